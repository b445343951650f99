"""How each backend turns the FP32 export into its variant files: one recipe per backend.

A new backend adds one `Recipe` here (its own export/quantize code lives in serving/export and
serving/quantize); `rtq build`, the spec checker and the manifest all read from this table.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from serving.repository.weight_stats import WeightStats, onnx_weight_stats, openvino_weight_stats

BASE_PRECISIONS = ("fp32", "fp16", "int8")


class Sources(Protocol):
    """What every recipe may draw on (built lazily, shared by all variants of one model)."""

    calibration: np.ndarray | None
    loaded: Any  # serving.models.zoo.LoadedModel: converters that start from PyTorch (litert)
    workdir: Path  # scratch folder shared by the variants of one model

    def onnx_fp32(self) -> Path: ...

    def ir_fp32(self) -> Path: ...

    def lowbit(self, plan: str) -> Path: ...  # packed QDQ ONNX of a precision plan


@dataclass(frozen=True)
class Recipe:
    model_file: str
    precisions: tuple[str, ...]
    make: Callable[[Sources, str, Path], None]  # (sources, precision, destination file)
    fp32_file: Callable[[Sources], Path]  # the FP32 file of this backend, for compression ratios
    weight_stats: Callable[[Path], WeightStats]
    int8_method: str
    extra_files: Callable[[Path], list[Path]] = lambda p: []
    lowbit: bool = False  # serves a precision plan's packed QDQ ONNX (unpacked to INT8 at load)

    def file_for(self, precision: str) -> str:
        return self.model_file if precision in BASE_PRECISIONS else "model.onnx"

    def stats(self, path: Path) -> WeightStats:
        return onnx_weight_stats(path) if path.suffix == ".onnx" else self.weight_stats(path)


def _onnxruntime(src: Sources, precision: str, dst: Path) -> None:
    if precision not in BASE_PRECISIONS:
        shutil.copyfile(src.lowbit(precision), dst)
    elif precision == "fp32":
        shutil.copyfile(src.onnx_fp32(), dst)
    elif precision == "fp16":
        from serving.export.onnx_export import convert_fp16

        convert_fp16(src.onnx_fp32(), dst)
    else:
        from serving.export.onnx_export import INPUT_NAME
        from serving.quantize.int8_onnxruntime import quantize_int8

        quantize_int8(src.onnx_fp32(), dst, src.calibration, INPUT_NAME)


def _openvino(src: Sources, precision: str, dst: Path) -> None:
    from serving.export.openvino_export import save_ir, to_ir_model

    if precision not in BASE_PRECISIONS:
        shutil.copyfile(src.lowbit(precision), dst)
    elif precision == "int8":
        from serving.quantize.int8_openvino import quantize_int8

        save_ir(quantize_int8(to_ir_model(src.onnx_fp32()), src.calibration), dst)
    else:
        save_ir(to_ir_model(src.onnx_fp32()), dst, fp16_weights=precision == "fp16")


def _litert_fp32(src: Sources) -> Path:
    from serving.export.litert_export import export_float_tflite

    # litert-torch converts the PyTorch module itself (NHWC input), not the ONNX export; once per model.
    path = src.workdir / "fp32.tflite"
    return path if path.is_file() else export_float_tflite(src.loaded, path)


def _litert(src: Sources, precision: str, dst: Path) -> None:
    from serving.export.litert_export import build_litert

    build_litert(src.loaded, precision, dst, src.calibration, _litert_fp32(src))


def _tensorrt(src: Sources, precision: str, dst: Path) -> None:
    from serving.export.tensorrt_export import build_engine_for_recipe, require_tensorrt_gpu

    require_tensorrt_gpu()  # a clear RtqError before any export work where TensorRT or the GPU is missing
    build_engine_for_recipe(src.onnx_fp32(), precision, dst, src.calibration)


def _tflite_stats(path: Path) -> WeightStats:
    from serving.export.litert_export import tflite_weight_stats

    return tflite_weight_stats(path)


def _plan_stats(path: Path) -> WeightStats:
    from serving.export.tensorrt_export import plan_weight_stats

    return plan_weight_stats(path)


RECIPES: dict[str, Recipe] = {
    "onnxruntime": Recipe(
        model_file="model.onnx",
        precisions=("fp32", "fp16", "int8"),
        make=_onnxruntime,
        fp32_file=lambda src: src.onnx_fp32(),
        weight_stats=onnx_weight_stats,
        int8_method="onnxruntime.quantization.quantize_static: QDQ, per-channel s8 weights, "
        "u8 activations; ranges cut at the 99.99th percentile where activations are unbounded "
        "(sigmoid gates), else MinMax",
        lowbit=True,
    ),
    "openvino": Recipe(
        model_file="model.xml",
        precisions=("fp32", "fp16", "int8"),
        make=_openvino,
        fp32_file=lambda src: src.ir_fp32(),
        weight_stats=openvino_weight_stats,
        int8_method="nncf.quantize: preset mixed, fast bias correction",
        extra_files=lambda p: [p.with_suffix(".bin")] if p.suffix == ".xml" else [],
        lowbit=True,
    ),
    "litert": Recipe(
        model_file="model.tflite",
        precisions=("fp32", "int8"),
        make=_litert,
        fp32_file=_litert_fp32,
        weight_stats=_tflite_stats,
        int8_method="litert-torch FP32 .tflite, then ai-edge-quantizer static_wi8_ai8: per-channel s8 "
        "weights, s8 activations, int8 input (pixel-128) and output; Edge TPU-ready",
    ),
    "tensorrt": Recipe(
        model_file="model.plan",
        precisions=("fp32", "fp16", "int8"),
        make=_tensorrt,
        fp32_file=lambda src: src.onnx_fp32(),
        weight_stats=_plan_stats,
        int8_method="explicit quantization: ORT QDQ with symmetric s8 weights and activations, "
        "built by the TensorRT builder with the INT8 flag",
    ),
}


def file_bytes(backend: str, model_path: Path) -> int:
    return sum(f.stat().st_size for f in [model_path, *RECIPES[backend].extra_files(model_path)])
