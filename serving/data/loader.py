"""Decode and resize a labelled set once into uint8 arrays; each variant then only normalises."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from serving.data.datasets import LabelledSet
from serving.models.preprocessing import Preprocessing, load_image, resize_crop


def load_uint8(images: LabelledSet, pp: Preprocessing, progress: bool = True) -> np.ndarray:
    """(N, 3, H, W) uint8 after resize + crop; PIL releases the GIL, so threads use both cores."""
    out = np.empty((len(images), *pp.input_shape), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = resize_crop(load_image(images.items[i].path), pp)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(
            tqdm(
                pool.map(one, range(len(images))),
                total=len(images),
                desc=f"decode {images.name}",
                disable=not progress,
                leave=False,
            )
        )
    return out
