"""A precision plan -> one packed QDQ ONNX file that ONNX Runtime and OpenVINO both serve.

Steps: quantize each layer's weights per the plan (ptq), let ONNX Runtime's static quantizer place
8-bit activation Q/DQ nodes calibrated on the already-quantized weights, overwrite its int8 weight
tensors with ours (the integers fit: 4-bit values are valid int8), then pack the low-bit ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from serving.errors import RtqError
from serving.quantize.lowbit import QuantizedWeight
from serving.quantize.packing import pack, packed_fraction
from serving.quantize.plan import STORAGE_BITS, PrecisionPlan
from serving.quantize.ptq import PTQ_VERSION, Log, QuantizedLayer, fake_quantized, quantize_layers


def signed_storage(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Integers and zero points as signed values of the weight's width: ONNX INT2/INT4 are signed.

    Asymmetric grids count from 0 (2 bits: 0..3); shifting both by half the range keeps q - zp,
    hence every dequantized value, exactly.
    """
    shift = 0 if qw.spec.symmetric else 2 ** (qw.spec.bits - 1)
    q = (qw.q.astype(np.int16) - shift).astype(np.int8)
    return q, (qw.zero_point.astype(np.int16) - shift).astype(np.int8)


def _patch(model: onnx.ModelProto, qlayers: list[QuantizedLayer]) -> dict[str, int]:
    """Write our integers, scales and zero points into the QDQ graph; return storage bits by tensor."""
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    producer = {o: n for n in model.graph.node for o in n.output}
    by_weight = {ql.layer.weight: ql for ql in qlayers}
    storage: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        weight = dq.input[0].removesuffix("_quantized")
        ql = by_weight.get(weight)
        if ql is None:
            raise RtqError(f"quantized graph has a weight {weight} the plan did not quantize")
        x_name, s_name, z_name = dq.input[0], dq.input[1], dq.input[2]
        q, zp = signed_storage(ql.weight)
        for name, value in (
            (x_name, q),
            (s_name, ql.weight.scale.astype(np.float32)),
            (z_name, zp),
        ):
            model.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(value, name))
        # Corrected biases reach the graph through fake_quantized(); align_bias_scales rescales them.
        storage[x_name] = STORAGE_BITS[ql.weight.spec.bits]
    missing = set(by_weight) - {k.removesuffix("_quantized") for k in storage}
    if missing:
        raise RtqError(f"the QDQ graph lost quantized weights for {sorted(missing)[:3]}")
    return storage


def align_bias_scales(model: onnx.ModelProto) -> int:
    """Requantize each int32 Conv/Gemm bias to scale = input scale x weight scale; return how many.

    ORT's quantizer scaled the biases for its own weight scales, which _patch replaced; ONNX Runtime
    only fuses DQ -> Conv -> Q into QLinearConv when the bias scale is exactly that product, and runs a
    float Conv otherwise (7x slower). The float bias values (bias correction included) are kept.
    """
    inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
    producer = {o: n for n in model.graph.node for o in n.output}

    def init(name: str) -> np.ndarray:
        return numpy_helper.to_array(model.graph.initializer[inits[name]])

    changed = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        dqs = [producer.get(i) for i in node.input[:3]]
        if any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
            continue
        dx, dw, db = dqs
        if db.input[0] not in inits or init(db.input[0]).dtype != np.int32:
            continue
        x_scale = init(dx.input[1]).astype(np.float32)
        w_scale = init(dw.input[1]).astype(np.float32)
        b_scale = init(db.input[1]).astype(np.float32)
        want = np.broadcast_to(x_scale * w_scale, b_scale.shape).astype(np.float32)
        if np.array_equal(b_scale, want):
            continue
        zp = init(db.input[2]) if len(db.input) > 2 else np.zeros_like(b_scale, dtype=np.int32)
        bias = (init(db.input[0]).astype(np.float64) - zp) * b_scale
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(want > 0, np.round(bias / want), 0)
        i32 = np.iinfo(np.int32)
        q = np.clip(q, i32.min, i32.max).astype(np.int32)
        for name, value in ((db.input[0], q), (db.input[1], want)):
            model.graph.initializer[inits[name]].CopyFrom(numpy_helper.from_array(value, name))
        if len(db.input) > 2:
            model.graph.initializer[inits[db.input[2]]].CopyFrom(
                numpy_helper.from_array(np.zeros(want.shape, np.int32), db.input[2])
            )
        changed += 1
    return changed


def build_lowbit(
    fp32_onnx: Path,
    plan: PrecisionPlan,
    calibration: np.ndarray,
    dst: Path,
    log: Log = print,
    cache_dir: Path | None = None,
) -> dict:
    """Write the packed file; return facts for the manifest (bits per layer, packing, timing).

    With a cache_dir, a result for the same FP32 file, plan and calibration images is reused:
    learned rounding costs minutes, and `rtq build` and `rtq bench lowbit` ask for the same plans.
    """
    key = None
    if cache_dir is not None:
        h = hashlib.sha256(Path(fp32_onnx).read_bytes())
        h.update(json.dumps(plan.to_dict(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(calibration[: plan.calibration_images]).tobytes())
        h.update(f"ptq-{PTQ_VERSION}".encode())
        key = cache_dir / h.hexdigest()[:24]
        if key.with_suffix(".onnx").is_file() and key.with_suffix(".json").is_file():
            cached = onnx.load(str(key.with_suffix(".onnx")))
            # Entries cached before bias alignment existed are fixed here, not rebuilt (AdaRound is slow).
            if align_bias_scales(cached):
                onnx.save(cached, str(key.with_suffix(".onnx")))
            shutil.copyfile(key.with_suffix(".onnx"), dst)
            log(f"reused {key.with_suffix('.onnx')}")
            return json.loads(key.with_suffix(".json").read_text()) | {"cached": True}
    info = _build_lowbit(fp32_onnx, plan, calibration, dst, log)
    if key is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dst, key.with_suffix(".onnx"))
        key.with_suffix(".json").write_text(json.dumps(info))
    return info


def _build_lowbit(fp32_onnx: Path, plan: PrecisionPlan, calibration: np.ndarray, dst: Path, log: Log) -> dict:
    if plan.act_bits != 8:
        raise RtqError(
            f"plan {plan.name}: {plan.act_bits}-bit activations have no integer kernels in ONNX Runtime "
            "or OpenVINO; they are measured by `rtq sensitivity` and trained by `rtq qat`, built at 8"
        )
    if len(calibration) < plan.calibration_images:
        raise RtqError(
            f"plan {plan.name} wants {plan.calibration_images} calibration images, the build has "
            f"{len(calibration)}; raise calibration_images in the spec"
        )
    from serving.export.onnx_export import INPUT_NAME
    from serving.quantize.int8_onnxruntime import quantize_int8

    model = onnx.load(str(fp32_onnx))
    if plan.method == "qat":
        from serving.qat.integers import load_qat_layers

        qlayers = load_qat_layers(model, plan)
        log(f"took {len(qlayers)} layers' integers from {plan.qat_file}")
    else:
        qlayers = quantize_layers(model, plan, calibration, log)
    with tempfile.TemporaryDirectory() as tmp:
        fq = Path(tmp) / "fq.onnx"
        onnx.save(fake_quantized(model, qlayers), str(fq))
        q8 = Path(tmp) / "q8.onnx"
        quantize_int8(fq, q8, calibration, INPUT_NAME)
        qdq = onnx.load(str(q8))
    storage = _patch(qdq, qlayers)
    align_bias_scales(qdq)
    onnx.save(pack(qdq, storage), str(dst))
    bits = {ql.layer.name: ql.weight.spec.bits for ql in qlayers}
    return {
        "plan": plan.to_dict(),
        "layer_bits": bits,
        "packed": packed_fraction(onnx.load(str(dst))),
        "ptq_seconds": round(sum(ql.seconds for ql in qlayers), 1),
    }
