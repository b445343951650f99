"""INT4 / INT2 weights stored packed in ONNX, and unpacked to INT8 at load.

Packed: each low-bit weight is an INT4 (opset 21) or INT2 (opset 25) initializer feeding a
DequantizeLinear, so the file really shrinks. Unpacked: the same integers as INT8 in a plain
opset-18 QDQ graph, which ONNX Runtime and OpenVINO fuse into their INT8 convolution kernels:
no dequantize-per-run penalty, and the values fit exactly.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

PACKED_TYPES = {4: TensorProto.INT4, 2: TensorProto.INT2}
_ML_DTYPES = {4: ml_dtypes.int4, 2: ml_dtypes.int2}
_OPSET_FOR = {4: 21, 2: 25}
UNPACKED_OPSET = 18


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = version
    model.ir_version = max(model.ir_version, 11 if version >= 25 else 10 if version >= 21 else 8)


def pack(model: onnx.ModelProto, storage_bits: dict[str, int]) -> onnx.ModelProto:
    """Rewrite the named int8 weight initializers (and their zero points) as INT4/INT2."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dq_zp = {n.input[0]: n.input[2] for n in out.graph.node
             if n.op_type == "DequantizeLinear" and len(n.input) > 2}  # fmt: skip
    targets: dict[str, int] = {}
    for name, bits in storage_bits.items():
        if bits in PACKED_TYPES:
            targets[name] = bits
            if name in dq_zp:
                targets[dq_zp[name]] = bits
    for i, t in enumerate(out.graph.initializer):
        bits = targets.get(t.name)
        if bits is None:
            continue
        values = numpy_helper.to_array(t).astype(np.int64)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if values.size and (values.min() < lo or values.max() > hi):
            raise ValueError(f"{t.name} holds values outside int{bits}")
        # ml_dtypes arrays serialize as packed raw bytes (2 or 4 values a byte), not int32 fields.
        packed = values.astype(_ML_DTYPES[bits]).reshape(tuple(t.dims))
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(packed, t.name))
    if targets:
        _set_opset(out, max(_OPSET_FOR[b] for b in targets.values()))
    return out


def is_packed(model: onnx.ModelProto) -> bool:
    return any(t.data_type in PACKED_TYPES.values() for t in model.graph.initializer)


def unpack(model: onnx.ModelProto) -> onnx.ModelProto:
    """INT4/INT2 initializers -> INT8 with the same values; back to opset 18 for every runtime.

    A weight with zero points (an asymmetric grid) becomes q - zp with zero points 0: the same
    dequantized values (|q - zp| <= 15 fits int8), and INT8 kernels take symmetric weights.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    values = {t.name: numpy_helper.to_array(t).astype(np.int16) for t in out.graph.initializer
              if t.data_type in PACKED_TYPES.values()}  # fmt: skip
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in values:
            continue
        zp = values.get(node.input[2])
        if zp is None or not zp.any():
            continue
        q = values[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if zp.ndim:
            shape[axis % q.ndim] = -1
        values[node.input[0]] = q - zp.reshape(shape)
        values[node.input[2]] = np.zeros_like(zp)
    for name, v in values.items():
        out.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(v.astype(np.int8), name))
    for op in out.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = UNPACKED_OPSET
    out.ir_version = 8
    return out


def packed_fraction(model: onnx.ModelProto) -> dict[str, int]:
    """How many weight tensors are stored per packed width, e.g. {"int4": 48, "int2": 3}."""
    names = {v: f"int{k}" for k, v in PACKED_TYPES.items()}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    counts: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_type in names and t.name in weights:
            counts[names[t.data_type]] = counts.get(names[t.data_type], 0) + 1
    return counts


def load_unpacked(path: Path) -> onnx.ModelProto | None:
    """The unpacked model if the file holds packed weights, else None (load the file as is)."""
    if path.suffix != ".onnx":
        return None
    model = onnx.load(str(path))
    return unpack(model) if is_packed(model) else None
