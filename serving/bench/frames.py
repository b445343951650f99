"""Labelled frames for load generators: imagenet-val images as FP32 tensors or JPEG bytes, with labels.

Client side only (numpy, PIL, our preprocessing and data modules): no runtime, no OpenVINO, so a
Locust process can import it (OpenVINO + gevent hang together, see FIELD-NOTES).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.data.datasets import open_labelled
from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing, preprocess
from serving.settings import default_repository

# EfficientNet-Lite0's data config (mean 127 / std 128 on 0-255 pixels), used when the variant's
# manifest is not on this machine (a load generator on another host).
LITE0_PREPROCESSING = Preprocessing(224, 0.875, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), "bicubic")
INPUT_MODES = ("tensor", "jpeg")


@dataclass(frozen=True)
class Frame:
    payload: np.ndarray  # [1, 3, H, W] float32 for "tensor", [1] object (bytes) for "jpeg"
    label: int  # ImageNet-1k class index; -1 when unknown
    name: str


def preprocessing_for(model: str, repository: Path | None = None) -> Preprocessing:
    """The variant's own preprocessing from its manifest; Lite0's when the repository is elsewhere."""
    manifest = (repository or default_repository()) / model / "manifest.json"
    if manifest.is_file():
        return Preprocessing.from_dict(json.loads(manifest.read_text())["preprocessing"])
    return LITE0_PREPROCESSING


def load_frames(
    data: str | Path,
    n: int,
    mode: str = "tensor",
    model: str = "",
    repository: Path | None = None,
    data_root: Path | None = None,
) -> list[Frame]:
    """The first n labelled images of `data` (a folder or a name under the data root)."""
    if mode not in INPUT_MODES:
        raise RtqError(f"input mode {mode!r} unknown; expected one of {INPUT_MODES}")
    if n < 1:
        raise RtqError(f"need at least one image, got {n}")
    labelled = open_labelled(data, data_root).head(n)
    index = _class_index(labelled.root)
    pp = preprocessing_for(model, repository) if mode == "tensor" else None
    frames = []
    for item in labelled.items:
        label = index.get(item.path.name, -1)
        if pp is not None:
            payload = preprocess(item.path, pp)[None].astype(np.float32)
        else:
            payload = np.array([item.path.read_bytes()], dtype=np.object_)
        frames.append(Frame(payload, label, item.path.name))
    return frames


def _class_index(root: Path) -> dict[str, int]:
    """labels.csv's `index` column (ImageNet-1k class index) per file, when the folder has one."""
    table = root / "labels.csv"
    if not table.is_file():
        return {}
    with table.open() as f:
        rows = list(csv.DictReader(f))
    if not rows or "index" not in rows[0]:
        return {}
    return {r["file"]: int(r["index"]) for r in rows}


def infer_inputs(frame: Frame, input_name: str = "input"):
    """tritonclient.grpc inputs for one frame (FP32 tensor, or one BYTES element holding the JPEG)."""
    import tritonclient.grpc as grpcclient

    if frame.payload.dtype == np.object_:
        inp = grpcclient.InferInput(input_name, [1], "BYTES")
    else:
        inp = grpcclient.InferInput(input_name, list(frame.payload.shape), "FP32")
    inp.set_data_from_numpy(frame.payload)
    return [inp]
