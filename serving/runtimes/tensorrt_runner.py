"""TensorRT engines (`.plan`) on an NVIDIA GPU, with PyTorch CUDA tensors as the I/O buffers.

PyTorch (a CUDA build in our pins) provides device memory and the stream, so the runner needs no
pycuda or cuda-python. Before deserializing, the plan's build record is checked against this
machine's TensorRT version and GPU: an engine from another GPU or TensorRT fails with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.errors import RtqError
from serving.export.tensorrt_export import check_compatible, record_path, require_tensorrt_gpu
from serving.runtimes.base import Runner, check_batch


class TensorRtRunner(Runner):
    backend = "tensorrt"
    model_suffix = ".plan"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int = 1):
        super().__init__(model_path, precision, threads)
        rec_path = record_path(self.model_path)
        if not rec_path.is_file():
            raise RtqError(
                f"{rec_path.name} (the engine's build record) is missing beside {self.model_path.name}: "
                "without it the engine's GPU and TensorRT version are unknown; rebuild the engine"
            )
        self.record = json.loads(rec_path.read_text())
        trt, device = require_tensorrt_gpu()  # the hardware boundary: skips/raises here without a GPU
        check_compatible(self.record, trt.__version__, device)
        import torch

        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise RtqError(
                f"TensorRT {trt.__version__} could not deserialize {self.model_path} (corrupt file, or built "
                "by an incompatible TensorRT); rebuild it on this machine"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RtqError(f"{self.model_path}: expected one input and one output, got {inputs} / {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for n in names:
            if trt.nptype(self.engine.get_tensor_dtype(n)) != np.float32:
                raise RtqError(f"{self.model_path}: tensor {n} is not float32; our engines keep FP32 I/O")
        self.input_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name)[1:])
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.stream = torch.cuda.Stream()

    @property
    def execution_precision(self) -> str:
        return self.record.get("precision", self.declared_precision)

    def describe(self) -> dict:
        return super().describe() | {
            "device": self.record.get("gpu_name"),
            "tensorrt_version": self.record.get("tensorrt_version"),
            "profiles": self.record.get("profiles"),
            "builder_flags": self.record.get("builder_flags"),
        }

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape)
        torch = self._torch
        outs = []
        for i in range(0, len(batch), self.max_batch):  # beyond the profile's max: split
            chunk = batch[i : i + self.max_batch]
            with torch.cuda.stream(self.stream):
                x = torch.from_numpy(chunk).to("cuda", non_blocking=False)
                self.context.set_input_shape(self.input_name, tuple(x.shape))
                y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda")
                self.context.set_tensor_address(self.input_name, x.data_ptr())
                self.context.set_tensor_address(self.output_name, y.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RtqError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            self.stream.synchronize()
            outs.append(y.cpu().numpy())
        return np.concatenate(outs)

    def close(self) -> None:
        self.context = None
        self.engine = None
