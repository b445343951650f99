"""LiteRT (.tflite) for CPUs and the Coral Edge TPU: full-integer export, op inspection, Edge TPU compile.

Route (FIELD-NOTES): litert-torch converts the statically padded PyTorch model to an FP32 .tflite
with NHWC input, then ai-edge-quantizer's `static_wi8_ai8` recipe makes every tensor int8,
input and output included. litert-torch's own PT2E quantizer is not used: it leaves float ADDs,
which the Edge TPU compiler would push back to the CPU together with everything after them.

The Edge TPU compiler is not on the package registries; where `edgetpu_compiler` is on PATH it is
run, and everywhere else `edgetpu_coverage` says which ops it would map, from Coral's op table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.errors import RtqError

COMPILER = "edgetpu_compiler"
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
INT_TYPES = ("INT8", "UINT8")
# Float tensor types: any of these on a non-constant tensor means the op runs in float.
FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64", "BFLOAT16")

# Coral's "supported operations" table (compiler 16): op -> its documented limitation ("" = none).
# All of them additionally need int8/uint8 tensors, static shapes and at most 3 dims above size 1.
EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "no fused activation",
    "CONCATENATION": "no fused activation; a constant input must be all zeros",
    "CONV_2D": "",
    "DEPTHWISE_CONV_2D": "",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "default weight format only; 1-D output",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "LSTM": "unidirectional only",
    "MAXIMUM": "",
    "MAX_POOL_2D": "no fused activation",
    "MEAN": "reduction along x and/or y only",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "no packing in the batch dimension",
    "PAD": "padding along x and/or y only",
    "PRELU": "",
    "QUANTIZE": "",
    "REDUCE_MAX": "",
    "REDUCE_MIN": "",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "",
    "RESIZE_BILINEAR": "3-D input/output; may stay on CPU for precision",
    "RESIZE_NEAREST_NEIGHBOR": "3-D input/output",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "1-D input only, at most 16,000 elements",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "no split in the batch dimension",
    "SQUARED_DIFFERENCE": "",
    "SQUEEZE": "",
    "STRIDED_SLICE": "",
    "SUB": "",
    "SUM": "reduction along x and/or y only",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: float | None = None
    zero_point: int | None = None


@dataclass(frozen=True)
class OpInfo:
    index: int
    name: str
    float_tensors: tuple[str, ...]  # non-constant float tensors this op reads or writes


@dataclass
class TfliteInfo:
    path: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: list[OpInfo]

    @property
    def op_counts(self) -> dict[str, int]:
        return dict(Counter(op.name for op in self.ops))

    @property
    def float_ops(self) -> list[OpInfo]:
        return [op for op in self.ops if op.float_tensors]

    @property
    def fully_integer(self) -> bool:
        io = [*self.inputs, *self.outputs]
        return not self.float_ops and all(t.dtype in INT_TYPES for t in io)

    @property
    def compiled_for_edgetpu(self) -> bool:
        return any(op.name == EDGETPU_CUSTOM_OP for op in self.ops)

    def integer_problems(self) -> list[str]:
        """Why this file is not fully integer, one line per reason (empty when it is)."""
        problems = [
            f"{kind} {t.name} is {t.dtype}"
            for kind, ts in (("input", self.inputs), ("output", self.outputs))
            for t in ts
            if t.dtype not in INT_TYPES
        ]
        for name, n in Counter(op.name for op in self.float_ops).items():
            problems.append(f"{n} float {name} op(s)")
        return problems


def inspect_tflite(path: Path) -> TfliteInfo:
    """Ops, I/O types and float tensors of a .tflite, read from its flatbuffer (no interpreter)."""
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise RtqError(f"{path} does not exist")
    buf = path.read_bytes()
    try:
        model = schema.Model.GetRootAs(buf, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("no subgraph")
    except Exception as exc:  # a non-flatbuffer file fails anywhere inside the generated accessors
        raise RtqError(f"{path} is not a valid .tflite flatbuffer: {exc}") from None
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)

    def tensor(i: int) -> TensorInfo:
        t = graph.Tensors(i)
        q = t.Quantization()
        scale = zp = None
        if q is not None and q.ScaleLength() == 1:
            scale, zp = float(q.Scale(0)), int(q.ZeroPoint(0))
        name = (t.Name() or b"").decode()
        return TensorInfo(
            name, type_names.get(t.Type(), str(t.Type())), tuple(int(d) for d in t.ShapeAsNumpy()), scale, zp
        )

    def constant(i: int) -> bool:
        b = graph.Tensors(i).Buffer()
        if b <= 0:
            return False
        data = model.Buffers(b)
        return data.DataLength() > 0 or data.Size() > 0  # Size: data stored after the flatbuffer

    ops = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM":
            name = (code.CustomCode() or b"custom").decode()
        ids = [int(i) for i in [*op.InputsAsNumpy(), *op.OutputsAsNumpy()] if int(i) >= 0]
        floats = tuple(
            graph.Tensors(i).Name().decode()
            for i in ids
            if type_names.get(graph.Tensors(i).Type()) in FLOAT_TYPES and not constant(i)
        )
        ops.append(OpInfo(k, name, floats))
    return TfliteInfo(
        str(path),
        [tensor(int(i)) for i in graph.InputsAsNumpy()],
        [tensor(int(i)) for i in graph.OutputsAsNumpy()],
        ops,
    )


@dataclass
class EdgeTpuCoverage:
    """What the Edge TPU compiler would do with a file, predicted from Coral's documented rules."""

    model: str
    fully_integer: bool
    integer_problems: list[str]
    ops_total: int
    ops_on_edgetpu: int
    first_unmapped: str | None  # the compiler maps one prefix; everything from here runs on the CPU
    unsupported: dict[str, int]
    op_counts: dict[str, int]
    limitations: dict[str, str] = field(default_factory=dict)
    compiler: str = "not run: edgetpu_compiler not found (prediction from Coral's op table)"

    def to_dict(self) -> dict:
        return asdict(self)


def edgetpu_coverage(info: TfliteInfo) -> EdgeTpuCoverage:
    """Ops the Edge TPU would run. The compiler maps ops up to the first one it cannot map
    (float, unsupported) and hands that op and everything after it to the CPU."""
    unsupported = Counter(op.name for op in info.ops if op.name not in EDGETPU_OPS)
    mapped, first = len(info.ops), None
    for op in info.ops:
        if op.name not in EDGETPU_OPS or op.float_tensors:
            why = "float tensors" if op.name in EDGETPU_OPS else "op not supported by the Edge TPU"
            mapped, first = op.index, f"#{op.index} {op.name} ({why})"
            break
    if not info.inputs or info.inputs[0].dtype not in INT_TYPES:
        mapped, first = 0, first or "model input is float"
    used = {op.name for op in info.ops}
    return EdgeTpuCoverage(
        model=Path(info.path).name,
        fully_integer=info.fully_integer,
        integer_problems=info.integer_problems(),
        ops_total=len(info.ops),
        ops_on_edgetpu=mapped,
        first_unmapped=first,
        unsupported=dict(unsupported),
        op_counts=info.op_counts,
        limitations={k: v for k, v in EDGETPU_OPS.items() if k in used and v},
    )


def coverage_markdown(cov: EdgeTpuCoverage) -> str:
    lines = [
        f"# Edge TPU op coverage: {cov.model}",
        "",
        f"- compiler: {cov.compiler}",
        f"- fully integer (int8/uint8 I/O, no float ops): {'yes' if cov.fully_integer else 'NO'}",
        f"- ops on the Edge TPU: {cov.ops_on_edgetpu} of {cov.ops_total}",
        f"- first op left to the CPU: {cov.first_unmapped or 'none'}",
        "",
        "| op | count | Edge TPU | documented limitation |",
        "| --- | ---: | --- | --- |",
    ]
    for name, n in sorted(cov.op_counts.items()):
        lines.append(
            f"| {name} | {n} | {'yes' if name in EDGETPU_OPS else 'NO'} | {EDGETPU_OPS.get(name, '')} |"
        )
    if cov.integer_problems:
        lines += ["", "Not fully integer: " + "; ".join(cov.integer_problems)]
    return "\n".join(lines) + "\n"


def require_fully_integer(info: TfliteInfo, purpose: str = "the Edge TPU") -> None:
    if not info.fully_integer:
        raise RtqError(
            f"{info.path} is not fully integer, which {purpose} requires: "
            + "; ".join(info.integer_problems()[:6])
            + ". Build it with the litert int8 recipe (ai-edge-quantizer static_wi8_ai8), not a float "
            "or weight-only .tflite"
        )


# --- building -----------------------------------------------------------------------------------------


def _converter_missing(what: str) -> RtqError:
    return RtqError(
        f"{what} is not installed; the LiteRT build needs litert-torch and ai-edge-quantizer "
        '(`.venv/bin/pip install -e ".[coral]"`)'
    )


def export_float_tflite(loaded, dst: Path) -> Path:
    """FP32 .tflite with NHWC input (what camera pipelines and the Edge TPU want), static padding."""
    import torch

    try:
        import litert_torch
    except ImportError:
        raise _converter_missing("litert-torch") from None
    from serving.export.onnx_export import make_static

    res = loaded.spec.preprocessing.resolution
    model = litert_torch.to_channel_last_io(make_static(loaded.module, res), args=[0]).eval()
    with torch.no_grad():
        edge = litert_torch.convert(model, (torch.zeros(1, res, res, 3),))
    dst.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(dst))
    return dst


@dataclass(frozen=True)
class InputRange:
    """The float range the int8 input covers. Pinning it to the normalised 0-255 pixel range makes the
    input quantization exact: with (x-127)/128 it is scale 1/128, zero-point -1, i.e. int8 = pixel-128,
    so a device feeds camera bytes with one subtraction instead of a float normalisation."""

    low: float
    high: float

    @classmethod
    def of(cls, pp) -> InputRange:
        lows = [(0.0 - m) / s for m, s in zip(pp.mean, pp.std, strict=True)]
        highs = [(255.0 - m) / s for m, s in zip(pp.mean, pp.std, strict=True)]
        return cls(min(lows), max(highs))


def quantize_full_int8(
    float_tflite: Path,
    dst: Path,
    calibration_nchw: np.ndarray,
    input_range: InputRange | None = None,
    threads: int = 2,
) -> Path:
    """static_wi8_ai8: per-channel int8 weights, int8 activations, int8 input and output."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise _converter_missing("ai-edge-quantizer") from None
    from ai_edge_litert.interpreter import Interpreter

    if calibration_nchw is None or len(calibration_nchw) == 0:
        raise RtqError("the LiteRT int8 build needs calibration images")
    interp = Interpreter(str(float_tflite))
    signatures = interp.get_signature_list()
    if len(signatures) != 1:
        raise RtqError(f"{float_tflite} has {len(signatures)} signatures; expected exactly one")
    key = next(iter(signatures))
    arg = signatures[key]["inputs"][0]
    input_tensor = interp.get_input_details()[0]["name"]
    nhwc = np.ascontiguousarray(calibration_nchw.transpose(0, 2, 3, 1), dtype=np.float32)
    q = quantizer.Quantizer(str(float_tflite), recipe.static_wi8_ai8())
    qsv = q.calibrate({key: [{arg: nhwc[i : i + 1]} for i in range(len(nhwc))]}, num_threads=threads)
    if input_range is not None:
        if input_tensor not in qsv:
            raise RtqError(f"calibration recorded no range for input tensor {input_tensor}")
        qsv[input_tensor] = {
            "min": np.array([input_range.low], np.float32),
            "max": np.array([input_range.high], np.float32),
        }
    result = q.quantize(qsv, enable_progress_report=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    result.export_model(str(dst), overwrite=True)
    repair_bias_overflow(dst, float_tflite)
    info = inspect_tflite(dst)
    require_fully_integer(info, "the LiteRT int8 variant")
    return dst


def _array(buf, dtype) -> np.ndarray:
    return np.frombuffer(bytes(buf.data), dtype=dtype).copy()


def repair_bias_overflow(quantized: Path, float_tflite: Path) -> int:
    """Fix channels whose int32 bias overflowed; returns how many channels were fixed.

    Lite0 has nearly dead output channels (BN-folded weights ~1e-8, 103 channels in its early
    layers). ai-edge-quantizer gives them a weight scale so small that bias / (input scale * weight
    scale) exceeds int32 and the cast leaves INT32_MIN, i.e. the channel is pinned to the activation
    floor. In Lite0 their biases are negative, so ReLU6 gives 0 either way (outputs are bit-identical
    after the repair); a positive bias would be silently zeroed. For those channels the weight scale
    is raised until the bias fits (|bias_q| <= 2^24) and the weights are re-quantized from the float
    file: they round to ~0, which is what they are.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    q = fbu.read_model_from_bytearray(bytearray(quantized.read_bytes()))
    f = fbu.read_model_from_bytearray(bytearray(float_tflite.read_bytes()))
    qg, fg = q.subgraphs[0], f.subgraphs[0]
    if len(qg.operators) != len(fg.operators):
        raise RtqError(f"{quantized} and {float_tflite} differ in op count; cannot map biases back")
    weighted = {schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D}
    limit = float(2**30)
    repaired = 0
    for qop, fop in zip(qg.operators, fg.operators, strict=True):
        code = q.operatorCodes[qop.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) not in weighted or len(qop.inputs) < 3:
            continue
        if qop.inputs[2] < 0:
            continue
        x, w, bias = (qg.tensors[i] for i in qop.inputs[:3])
        if bias.type != schema.TensorType.INT32 or w.type != schema.TensorType.INT8:
            continue
        fbias = _array(f.buffers[fg.tensors[fop.inputs[2]].buffer], np.float32)
        in_scale = float(x.quantization.scale[0])
        w_scales = np.asarray(w.quantization.scale, dtype=np.float64)
        over = np.flatnonzero(np.abs(fbias) / (in_scale * w_scales) > limit)
        if not len(over):
            continue
        axis = int(w.quantization.quantizedDimension)
        fw = np.moveaxis(
            _array(f.buffers[fg.tensors[fop.inputs[1]].buffer], np.float32).reshape(w.shape), axis, 0
        )
        qw = np.moveaxis(_array(q.buffers[w.buffer], np.int8).reshape(w.shape), axis, 0).copy()
        qb = _array(q.buffers[bias.buffer], np.int32)
        w_scales[over] = np.maximum(w_scales[over], np.abs(fbias[over]) / (in_scale * 2**24))
        for c in over:
            qw[c] = np.clip(np.round(fw[c] / w_scales[c]), -127, 127).astype(np.int8)
            qb[c] = int(np.round(fbias[c] / (in_scale * w_scales[c])))
        q.buffers[w.buffer].data = np.ascontiguousarray(np.moveaxis(qw, 0, axis)).view(np.uint8).ravel()
        q.buffers[bias.buffer].data = qb.view(np.uint8)
        w.quantization.scale = w_scales.astype(np.float32).tolist()
        bias.quantization.scale = (in_scale * w_scales).astype(np.float32).tolist()
        repaired += len(over)
    if repaired:
        quantized.write_bytes(bytes(fbu.convert_object_to_bytearray(q)))
    return repaired


def build_litert(
    loaded, precision: str, dst: Path, calibration: np.ndarray | None, fp32_tflite: Path | None = None
) -> Path:
    """Variant file for `rtq build`: FP32 .tflite, or the full-INT8 one plus its Edge TPU artefacts
    (compiled model when the compiler exists, op coverage report always)."""
    if precision not in ("fp32", "int8"):
        raise RtqError(f"litert builds fp32 and int8, not {precision}")
    with tempfile.TemporaryDirectory(prefix="rtq-litert-") as tmp:
        fp32 = fp32_tflite or export_float_tflite(loaded, Path(tmp) / "fp32.tflite")
        if precision == "fp32":
            shutil.copyfile(fp32, dst)
            return dst
        quantize_full_int8(fp32, dst, calibration, InputRange.of(loaded.spec.preprocessing))
    compile_edgetpu(dst, dst.parent)
    return dst


# --- Edge TPU compiler --------------------------------------------------------------------------------


@dataclass
class CompileResult:
    compiled: Path | None  # <stem>_edgetpu.tflite, when the compiler ran
    coverage: EdgeTpuCoverage
    log: str = ""


def compile_edgetpu(tflite: Path, out_dir: Path, compiler: str | None = None) -> CompileResult:
    """Run edgetpu_compiler when present; always write edgetpu_coverage.{json,md} beside the model.

    Refuses a file that is not fully integer: the compiler would silently leave it on the CPU.
    """
    info = inspect_tflite(tflite)
    cov = edgetpu_coverage(info)
    exe = compiler or shutil.which(COMPILER)
    compiled = None
    log = ""
    if exe:
        require_fully_integer(info)
        proc = subprocess.run(
            [exe, "--show_operations", "--out_dir", str(out_dir), str(tflite)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RtqError(f"{COMPILER} failed on {tflite} (exit {proc.returncode}): {log.strip()[-600:]}")
        compiled = out_dir / f"{tflite.stem}_edgetpu.tflite"
        if not compiled.is_file():
            raise RtqError(f"{COMPILER} exited 0 but wrote no {compiled.name}: {log.strip()[-300:]}")
        mapped = inspect_tflite(compiled)
        cov.compiler = (
            f"{exe}: {sum(op.name == EDGETPU_CUSTOM_OP for op in mapped.ops)} Edge TPU subgraph(s), "
            f"{sum(op.name != EDGETPU_CUSTOM_OP for op in mapped.ops)} op(s) left on the CPU"
        )
        (out_dir / f"{tflite.stem}_edgetpu.log").write_text(log)
    (out_dir / "edgetpu_coverage.json").write_text(json.dumps(cov.to_dict(), indent=2) + "\n")
    (out_dir / "edgetpu_coverage.md").write_text(coverage_markdown(cov))
    return CompileResult(compiled, cov, log)


# --- weight statistics --------------------------------------------------------------------------------

_WEIGHTED = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}
_TYPE_BITS = {"FLOAT32": 32, "FLOAT16": 16, "BFLOAT16": 16, "INT8": 8, "UINT8": 8, "INT4": 4, "INT2": 2}


def tflite_weight_stats(path: Path):
    """Bits per stored weight of conv/FC layers, counting per-channel scales (f32) and zero-points
    (i64) as the flatbuffer stores them, like `onnx_weight_stats` does for ONNX."""
    from ai_edge_litert import schema_py_generated as schema

    from serving.repository.weight_stats import WeightStats

    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    params = bits = 0
    seen: set[int] = set()
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = model.OperatorCodes(op.OpcodeIndex())
        idx = _WEIGHTED.get(op_names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), ""))
        if idx is None or op.InputsLength() <= idx or op.Inputs(idx) < 0 or op.Inputs(idx) in seen:
            continue
        seen.add(op.Inputs(idx))
        t = graph.Tensors(op.Inputs(idx))
        n = int(np.prod(t.ShapeAsNumpy()))
        q = t.Quantization()
        extra = 0 if q is None else 32 * q.ScaleLength() + 64 * q.ZeroPointLength()
        params += n
        bits += n * _TYPE_BITS.get(type_names.get(t.Type(), ""), 32) + extra
    return WeightStats(params, bits)
