"""`rtq train`: EfficientNetV2-B0 from scratch on imagenette with progressive learning."""
