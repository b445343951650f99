"""`rtq train --teacher`: a real ImageNet Lite0 teaching on imagenette's classes, and its bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.errors import RtqError
from serving.models.preprocessing import load_image, resize_crop
from serving.models.zoo import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGENETTE_WNIDS,
    LITE_MEAN,
    LITE_STD,
    create_model,
    get_spec,
)
from serving.qat.config import QatConfig
from serving.qat.loop import _loss as qat_loss
from serving.train.config import TrainConfig
from serving.train.distill import distillation_loss, load_teacher, quantize_teacher, teacher_logits
from serving.train.loop import RunOptions, read_checkpoint, train

TEACHER = "efficientnet_lite0"


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(TEACHER, IMAGENETTE_WNIDS, size=0, threads=1)


def _val_batch(imagenette: Path, per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-normalized (ImageNet mean/std) val images, the whole frame resized to `size`."""
    pp = replace(get_spec("efficientnetv2_b0_imagenette").preprocessing, resolution=size)
    images, labels = [], []
    for c, wnid in enumerate(IMAGENETTE_WNIDS):
        for path in sorted((imagenette / "imagenette" / "val" / wnid).iterdir())[:per_class]:
            images.append(resize_crop(load_image(path), pp))
            labels.append(c)
    x = torch.from_numpy(np.stack(images)).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def test_teacher_reads_the_students_batch_in_its_own_normalization(imagenette: Path, teacher):
    x, labels = _val_batch(imagenette, per_class=3, size=112)
    got = teacher_logits(teacher, x, IMAGENET_MEAN, IMAGENET_STD)
    assert teacher.runtime == "openvino"
    assert got.shape == (30, 10)
    # The same pixels normalized the teacher's way, through the whole 1,000-class model.
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    lite = (pixels - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        full = create_model(TEACHER).module(lite)
    assert full.shape[1] == 1000
    # OpenVINO runs the PyTorch model's own graph in f32: the same logits to rounding.
    torch.testing.assert_close(got, full[:, teacher.class_index], rtol=1e-3, atol=1e-3)
    # Real ImageNet weights over 10 distinct classes: nearly every image right at 112 px.
    assert (got.argmax(1) == labels).float().mean() >= 0.85


def test_teacher_size_resizes_the_batch(imagenette: Path, teacher):
    x, labels = _val_batch(imagenette, per_class=2, size=64)
    big = replace(teacher, size=160)
    small_logits = teacher_logits(teacher, x, IMAGENET_MEAN, IMAGENET_STD)
    big_logits = teacher_logits(big, x, IMAGENET_MEAN, IMAGENET_STD)
    assert small_logits.shape == big_logits.shape == (20, 10)
    assert not torch.allclose(small_logits, big_logits, atol=1e-2)


def test_int8_teacher_is_quantized_and_keeps_the_f32_answers(imagenette: Path, teacher):
    pp = replace(get_spec("efficientnetv2_b0_imagenette").preprocessing, resolution=160)
    frames = np.stack(
        [
            resize_crop(load_image(p), pp)
            for wnid in IMAGENETTE_WNIDS
            for p in sorted((imagenette / "imagenette" / "train" / wnid).iterdir())[:4]
        ]
    ).astype(np.uint8)
    int8, kept = quantize_teacher(replace(teacher, size=128), frames, threads=1)
    assert int8.precision == "int8" and teacher.precision == "f32"
    x, labels = _val_batch(imagenette, per_class=3, size=112)
    f32_logits = teacher_logits(replace(teacher, size=128), x, IMAGENET_MEAN, IMAGENET_STD)
    int8_logits = teacher_logits(int8, x, IMAGENET_MEAN, IMAGENET_STD)
    # Really quantized (other logits), yet the same teacher: nearly every answer kept.
    assert not torch.allclose(f32_logits, int8_logits, atol=1e-2)
    assert (int8_logits.argmax(1) == f32_logits.argmax(1)).float().mean() >= 0.9
    assert (int8_logits.argmax(1) == labels).float().mean() >= 0.85
    assert 0.9 <= kept <= 1.0
    with pytest.raises(RtqError, match="an int8 teacher runs on OpenVINO on the CPU"):
        quantize_teacher(replace(teacher, graph=None, runtime="torch"), frames)
    # On a GPU it is refused before anything loads, not after the images are decoded.
    with pytest.raises(RtqError, match="efficientnet_lite0 would run on cuda here"):
        load_teacher(TEACHER, IMAGENETTE_WNIDS, device="cuda", precision="int8")


def test_teacher_precision_is_checked_and_old_checkpoints_keep_f32():
    with pytest.raises(RtqError, match="--teacher-precision must be one of f32, int8, got 'fp8'"):
        TrainConfig(teacher=TEACHER, teacher_precision="fp8")
    old = TrainConfig(teacher=TEACHER).to_dict()
    del old["teacher_precision"]
    assert TrainConfig.from_dict(old).teacher_precision == "f32"


def test_distillation_loss_is_zero_only_when_the_student_agrees():
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    assert distillation_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10)
    assert distillation_loss(s, t, 1.0).item() > 0.1
    # QAT's KD loss is this one (one implementation for both loops).
    y = torch.zeros(8, dtype=torch.long)
    assert qat_loss(s, t, y, QatConfig(kd=True, temperature=2.0)).item() == pytest.approx(
        distillation_loss(s, t, 2.0).item()
    )


def test_a_teacher_that_cannot_teach_is_a_clear_error():
    with pytest.raises(RtqError, match="unknown model 'lite9'"):
        load_teacher("lite9", IMAGENETTE_WNIDS)
    with pytest.raises(RtqError, match="predicts imagenette classes; a teacher must be an ImageNet-1k"):
        load_teacher("efficientnetv2_b0_imagenette", IMAGENETTE_WNIDS)
    with pytest.raises(RtqError, match=r"1 class folders are not ImageNet wnids \(e.g. 'cats'\)"):
        load_teacher(TEACHER, ("n01440764", "cats"))
    with pytest.raises(RtqError, match="'efficientnet_edgetpu_s' has no trained weights"):
        load_teacher("efficientnet_edgetpu_s", IMAGENETTE_WNIDS)
    for bad, match in (
        ({"kd_weight": 1.5}, "--kd-weight must be in"),
        ({"kd_temperature": 0.0}, "--kd-temperature must be positive"),
        ({"teacher_size": -1}, "--teacher-size must be 0 or more"),
    ):
        with pytest.raises(RtqError, match=match):
            TrainConfig(**bad)


def test_tiny_distilled_run_logs_the_teacher_and_keeps_it_in_checkpoint_and_manifest(
    imagenette: Path, tmp_path: Path
):
    cfg = TrainConfig(
        epochs=1,
        stages=1,
        min_size=64,
        max_size=64,
        eval_size=64,
        batch_size=16,
        max_images=32,
        max_val_images=10,
        warmup_epochs=1.0,
        teacher=TEACHER,
        kd_weight=0.7,
        kd_temperature=2.0,
        teacher_precision="int8",
    )
    messages: list[str] = []
    opts = RunOptions(
        out=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        data_root=imagenette,
        progress=False,
        command="pytest distilled run",
        log=messages.append,
        threads=1,
        workers=0,
    )
    summary = train(cfg, opts)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    (epoch,) = log["history"]
    assert epoch["train_images"] == 32 and 0 <= epoch["teacher_train_top1"] <= 1
    assert np.isfinite(epoch["train_loss"]) and epoch["train_loss"] > 0
    manifest = json.loads(Path(summary["exported"]).with_suffix(".json").read_text())
    assert manifest["config"]["teacher"] == TEACHER and manifest["config"]["kd_weight"] == 0.7
    assert manifest["config"]["teacher_precision"] == "int8"
    assert 0 <= summary["teacher_int8_top1_agreement"] <= 1
    assert any(m.startswith("teacher quantized to int8 on 32 train images") for m in messages)
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert TrainConfig.from_dict(ckpt["config"]) == cfg
