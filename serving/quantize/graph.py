"""The quantizable layers of an exported FP32 ONNX graph (BN already folded by the exporter).

Everything below 8 bits works on this graph rather than on the PyTorch module: the weights seen
here are exactly the ones that ship, and ORT evaluates a candidate in a second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from serving.errors import RtqError

COMPONENTS = ("stem", "fused_expand", "pw_expand", "depthwise", "se", "project", "head", "classifier")


@dataclass(frozen=True)
class Layer:
    name: str  # module path, e.g. "blocks.1.0.conv_dw"
    op: str  # Conv or Gemm
    weight: str  # initializer names
    bias: str | None
    input: str  # activation tensor feeding the layer
    component: str
    shape: tuple[int, ...]
    strides: tuple[int, ...] = (1, 1)
    pads: tuple[int, ...] = (0, 0, 0, 0)
    group: int = 1

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))


def component_of(name: str, op: str, group: int, siblings: set[str]) -> str:
    """Map a timm EfficientNet module path to its component type."""
    if op == "Gemm" or name.endswith("classifier"):
        return "classifier"
    leaf = name.rsplit(".", 1)[-1]
    if name == "conv_stem":
        return "stem"
    if name == "conv_head":
        return "head"
    if ".se." in f".{name}.":
        return "se"
    if leaf == "conv_dw" or group > 1:
        return "depthwise"
    if leaf == "conv_pwl":
        return "project"
    if leaf == "conv_pw":  # an expansion in MBConv; the projection in a depthwise-separable block
        block = name.rsplit(".", 1)[0]
        return "pw_expand" if f"{block}.conv_pwl" in siblings else "project"
    if leaf in ("conv_exp", "conv"):  # Fused-MBConv 3x3 expansion (EfficientNetV2), or its e=1 form
        return "fused_expand"
    raise RtqError(f"layer {name} ({op}) has no known component type")


def layers_of(model: onnx.ModelProto) -> list[Layer]:
    inits = {t.name: t for t in model.graph.initializer}
    convs = [
        n for n in model.graph.node
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits
    ]  # fmt: skip
    names = {re.sub(r"\.weight$", "", n.input[1]) for n in convs}
    out = []
    for n in convs:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        name = re.sub(r"\.weight$", "", n.input[1])
        group = int(attrs.get("group", 1))
        out.append(
            Layer(
                name=name,
                op=n.op_type,
                weight=n.input[1],
                bias=n.input[2] if len(n.input) > 2 and n.input[2] else None,
                input=n.input[0],
                component=component_of(name, n.op_type, group, names),
                shape=tuple(inits[n.input[1]].dims),
                strides=tuple(attrs.get("strides", (1, 1))),
                pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
                group=group,
            )
        )
    return out


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise RtqError(f"no initializer {name}")


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy with some initializers replaced (e.g. by fake-quantized weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return out


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy that also returns the named intermediate tensors (for calibration statistics)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for t in tensors:
        if t not in have:
            out.graph.output.append(helper.make_empty_tensor_value_info(t))
    return out
