"""INT8 for ONNX Runtime: static QDQ, per-channel symmetric weights, MinMax activation ranges."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process


class _ArrayReader(CalibrationDataReader):
    def __init__(self, input_name: str, inputs: np.ndarray):
        self._batches = iter([{input_name: inputs[i : i + 1]} for i in range(len(inputs))])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_int8(
    src: Path, dst: Path, calibration: np.ndarray, input_name: str = "input", symmetric: bool = False
) -> Path:
    """symmetric=True gives the form TensorRT's explicit quantization takes: s8 activations with
    zero-point 0 and float biases (an int32 bias DQ is not fused there)."""
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False} if symmetric else {}
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        quantize_static(
            str(prepped),
            str(dst),
            _ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra,
        )
    return dst
