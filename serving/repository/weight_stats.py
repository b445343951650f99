"""Bits per weight as stored, counting quantization scales and zero-points.

Counts the weights of Conv/Gemm/MatMul layers (biases, BN and activation ranges excluded): for
each layer, the bits of its stored weight tensor plus those of the scale/zero-point tensors that
dequantize it, divided by the number of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ONNX_WEIGHTED = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}
_OV_WEIGHTED = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}
_OV_WEIGHT_PATH = {
    "Convert",
    "Subtract",
    "Multiply",
    "Reshape",
    "Unsqueeze",
    "Transpose",
    "FakeQuantize",
    "FakeConvert",
}


@dataclass(frozen=True)
class WeightStats:
    params: int
    bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params if self.params else 0.0


def onnx_weight_stats(path: Path) -> WeightStats:
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def bits(name: str) -> tuple[int, int]:
        t = inits.get(name)
        if t is None:
            return 0, 0
        n = int(np.prod(t.dims)) if t.dims else 1
        width = 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            width = 4
        elif t.data_type in (getattr(onnx.TensorProto, "INT2", -1), getattr(onnx.TensorProto, "UINT2", -1)):
            width = 2
        return n, n * width

    params = total = 0
    for node in model.graph.node:
        idx = _ONNX_WEIGHTED.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        name = node.input[idx]
        src = producers.get(name)
        if src is not None and src.op_type == "DequantizeLinear":
            n, b = bits(src.input[0])
            extra = sum(bits(i)[1] for i in src.input[1:] if i)
        elif name in inits:
            n, b = bits(name)
            extra = 0
        else:
            continue  # MatMul on two activations: no weights
        if n:
            params += n
            total += b + extra
    return WeightStats(params, total)


def openvino_weight_stats(path: Path) -> WeightStats:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    params = total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _OV_WEIGHTED:
            continue
        consts: dict[str, tuple[int, int]] = {}
        stack = [op.input_value(1).get_node()]
        while stack:
            node = stack.pop()
            kind = node.get_type_name()
            if kind == "Constant":
                shape = node.get_output_partial_shape(0).to_shape()
                n = int(np.prod(list(shape))) if len(shape) else 1
                consts[node.get_friendly_name()] = (n, n * node.get_element_type().bitwidth)
            elif kind in _OV_WEIGHT_PATH:
                stack.extend(v.get_node() for v in node.input_values())
        if not consts:
            continue  # weights come from an activation
        n_weight = max(n for n, _ in consts.values())
        params += n_weight
        total += sum(b for _, b in consts.values())
    return WeightStats(params, total)
