"""Fold every batch norm into the convolution in front of it, as the ONNX exporter does.

QAT then quantizes the very weights that ship (a folded conv's per-channel grid), and its layer
names are the ones `serving.quantize.graph.layers_of` reads from the exported ONNX graph.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.errors import RtqError


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, bn) module names where the bn runs right after the conv on the conv's output."""
    order: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, inp, out, name=name: order.append((name, mod, inp[0], out))
                )
            )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    pairs = []
    for (cname, conv, _, cout), (bname, bn, bin_, _) in zip(order, order[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bin_ is cout:
            pairs.append((cname, bname))
    return pairs


def _activation_only(bn: nn.BatchNorm2d) -> nn.Module:
    # timm's BatchNormAct2d applies its activation (and drop) after normalizing; keep those.
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, act) if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold in place (eval statistics); return the conv names that absorbed a batch norm."""
    pairs = _conv_bn_pairs(model, example)
    for cname, bname in pairs:
        conv: nn.Conv2d = model.get_submodule(cname)
        bn: nn.BatchNorm2d = model.get_submodule(bname)
        if bn.running_mean is None or bn.running_var is None:
            raise RtqError(f"{bname} keeps no running statistics; it cannot be folded")
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * factor + beta
        conv.bias = nn.Parameter(new_bias.detach().clone())
        _set(model, bname, _activation_only(bn))
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise RtqError(f"batch norms with no conv in front of them cannot be folded: {left[:3]}")
    return [c for c, _ in pairs]
