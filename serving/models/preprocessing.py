"""Image preprocessing that travels with each model: the same code serves eval, calibration and servers.

Wrong preprocessing is the first silent accuracy bug in this field, so a variant never re-types its
resolution, crop or normalisation at a call site: it carries a `Preprocessing` (in the zoo and in
its manifest) and every consumer calls `preprocess` with it.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.errors import RtqError

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
# Modes with one well-defined conversion to 8-bit RGB (ImageNet itself holds grayscale and CMYK
# JPEGs); 16-bit, float and other modes have no agreed mapping and are refused.
_CONVERTIBLE_MODES = {"RGB", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1"}
# Decompression-bomb guard for untrusted bytes: far above any camera frame a classifier takes.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resolution / crop_pct`, centre-crop, normalise on 0-255 pixels."""

    resolution: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resolution <= 0 or not 0 < self.crop_pct <= 1:
            raise RtqError(f"bad preprocessing: resolution {self.resolution}, crop_pct {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            raise RtqError(
                f"unknown interpolation {self.interpolation!r}; expected one of {sorted(_INTERPOLATIONS)}"
            )

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.resolution / self.crop_pct))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def to_dict(self) -> dict:
        return asdict(self) | {"layout": "NCHW", "pixel_scale": "0-255"}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            resolution=int(d["resolution"]),
            crop_pct=float(d["crop_pct"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bicubic")),
        )


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode a file or encoded bytes into an RGB image, or raise RtqError naming the source."""
    label = name or (str(source) if not isinstance(source, bytes) else f"of {len(source)} bytes")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise RtqError(f"cannot read image {label}: {exc.strerror or exc}") from None
    try:
        with fp:
            img = Image.open(fp)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise RtqError(
                    f"image {label} is {img.width}x{img.height}; at most {MAX_IMAGE_PIXELS} pixels "
                    "are decoded"
                )
            img.load()
    except RtqError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's parsers raise SyntaxError, struct.error, ... on junk
        raise RtqError(f"cannot decode image {label}: {type(exc).__name__}: {exc}") from None
    if img.mode not in _CONVERTIBLE_MODES:
        raise RtqError(
            f"image {label} has pixel mode {img.mode!r}; expected an 8-bit RGB, grayscale, palette "
            "or CMYK image"
        )
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_crop(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """Short-side resize + centre crop, as uint8 CHW (what a UINT8 tensor request carries)."""
    w, h = img.size
    short = pp.resize_size
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nw, nh = int(short * w / h), short
    img = img.resize((nw, nh), _INTERPOLATIONS[pp.interpolation])
    top = int(round((nh - pp.resolution) / 2.0))
    left = int(round((nw - pp.resolution) / 2.0))
    img = img.crop((left, top, left + pp.resolution, top + pp.resolution))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(chw_uint8: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """uint8 CHW or NCHW -> float32 normalised; works on a single image or a batch."""
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(3, 1, 1)
    # In place: the same float32 operations as (x - mean) / std, 3x faster without the temporaries.
    out = chw_uint8.astype(np.float32)
    out -= mean
    out /= std
    return out


def preprocess(source: str | Path | bytes | Image.Image, pp: Preprocessing) -> np.ndarray:
    """Anything image-like -> float32 CHW ready for the model."""
    img = source if isinstance(source, Image.Image) else load_image(source)
    return normalize(resize_crop(img, pp), pp)
