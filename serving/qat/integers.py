"""The integers QAT trained, in one .npz, and their way into the packed-file build.

Per layer: `<name>/q` (int8 values on the layer's grid), `<name>/step` (per output channel),
`<name>/zero_point` (asymmetric grids only: q counts from 0 then, lowbit.WeightQuant's convention),
`<name>/bias` (float, folded batch norm included), `<name>/bits`, and the learned input grid
(`<name>/input_offset`, `<name>/input_log_step`, `<name>/input_bits`). The build swaps the first four
for the exported FP32 graph's weights and biases, so the served graph computes what QAT trained up to
its 8-bit activations; `load_student` rebuilds the fake-quantized student itself from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from serving.errors import RtqError
from serving.models.weights import sha256_of
from serving.quantize.graph import initializer, layers_of
from serving.quantize.lowbit import QuantizedWeight, WeightQuant
from serving.quantize.plan import PrecisionPlan
from serving.quantize.ptq import QuantizedLayer

if TYPE_CHECKING:
    from torch import nn

    from serving.models.zoo import LoadedModel


def save_integers(
    path: Path,
    layers: dict[str, tuple[QuantizedWeight, np.ndarray | None]],
    meta: dict,
    input_grids: dict[str, tuple[float, float, int]] | None = None,
) -> str:
    """Write the file atomically; return its sha256."""
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(meta))}
    for name, (qw, bias) in layers.items():
        arrays[f"{name}/q"] = qw.q.astype(np.int8)
        arrays[f"{name}/step"] = np.asarray(qw.scale, np.float32)
        arrays[f"{name}/bits"] = np.array(qw.spec.bits, np.int8)
        if not qw.spec.symmetric:
            arrays[f"{name}/zero_point"] = qw.zero_point.astype(np.int8)
        if bias is not None:
            arrays[f"{name}/bias"] = bias.astype(np.float32)
    for name, (offset, log_step, bits) in (input_grids or {}).items():
        arrays[f"{name}/input_offset"] = np.array(offset, np.float32)
        arrays[f"{name}/input_log_step"] = np.array(log_step, np.float32)
        arrays[f"{name}/input_bits"] = np.array(bits, np.int8)
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
        symmetric = "zero_point" not in got
        if symmetric != plan.quant_for(layer).symmetric:
            grid = "symmetric" if symmetric else "asymmetric"
            raise RtqError(f"{path}: {layer.name} was trained on a {grid} grid, not plan {plan.name}'s")
        spec = WeightQuant(bits, per_channel=True, symmetric=symmetric, search_scale=False)
        zp = np.zeros_like(step, np.int8) if symmetric else got["zero_point"].astype(np.int8)
        if q.min() < spec.qmin or q.max() > spec.qmax or zp.min() < spec.qmin or zp.max() > spec.qmax:
            raise RtqError(f"{path}: {layer.name} holds values outside the {bits}-bit range")
        qw = QuantizedWeight(q.astype(np.int8), step.astype(np.float32), zp, spec)
        bias = got.get("bias")
        if bias is None and layer.bias is not None:
            bias = initializer(model, layer.bias)
        out.append(QuantizedLayer(layer, qw, bias))
    return out


def load_student(loaded: LoadedModel, path: Path) -> nn.Module:
    """The fake-quantized student exactly as `rtq qat` left it (folded model, trained integers and
    steps, learned input grids), to evaluate or compare with what a served variant computes."""
    import copy

    import torch

    from serving.qat.fold import fold_batchnorm
    from serving.qat.prepare import prepare
    from serving.quantize.plan import parse_plan

    by_layer, meta = read_integers(path)
    plan = parse_plan(meta.get("plan", {}), str(path))
    model = copy.deepcopy(loaded.module).eval()
    size = loaded.spec.preprocessing.resolution
    fold_batchnorm(model, torch.zeros(1, 3, size, size))
    with torch.no_grad():
        for q in prepare(model, plan):
            got = by_layer.get(q.name)
            if got is None or "input_log_step" not in got:
                raise RtqError(
                    f"{path} has no {'integers' if got is None else 'input grid'} for {q.name} "
                    "(another model, or written before input grids were saved: rerun `rtq qat`)"
                )
            w = q.inner.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            step = torch.from_numpy(got["step"]).to(w)
            zp = torch.from_numpy(got.get("zero_point", np.zeros(len(step), np.int8))).to(w)
            w.copy_((torch.from_numpy(got["q"]).to(w) - zp.view(shape)) * step.view(shape))
            if q.inner.bias is not None and "bias" in got:
                q.inner.bias.copy_(torch.from_numpy(got["bias"]))
            q.weight_q.bits, q.weight_q.symmetric = int(got["bits"]), "zero_point" not in got
            q.weight_q.log_step.copy_(step.log())
            q.weight_q.zero_point.copy_(zp)
            a = q.input_q
            a.bits, a.initialized = int(got["input_bits"]), True
            a.offset.fill_(float(got["input_offset"]))
            a.log_step.fill_(float(got["input_log_step"]))
    return model
