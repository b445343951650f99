"""The model repository on disk: Triton layout plus one manifest.json of measured facts per variant.

<repository>/<variant>/config.pbtxt      Triton's config (checked against its schema)
<repository>/<variant>/labels.txt        class names, Triton's classification extension
<repository>/<variant>/manifest.json     precision, sizes, accuracy, provenance
<repository>/<variant>/1/model.{onnx,xml+bin}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing

MANIFEST = "manifest.json"
CONFIG = "config.pbtxt"
VERSION = "1"
MANIFEST_KEYS = (
    "model",
    "precision",
    "backend",
    "weight_bits",
    "file_bytes",
    "compression_vs_fp32",
    "top1",
    "top1_fp32",
    "agreement_fp32",
    "calibration",
    "tool_versions",
    "build_command",
)
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    """A variant folder as the servers and tools see it."""

    root: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def model_path(self) -> Path:
        return self.root / VERSION / self.manifest["model_file"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])


def check_variant_name(name: str) -> str:
    """Names come from users and requests: only plain folder names, never a path."""
    if not _VARIANT_NAME.match(name) or ".." in name:
        raise RtqError(f"invalid variant name {name!r}; expected letters, digits, '_', '-', '.'")
    return name


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise RtqError(f"{folder} has no {MANIFEST}; rebuild it with `rtq build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RtqError(f"{path} is not valid JSON: {exc}") from None
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise RtqError(f"{path} lacks keys {missing}")
    # A copied or hostile repository must not point a server at files outside the variant folder.
    model_file = manifest["model_file"]
    plain = isinstance(model_file, str) and Path(model_file).name == model_file
    if not plain or model_file in ("", ".", ".."):
        raise RtqError(f"{path}: model_file must be a plain file name inside the variant, not {model_file!r}")
    return manifest


def open_variant(repository: Path, name: str) -> Variant:
    check_variant_name(name)
    folder = repository / name
    if not folder.is_dir():
        known = ", ".join(list_variants(repository)) or "none; run `rtq build`"
        raise RtqError(f"unknown variant {name!r} in {repository}; known: {known}")
    return Variant(folder, read_manifest(folder))


def list_variants(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / MANIFEST).is_file())
