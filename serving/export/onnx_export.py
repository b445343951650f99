"""PyTorch -> ONNX (FP32, static spatial shapes, dynamic batch) and ONNX FP32 -> FP16."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import RtqError
from serving.models.zoo import LoadedModel

# The dynamo exporter folds the static pads into Conv's own asymmetric `pads`; the TorchScript one
# leaves ConstantOfShape/Slice/Pad chains. INT4/INT2 packing (opset >= 21) is the quantize stage's.
ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class StaticPadConv2d(nn.Conv2d):
    """TF 'same' convolution with the padding fixed for one input size (no Shape/Ceil/Pad chain)."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        self.load_state_dict(conv.state_dict())
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def _same_pad(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def make_static(module: nn.Module, resolution: int) -> nn.Module:
    """Copy of `module` with every dynamic-'same' conv replaced by a statically padded one."""
    from timm.layers import Conv2dSame

    model = copy.deepcopy(module).eval()
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, n=name: shapes.__setitem__(n, inp[0].shape[-2:]))
        for name, m in model.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    for name, (h, w) in shapes.items():
        conv = model.get_submodule(name)
        top, bottom = _same_pad(h, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        left, right = _same_pad(w, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticPadConv2d(conv, (left, right, top, bottom)))
    return model


def export_onnx(loaded: LoadedModel, path: Path, opset: int = ONNX_OPSET) -> Path:
    """Export FP32 with a dynamic batch axis; verify the graph has no shape-dependent padding."""
    res = loaded.spec.preprocessing.resolution
    model = make_static(loaded.module, res)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (torch.zeros(1, 3, res, res),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.optimize()
    graph = program.model_proto
    onnx.checker.check_model(graph)
    dynamic = {n.op_type for n in graph.graph.node} & {"Shape", "Ceil", "Pad", "ConstantOfShape"}
    if dynamic:
        raise RtqError(f"export of {loaded.spec.name} left shape-dependent ops: {sorted(dynamic)}")
    onnx.save(graph, str(path))  # one self-contained file: Triton and the quantizers want that
    return path


def convert_fp16(src: Path, dst: Path) -> Path:
    """FP16 weights and math, FP32 inputs/outputs so clients send the same tensors."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst
