"""The real build on a small spec: files, Triton configs, manifests, runners, sizes and precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from serving.errors import RtqError
from serving.models.preprocessing import preprocess
from serving.models.zoo import create_model
from serving.repository import layout
from serving.repository.build import build
from serving.repository.spec import load_spec, parse_spec
from serving.repository.triton_config import parse_config, read_config
from serving.runtimes import open_runner

VARIANTS = [f"efficientnet_lite0-{p}-{b}" for p in ("fp32", "int8") for b in ("onnxruntime", "openvino")]


def test_every_variant_is_in_triton_layout_with_a_measured_manifest(small_repository: Path):
    assert layout.list_variants(small_repository) == sorted(VARIANTS)
    assert not [p for p in small_repository.iterdir() if p.name.startswith(".")]
    for name in VARIANTS:
        v = layout.open_variant(small_repository, name)
        cfg = read_config(v.root / layout.CONFIG)
        assert cfg.name == name and cfg.max_batch_size == 8
        assert list(cfg.input[0].dims) == [3, 224, 224] and list(cfg.output[0].dims) == [1000]
        assert (cfg.platform == "onnxruntime_onnx") == (v.manifest["backend"] == "onnxruntime")
        assert (v.root / cfg.output[0].label_filename).read_text().count("\n") == 1000
        assert v.model_path.is_file()
        m = v.manifest
        assert m["top1"]["imagenet-val"] > 0.5 and m["eval_images"]["imagenet-val"] == 64
        assert set(m["top1"]) == set(m["top1_fp32"]) == set(m["agreement_fp32"])
        assert m["trained"] is True and len(m["weights_sha256"]) == 64
        assert m["build_command"] == "pytest fixture" and m["tool_versions"]["openvino"]


def test_int8_files_are_smaller_and_count_their_scales(small_repository: Path):
    man = {n: layout.open_variant(small_repository, n).manifest for n in VARIANTS}
    for backend in ("onnxruntime", "openvino"):
        fp32 = man[f"efficientnet_lite0-fp32-{backend}"]
        int8 = man[f"efficientnet_lite0-int8-{backend}"]
        assert fp32["weight_bits"] == 32.0 and fp32["compression_vs_fp32"] == 1.0
        assert 8.0 < int8["weight_bits"] < 8.5  # int8 weights plus per-channel fp32 scales
        assert int8["compression_vs_fp32"] >= 3.5
        assert int8["calibration"] == {"folder": "imagenet-calib", "images": 32}
        assert int8["weight_params"] == fp32["weight_params"]


def test_onnx_export_is_static_and_matches_pytorch(small_repository: Path, data_root: Path):
    v = layout.open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime")
    ops = {n.op_type for n in onnx.load(str(v.model_path)).graph.node}
    assert not ops & {"Shape", "Pad", "Ceil", "ConstantOfShape"}
    images = sorted((data_root / "imagenet-val").glob("*.JPEG"))[:8]
    x = np.stack([preprocess(p, v.preprocessing) for p in images])
    import torch

    with torch.no_grad():
        ref = create_model("efficientnet_lite0").module(torch.from_numpy(x)).numpy()
    for name in ("efficientnet_lite0-fp32-onnxruntime", "efficientnet_lite0-fp32-openvino"):
        var = layout.open_variant(small_repository, name)
        with open_runner(var.manifest["backend"], var.model_path, "fp32") as r:
            np.testing.assert_allclose(r.infer(x), ref, rtol=1e-3, atol=1e-3)


def test_openvino_fp32_really_runs_fp32_and_int8_runs_int8(small_repository: Path):
    fp32 = layout.open_variant(small_repository, "efficientnet_lite0-fp32-openvino")
    int8 = layout.open_variant(small_repository, "efficientnet_lite0-int8-openvino")
    with open_runner("openvino", fp32.model_path, "fp32") as r:
        assert r.execution_precision == "f32"
        assert r.conv_precisions() == {"f32": 49}
    with open_runner("openvino", int8.model_path, "int8") as r:
        assert r.conv_precisions() == {"u8": 49}
    assert fp32.manifest["runtime"]["conv_precisions"] == {"f32": 49}


def test_runners_reject_bad_batches_and_files(small_repository: Path, tmp_path: Path):
    v = layout.open_variant(small_repository, "efficientnet_lite0-int8-onnxruntime")
    for backend, path in (
        ("onnxruntime", v.model_path),
        ("openvino", small_repository / "efficientnet_lite0-int8-openvino/1/model.xml"),
    ):
        with open_runner(backend, path, "int8") as r:
            assert r.infer(np.zeros((2, 3, 224, 224), np.float32)).shape == (2, 1000)
            with pytest.raises(RtqError, match="float32"):
                r.infer(np.zeros((1, 3, 224, 224), np.float64))
            with pytest.raises(RtqError, match=r"does not match \[N, 3, 224, 224\]"):
                r.infer(np.zeros((1, 3, 200, 224), np.float32))
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(RtqError, match="ONNX Runtime cannot load"):
        open_runner("onnxruntime", bad, "fp32")
    with pytest.raises(RtqError, match="does not exist"):
        open_runner("openvino", tmp_path / "nope.xml", "fp32")
    with pytest.raises(RtqError, match="unknown backend 'tensorflow'"):
        open_runner("tensorflow", bad, "fp32")


def test_config_parser_refuses_what_triton_would():
    with pytest.raises(RtqError, match="ModelConfig schema"):
        parse_config('name: "x"\nmax_batch_size: 8\nbogus_field: 1\n')


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"models": [{"model": "efficientnet_lite0"}], "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"models": [{"model": "resnet50"}]}, "unknown model 'resnet50'"),
        ({"models": [{"model": "efficientnet_lite0", "precisions": ["int3"]}]}, "precisions"),
        ({"models": [{"model": "efficientnet_lite0", "backends": "tflite"}]}, "backends"),
        ({"models": [{"model": "efficientnet_lite0"}], "threads": 0}, "threads must be a positive"),
        ({"models": []}, "lists no models"),
        ({"models": [{"precisions": ["fp32"]}]}, "lacks the `model` field"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_bad_specs_are_refused(spec: object, message: str):
    with pytest.raises(RtqError, match=message):
        parse_spec(spec, "t.yaml")


def test_bad_spec_files_are_refused(tmp_path: Path):
    with pytest.raises(RtqError, match="does not exist"):
        load_spec(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n")
    with pytest.raises(RtqError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    assert load_spec().models[0].model == "efficientnet_lite0"  # the default spec parses


def test_a_failing_build_leaves_nothing_half_written(tmp_path: Path, data_root: Path, monkeypatch):
    repo = tmp_path / "repo"
    spec = parse_spec(
        {
            "models": [{"model": "efficientnet_lite0", "precisions": ["fp32"], "backends": ["onnxruntime"]}],
            "eval_images": 16,
        },
        "t.yaml",
    )

    def broken_runner(*args, **kwargs):
        raise RtqError("runner exploded")

    monkeypatch.setattr("serving.repository.build.open_runner", broken_runner)
    with pytest.raises(RtqError, match="runner exploded"):
        build(spec, repo, "test", data_root, tmp_path / "cache", progress=False, log=lambda m: None)
    assert list(repo.iterdir()) == []


def test_calibrating_on_an_eval_set_is_refused(tmp_path: Path, data_root: Path):
    spec = parse_spec(
        {
            "models": [{"model": "efficientnet_lite0", "precisions": ["int8"]}],
            "calibration_folder": "imagenet-val",
        },
        "t.yaml",
    )
    with pytest.raises(RtqError, match="evaluation set"):
        build(spec, tmp_path / "r", "test", data_root, tmp_path / "c", progress=False, log=lambda m: None)
    assert not (tmp_path / "r").exists() or list((tmp_path / "r").iterdir()) == []


def test_manifest_is_plain_json_with_the_required_keys(small_repository: Path):
    raw = json.loads((small_repository / VARIANTS[0] / layout.MANIFEST).read_text())
    assert set(layout.MANIFEST_KEYS) <= set(raw)
