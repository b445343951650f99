"""Top-1/top-5 with 95% intervals and agreement with FP32, all on the same images."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.models.preprocessing import Preprocessing, normalize


@dataclass(frozen=True)
class Accuracy:
    eval_set: str
    n: int
    top1: float
    top5: float
    top1_ci95: tuple[float, float]
    top1_fp32: float
    agreement_fp32: float

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: stays inside [0, 1] and behaves at small n, unlike k/n +- 1.96 se."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def predict_top5(
    infer: Callable[[np.ndarray], np.ndarray],
    images_uint8: np.ndarray,
    pp: Preprocessing,
    batch: int = 32,
    desc: str = "eval",
    progress: bool = True,
) -> np.ndarray:
    """(N, 5) class indices, best first, from any batch -> logits callable."""
    out = []
    for i in tqdm(range(0, len(images_uint8), batch), desc=desc, disable=not progress, leave=False):
        out.append(topk(np.asarray(infer(normalize(images_uint8[i : i + batch], pp))), 5))
    return np.concatenate(out)


def score(eval_set: str, pred5: np.ndarray, ref5: np.ndarray, labels: np.ndarray) -> Accuracy:
    n = len(labels)
    hits = int((pred5[:, 0] == labels).sum())
    return Accuracy(
        eval_set=eval_set,
        n=n,
        top1=round(hits / n, 4),
        top5=round(float((pred5 == labels[:, None]).any(axis=1).mean()), 4),
        top1_ci95=wilson_interval(hits, n),
        top1_fp32=round(float((ref5[:, 0] == labels).mean()), 4),
        agreement_fp32=round(float((pred5[:, 0] == ref5[:, 0]).mean()), 4),
    )


def reference_top5(
    loaded,
    images_uint8: np.ndarray,
    image_names: list[str],
    cache_dir: Path | None,
    progress: bool = True,
) -> np.ndarray:
    """FP32 PyTorch predictions: the reference every variant is compared with, cached on disk.

    The cache key covers weights, preprocessing and the exact image list, so it cannot go stale.
    """
    import torch

    pp = loaded.spec.preprocessing
    key = hashlib.sha256(json.dumps([loaded.provenance(), pp.to_dict(), image_names]).encode()).hexdigest()[
        :20
    ]
    path = cache_dir / f"{loaded.spec.name}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded.module(torch.from_numpy(x)).numpy()

    ref = predict_top5(infer, images_uint8, pp, batch=16, desc="fp32 pytorch", progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, ref)
    return ref
