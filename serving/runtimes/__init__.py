"""Backends behind one interface; each lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
from pathlib import Path

from serving.errors import RtqError
from serving.runtimes.base import Runner

BACKENDS = {
    "onnxruntime": ("serving.runtimes.onnxruntime_runner", "OnnxRuntimeRunner"),
    "openvino": ("serving.runtimes.openvino_runner", "OpenVinoRunner"),
    "tensorrt": ("serving.runtimes.tensorrt_runner", "TensorRtRunner"),
    "litert": ("serving.runtimes.litert_runner", "LiteRtRunner"),
}


def runner_class(backend: str) -> type[Runner]:
    try:
        module, cls = BACKENDS[backend]
    except KeyError:
        raise RtqError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)


def open_runner(backend: str, model_path: Path, precision: str, threads: int = 2) -> Runner:
    return runner_class(backend)(Path(model_path), precision=precision, threads=threads)
