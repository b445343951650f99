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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape)
        return self.session.run([self.output_name], {self.input_name: batch})[0]
