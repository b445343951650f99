"""The one interface servers and benchmarks call: load a variant's file, run a batch, say how."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from serving.errors import RtqError


class Runner(ABC):
    """One loaded model on one backend. `infer` takes NCHW float32 and returns logits.

    Not shared across threads: a server makes one runner per instance.
    """

    backend: ClassVar[str]
    model_suffix: ClassVar[str]

    def __init__(self, model_path: Path, precision: str, threads: int):
        if threads < 1:
            raise RtqError(f"threads must be >= 1, got {threads}")
        if not Path(model_path).is_file():
            raise RtqError(f"model file {model_path} does not exist")
        self.model_path = Path(model_path)
        self.declared_precision = precision
        self.threads = threads

    @property
    @abstractmethod
    def execution_precision(self) -> str:
        """What the backend really computes in (e.g. OpenVINO's f32 vs bf16), read back from it."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "precision": self.declared_precision,
            "execution_precision": self.execution_precision,
            "threads": self.threads,
            "model_file": self.model_path.name,
        }

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch(batch: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    if batch.dtype != np.float32:
        raise RtqError(f"input must be float32, got {batch.dtype}")
    if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(shape) or batch.shape[0] < 1:
        raise RtqError(f"input shape {tuple(batch.shape)} does not match [N, {', '.join(map(str, shape))}]")
    return np.ascontiguousarray(batch)
