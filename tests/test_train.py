"""`rtq train` on a tiny real imagenette subset: artifacts, export into the zoo, exact resume, bad input."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serving.errors import RtqError
from serving.models.weights import sha256_of
from serving.models.zoo import IMAGENETTE_WNIDS, create_model, get_spec
from serving.train.cli import DEFAULT_EXPORT, add_arguments, config_from_args, export_path, main
from serving.train.config import TrainConfig
from serving.train.loop import RunOptions, TrainingInterrupted, build_model, read_checkpoint, train

# 40 train / 20 val images, 2 stages of one epoch (32 then 64 px), 2 steps per epoch.
TINY = TrainConfig(
    epochs=2,
    stages=2,
    min_size=32,
    max_size=64,
    eval_size=64,
    batch_size=16,
    max_images=40,
    max_val_images=20,
    warmup_epochs=1.0,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


def _opts(out: Path, cache_dir: Path, data_root: Path, **kw) -> RunOptions:
    return RunOptions(
        out=out,
        cache_dir=cache_dir,
        data_root=data_root,
        progress=False,
        command="pytest tiny run",
        resume_command=f"rtq train --out {out} --resume",
        log=lambda msg: None,
        # One thread: two OpenMP threads on a machine already running other jobs wait on each other
        # (measured 4x slower than one).
        threads=1,
        **kw,
    )


@pytest.fixture(scope="module")
def straight_run(imagenette: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs without interruption, one augmentation worker (the CLI default)."""
    out = tmp_path_factory.mktemp("straight")
    train(TINY, _opts(out, cache_dir, imagenette, workers=1))
    return out


def _sd(path: Path, key: str) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[key]


def test_schedule_grows_size_and_regularization_together():
    cfg = TrainConfig(epochs=42, stages=4, min_size=96, max_size=160)
    stages = cfg.schedule()
    assert [s.image_size for s in stages] == [96, 120, 136, 160]  # 117.3 and 138.7 rounded to 8
    assert [s.epochs for s in stages] == [10, 10, 11, 11]  # remainder to the large stages
    assert [s.first_epoch for s in stages] == [0, 10, 20, 31]
    for attr, (lo, hi) in (
        ("dropout", cfg.dropout),
        ("randaug_magnitude", cfg.randaug),
        ("mixup_alpha", cfg.mixup),
    ):
        values = [getattr(s, attr) for s in stages]
        assert values[0] == lo and values[-1] == hi, attr
        assert all(a < b for a, b in zip(values, values[1:], strict=False)), (attr, values)
        # Linear in the stage index (Algorithm 1 of the EfficientNetV2 paper).
        assert values[1:3] == pytest.approx([lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3], abs=1e-6)
    assert cfg.stage_of(0).index == 0 and cfg.stage_of(19).index == 1 and cfg.stage_of(41).index == 3
    one = TrainConfig(epochs=3, stages=1).schedule()
    d = TrainConfig()
    assert len(one) == 1 and one[0].image_size == d.max_size and one[0].dropout == d.dropout[1]
    with pytest.raises(RtqError, match="at least --stages"):
        TrainConfig(epochs=3, stages=4)


def test_tiny_run_writes_checkpoint_curves_log_and_exports_into_the_zoo(straight_run: Path):
    for name in ("last.pt", "curves.png", "log.json"):
        assert (straight_run / name).stat().st_size > 0, name
    log = json.loads((straight_run / "log.json").read_text())
    assert [h["image_size"] for h in log["history"]] == [32, 64]
    assert [h["stage"] for h in log["history"]] == [1, 2]
    assert all(h["val_images"] == 20 and h["train_images"] == 32 for h in log["history"])
    summary = log["summary"]
    assert summary["wall_s"] > 0 and summary["peak_memory"]["main_mib"] > 100
    # Committed as a result file as it is: it names its date and machine.
    assert log["date"].startswith("20") and log["machine"]["cores"] == os.cpu_count()

    weights = straight_run / "efficientnetv2_b0_imagenette.safetensors"
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256_of(weights) == summary["sha256"]
    assert manifest["command"] == "pytest tiny run" and manifest["dtype"] == "float16"
    assert manifest["classes"] == list(IMAGENETTE_WNIDS)
    assert manifest["preprocessing"]["resolution"] == 64

    ckpt = read_checkpoint(straight_run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0 and ckpt["stage"] == 1
    import timm

    trained = timm.create_model("tf_efficientnetv2_b0", num_classes=10)
    trained.load_state_dict(ckpt["ema"])
    trained.eval()
    loaded = create_model("efficientnetv2_b0_imagenette", weights=weights)
    assert loaded.trained and loaded.weights_sha256 == manifest["sha256"]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref, got = trained(x), loaded.module(x)
    # fp16 weights: a few parts in 1e3 of the logits' range, far below what a wrong tensor gives.
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    assert not torch.equal(got, ref)  # it really went through fp16


def test_resume_exports_where_the_run_was_started_to(straight_run: Path, tmp_path: Path):
    # A resumed full-data run once wrote the committed weights/ file because --export was not kept.
    full = TrainConfig()
    ckpt = read_checkpoint(straight_run / "last.pt")
    assert ckpt["export"] is None  # the tiny run exports beside its checkpoint
    assert export_path(None, TINY, ckpt) is None
    mine = tmp_path / "kd.safetensors"
    assert export_path(None, full, {**ckpt, "export": str(mine)}) == mine
    given = tmp_path / "x.safetensors"
    assert export_path(given, full, {**ckpt, "export": str(mine)}) == given
    old = {k: v for k, v in ckpt.items() if k != "export"}
    for command in (f"rtq train --export {mine} -q", f"rtq train --export={mine}"):
        assert export_path(None, full, {**old, "command": command}) == mine
    assert export_path(None, full, {**old, "command": "rtq train -q"}) == DEFAULT_EXPORT
    assert export_path(None, full, None) == DEFAULT_EXPORT and export_path(None, TINY, None) is None


def test_init_starts_from_a_checkpoints_ema(
    straight_run: Path, imagenette: Path, cache_dir: Path, tmp_path: Path
):
    ema = read_checkpoint(straight_run / "last.pt")["ema"]
    fresh = build_model(TINY, 10, TINY.schedule()[0]).state_dict()
    # A learning rate too small to move the weights: what comes out is what went in.
    still = replace(TINY, lr=1e-9, min_lr=1e-9, warmup_epochs=0.0)
    for init in (straight_run / "last.pt", straight_run / "efficientnetv2_b0_imagenette.safetensors"):
        out = tmp_path / init.suffix[1:]
        train(still, _opts(out, cache_dir, imagenette, workers=0, init=init))
        got = read_checkpoint(out / "last.pt")["model"]
        for key in ("conv_stem.weight", "classifier.weight", "blocks.5.0.conv_pwl.weight"):
            # fp16 export: a few parts in 1e3; batch-norm running stats move in train mode, so weights only.
            torch.testing.assert_close(got[key], ema[key], rtol=0, atol=2e-3 * ema[key].abs().max().item())
            assert not torch.allclose(got[key], fresh[key], atol=1e-3), key
        # The export names what it started from and how that was made: the whole recipe.
        origin = json.loads((out / "efficientnetv2_b0_imagenette.json").read_text())["init"]
        assert origin["file"] == str(init) and origin["sha256"] == sha256_of(init)
        assert origin["command"] == "pytest tiny run" and origin["resumed_with"] == []
        assert ("epoch" in origin) == (init.suffix == ".pt")
        assert ("val_top1_ema" in origin) == (init.suffix == ".safetensors")


def test_bad_init_gives_one_line_errors(straight_run: Path, imagenette: Path, tmp_path: Path):
    base = ["--data-root", str(imagenette), "--cache-dir", str(tmp_path / "cache"), "--max-images", "20"]
    _one_line_error(
        [*base, "--resume", str(straight_run / "last.pt"), "--init", str(straight_run / "last.pt")],
        r"--init starts a new run .* pass only one",
    )
    five = {
        k: v[:5] if k.startswith("classifier") else v
        for k, v in read_checkpoint(straight_run / "last.pt")["ema"].items()
    }
    torch.save(five, tmp_path / "five.pt")
    _one_line_error(
        [*base, "--out", str(tmp_path / "a"), "--init", str(tmp_path / "five.pt")],
        r"weights --init .*five.pt do not match the model's keys: 2 with another shape \(e.g. classifier",
    )
    # An rtq checkpoint of the right shapes but another architecture or other classes: a head that
    # would load and name the wrong class for every image.
    ckpt = read_checkpoint(straight_run / "last.pt")
    torch.save({**ckpt, "arch": "tf_efficientnet_lite0"}, tmp_path / "lite.pt")
    _one_line_error(
        [*base, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "lite.pt")],
        r"--init checkpoint .*lite.pt is for architecture tf_efficientnet_lite0, but rtq train trains "
        r"tf_efficientnetv2_b0; give --init a tf_efficientnetv2_b0 run's last.pt",
    )
    renamed = ("n00000000", *ckpt["classes"][1:])
    torch.save({**ckpt, "classes": renamed}, tmp_path / "renamed.pt")
    _one_line_error(
        [*base, "--out", str(tmp_path / "d"), "--init", str(tmp_path / "renamed.pt")],
        r"--init checkpoint .*renamed.pt was trained on other classes than the data's \(e.g. \['n00000000'",
    )
    _one_line_error(
        [*base, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "nope.pt")],
        r"weights file .*nope.pt does not exist",
    )
    _one_line_error([*base, "--warmup-epochs", "-1"], r"--warmup-epochs must be 0 or more, got -1")


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_same_weights(
    straight_run: Path, imagenette: Path, cache_dir: Path, tmp_path: Path
):
    def ctrl_c_at(when: tuple[int, int]):
        def hook(epoch: int, step: int) -> None:
            if (epoch, step) == when:
                os.kill(os.getpid(), signal.SIGINT)

        return hook

    ckpt = tmp_path / "last.pt"
    # Stop mid-epoch (after step 1 of 2), then on its last step (the epoch still completes and is
    # evaluated first), then mid-epoch in stage 2 (mixup draws), then run to the end. No loader
    # worker here: the data an epoch sees must not depend on the worker count either.
    for when, expected in (((0, 1), (0, 1)), ((0, 2), (1, 0)), ((1, 1), (1, 1))):
        with pytest.raises(
            TrainingInterrupted, match=r"checkpoint saved to .*last.pt; resume with: rtq train"
        ):
            resume = read_checkpoint(ckpt) if ckpt.exists() else None
            train(
                TINY, _opts(tmp_path, cache_dir, imagenette, workers=0, on_step=ctrl_c_at(when)), resume, ckpt
            )
        saved = read_checkpoint(ckpt)
        assert (saved["epoch"], saved["step"]) == expected
        assert len(saved["history"]) == expected[0]
    train(TINY, _opts(tmp_path, cache_dir, imagenette, workers=0), read_checkpoint(ckpt), ckpt)

    done = read_checkpoint(ckpt)
    ref = read_checkpoint(straight_run / "last.pt")
    assert done["epoch"] == 2 and done["scheduler"]["global_step"] == ref["scheduler"]["global_step"] == 4
    for key in ("model", "ema"):
        assert done[key].keys() == ref[key].keys()
        for name, tensor in ref[key].items():
            assert torch.equal(done[key][name], tensor), (key, name)
    for name, state in ref["optimizer"]["state"].items():
        assert torch.equal(done["optimizer"]["state"][name]["exp_avg"], state["exp_avg"])
    assert [h["val_top1_ema"] for h in done["history"]] == [h["val_top1_ema"] for h in ref["history"]]
    assert [h["train_loss"] for h in done["history"]] == [h["train_loss"] for h in ref["history"]]
    assert torch.equal(done["rng"]["torch"], ref["rng"]["torch"])
    # The manifest keeps the command that started the run, with each resume beside it.
    assert done["command"] == "pytest tiny run" and len(done["resumed_with"]) == 3
    manifest = json.loads((tmp_path / "efficientnetv2_b0_imagenette.json").read_text())
    assert manifest["command"] == "pytest tiny run" and len(manifest["resumed_with"]) == 3


def _parse(*argv: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _one_line_error(argv: list[str], match: str) -> str:
    with pytest.raises(RtqError, match=match) as info:
        main(_parse(*argv))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def _folders(root: Path, train: list[str], val: list[str], images: int = 1) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for wnid in classes:
            d = root / "set" / split / wnid
            d.mkdir(parents=True)
            for i in range(images):
                Image.new("RGB", (160, 160), (i * 40, 80, 120)).save(d / f"{i}.JPEG")
    return root


def test_bad_data_folders_give_one_line_errors(tmp_path: Path):
    common = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--data", "set"]
    root = tmp_path / "missing"
    _one_line_error([*common, "--data-root", str(root)], r"data folder set not found .*--data-root")

    root = tmp_path / "no-val"
    (root / "set" / "train" / "n01440764").mkdir(parents=True)
    _one_line_error([*common, "--data-root", str(root)], r"has no val/ folder")

    root = tmp_path / "empty"
    (root / "set" / "train").mkdir(parents=True)
    (root / "set" / "val").mkdir(parents=True)
    _one_line_error([*common, "--data-root", str(root)], r"set/train holds no class folders")

    root = _folders(tmp_path / "empty-class", ["n01440764", "n02102040"], ["n01440764", "n02102040"])
    for f in (root / "set" / "train" / "n02102040").iterdir():
        f.unlink()
    _one_line_error([*common, "--data-root", str(root)], r"1 class folders in .*train hold no images")

    root = _folders(tmp_path / "differ", ["n01440764", "n02102040"], ["n01440764", "n03000684"])
    _one_line_error(
        [*common, "--data-root", str(root)],
        r"class folders differ .*1 only in train \['n02102040'\], 1 only in val \['n03000684'\]",
    )


def test_resume_writes_into_the_checkpoints_folder_unless_out_moves_it(tmp_path: Path):
    # A resume by path once wrote its checkpoints and log into the default folder, not the run's own.
    from serving.train.cli import run_folder

    default, run = tmp_path / "default", tmp_path / "run"
    run.mkdir()
    assert run_folder(None, str(run / "last.pt"), default) == (run, run / "last.pt")
    assert run_folder(None, str(run), default) == (run, run / "last.pt")
    fork = tmp_path / "fork"
    assert run_folder(fork, str(run / "last.pt"), default) == (fork, run / "last.pt")
    assert run_folder(None, "last", default) == (default, default / "last.pt")
    assert run_folder(run, "last", default) == (run, run / "last.pt")
    assert run_folder(None, None, default) == (default, None)


def test_bad_resume_checkpoints_give_one_line_errors(straight_run: Path, imagenette: Path, tmp_path: Path):
    base = ["--data-root", str(imagenette), "--cache-dir", str(tmp_path / "cache")]
    ckpt = torch.load(straight_run / "last.pt", weights_only=True)

    other_arch = dict(
        ckpt, arch="tf_efficientnet_lite0", config=dict(ckpt["config"], timm_name="tf_efficientnet_lite0")
    )
    torch.save(other_arch, tmp_path / "lite0.pt")
    _one_line_error(
        [*base, "--out", str(tmp_path / "a"), "--resume", str(tmp_path / "lite0.pt")],
        r"is for architecture tf_efficientnet_lite0, but rtq train trains tf_efficientnetv2_b0",
    )

    five = dict(ckpt, classes=ckpt["classes"][:5])
    torch.save(five, tmp_path / "five.pt")
    _one_line_error(
        [*base, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "five.pt")],
        r"has 5 classes, but the data has 10 class folders",
    )

    bare = tmp_path / "bare.pt"
    torch.save(ckpt["model"], bare)
    _one_line_error([*base, "--resume", str(bare)], r"is not an rtq train checkpoint")
    _one_line_error(
        [*base, "--resume", str(tmp_path / "nope.pt")], r"resume checkpoint .*nope.pt does not exist"
    )

    _one_line_error(
        [*base, "--resume", str(straight_run / "last.pt"), "--epochs", "9"],
        r"--resume continues the checkpoint's own configuration.*--epochs 9 \(checkpoint: 2\)",
    )
    _one_line_error([*base, "--out", str(straight_run)], r"already holds a run .*pass --resume")


def test_zoo_entry_refuses_to_run_without_its_trained_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import serving.models.zoo as zoo

    spec = get_spec("efficientnetv2_b0_imagenette")
    assert (
        spec.classes == "imagenette" and spec.num_classes == 10 and spec.timm_name == "tf_efficientnetv2_b0"
    )
    assert spec.preprocessing.resolution == TrainConfig().eval_size
    monkeypatch.setattr(zoo, "PROJECT_ROOT", tmp_path)
    with pytest.raises(
        RtqError, match=r"weights/efficientnetv2_b0_imagenette.safetensors are not there.*rtq train"
    ):
        create_model("efficientnetv2_b0_imagenette")


def test_cached_arrays_hold_the_decoded_images(straight_run: Path, cache_dir: Path, imagenette: Path):
    arrays = sorted(cache_dir.glob("images-*.npy"))
    assert len(arrays) == 2, arrays
    train_arr = np.load(next(p for p in arrays if "-160px-40-" in p.name), mmap_mode="r")
    assert train_arr.shape == (40, 3, 160, 160) and train_arr.dtype == np.uint8
    first = sorted((imagenette / "imagenette" / "train" / "n01440764").iterdir())[0]
    assert np.array_equal(train_arr[0], np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1))


def test_augmentation_is_built_before_loader_workers_fork():
    # A worker that imported torchvision's transforms itself once hung on a lock held at fork time.
    code = """
import sys
import numpy as np
import torch
from serving.train.data import Augment, AugmentedImages
assert "torchvision.transforms.v2" not in sys.modules
rng = np.random.default_rng(0)
images = rng.integers(0, 255, (2, 3, 40, 40), np.uint8)
ds = AugmentedImages(images, np.array([0, 1]), Augment(24, 0.5, 2, 5.0))
assert "torchvision.transforms.v2" in sys.modules
x, _ = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=[[(1, 7)]], num_workers=1)))
assert x.shape == (1, 3, 24, 24) and torch.equal(x[0], ds[(1, 7)][0])
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_replace_keeps_config_validation():
    with pytest.raises(RtqError, match="image sizes"):
        replace(TINY, min_size=80)


@pytest.mark.parametrize(
    "flags, device, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "cpu", True),
        ({"avx2", "amx_bf16"}, "cpu", True),
        ({"avx2", "fma"}, "cpu", False),  # emulated bf16: ~10x slower than fp32
        ({"avx2", "fma"}, "cuda", True),
    ],
)
def test_bf16_is_on_by_default_only_where_it_is_fast(monkeypatch, flags, device, expected):
    import serving.runtimes.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_info", lambda: ("test CPU", frozenset(flags)))
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert config_from_args(_parse("--device", device)).bf16 is expected
    # An explicit choice wins either way.
    assert config_from_args(_parse("--device", device, "--bf16")).bf16 is True
    assert config_from_args(_parse("--device", device, "--no-bf16")).bf16 is False


def test_regularization_flags_set_the_first_and_last_stage_or_every_stage():
    cfg = config_from_args(_parse("--dropout", "0.05,0.3", "--randaug", "2", "--mixup", "0", "--no-bf16"))
    assert (cfg.dropout, cfg.randaug, cfg.mixup) == ((0.05, 0.3), (2.0, 2.0), (0.0, 0.0))
    stages = cfg.schedule()
    assert (stages[0].dropout, stages[-1].dropout) == (0.05, 0.3)
    assert {s.randaug_magnitude for s in stages} == {2.0} and {s.mixup_alpha for s in stages} == {0.0}
    # A config saved with these flags resumes without a clash (lists in JSON, tuples here).
    from serving.train.cli import _resume_config

    assert _resume_config({"config": cfg.to_dict()}, _parse("--randaug", "2")) == cfg
    with pytest.raises(SystemExit):
        _parse("--mixup", "0.1,0.2,0.3")
    with pytest.raises(RtqError, match=r"RandAugment magnitude is 0-10, got \(2.0, 12.0\)"):
        config_from_args(_parse("--randaug", "2,12"))
