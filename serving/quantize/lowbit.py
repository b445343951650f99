"""Uniform quantizers for weights (2-8 bits, per-channel or per-tensor, symmetric or not) and activations.

Hand-written because no library here quantizes conv weights below 4 bits per channel with the
scale search and integer outputs that packing needs (NNCF's INT4 covers MatMul only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.errors import RtqError

WEIGHT_BITS = (2, 3, 4, 6, 8)
ACT_BITS = (4, 8)
# Clipping ratios tried per channel: at 4 bits and below, clipping outliers beats max scaling.
_CLIP_GRID = np.linspace(0.35, 1.0, 27)
# Output-error clipping goes lower: at 2 bits the classifier's best clips sit near 0.3 of the max.
_OUTPUT_CLIP_GRID = np.linspace(0.2, 1.0, 33)


@dataclass(frozen=True)
class WeightQuant:
    bits: int = 8
    per_channel: bool = True
    symmetric: bool = True
    search_scale: bool = True  # MSE-optimal clipping per channel, else max-abs

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise RtqError(f"weight bits {self.bits} not supported; expected one of {list(WEIGHT_BITS)}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass(frozen=True)
class QuantizedWeight:
    q: np.ndarray  # integers (int8 storage) in [qmin, qmax]
    scale: np.ndarray  # (C_out,) or scalar, float32
    zero_point: np.ndarray  # same shape as scale, int8 storage
    spec: WeightQuant

    def dequantize(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.q.ndim - 1) if self.scale.ndim else ()
        s = self.scale.reshape(shape)
        z = self.zero_point.reshape(shape).astype(np.float32)
        return ((self.q.astype(np.float32) - z) * s).astype(np.float32)


def _channels(w: np.ndarray, per_channel: bool) -> np.ndarray:
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _scale_zp(lo: np.ndarray, hi: np.ndarray, spec: WeightQuant) -> tuple[np.ndarray, np.ndarray]:
    if spec.symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / spec.qmax, 1e-12)
        return scale.astype(np.float32), np.zeros_like(scale, dtype=np.int8)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = np.maximum((hi - lo) / (spec.qmax - spec.qmin), 1e-12).astype(np.float32)
    zp = np.clip(np.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
    # Zero points live in int8 storage: asymmetric 8-bit (0..255) cannot, so it is refused here.
    if spec.qmax > 127:
        raise RtqError("asymmetric 8-bit weights do not fit int8 storage; use symmetric at 8 bits")
    return scale, zp.astype(np.int8)


def _round(x2d: np.ndarray, scale: np.ndarray, zp: np.ndarray, spec: WeightQuant) -> np.ndarray:
    return np.clip(np.round(x2d / scale[:, None]) + zp[:, None], spec.qmin, spec.qmax)


def _output_error(e: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Per output channel e H e^T: the layer's mean squared output error for weight error e."""
    groups, d = moment.shape[0], moment.shape[-1]
    eg = e.reshape(groups, -1, d)
    return (np.matmul(eg, moment) * eg).sum(axis=-1).reshape(-1)


def quantize_weight(w: np.ndarray, spec: WeightQuant, moment: np.ndarray | None = None) -> QuantizedWeight:
    """Round-to-nearest on a per-channel (axis 0) or per-tensor grid, clipping chosen by MSE.

    With `moment` (per group, E[x x^T] of the layer's input as im2col rows, shape (G, d, d)),
    each channel's clipping minimizes its output error instead of its weight error: at 2 bits
    the two pick different clips, and the output is what the network sees.
    """
    x = _channels(w.astype(np.float32), spec.per_channel)
    lo, hi = x.min(axis=1), x.max(axis=1)
    best_scale, best_zp = _scale_zp(lo, hi, spec)
    if moment is not None and not spec.per_channel:
        raise RtqError("output-error clipping is per channel; per-tensor scales use weight MSE")
    if spec.search_scale:
        best_err = np.full(x.shape[0], np.inf)
        for r in _CLIP_GRID if moment is None else _OUTPUT_CLIP_GRID:
            scale, zp = _scale_zp(lo * r, hi * r, spec)
            q = _round(x, scale, zp, spec)
            e = (q - zp[:, None]) * scale[:, None] - x
            err = (e**2).sum(axis=1) if moment is None else _output_error(e, moment)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zp = np.where(better, zp, best_zp)
    q = _round(x, best_scale, best_zp, spec).astype(np.int8).reshape(w.shape)
    if not spec.per_channel:
        best_scale, best_zp = best_scale.reshape(()), best_zp.reshape(())
    return QuantizedWeight(q, best_scale.astype(np.float32), best_zp.astype(np.int8), spec)


def activation_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric unsigned per-tensor (scale, zero point) covering [lo, hi] and 0."""
    if bits not in ACT_BITS:
        raise RtqError(f"activation bits {bits} not supported; expected one of {list(ACT_BITS)}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-8)
    return float(scale), int(np.clip(round(-lo / scale), 0, qmax))
