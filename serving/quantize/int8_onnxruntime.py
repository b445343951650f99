"""INT8 for ONNX Runtime: static QDQ, per-channel symmetric weights, calibrated activation ranges.

Where activations are unbounded (SiLU/sigmoid gates, as in EfficientNetV2) the range cuts the
0.01% most extreme values (ORT's percentile calibration) instead of taking the calibration set's
single most extreme value: on our trained V2-B0 (88.24% FP32, imagenette val, 3,791 images)
INT8 went from -0.70 points with the mean of per-image extremes (the earlier rule; -0.24 on the
86.7% model) to -0.08 (1,000 calibration images, benchmarks/results/variants-20261207-122331.md;
README lists the other settings tried). Where every activation is clipped (ReLU6, as in Lite0) the
extremes are the real bounds and cutting them clips: averaging them cost Lite0 0.6 points on
imagenet-val.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

# Percent of each tensor's calibration values inside its range: 99.99 cuts 0.005% off each end.
PERCENTILE = 99.99
# Images per calibration pass: ORT's histogram calibration holds every intermediate tensor of a
# pass in memory (13.7 GB for 300 V2-B0 images in one pass, 3.5 GB in passes of 50).
CHUNK_IMAGES = 50


class _ArrayReader(CalibrationDataReader):
    """One image at a time; `set_range` lets ORT calibrate in passes (its CalibStridedMinMax)."""

    def __init__(self, input_name: str, inputs: np.ndarray, chunk: int = CHUNK_IMAGES):
        self._name, self._inputs, self._chunk = input_name, inputs, chunk
        self.set_range(0, len(inputs))

    def __len__(self) -> int:
        # Rounded up to whole passes, as ORT requires; the last pass is the short remainder.
        return -(-len(self._inputs) // self._chunk) * self._chunk

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(range(start_index, min(end_index, len(self._inputs))))

    def get_next(self) -> dict | None:
        i = next(self._next, None)
        return None if i is None else {self._name: self._inputs[i : i + 1]}


def quantize_int8(
    src: Path, dst: Path, calibration: np.ndarray, input_name: str = "input", symmetric: bool = False
) -> Path:
    """symmetric=True gives the form TensorRT's explicit quantization takes: s8 activations with
    zero-point 0 and float biases (an int32 bias DQ is not fused there)."""
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} if symmetric else {}
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        method = CalibrationMethod.MinMax
        if has_unbounded_activations(onnx.load(str(prepped), load_external_data=False)):
            method = CalibrationMethod.Percentile
            extra |= {"CalibPercentile": PERCENTILE, "CalibStridedMinMax": CHUNK_IMAGES}
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints each pass
            quantize_static(
                str(prepped),
                str(dst),
                _ArrayReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options=extra,
            )
    return dst


def has_unbounded_activations(model: onnx.ModelProto) -> bool:
    """True when the graph gates with sigmoids (SiLU, squeeze-excitation): its activation tails are
    long, so the few most extreme values say little about the rest."""
    return any(n.op_type in ("Sigmoid", "HardSigmoid", "Swish") for n in model.graph.node)
