"""ONNX Runtime on CPU: FP32, FP16 and INT8 QDQ graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import RtqError
from serving.runtimes.base import Runner, check_batch


def _loadable(path: Path) -> str | bytes:
    """Packed INT4/INT2 weights become INT8 at load, so they run on the INT8 kernels."""
    from serving.quantize.packing import load_unpacked

    unpacked = load_unpacked(path)
    return str(path) if unpacked is None else unpacked.SerializeToString()


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"
    model_suffix = ".onnx"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int = 2):
        super().__init__(model_path, precision, threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                _loadable(Path(model_path)), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types for bad files
            raise RtqError(f"ONNX Runtime cannot load {model_path}: {str(exc)[:300]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_shape = tuple(int(d) for d in inp.shape[1:])

    @property
    def execution_precision(self) -> str:
        return self.declared_precision

    def conv_kernels(self) -> dict[str, int]:
        """Convolutions after ORT's graph fusions, e.g. {"int8": 49}: a QDQ conv ORT could not fuse
        runs in float and counts as "float" (proof of what runs, as OpenVINO's conv_precisions)."""
        import tempfile

        import onnx

        opts = ort.SessionOptions()
        # Extended: the QDQ fusions without the CPU-layout rewrite (NCHWc) that renames convolutions.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.log_severity_level = 3
        with tempfile.TemporaryDirectory() as tmp:
            opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(_loadable(self.model_path), opts, providers=["CPUExecutionProvider"])
            nodes = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node
        counts: dict[str, int] = {}
        for n in nodes:
            kind = {"QLinearConv": "int8", "ConvInteger": "int8", "Conv": "float", "FusedConv": "float"}.get(
                n.op_type
            )
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def describe(self) -> dict:
        return super().describe() | {"conv_kernels": self.conv_kernels()}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape)
        return self.session.run([self.output_name], {self.input_name: batch})[0]
