"""Quantization-aware training with distillation (`rtq qat`): LSQ fake quantizers, BN folding, export."""
