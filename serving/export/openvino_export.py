"""ONNX -> OpenVINO IR (model.xml + model.bin) with a dynamic batch dimension."""

from __future__ import annotations

from pathlib import Path

import openvino as ov


def to_ir_model(onnx_path: Path) -> ov.Model:
    model = ov.convert_model(str(onnx_path))
    shape = model.input(0).get_partial_shape()
    shape[0] = -1
    model.reshape({model.input(0): shape})
    return model


def save_ir(model: ov.Model, xml_path: Path, fp16_weights: bool = False) -> Path:
    """`compress_to_fp16` defaults to True in OpenVINO: FP32 variants must say False."""
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=fp16_weights)
    return xml_path
