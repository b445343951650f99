"""Calibration images: only ever from a calibration folder, never from an evaluation set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.data.datasets import open_labelled
from serving.data.loader import load_uint8
from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing, normalize

MIN_CALIBRATION_IMAGES = 16
EVAL_SETS = ("imagenet-val", "val")


def calibration_inputs(
    folder: str, pp: Preprocessing, count: int, data_root: Path | None = None, progress: bool = True
) -> np.ndarray:
    """(count, 3, H, W) float32 from the first `count` images of the folder's fixed order."""
    if Path(folder).name in EVAL_SETS:
        raise RtqError(f"{folder} is an evaluation set; calibrate on imagenet-calib instead")
    if count < MIN_CALIBRATION_IMAGES:
        raise RtqError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} images, got {count}")
    images = open_labelled(folder, data_root)
    if len(images) < count:
        raise RtqError(f"{images.root} has {len(images)} images; calibration asked for {count}")
    # Spread over classes: calib folders are sorted by class, so take a strided sample.
    step = len(images) / count
    picked = type(images)(images.name, images.root, tuple(images.items[int(i * step)] for i in range(count)))
    return normalize(load_uint8(picked, pp, progress), pp)
