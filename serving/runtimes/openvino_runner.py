"""OpenVINO on CPU. FP32 variants pin f32 execution: this CPU would silently run bf16 otherwise."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import openvino as ov

from serving.errors import RtqError
from serving.runtimes.base import Runner, check_batch
from serving.runtimes.signal_stack import keep_signal_stack

# What each declared precision asks OpenVINO to compute in; int8 graphs keep their u8/i8 convs and
# run the rest in f32 so INT8 is compared with true FP32, not with bf16.
_HINTS = {"fp32": "f32", "fp16": "f16", "int8": "f32"}


# Ops whose activation input OpenVINO runs on INT8 kernels: the only places a Q/DQ pair pays.
_INTEGER_INPUT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def clip_qdq_off_conv_inputs(model: onnx.ModelProto) -> int:
    """Activation Q/DQ pairs that feed anything but a conv/matmul's data input become a Clip to
    their range (in place); returns how many consumers now read the Clip.

    ONNX Runtime's QDQ graphs also quantize conv outputs, so that QLinearConv can write u8. OpenVINO
    cannot fold that into the conv when a float op follows (SiLU, SE): it ran Convert, Subtract and
    Multiply per tensor at every call (EfficientNetV2-B0 W4A8: 3.6 of 8.8 ms, against 6.1 ms for
    NNCF's INT8, which puts FakeQuantize on conv inputs only). The Clip keeps what the pair did
    besides rounding: ORT's quantizer folds ReLU6 into the range of the Q after a conv, so without it
    Lite0 lost its activation (44% agreement with the QDQ graph). Weights (DQ of an initializer) stay.
    """
    from onnx import numpy_helper

    g = model.graph
    producer = {out: n for n in g.node for out in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers[name].append((n, i))
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    dropped: set[int] = set()
    clips: dict[int, onnx.NodeProto] = {}  # id(dq) -> the Clip that replaces it, placed where it was
    rewired = 0
    for dq in g.node:
        q = producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        if q.input[1] not in inits or q.input[2] not in inits:
            continue
        scale = numpy_helper.to_array(inits[q.input[1]])
        zp = numpy_helper.to_array(inits[q.input[2]])
        if scale.size != 1 or zp.size != 1:
            continue  # per-channel activations: leave them to OpenVINO as they are
        readers = consumers[dq.output[0]]
        others = [(n, i) for n, i in readers if not (n.op_type in _INTEGER_INPUT_OPS and i == 0)]
        if not others:
            continue
        info = np.iinfo(zp.dtype)
        lo, hi = (float(scale) * (float(v) - float(zp)) for v in (info.min, info.max))
        clip = dq.output[0] + "_clip"
        g.initializer.extend([numpy_helper.from_array(np.array(lo, np.float32), clip + "_lo"),
                              numpy_helper.from_array(np.array(hi, np.float32), clip + "_hi")])  # fmt: skip
        clips[id(dq)] = onnx.helper.make_node("Clip", [q.input[0], clip + "_lo", clip + "_hi"], [clip])
        for n, i in others:
            n.input[i] = clip
            rewired += 1
        if len(others) == len(readers) and dq.output[0] not in outputs:
            dropped.add(id(dq))
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        if all(id(c) in dropped for c, _ in consumers[q.output[0]]) and q.output[0] not in outputs:
            dropped.add(id(q))
    nodes = []
    for n in g.node:
        if id(n) in clips:
            nodes.append(clips[id(n)])
        if id(n) not in dropped:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return rewired


def _read(core: ov.Core, path: Path) -> ov.Model:
    """IR as is; an ONNX file (packed low-bit QDQ) is unpacked to INT8 first, with activation Q/DQ
    kept on conv inputs only."""
    if path.suffix != ".onnx":
        return core.read_model(str(path))
    from serving.quantize.packing import load_unpacked

    unpacked = load_unpacked(path)
    if unpacked is None:
        return core.read_model(str(path))
    clip_qdq_off_conv_inputs(unpacked)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "unpacked.onnx"
        onnx.save(unpacked, str(plain))
        return core.read_model(str(plain))


class OpenVinoRunner(Runner):
    backend = "openvino"
    model_suffix = ".xml"

    def __init__(self, model_path: Path, precision: str = "fp32", threads: int = 2):
        super().__init__(model_path, precision, threads)
        with keep_signal_stack():  # the CPU plugin is created here: see signal_stack.py
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
