"""Full-size accuracy targets on all 1,300 imagenet-val images (slow: about 3 minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.repository.build import build
from serving.repository.spec import parse_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lite0_full(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, dict]:
    spec = parse_spec(
        {"models": [{"model": "efficientnet_lite0"}], "calibration_images": 300},
        "tests/test_accuracy_slow.py",
    )
    manifests = build(
        spec,
        tmp_path_factory.mktemp("repo"),
        "pytest -m slow",
        data_root,
        tmp_path_factory.mktemp("cache"),
        progress=False,
        log=lambda m: None,
    )
    return {m["variant"]: m for m in manifests}


def test_fp32_pytorch_onnxruntime_openvino_agree(lite0_full: dict[str, dict]):
    for backend in ("onnxruntime", "openvino"):
        m = lite0_full[f"efficientnet_lite0-fp32-{backend}"]
        assert m["eval_images"]["imagenet-val"] == 1300
        assert m["agreement_fp32"]["imagenet-val"] >= 0.995
        assert m["execution_precision"] in ("fp32", "f32")


def test_int8_loses_at_most_half_a_point_at_3_5x_smaller(lite0_full: dict[str, dict]):
    for backend in ("onnxruntime", "openvino"):
        m = lite0_full[f"efficientnet_lite0-int8-{backend}"]
        delta = m["top1"]["imagenet-val"] - m["top1_fp32"]["imagenet-val"]
        assert delta >= -0.005, (backend, delta)
        assert m["compression_vs_fp32"] >= 3.5
