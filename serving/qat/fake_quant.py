"""LSQ fake quantizers for QAT: learnable step sizes for weights and activations, oscillation freezing.

Hand-written because the frameworks' QAT (torch.ao, NNCF) quantize at 8 bits with fixed observers
or no per-weight freezing; below 4 bits the step size has to be learned (LSQ, Esser et al. 2020)
and weights that flip between two grid points have to be pinned (Nagel et al. 2022, "Overcoming
Oscillations in Quantization-Aware Training").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from serving.quantize.lowbit import WeightQuant, quantize_weight


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Gradient times `scale` (LSQ: keeps step-size updates on the weights' footing). The value is x
    # to the bit (y - y is exactly 0), so training rounds w / s as the exported integers do.
    y = x * scale
    return x.detach() + (y - y.detach())


def act_fake_quant(x: torch.Tensor, s: torch.Tensor, beta: torch.Tensor, qmax: int) -> torch.Tensor:
    """LSQ+ on a tensor: s * round(clamp((x - beta) / s, 0, qmax)) + beta, straight-through."""
    q = _round_ste(torch.clamp((x - beta) / s, 0, qmax))
    return q * s + beta


def weight_fake_quant(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    frozen: torch.Tensor,
    frozen_int: torch.Tensor,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """(q - z) * s with q = round(w / s) + z on the grid (pinned where `frozen`); w is C x K, s and z C x 1.

    Rounded straight-through: LSQ's gradients; z, an integer, learns only where it clips.
    """
    q = torch.where(frozen, frozen_int, weight_ints(w, s, z, qmin, qmax, _round_ste))
    return (q - z) * s


def weight_ints(
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qmin: int,
    qmax: int,
    rnd: Callable[[torch.Tensor], torch.Tensor] = torch.round,
) -> torch.Tensor:
    """round(w / s) + z clipped to [qmin, qmax]: the grid training rounds to and the file stores.

    Clipped around z before rounding (equal for an integer z, and it lets the gradient through only
    inside the grid); w / s + z first would round differently near half-steps.
    """
    return rnd(torch.maximum(torch.minimum(w / s, qmax - z), qmin - z)) + z


@dataclass(frozen=True)
class Kernels:
    """The fake-quantization functions every quantizer of a model calls: eager, or torch.compile'd."""

    act: Callable[..., torch.Tensor] = act_fake_quant
    weight: Callable[..., torch.Tensor] = weight_fake_quant
    name: str = "eager"


EAGER = Kernels()
RECOMPILE_LIMIT = 64


def compiled_kernels(device: str = "cpu", log: Callable[[str], None] = print) -> Kernels:
    """The kernels fused by torch.compile, else (no C++ compiler, any compile error) the eager ones.

    Eager, each activation quantizer is ~8 passes over its tensor forward and more backward, and each
    weight quantizer ~30 small ops: together they doubled the step time of an EfficientNetV2-B0 QAT
    step here. Fused, the step is faster (figures in README). A probe checks, before training starts,
    that the compiled kernels compute exactly the eager values (the integers that ship depend on it).
    """
    # V2-B0's quantizers need 8-11 graphs per kernel (grad on/off, ranks 2 and 4, 1x1 maps, inputs
    # with and without grad): at dynamo's default limit of 8 the rest ran eager, unfused.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    try:
        kernels = Kernels(
            torch.compile(act_fake_quant, dynamic=True),
            torch.compile(weight_fake_quant, dynamic=True),
            "compiled",
        )
        _probe(kernels, device)
    except Exception as exc:  # inductor raises many types (no compiler, unsupported op, mismatch)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"note: fake quantizers run eager (torch.compile failed: {first[:160]}); --no-compile skips it")
        return EAGER
    return kernels


def _probe(kernels: Kernels, device: str) -> None:
    """Compile both kernels for training and evaluation; raise if one differs from eager."""
    g = torch.Generator().manual_seed(0)

    def leaf(t: torch.Tensor) -> torch.Tensor:  # as in training: every input has a gradient
        return t.to(device).requires_grad_(True)

    frozen = torch.zeros(3, 6, dtype=torch.bool)
    frozen[0, 0] = True
    calls = {
        "act_fake_quant": (
            kernels.act,
            act_fake_quant,
            (
                leaf(torch.randn(2, 3, 5, 7, generator=g) * 3),
                leaf(torch.tensor(0.3)),
                leaf(torch.tensor(-0.4)),
                15,
            ),
        ),
        "weight_fake_quant": (
            kernels.weight,
            weight_fake_quant,
            (
                leaf(torch.randn(3, 6, generator=g)),
                leaf(torch.full((3, 1), 0.4)),
                leaf(torch.tensor([[0.0], [1.0], [-1.0]])),
                frozen.to(device),
                torch.full((3, 6), 2.0, device=device),
                -8,
                7,
            ),
        ),
    }
    for training in (True, False):  # training and evaluation are separate compiled graphs
        with torch.set_grad_enabled(training):
            for name, (kernel, eager, args) in calls.items():
                want, got = eager(*args), kernel(*args)
                if not torch.equal(want, got):
                    raise RuntimeError(f"compiled {name} differs from eager by {(want - got).abs().max()}")
                if training:
                    got.sum().backward()


class WeightFakeQuant(nn.Module):
    """Per-output-channel weights on a learned grid: w_hat = (clamp(round(w / s) + z) - z) * s.

    Symmetric: z = 0 on the signed grid (2 bits: -2..1). Asymmetric: an integer zero point per
    channel on the unsigned grid (0..3), learned through a rounded parameter, so a channel can put
    its two-level side where its weights are (symmetric 2-bit has one positive level). Both are the
    grids the packed ONNX file stores, so the integers trained here are the integers that ship.
    """

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.bits = 8
        self.symmetric = True
        self.enabled = True  # off during calibration: the ranges are those of the FP model
        self.kernels = EAGER
        self.log_step = nn.Parameter(torch.zeros(out_channels))
        # Continuous; its rounding is the zero point (a straight-through estimator moves it).
        self.zero_point = nn.Parameter(torch.zeros(out_channels))
        # Oscillation tracking, per weight (buffers so they follow the module across devices).
        self.register_buffer("prev_int", torch.zeros(0))
        self.register_buffer("prev_dir", torch.zeros(0))
        self.register_buffer("freq", torch.zeros(0))
        self.register_buffer("ema_int", torch.zeros(0))
        self.register_buffer("frozen", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("frozen_int", torch.zeros(0))

    @property
    def spec(self) -> WeightQuant:
        return WeightQuant(self.bits, per_channel=True, symmetric=self.symmetric, search_scale=False)

    @property
    def qmin(self) -> int:
        return self.spec.qmin

    @property
    def qmax(self) -> int:
        return self.spec.qmax

    def step(self) -> torch.Tensor:
        # A log-parametrized step cannot go negative or to zero under a large update.
        return self.log_step.exp()

    def zero_points(self) -> torch.Tensor:
        """Integer zero points per channel (0 when symmetric), straight-through for their gradient."""
        if self.symmetric:
            return torch.zeros_like(self.zero_point)
        return _round_ste(torch.clamp(self.zero_point, self.qmin, self.qmax))

    @torch.no_grad()
    def reset(self, weight: torch.Tensor, bits: int, symmetric: bool = True) -> None:
        """Start at `bits` from the MSE-optimal per-channel clipping of round-to-nearest (lowbit.py)."""
        self.bits, self.symmetric = bits, symmetric
        qw = quantize_weight(weight.detach().float().cpu().numpy(), WeightQuant(bits, True, symmetric, True))
        step = torch.as_tensor(qw.scale, dtype=torch.float32, device=weight.device).clamp_min(1e-12)
        self.log_step.copy_(step.log())
        self.zero_point.copy_(torch.as_tensor(qw.zero_point.astype("float32"), device=weight.device))
        ints = self._ints(weight)
        self.prev_int = ints.clone()
        self.prev_dir = torch.zeros_like(ints)
        self.freq = torch.zeros_like(ints)
        self.ema_int = ints.clone()
        self.frozen = torch.zeros_like(ints, dtype=torch.bool)
        self.frozen_int = torch.zeros_like(ints)

    def _shape(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.dim() - 1)

    def _ints(self, weight: torch.Tensor) -> torch.Tensor:
        shape = self._shape(weight)
        return weight_ints(
            weight, self.step().view(shape), self.zero_points().view(shape), self.qmin, self.qmax
        )

    @property
    def initialized(self) -> bool:
        return self.prev_int.numel() > 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        g = 1.0 / math.sqrt(weight[0].numel() * self.qmax)
        s = _grad_scale(self.step(), g).view(-1, 1)
        z = _grad_scale(self.zero_points(), g).view(-1, 1)
        frozen, pinned = self.frozen, self.frozen_int
        if frozen.shape != weight.shape:  # a student rebuilt from its integers file: nothing pinned
            frozen, pinned = torch.zeros_like(weight, dtype=torch.bool), torch.zeros_like(weight)
        c = weight.shape[0]
        # C x K: one compiled graph serves every layer (4-D shapes with 1s in them would each recompile).
        out = self.kernels.weight(
            weight.reshape(c, -1), s, z, frozen.view(c, -1), pinned.view(c, -1), self.qmin, self.qmax
        )
        return out.view(weight.shape)

    def integers(self, weight: torch.Tensor) -> torch.Tensor:
        """The integers the deployed file stores (frozen weights at their pinned value)."""
        with torch.no_grad():
            q = self._ints(weight)
            return torch.where(self.frozen, self.frozen_int, q) if self.frozen.numel() else q

    @torch.no_grad()
    def track(self, weight: torch.Tensor, momentum: float, threshold: float | None) -> int:
        """After an optimizer step: update oscillation frequencies; freeze weights above threshold.

        An oscillation is a change of the integer in the direction opposite to its last change.
        Returns how many weights are frozen.
        """
        if self.prev_int.shape != weight.shape:
            return 0
        ints = self._ints(weight)
        delta = torch.sign(ints - self.prev_int)
        flipped = (delta != 0) & (self.prev_dir != 0) & (delta != self.prev_dir)
        self.freq.mul_(momentum).add_(flipped.float(), alpha=1 - momentum)
        self.ema_int.mul_(momentum).add_(ints, alpha=1 - momentum)
        self.prev_dir = torch.where(delta != 0, delta, self.prev_dir)
        self.prev_int = ints
        if threshold is not None:
            new = (self.freq > threshold) & ~self.frozen
            if bool(new.any()):
                pinned = torch.clamp(torch.round(self.ema_int), self.qmin, self.qmax)
                self.frozen_int = torch.where(new, pinned, self.frozen_int)
                self.frozen |= new
        return int(self.frozen.sum())


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric activations with a learned step and offset (LSQ+, Bhalgat et al. 2020).

    Conv inputs here are SiLU outputs (down to -0.28) or linear projections (signed), so a learned
    offset keeps the grid on the values actually seen instead of wasting half of it on negatives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bits = 8
        self.enabled = True
        self.kernels = EAGER
        self.log_step = nn.Parameter(torch.zeros(()))
        self.offset = nn.Parameter(torch.zeros(()))
        # Sums of per-batch minima and maxima and the batch count: the mean of per-batch extremes
        # ignores the rare outlier that one global min/max would stretch a 4-bit grid over.
        self.register_buffer("observed", torch.zeros(3))
        self.observing = False
        self.initialized = False

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """First call: start from the calibrated range. Later: keep the learned range, refine the grid."""
        if not self.initialized:
            self.init_from_range(bits)
        elif bits != self.bits:
            old = self.qmax
            self.bits = bits
            self.log_step.add_(math.log(old / self.qmax))

    @torch.no_grad()
    def init_from_range(self, bits: int) -> None:
        lo_sum, hi_sum, n = (float(v) for v in self.observed)
        if n == 0:
            raise RuntimeError("activation quantizer saw no data during calibration")
        lo, hi = lo_sum / n, hi_sum / n
        self.bits = bits
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        self.log_step.fill_(math.log(max((hi - lo) / self.qmax, 1e-8)))
        self.offset.fill_(lo)
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                self.observed += torch.stack([lo, hi, torch.ones_like(lo)])
            return x
        if not self.enabled:
            return x
        g = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        s = _grad_scale(self.log_step.exp(), g)
        beta = _grad_scale(self.offset, g)
        return self.kernels.act(x, s, beta, self.qmax)
