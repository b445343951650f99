"""The integers QAT trained, in one .npz, and their way into the packed-file build.

Per layer: `<name>/q` (int8 values on the layer's grid), `<name>/step` (per output channel),
`<name>/bias` (float, folded batch norm included) and `<name>/bits`. The build swaps these for the
exported FP32 graph's weights and biases, so the served graph computes what QAT trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from serving.errors import RtqError
from serving.models.weights import sha256_of
from serving.quantize.graph import initializer, layers_of
from serving.quantize.lowbit import QuantizedWeight, WeightQuant
from serving.quantize.plan import PrecisionPlan
from serving.quantize.ptq import QuantizedLayer


def save_integers(
    path: Path, layers: dict[str, tuple[QuantizedWeight, np.ndarray | None]], meta: dict
) -> str:
    """Write the file atomically; return its sha256."""
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(meta))}
    for name, (qw, bias) in layers.items():
        arrays[f"{name}/q"] = qw.q.astype(np.int8)
        arrays[f"{name}/step"] = np.asarray(qw.scale, np.float32)
        arrays[f"{name}/bits"] = np.array(qw.spec.bits, np.int8)
        if bias is not None:
            arrays[f"{name}/bias"] = bias.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return sha256_of(path)


def read_integers(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    if not path.is_file():
        raise RtqError(f"QAT integers {path} do not exist; `rtq qat` writes them next to its plan")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise RtqError(f"cannot read QAT integers {path}: {exc}") from None
    meta = json.loads(str(data.pop("__meta__", "{}")))
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for key, value in data.items():
        name, _, field = key.rpartition("/")
        by_layer.setdefault(name, {})[field] = value
    return by_layer, meta


def load_qat_layers(model: onnx.ModelProto, plan: PrecisionPlan) -> list[QuantizedLayer]:
    """QuantizedLayers for every Conv/Gemm of `model`, from the plan's QAT file (checked)."""
    path = Path(plan.qat_file)
    if plan.qat_sha256 and path.is_file() and sha256_of(path) != plan.qat_sha256:
        raise RtqError(f"{path} does not match the sha256 in plan {plan.name}; rerun `rtq qat`")
    by_layer, meta = read_integers(path)
    out = []
    layers = layers_of(model)
    missing = [layer.name for layer in layers if layer.name not in by_layer]
    if missing:
        raise RtqError(
            f"{path} has no integers for {missing[:3]} (trained on {meta.get('model', '?')}, not this model?)"
        )
    for layer in layers:
        got = by_layer[layer.name]
        q, step, bits = got["q"], got["step"], int(got["bits"])
        if tuple(q.shape) != layer.shape:
            raise RtqError(f"{path}: {layer.name} is {tuple(q.shape)} there but {layer.shape} in the model")
        want = plan.bits_for(layer)
        if bits != want:
            raise RtqError(f"{path}: {layer.name} was trained at {bits} bits, plan {plan.name} says {want}")
        spec = WeightQuant(bits, per_channel=True, symmetric=True, search_scale=False)
        if q.min() < spec.qmin or q.max() > spec.qmax:
            raise RtqError(f"{path}: {layer.name} holds values outside the {bits}-bit range")
        qw = QuantizedWeight(q.astype(np.int8), step.astype(np.float32), np.zeros_like(step, np.int8), spec)
        bias = got.get("bias")
        if bias is None and layer.bias is not None:
            bias = initializer(model, layer.bias)
        out.append(QuantizedLayer(layer, qw, bias))
    return out
