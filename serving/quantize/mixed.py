"""Mixed-precision bit allocation under a file-size budget, from measured per-layer sensitivity.

Method: exact multiple-choice knapsack by dynamic programming over the file size (1 KiB units).
Each layer picks one width; the cost of a choice is its measured KL divergence from FP32 when
that layer alone is quantized (8 bits counts as lossless), assumed additive across layers. A
Hessian trace would need second derivatives we cannot afford per layer on 2 cores; the measured
KL already includes each layer's real effect on the output, and with ~50 layers and 3 widths the
DP is exact and instant, so no greedy approximation is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.errors import RtqError
from serving.quantize.graph import Layer
from serving.quantize.plan import STORAGE_BITS, PrecisionPlan
from serving.quantize.sensitivity import Sensitivity

UNIT = 1024  # bytes per DP cell


@dataclass(frozen=True)
class Allocation:
    bits: dict[str, int]
    estimated_bytes: int
    budget_bytes: int
    predicted_kl: float


def layer_bytes(layer: Layer, bits: int) -> int:
    """Packed weights plus per-channel fp32 scale and zero point in the weight's own type."""
    channels = layer.shape[0]
    return math.ceil(layer.params * STORAGE_BITS[bits] / 8) + channels * 4 + math.ceil(channels * bits / 8)


def allocate(
    layers: list[Layer],
    sens: list[Sensitivity],
    fp32_bytes: int,
    target_ratio: float,
    widths: tuple[int, ...] = (2, 4, 8),
    fixed: dict[str, int] | None = None,
    overhead_bytes: int | None = None,
) -> Allocation:
    """Choose per-layer widths so the estimated file is fp32_bytes / target_ratio or smaller.

    `overhead_bytes`: everything in the quantized file but the weights, their scales and zero points
    (int32 biases with their scales, activation Q/DQ, graph), best measured on a real INT8 QDQ file
    with `qdq_overhead`; without it the FP32 file's non-weight bytes stand in, which undercounts
    int32 biases and activation ranges (about 5% of a Lite0 W4 file).
    """
    if target_ratio <= 1:
        raise RtqError(f"target compression ratio must exceed 1, got {target_ratio}")
    fixed = fixed or {}
    kl = {(s.layer, s.bits): s.kl for s in sens if s.kind == "weight"}
    if overhead_bytes is None:
        overhead_bytes = fp32_bytes - 4 * sum(layer.params for layer in layers)
    other_bytes = overhead_bytes
    budget = int(fp32_bytes / target_ratio)
    room = budget - other_bytes
    options: list[list[tuple[int, int, float]]] = []  # per layer: (bits, cost units, kl)
    for layer in layers:
        choices = [fixed[layer.name]] if layer.name in fixed else list(widths)
        opts = []
        for b in choices:
            if b != 8 and (layer.name, b) not in kl:
                raise RtqError(f"no {b}-bit sensitivity measured for {layer.name}; rerun sensitivity")
            opts.append((b, math.ceil(layer_bytes(layer, b) / UNIT), 0.0 if b == 8 else kl[(layer.name, b)]))
        options.append(opts)
    cap = room // UNIT
    smallest = sum(min(o[1] for o in opts) for opts in options)
    if cap < smallest:
        best = fp32_bytes / (other_bytes + smallest * UNIT)
        raise RtqError(
            f"a {target_ratio:.1f}x smaller file cannot be met with widths {list(widths)}: "
            f"at most about {best:.1f}x is reachable"
        )
    # dp[c] = (least total KL, choices) using at most c units so far.
    inf = float("inf")
    dp: list[float] = [0.0] * (cap + 1)
    picks: list[list[int]] = []
    for opts in options:
        new = [inf] * (cap + 1)
        pick = [-1] * (cap + 1)
        for c in range(cap + 1):
            for j, (_, units, cost) in enumerate(opts):
                if units <= c and dp[c - units] + cost < new[c]:
                    new[c] = dp[c - units] + cost
                    pick[c] = j
        dp = new
        picks.append(pick)
    c = min(range(cap + 1), key=lambda i: (dp[i], i))
    total_kl = dp[c]
    bits: dict[str, int] = {}
    for layer, opts, pick in zip(reversed(layers), reversed(options), reversed(picks), strict=True):
        b, units, _ = opts[pick[c]]
        bits[layer.name] = b
        c -= units
    est = other_bytes + sum(layer_bytes(layer, bits[layer.name]) for layer in layers)
    return Allocation(dict(reversed(list(bits.items()))), est, budget, round(total_kl, 5))


def qdq_overhead(int8_qdq_bytes: int, layers: list[Layer]) -> int:
    """Non-weight bytes of a real INT8 QDQ file of the same graph: the part no width choice changes."""
    return int8_qdq_bytes - sum(layer_bytes(layer, 8) for layer in layers)


def mixed_plan(
    name: str,
    allocation: Allocation,
    method: str = "adaround",
    act_bits: int = 8,
    calibration_images: int = 256,
    description: str = "",
    symmetric: bool = True,
) -> PrecisionPlan:
    from serving.quantize.lowbit import WeightQuant

    # 8-bit layers stay symmetric whatever this says (PrecisionPlan.quant_for): int8 storage.
    return PrecisionPlan(
        name=name, method=method, weights=WeightQuant(8, symmetric=symmetric), act_bits=act_bits,
        layers=dict(allocation.bits), calibration_images=calibration_images,
        description=description or f"knapsack allocation for <= {allocation.budget_bytes} bytes",
    )  # fmt: skip
