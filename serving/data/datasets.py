"""Readers for labelled image folders; labels are wnids so any model can map them to its own classes.

Three layouts are understood, detected in this order:
- `labels.csv` with `file,wnid[,index]` (our `imagenet-val/` and `imagenet-calib/`);
- `LOC_val_solution.csv` (the ILSVRC2012 val layout as distributed with the localisation
  challenge: `ImageId,PredictionString`, the wnid first in the prediction string);
- wnid-named class folders (`<root>/n01440764/*.JPEG`: imagenette, torchvision's ImageFolder val).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.errors import RtqError
from serving.settings import default_data_root

_WNID = re.compile(r"^n\d{8}$")
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    wnid: str


@dataclass(frozen=True)
class LabelledSet:
    name: str
    root: Path
    items: tuple[LabelledImage, ...]

    def __len__(self) -> int:
        return len(self.items)

    def for_classes(self, wnids: Sequence[str]) -> tuple[LabelledSet, np.ndarray]:
        """Keep the images whose class the model knows; return them with model label indices."""
        index = {w: i for i, w in enumerate(wnids)}
        kept = tuple(it for it in self.items if it.wnid in index)
        if not kept:
            raise RtqError(
                f"no image in {self.root} belongs to the model's {len(wnids)} classes "
                f"(the folder's classes start {sorted({it.wnid for it in self.items})[:3]})"
            )
        labels = np.fromiter((index[it.wnid] for it in kept), dtype=np.int64, count=len(kept))
        return LabelledSet(self.name, self.root, kept), labels

    def head(self, n: int | None) -> LabelledSet:
        """The first n images in a fixed order (deterministic subsets for tests and quick runs)."""
        if n is None or n >= len(self.items):
            return self
        if n <= 0:
            raise RtqError(f"image limit must be positive, got {n}")
        return LabelledSet(self.name, self.root, self.items[:n])


def resolve_folder(folder: str | Path, data_root: Path | None = None) -> Path:
    """A path as given, or a name under the data root (`imagenet-val` -> <root>/imagenet-val)."""
    p = Path(folder)
    if p.exists():
        return p
    root = data_root or default_data_root()
    if not p.is_absolute() and (root / p).exists():
        return root / p
    raise RtqError(
        f"data folder {folder} not found (looked as given and under {root}); set "
        "--data-root or RTQ_DATA_ROOT to the folder holding imagenet-val/ and imagenet-calib/"
    )


def _read_labels_csv(root: Path, csv_path: Path) -> list[LabelledImage]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"file", "wnid"} <= fields:
            raise RtqError(
                f"{csv_path} has columns {sorted(fields)}; expected a header with file,wnid[,index]"
            )
        rows = [LabelledImage(root / r["file"], r["wnid"].strip()) for r in reader]
    bad = [it.wnid for it in rows if not _WNID.match(it.wnid)]
    if bad:
        raise RtqError(f"{csv_path} has {len(bad)} labels that are not wnids (e.g. {bad[0]!r})")
    return rows


def _read_loc_solution(root: Path, csv_path: Path) -> list[LabelledImage]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise RtqError(f"{csv_path} lacks the ImageId,PredictionString header")
        rows = []
        for r in reader:
            name = r["ImageId"]
            path = next(
                (root / f"{name}{s}" for s in (".JPEG", ".jpeg", ".jpg") if (root / f"{name}{s}").exists()),
                root / f"{name}.JPEG",
            )
            rows.append(LabelledImage(path, r["PredictionString"].split()[0]))
    return rows


def _read_wnid_tree(root: Path) -> list[LabelledImage]:
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and _WNID.match(p.name)):
        rows.extend(
            LabelledImage(f, sub.name) for f in sorted(sub.iterdir()) if f.suffix.lower() in _IMAGE_SUFFIXES
        )
    return rows


def open_labelled(folder: str | Path, data_root: Path | None = None) -> LabelledSet:
    """Open any supported labelled folder; raise RtqError if it holds no labelled images."""
    root = resolve_folder(folder, data_root)
    if not root.is_dir():
        raise RtqError(f"{root} is not a folder of labelled images")
    if (root / "labels.csv").is_file():
        items = _read_labels_csv(root, root / "labels.csv")
        source = "labels.csv"
    elif (root / "LOC_val_solution.csv").is_file():
        items = _read_loc_solution(root, root / "LOC_val_solution.csv")
        source = "LOC_val_solution.csv"
    else:
        items = _read_wnid_tree(root)
        source = "wnid class folders"
        if not items and any((root / s).is_dir() for s in ("train", "val")):
            raise RtqError(f"{root} holds train/ and val/ splits; pass {root / 'val'} instead")
    if not items:
        raise RtqError(
            f"{root} holds no labelled images (looked for {source}); expected labels.csv "
            "(file,wnid), LOC_val_solution.csv, or wnid-named class folders"
        )
    missing = [it.path for it in items if not it.path.is_file()]
    if missing:
        raise RtqError(f"{len(missing)} images listed in {root} are missing (e.g. {missing[0]})")
    name = root.name if root.name not in ("val", "train") else f"{root.parent.name}/{root.name}"
    return LabelledSet(name, root, tuple(items))
