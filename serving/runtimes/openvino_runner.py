"""OpenVINO on CPU. FP32 variants pin f32 execution: this CPU would silently run bf16 otherwise."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import openvino as ov

from serving.errors import RtqError
from serving.runtimes.base import Runner, check_batch

# What each declared precision asks OpenVINO to compute in; int8 graphs keep their u8/i8 convs and
# run the rest in f32 so INT8 is compared with true FP32, not with bf16.
_HINTS = {"fp32": "f32", "fp16": "f16", "int8": "f32"}


def _read(core: ov.Core, path: Path) -> ov.Model:
    """IR as is; an ONNX file (packed low-bit QDQ) is unpacked to INT8 first."""
    if path.suffix != ".onnx":
        return core.read_model(str(path))
    from serving.quantize.packing import load_unpacked

    unpacked = load_unpacked(path)
    if unpacked is None:
        return core.read_model(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "unpacked.onnx"
        onnx.save(unpacked, str(plain))
        return core.read_model(str(plain))


class OpenVinoRunner(Runner):
    backend = "openvino"
    model_suffix = ".xml"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int = 2):
        super().__init__(model_path, precision, threads)
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        hint = _HINTS.get(precision, "f32")
        if hint == "f16" and "FP16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            hint = "f32"  # no native f16 math on this CPU: f16 weights, f32 compute
        config["INFERENCE_PRECISION_HINT"] = hint
        try:
            self.compiled = core.compile_model(_read(core, Path(model_path)), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ traces
            raise RtqError(
                f"OpenVINO cannot load {model_path}: {str(exc).strip().splitlines()[0][:300]}"
            ) from None
        self.request = self.compiled.create_infer_request()
        inp = self.compiled.input(0)
        self.input_shape = tuple(int(d.get_length()) for d in inp.get_partial_shape()[1:])

    @property
    def execution_precision(self) -> str:
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def conv_precisions(self) -> dict[str, int]:
        """Runtime precision of each compiled convolution, e.g. {"u8": 49}: proof, not a hint."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" in info and info["layerType"].astype(str) == "Convolution":
                p = info["runtimePrecision"].astype(str)
                counts[p] = counts.get(p, 0) + 1
        return counts

    def describe(self) -> dict:
        return super().describe() | {"conv_precisions": self.conv_precisions()}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape)
        self.request.infer({0: batch}, share_inputs=True)
        return self.request.get_output_tensor(0).data.copy()
