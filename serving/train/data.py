"""Training data: JPEGs decoded once into uint8 arrays cached on disk, augmented from memory.

Decoding a 160 px JPEG costs about as much as the augmentation itself, so both splits are decoded
once (two processes) into `.npy` files that later runs memory-map. Train images keep their stored
160 px; val images go through the zoo's own `resize_crop` at the evaluation size, so accuracy
measured during training is what `rtq eval` measures on the exported model.

Augmentation of each sample is seeded by (run seed, epoch, position in the epoch): the images an
epoch sees do not depend on the number of loader workers, and a run resumed mid-epoch sees the
same ones it would have seen without the interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing, load_image, resize_crop
from serving.settings import default_data_root

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
TRAIN_STORE_SIZE = 160


@dataclass(frozen=True)
class Split:
    paths: tuple[Path, ...]
    labels: np.ndarray  # int64 index into `classes`

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ImageFolders:
    root: Path
    classes: tuple[str, ...]  # wnids, sorted: index i is logit i
    train: Split
    val: Split


def _class_dirs(split_dir: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
        for d in sorted(split_dir.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }


def open_folders(data: str, data_root: Path | None) -> ImageFolders:
    """`<data>/train/<class>/*` and `<data>/val/<class>/*` with the same classes, or RtqError."""
    root = Path(data)
    if not root.is_dir():
        base = data_root or default_data_root()
        if root.is_absolute() or not (base / root).is_dir():
            raise RtqError(
                f"data folder {data} not found (looked as given and under {base}); point --data-root "
                f"or RTQ_DATA_ROOT at the folder holding {Path(data).name}/{{train,val}}/"
            )
        root = base / root
    splits: dict[str, dict[str, list[Path]]] = {}
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise RtqError(f"{root} has no {missing[0]}/ folder; expected {root}/{{train,val}}/<class>/*.JPEG")
    for name in ("train", "val"):
        d = root / name
        dirs = _class_dirs(d)
        if not dirs:
            raise RtqError(f"{d} holds no class folders; expected {d}/<class>/*.JPEG")
        empty = [c for c, files in dirs.items() if not files]
        if empty:
            raise RtqError(f"{len(empty)} class folders in {d} hold no images (e.g. {d / empty[0]})")
        splits[name] = dirs
    train_classes, val_classes = set(splits["train"]), set(splits["val"])
    if train_classes != val_classes:
        only_train = sorted(train_classes - val_classes)
        only_val = sorted(val_classes - train_classes)
        raise RtqError(
            f"class folders differ between {root / 'train'} and {root / 'val'}: "
            f"{len(only_train)} only in train {only_train[:3]}, {len(only_val)} only in val {only_val[:3]}"
        )
    classes = tuple(sorted(train_classes))

    def split(dirs: dict[str, list[Path]]) -> Split:
        paths = [p for c in classes for p in dirs[c]]
        labels = np.concatenate([np.full(len(dirs[c]), i, dtype=np.int64) for i, c in enumerate(classes)])
        return Split(tuple(paths), labels)

    return ImageFolders(root, classes, split(splits["train"]), split(splits["val"]))


def balanced_subset(split: Split, n: int | None) -> Split:
    """The first n images taking classes in turn: a fixed subset with every class in it."""
    if n is None or n >= len(split):
        return split
    keep = balanced_indices(split.labels, n)
    return Split(tuple(split.paths[i] for i in keep), split.labels[keep])


def balanced_indices(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Indices of the first n items taking classes in turn, in their original order."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        by_class.setdefault(c, []).append(i)
    order: list[int] = []
    depth = 0
    while len(order) < n:
        order.extend(idx[depth] for idx in by_class.values() if depth < len(idx))
        depth += 1
    return np.array(sorted(order[:n]), dtype=np.int64)


def _decode(job: tuple[str, Preprocessing]) -> np.ndarray:
    path, pp = job
    return resize_crop(load_image(path), pp)


def _quiet_worker() -> None:
    # Ctrl-C goes to the whole process group; only the parent decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cached_array(split: Split, pp: Preprocessing, cache_dir: Path, workers: int = 2) -> np.ndarray:
    """uint8 N x 3 x H x W of the split under `pp`, decoded once and memory-mapped afterwards."""
    key = hashlib.sha256(
        json.dumps(
            {
                "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in split.paths],
                "pp": pp.to_dict(),
            }
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"images-{pp.resolution}px-{len(split)}-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), *pp.input_shape))
    jobs = [(str(p), pp) for p in split.paths]
    if workers > 1 and len(jobs) > 64:
        with get_context("fork").Pool(workers, initializer=_quiet_worker) as pool:
            for i, arr in enumerate(pool.imap(_decode, jobs, chunksize=32)):
                out[i] = arr
    else:
        for i, job in enumerate(jobs):
            out[i] = _decode(job)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def train_store_preprocessing(mean: Sequence[float], std: Sequence[float]) -> Preprocessing:
    # The stored train images keep imagenette's full 160 px frame; crops are drawn from it later.
    return Preprocessing(TRAIN_STORE_SIZE, 1.0, tuple(mean), tuple(std), "bicubic")  # type: ignore[arg-type]


@dataclass(frozen=True)
class Augment:
    size: int
    crop_scale_min: float
    randaug_ops: int
    randaug_magnitude: float


def build_transform(aug: Augment):
    from torchvision.transforms import v2

    ops = [
        v2.RandomResizedCrop(aug.size, scale=(aug.crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if aug.randaug_ops > 0 and aug.randaug_magnitude > 0:
        # 11 bins put the magnitude on the 0-10 scale of the RandAugment and EfficientNetV2 papers;
        # torchvision has no fractional magnitude, so it is rounded.
        ops.append(v2.RandAugment(aug.randaug_ops, int(round(aug.randaug_magnitude)), num_magnitude_bins=11))
    return v2.Compose(ops)


class AugmentedImages(Dataset):
    """Indexed by (image index, sample seed) pairs from `EpochBatches`; returns uint8 CHW + label."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, aug: Augment) -> None:
        self.images = images
        self.labels = labels
        # Built here, in the parent: a loader worker forked from a trainer with live compile
        # threads hung for good importing torchvision's transforms (a lock held at fork time).
        self._transform = build_transform(aug)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        img = torch.from_numpy(np.array(self.images[index]))
        # fork_rng keeps the trainer's own RNG stream untouched when there are no loader workers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            img = self._transform(img)
        return img, int(self.labels[index])


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch, a pure function of (seed, epoch); `start` skips batches already done."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0) -> None:
        rng = np.random.default_rng([seed, epoch, 0xDA7A])
        perm = rng.permutation(n)
        sample_seeds = rng.integers(0, 2**62, size=n)
        # Whole batches only (batch norm on a 3-image tail is noise), unless the set is one batch.
        stop = n - batch_size + 1 if n >= batch_size else 1
        self.batches = [
            [(int(perm[j]), int(sample_seeds[j])) for j in range(i, min(i + batch_size, n))]
            for i in range(0, stop, batch_size)
        ]
        self.start = start

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches[self.start :])


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)


def worker_init(_worker_id: int) -> None:
    _quiet_worker()
    # The parent's two threads run the model; a loader worker with more than one would fight them.
    torch.set_num_threads(1)
