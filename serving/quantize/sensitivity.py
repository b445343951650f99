"""`rtq sensitivity`: each layer alone at low bits, measured against FP32 on calibration images.

For every layer: its weights alone at each weight width (round-to-nearest, per-channel), and its
input activation alone at each activation width (per-tensor, min/max range), all else FP32.
Reported per layer and grouped by component type, with the project's hypotheses checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from serving.quantize.graph import Layer, initializer, layers_of, with_outputs, with_weights
from serving.quantize.lowbit import WeightQuant, activation_qparams, quantize_weight
from serving.quantize.ptq import logits, run


@dataclass(frozen=True)
class Sensitivity:
    layer: str
    component: str
    params: int
    depth: float  # position in the network, 0 = first layer, 1 = last
    kind: str  # "weight" or "activation"
    bits: int
    agreement: float  # top-1 agreement with FP32
    kl: float  # mean KL(FP32 || quantized) of the softmax outputs

    def to_dict(self) -> dict:
        return asdict(self)


def kl_divergence(ref_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(ref_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def with_fake_quant_input(model: onnx.ModelProto, layer: Layer, scale: float, zp: int, bits: int):
    """Insert (clip(round(x / s) + zp, 0, 2^b - 1) - zp) * s before this one layer only."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    p = f"fq_{layer.name}"
    consts = {f"{p}_s": scale, f"{p}_zp": float(zp), f"{p}_lo": 0.0, f"{p}_hi": float(2**bits - 1)}
    for name, value in consts.items():
        out.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
    nodes = [
        helper.make_node("Div", [layer.input, f"{p}_s"], [f"{p}_a"]),
        helper.make_node("Round", [f"{p}_a"], [f"{p}_b"]),
        helper.make_node("Add", [f"{p}_b", f"{p}_zp"], [f"{p}_c"]),
        helper.make_node("Clip", [f"{p}_c", f"{p}_lo", f"{p}_hi"], [f"{p}_d"]),
        helper.make_node("Sub", [f"{p}_d", f"{p}_zp"], [f"{p}_e"]),
        helper.make_node("Mul", [f"{p}_e", f"{p}_s"], [f"{p}_out"]),
    ]
    for n in out.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] == layer.weight:
            n.input[0] = f"{p}_out"
    out.graph.node.extend(nodes)
    # Keep topological order: move the new nodes right before their consumer.
    ordered = []
    for n in out.graph.node[: -len(nodes)]:
        if n.op_type in ("Conv", "Gemm") and n.input[0] == f"{p}_out":
            ordered.extend(nodes)
        ordered.append(n)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out


def activation_ranges(model: onnx.ModelProto, layers: list[Layer], x: np.ndarray) -> dict[str, tuple]:
    names = sorted({layer.input for layer in layers if layer.input != model.graph.input[0].name})
    values = run(with_outputs(model, names), x, names) if names else []
    ranges = {n: (float(v.min()), float(v.max())) for n, v in zip(names, values, strict=True)}
    ranges[model.graph.input[0].name] = (float(x.min()), float(x.max()))
    return ranges


def measure(
    model: onnx.ModelProto,
    x: np.ndarray,
    weight_bits: tuple[int, ...] = (2, 4),
    act_bits: tuple[int, ...] = (4, 8),
    progress: bool = True,
    on_result: Callable[[Sensitivity], None] | None = None,
    only: set[str] | None = None,
) -> list[Sensitivity]:
    every = layers_of(model)
    layers = [layer for layer in every if only is None or layer.name in only]
    ref = logits(model, x)
    ref_top1 = ref.argmax(1)
    ranges = activation_ranges(model, layers, x) if act_bits else {}
    results = []
    jobs = [(layer, "weight", b) for layer in layers for b in weight_bits]
    jobs += [(layer, "activation", b) for layer in layers for b in act_bits]
    for layer, kind, bits in tqdm(jobs, desc="sensitivity", disable=not progress):
        if kind == "weight":
            w = initializer(model, layer.weight)
            q = quantize_weight(w, WeightQuant(bits, search_scale=False)).dequantize()
            candidate = with_weights(model, {layer.weight: q})
        else:
            scale, zp = activation_qparams(*ranges[layer.input], bits)
            candidate = with_fake_quant_input(model, layer, scale, zp, bits)
        out = logits(candidate, x)
        depth = [lay.name for lay in every].index(layer.name) / max(len(every) - 1, 1)
        agreement = round(float((out.argmax(1) == ref_top1).mean()), 4)
        r = Sensitivity(
            layer.name,
            layer.component,
            layer.params,
            round(depth, 3),
            kind,
            bits,
            agreement,
            round(kl_divergence(ref, out), 5),
        )
        results.append(r)
        if on_result:
            on_result(r)
    return results


def by_component(results: list[Sensitivity]) -> list[dict]:
    """Median agreement and KL per (component, kind, bits)."""
    groups: dict[tuple, list[Sensitivity]] = {}
    for r in results:
        groups.setdefault((r.component, r.kind, r.bits), []).append(r)
    return [
        {"component": c, "kind": k, "bits": b, "layers": len(rs),
         "median_agreement": round(float(np.median([r.agreement for r in rs])), 4),
         "median_kl": round(float(np.median([r.kl for r in rs])), 5),
         "worst_layer": min(rs, key=lambda r: r.agreement).layer}
        for (c, k, b), rs in sorted(groups.items())
    ]  # fmt: skip


def hypotheses(results: list[Sensitivity], bits: int = 4) -> list[dict]:
    """The project's hypotheses, each checked on the measured KL at `bits`-bit weights."""
    w = [r for r in results if r.kind == "weight" and r.bits == bits]
    if not w:
        return []

    def med(rs: list[Sensitivity]) -> float:
        return float(np.median([r.kl for r in rs])) if rs else float("nan")

    comp = {c: [r for r in w if r.component == c] for c in {r.component for r in w}}
    body = [r for r in w if r.component not in ("stem", "classifier")]
    dw, pw = comp.get("depthwise", []), comp.get("pw_expand", []) + comp.get("fused_expand", [])
    se = comp.get("se", [])
    ends = comp.get("stem", []) + comp.get("classifier", [])
    early = [r for r in body if r.depth < 0.5]
    late = [r for r in body if r.depth >= 0.5]
    checks = [
        ("depthwise layers are more tolerant than pointwise expansions", med(dw), med(pw), med(dw) < med(pw)),
        (
            "pointwise expansions and SE are more sensitive than the body median",
            med(pw + se),
            med(body),
            med(pw + se) > med(body),
        ),
        (
            "first and last layers are critical (above the body median)",
            med(ends),
            med(body),
            med(ends) > med(body),
        ),
        ("early blocks are more tolerant than late blocks", med(early), med(late), med(early) < med(late)),
    ]
    return [
        {"hypothesis": h, "median_kl": round(a, 5), "compared_with": round(b, 5),
         "verdict": "holds" if ok else ("n/a" if np.isnan(a) or np.isnan(b) else "does not hold")}
        for h, a, b, ok in checks
    ]  # fmt: skip
