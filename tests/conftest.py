"""Shared fixtures: real data from ../shared/data and one small real repository per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.repository.build import build
from serving.repository.spec import parse_spec
from serving.settings import default_data_root

DATA_ROOT = default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "imagenet-val").is_dir(),
    reason=f"no labelled data at {DATA_ROOT} (set RTQ_DATA_ROOT)",
)

# Small enough for the fast suite (about a minute on 2 cores), real enough to serve and measure.
SMALL_SPEC = {
    "models": [
        {
            "model": "efficientnet_lite0",
            "precisions": ["fp32", "int8"],
            "backends": ["onnxruntime", "openvino"],
        },
    ],
    "calibration_images": 32,
    "eval_images": 64,
    "threads": 2,
    "max_batch_size": 8,
}


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "imagenet-val").is_dir():
        pytest.skip(f"no labelled data at {DATA_ROOT} (set RTQ_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def imagenette(data_root: Path) -> Path:
    """The data root, skipping where it holds no imagenette train/ and val/."""
    if not all((data_root / "imagenette" / split).is_dir() for split in ("train", "val")):
        pytest.skip(f"no imagenette at {data_root}")
    return data_root


@pytest.fixture(scope="session")
def small_repository(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """Lite0 FP32 + INT8 on ONNX Runtime and OpenVINO, built by the real `build` once per session.

    Variants: efficientnet_lite0-{fp32,int8}-{onnxruntime,openvino}. Treat it as read-only.
    """
    repo = tmp_path_factory.mktemp("repository")
    build(
        parse_spec(SMALL_SPEC, "tests/conftest.py"),
        repo,
        command="pytest fixture",
        data_root=data_root,
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
        log=lambda msg: None,
    )
    return repo
