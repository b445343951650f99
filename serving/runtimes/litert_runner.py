"""LiteRT (.tflite) on the CPU (XNNPACK) or a Coral Edge TPU through the libedgetpu delegate.

The runner keeps the suite's contract (NCHW float32 in, float32 logits out) and does the model's
own I/O conversion: NCHW -> NHWC, float -> int8 with the input tensor's scale/zero-point, and
int8 logits back to float. A variant folder may hold `model_edgetpu.tflite` beside `model.tflite`
(written when `edgetpu_compiler` ran at build time); that file is used when the delegate loads.
"""

from __future__ import annotations

import ctypes.util
import platform
from pathlib import Path

import numpy as np

from serving.errors import RtqError
from serving.runtimes.base import Runner, check_batch

DELEGATE_MODES = ("auto", "cpu", "edgetpu")
INSTALL_EDGETPU = (
    "install the Edge TPU runtime (Debian package libedgetpu1-std from Coral's apt repository "
    "packages.cloud.google.com/apt coral-edgetpu-stable, or a libedgetpu build for your board) "
    "and plug in the Coral device"
)


def edgetpu_library() -> str:
    """The delegate's shared-library name on this OS (Coral's naming)."""
    return {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}.get(
        platform.system(), "libedgetpu.so.1"
    )


def load_edgetpu_delegate(library: str | None = None, device: str | None = None):
    """The libedgetpu delegate, or RtqError naming the library and how to install it."""
    from ai_edge_litert.interpreter import load_delegate

    lib = library or edgetpu_library()
    try:
        return load_delegate(lib, {"device": device} if device else {})
    except (ValueError, OSError, RuntimeError) as exc:
        found = ctypes.util.find_library("edgetpu")
        where = f"{lib} loads but found no Edge TPU" if found else f"{lib} is not installed"
        raise RtqError(
            f"Edge TPU delegate unavailable: {where} ({str(exc)[:200]}); {INSTALL_EDGETPU}"
        ) from None


def edgetpu_twin(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}_edgetpu{model_path.suffix}")


class LiteRtRunner(Runner):
    backend = "litert"
    model_suffix = ".tflite"

    def __init__(
        self,
        model_path: Path,
        precision: str = "int8",
        threads: int = 2,
        delegate: str = "auto",
        delegate_library: str | None = None,
    ):
        """delegate: "cpu" never touches libedgetpu; "edgetpu" requires it (and a compiled file);
        "auto" uses it only when a compiled `_edgetpu` file exists and the library loads."""
        super().__init__(model_path, precision, threads)
        if delegate not in DELEGATE_MODES:
            raise RtqError(f"delegate must be one of {DELEGATE_MODES}, got {delegate!r}")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise RtqError(
                "ai-edge-litert is not installed; `.venv/bin/pip install ai-edge-litert`"
            ) from None
        from serving.export.litert_export import EDGETPU_CUSTOM_OP, inspect_tflite, require_fully_integer

        path = self.model_path
        info = inspect_tflite(path)
        twin = edgetpu_twin(path)
        self.device = "cpu"
        delegates = []
        if delegate == "edgetpu" or (delegate == "auto" and (info.compiled_for_edgetpu or twin.is_file())):
            if not info.compiled_for_edgetpu and twin.is_file():
                path, info = twin, inspect_tflite(twin)
            require_fully_integer(info, "the Edge TPU path")
            if not info.compiled_for_edgetpu:
                raise RtqError(
                    f"{path} is fully integer but not compiled for the Edge TPU (no {EDGETPU_CUSTOM_OP} op): "
                    "run `edgetpu_compiler` on it (Coral's Debian package edgetpu-compiler, x86-64 Linux) "
                    "and keep the *_edgetpu.tflite beside it"
                )
            try:
                delegates = [load_edgetpu_delegate(delegate_library)]
                self.device = "edgetpu"
            except RtqError:
                if delegate == "edgetpu" or (info.compiled_for_edgetpu and path == self.model_path):
                    raise  # a compiled-only file cannot run without the delegate
                path, info = self.model_path, inspect_tflite(self.model_path)  # auto: CPU fallback
        self.info = info
        self.run_path = path
        try:
            self.interpreter = Interpreter(
                model_path=str(path), num_threads=threads, experimental_delegates=delegates or None
            )
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RtqError(f"LiteRT cannot load {path}: {str(exc)[:300]}") from None
        inp = self.interpreter.get_input_details()
        out = self.interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise RtqError(f"{path}: expected one input and one output, got {len(inp)} and {len(out)}")
        self._in, self._out = inp[0], out[0]
        shape = tuple(int(d) for d in self._in["shape"])
        if len(shape) != 4 or shape[0] != 1:
            raise RtqError(f"{path}: expected a [1, H, W, C] or [1, C, H, W] input, got {list(shape)}")
        self.nhwc = shape[3] in (1, 3) and shape[1] not in (1, 3)
        self.input_shape = (shape[3], shape[1], shape[2]) if self.nhwc else shape[1:]
        self._in_q = self._in["quantization"]
        self._out_q = self._out["quantization"]

    @property
    def execution_precision(self) -> str:
        if self.info.fully_integer or self.info.compiled_for_edgetpu:
            return "int8"
        return "fp32" if len(self.info.float_ops) == len(self.info.ops) else "mixed int8/fp32"

    def describe(self) -> dict:
        return super().describe() | {
            "device": self.device,
            "delegate": "libedgetpu" if self.device == "edgetpu" else "xnnpack",
            "run_file": self.run_path.name,
            "input_layout": "NHWC" if self.nhwc else "NCHW",
            "input_dtype": np.dtype(self._in["dtype"]).name,
        }

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self._in["dtype"])
        if dtype.kind == "f":
            return x.astype(dtype)
        scale, zp = self._in_q
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if np.dtype(y.dtype).kind == "f":
            return y.astype(np.float32)
        scale, zp = self._out_q
        return ((y.astype(np.float32) - zp) * scale).astype(np.float32)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.input_shape)
        x = batch.transpose(0, 2, 3, 1) if self.nhwc else batch
        q = self._quantize(x)
        outs = []
        # The graph is fixed at batch 1 (the Edge TPU runs one image at a time): loop.
        for i in range(len(q)):
            self.interpreter.set_tensor(self._in["index"], q[i : i + 1])
            self.interpreter.invoke()
            outs.append(self._dequantize(self.interpreter.get_tensor(self._out["index"])))
        return np.concatenate(outs)

    def close(self) -> None:
        self.interpreter = None
