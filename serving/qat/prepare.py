"""Wrap a BN-folded model's convolutions and classifier in LSQ fake quantizers, per a precision plan.

Each wrapped layer quantizes its input (per tensor, asymmetric) and its weight (per output
channel; symmetric unless the plan says otherwise below 8 bits) like the deployed QDQ graph does;
the plan's per-component and per-layer bits apply with the layer names and component types of
`serving.quantize.graph`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import RtqError
from serving.qat.fake_quant import ActFakeQuant, Kernels, WeightFakeQuant
from serving.quantize.graph import Layer, component_of
from serving.quantize.lowbit import QuantizedWeight, WeightQuant
from serving.quantize.plan import PrecisionPlan


class QuantLayer(nn.Module):
    """A Conv2d (timm's Conv2dSame included) or Linear computing with fake-quantized input and weight."""

    def __init__(
        self,
        inner: nn.Conv2d | nn.Linear,
        name: str,
        component: str,
        target_bits: int,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.component = component
        self.target_bits = target_bits
        self.symmetric = symmetric  # below 8 bits; 8-bit grids are always symmetric (int8 storage)
        self.weight_q = WeightFakeQuant(inner.weight.shape[0])
        self.input_q = ActFakeQuant()

    @property
    def is_first(self) -> bool:
        return self.component == "stem"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_q(x)
        w = self.weight_q(self.inner.weight)
        m = self.inner
        if isinstance(m, nn.Linear):
            return F.linear(x, w, m.bias)
        from timm.layers.conv2d_same import Conv2dSame, conv2d_same

        if isinstance(m, Conv2dSame):
            return conv2d_same(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return m._conv_forward(x, w, m.bias)

    def quantized(self) -> tuple[QuantizedWeight, np.ndarray | None]:
        """This layer's integers, steps and float bias as the packed file stores them."""
        w = self.inner.weight
        q = self.weight_q.integers(w).cpu().numpy().astype(np.int8)
        step = self.weight_q.step().detach().float().cpu().numpy().astype(np.float32)
        zp = self.weight_q.zero_points().detach().cpu().numpy().astype(np.int8)
        qw = QuantizedWeight(q, step, zp, self.weight_q.spec)
        bias = self.inner.bias.detach().float().cpu().numpy() if self.inner.bias is not None else None
        return qw, bias

    def input_grid(self) -> tuple[float, float, int]:
        """The learned grid of this layer's input: offset, log step, bits."""
        q = self.input_q
        return float(q.offset.detach()), float(q.log_step.detach()), q.bits


def _layer_info(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    siblings = {n for n, _ in modules}
    out = []
    for name, m in modules:
        op = "Gemm" if isinstance(m, nn.Linear) else "Conv"
        group = getattr(m, "groups", 1)
        out.append((name, m, component_of(name, op, group, siblings)))
    return out


def _plan_quant(plan: PrecisionPlan, name: str, component: str) -> WeightQuant:
    return plan.quant_for(Layer(name, "Conv", f"{name}.weight", None, "", component, (1,)))


def prepare(model: nn.Module, plan: PrecisionPlan) -> list[QuantLayer]:
    """Replace every Conv2d/Linear in place by a QuantLayer; return them in module order."""
    if not plan.weights.per_channel:
        raise RtqError(
            f"plan {plan.name}: QAT trains per-channel weights (what packing stores); set weights.per_channel"
        )
    info = _layer_info(model)
    known = {n for n, _, _ in info}
    unknown = sorted(set(plan.layers) - known)
    if unknown:
        raise RtqError(
            f"plan {plan.name} names unknown layers {unknown[:3]}; the model's start {sorted(known)[:3]}"
        )
    wrapped = []
    for name, m, component in info:
        spec = _plan_quant(plan, name, component)
        q = QuantLayer(m, name, component, spec.bits, plan.weights.symmetric)
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, q)
        wrapped.append(q)
    return wrapped


@dataclass(frozen=True)
class Phase:
    """One step of progressive bit reduction: no layer goes below its plan's bits."""

    weight_bits: int
    act_bits: int
    epochs: int


def progressive_phases(
    plan: PrecisionPlan, schedule: Iterable[int], epochs: int, split: tuple[int, ...] = ()
) -> list[Phase]:
    """Split `epochs` over the schedule's bit widths (e.g. 8, 4, 2), dropping widths under the plan's.

    Evenly, the last phase (the plan's own bits: the one that ships) taking the remainder, or as
    `split` says (epochs per phase, summing to `epochs`).
    """
    lowest = min(plan.weights.bits, *plan.components.values(), *plan.layers.values())
    widths = sorted({b for b in schedule if b > lowest}, reverse=True) + [lowest]
    if split:
        if len(split) != len(widths) or sum(split) != epochs or min(split) < 1:
            raise RtqError(
                f"--phase-epochs {','.join(map(str, split))} must give each of the {len(widths)} phases "
                f"{widths} at least one epoch and sum to --epochs {epochs}"
            )
        counts = list(split)
    else:
        if epochs < len(widths):
            raise RtqError(f"{epochs} epochs cannot cover {len(widths)} progressive phases {widths}")
        base, extra = divmod(epochs, len(widths))
        counts = [base] * (len(widths) - 1) + [base + extra]
    # Activations come down with the weights: 8 bits while weights are above 4, then the plan's.
    acts = [max(plan.act_bits, 8 if bits > 4 else 4) for bits in widths]
    return [Phase(b, a, n) for b, a, n in zip(widths, acts, counts, strict=True)]


def set_bits(layers: list[QuantLayer], weight_floor: int, act_bits: int) -> None:
    """Move every quantizer to max(its plan bits, the phase's floor).

    Weights whose width changes restart from the MSE-optimal grid of their current values;
    activations keep their learned range on the finer or coarser grid. The first layer's input
    (the normalized image) stays at 8 bits: its integer form is the input itself.
    """
    for q in layers:
        bits = max(q.target_bits, weight_floor)
        symmetric = q.symmetric or bits == 8
        if bits != q.weight_q.bits or symmetric != q.weight_q.symmetric or not q.weight_q.initialized:
            q.weight_q.reset(q.inner.weight, bits, symmetric)
        q.input_q.set_bits(8 if q.is_first else act_bits)


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[QuantLayer], batches: Iterable[torch.Tensor]) -> int:
    """Record each layer's input range on FP weights and inputs (quantizers off); return images seen."""
    for q in layers:
        q.input_q.observing = True
        q.input_q.observed.zero_()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for q in layers:
            q.weight_q.enabled = False
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for q in layers:
            q.weight_q.enabled = True
            q.input_q.observing = False
        model.train(was_training)
    return seen


def use_kernels(layers: list[QuantLayer], kernels: Kernels) -> None:
    for q in layers:
        q.weight_q.kernels = q.input_q.kernels = kernels


def track_oscillations(layers: list[QuantLayer], momentum: float, threshold: float | None) -> int:
    return sum(q.weight_q.track(q.inner.weight, momentum, threshold) for q in layers if q.weight_q.bits < 8)
