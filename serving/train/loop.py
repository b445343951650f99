"""The training loop: progressive stages, EMA, per-epoch val, checkpoints, Ctrl-C, curves, export.

A checkpoint holds everything the next step depends on (model, EMA, optimizer, schedule position,
RNG streams, the config, history and the running epoch's sums), and the data an epoch sees is a
function of (seed, epoch) alone, so a resumed run reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.errors import RtqError
from serving.models.preprocessing import Preprocessing
from serving.models.weights import sha256_of
from serving.train.config import ARCH, Stage, TrainConfig
from serving.train.data import (
    Augment,
    AugmentedImages,
    EpochBatches,
    ImageFolders,
    balanced_indices,
    balanced_subset,
    cached_array,
    open_folders,
    steps_per_epoch,
    train_store_preprocessing,
    worker_init,
)
from serving.train.distill import distillation_loss, teacher_logits

CHECKPOINT_FORMAT = "rtq-train/1"
EVAL_BATCH = 128
# Train images (class-balanced) that calibrate an int8 teacher: NNCF's default subset size.
TEACHER_CALIBRATION = 300


class TrainingInterrupted(Exception):
    """Ctrl-C arrived; a resumable checkpoint was written (the message says how to resume)."""


@dataclass
class RunOptions:
    out: Path
    cache_dir: Path
    data_root: Path | None = None
    export: Path | None = None  # None: <out>/<name>.safetensors
    init: Path | None = None  # weights to start from instead of a random init
    threads: int = 2
    workers: int = 1
    # "cpu" is the recipe's target; "cuda" runs the same recipe on a lent GPU (a recipe check: its
    # dropout RNG is the GPU's, so a resumed cuda run is not bit-identical to an uninterrupted one).
    device: str = "cpu"
    progress: bool = True
    command: str = ""
    resume_command: str = ""
    log: Callable[[str], None] = print
    # Called after every optimizer step with (epoch, step); tests use it to interrupt a run.
    on_step: Callable[[int, int], None] | None = None
    extra: dict = field(default_factory=dict)


def eval_preprocessing(cfg: TrainConfig) -> Preprocessing:
    from serving.models.zoo import ZOO

    base = ZOO[cfg.name].preprocessing if cfg.name in ZOO else None
    if base is None:
        from serving.models.zoo import IMAGENET_MEAN, IMAGENET_STD

        base = Preprocessing(cfg.eval_size, 1.0, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    return replace(base, resolution=cfg.eval_size)


def build_model(cfg: TrainConfig, num_classes: int, stage: Stage, device: str = "cpu") -> nn.Module:
    import timm

    torch.manual_seed(cfg.seed)
    model = timm.create_model(
        cfg.timm_name,
        pretrained=False,
        num_classes=num_classes,
        drop_rate=stage.dropout,
        drop_path_rate=cfg.drop_path,
    )
    # timm's head init gives logits of std ~5 over 10 classes (initial loss ~6, not ln 10 = 2.3);
    # a zero head starts from uniform predictions and the first steps go to features instead.
    nn.init.zeros_(model.get_classifier().weight)
    nn.init.zeros_(model.get_classifier().bias)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def lr_at(cfg: TrainConfig, step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine down to min_lr over the whole run (stages do not restart it)."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying batch-norm scales and biases only hurts a small model trained briefly.
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def normalize_batch(
    x: torch.Tensor, pp: Preprocessing, channels_last: bool, device: str = "cpu"
) -> torch.Tensor:
    # uint8 crosses to the device: a quarter of the bytes of the normalized float batch.
    x = x.to(device, non_blocking=True)
    mean = torch.tensor(pp.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pp.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    pp: Preprocessing,
    cfg: TrainConfig,
    device: str = "cpu",
) -> dict:
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(labels), EVAL_BATCH):
        x = normalize_batch(
            torch.from_numpy(np.array(images[i : i + EVAL_BATCH])), pp, cfg.channels_last, device
        )
        y = torch.from_numpy(labels[i : i + EVAL_BATCH]).to(device)
        with torch.autocast(_autocast_type(device), dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = len(labels)
    return {"top1": correct / n, "loss": loss_sum / n, "images": n, "seconds": time.perf_counter() - t0}


def _autocast_type(device: str) -> str:
    return torch.device(device).type


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise RtqError(f"--device {device!r}: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise RtqError(f"--device {device}: this torch sees no CUDA device; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise RtqError(f"--device {device}: training runs on cpu or cuda")


class _CtrlC:
    """First Ctrl-C: finish the current step, save, stop. A second one stops at once."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self._log = log
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("Ctrl-C: saving a resumable checkpoint after this step (Ctrl-C again to quit without)")

    def __enter__(self) -> _CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise RtqError(f"resume checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict copies to the device
    except Exception as exc:  # torch raises many unrelated types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RtqError(f"cannot read resume checkpoint {path}: {first[:160]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RtqError(
            f"{path} is not an rtq train checkpoint (a bare weights file?); --resume takes the last.pt "
            "that rtq train writes into its --out folder"
        )
    return ckpt


def read_init_weights(
    path: Path, arch: str, classes: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict]:
    """An rtq train checkpoint's EMA weights (what its run exports), or any state_dict file's; and
    where they came from (`init_origin`)."""
    from serving.models.weights import read_state_dict, state_dict_of

    obj = None
    if path.suffix == ".pt" and path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - read_state_dict gives the one-line error
            obj = None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        # Shapes alone would let a head trained on other classes in the same count load silently.
        check_checkpoint(obj, path, arch, classes, role="--init")
        return obj["ema"], init_origin(path, obj)
    weights = read_state_dict(path) if obj is None else state_dict_of(obj, path)
    return weights, init_origin(path, None)


def init_origin(path: Path, checkpoint: dict | None) -> dict:
    """The --init file, its sha256 and how it was made (the commands of the run behind it, from the
    checkpoint or the export's manifest beside it): a fine-tuned export names its whole recipe."""
    from serving.models.weights import sha256_of

    origin: dict = {"file": str(path), "sha256": sha256_of(path)}
    made_by = checkpoint
    if made_by is None:
        manifest = path.with_suffix(".json")
        try:
            made_by = json.loads(manifest.read_text()) if manifest.is_file() else None
        except (OSError, ValueError):
            made_by = None
        if made_by is not None and made_by.get("sha256") != origin["sha256"]:
            made_by = None  # a manifest of another file: saying nothing beats saying something wrong
    if made_by is not None:
        if checkpoint is not None:
            origin["epoch"] = checkpoint.get("epoch")
        elif "results" in made_by:
            origin["val_top1_ema"] = made_by["results"].get("val_top1_ema")
        origin.update({k: made_by[k] for k in ("command", "resumed_with", "init") if k in made_by})
    return origin


def check_checkpoint(
    ckpt: dict, path: Path, arch: str, classes: tuple[str, ...], role: str = "resume"
) -> None:
    """The checkpoint must be of the architecture this command trains and of the data's classes."""
    resuming = role == "resume"
    if ckpt.get("arch") != arch:
        raise RtqError(
            f"{role} checkpoint {path} is for architecture {ckpt.get('arch')}, but rtq train trains {arch}; "
            + ("start a new run with another --out" if resuming else f"give --init a {arch} run's last.pt")
        )
    theirs = tuple(ckpt.get("classes", ()))
    if len(theirs) != len(classes):
        raise RtqError(
            f"{role} checkpoint {path} has {len(theirs)} classes, but the data has {len(classes)} class "
            + ("folders; resume with the data it was trained on" if resuming else "folders")
        )
    if theirs != classes:
        diff = sorted(set(theirs) ^ set(classes))
        raise RtqError(
            f"{role} checkpoint {path} was trained on other classes than the data's (e.g. {diff[:2]})"
        )


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_seconds() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"trainer": own.ru_utime + own.ru_stime, "workers": children.ru_utime + children.ru_stime}


def peak_memory_mib() -> dict:
    # ru_maxrss is KiB on Linux; loader workers and the decode pool are children.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main_mib": round(own, 1), "largest_child_mib": round(children, 1)}


@dataclass
class _Sums:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    teacher_correct: int = 0  # the teacher's top-1 on the same augmented batches (hard labels)

    def as_dict(self) -> dict:
        return asdict(self)


def train(
    cfg: TrainConfig, opts: RunOptions, resume: dict | None = None, resume_path: Path | None = None
) -> dict:
    """Run (or continue) the training; returns the summary written to <out>/log.json."""
    from timm.utils import ModelEmaV3

    check_device(opts.device)
    torch.set_num_threads(opts.threads)
    log = opts.log
    load = os.getloadavg()[0]
    if opts.threads > 1 and load > (os.cpu_count() or 1):
        log(
            f"note: load average {load:.1f} on {os.cpu_count()} cores; {opts.threads} OpenMP threads on a "
            "busy machine mostly wait on each other (measured 4x slower than --threads 1 here)"
        )
    folders = open_folders(cfg.data, opts.data_root)
    if resume is not None:
        # Against ARCH, not cfg.timm_name: a resumed run's config comes from the checkpoint itself.
        check_checkpoint(resume, resume_path or Path("?"), ARCH, folders.classes)
    # Before the images are decoded: a teacher that cannot teach fails in a second, not after minutes.
    teacher = None
    if cfg.teacher is not None:
        from serving.train.distill import load_teacher

        teacher = load_teacher(
            cfg.teacher, folders.classes, cfg.teacher_size, opts.device, opts.threads, cfg.teacher_precision
        )
        log(
            f"distilling from {cfg.teacher} on {teacher.runtime} at "
            f"{f'{cfg.teacher_size} px' if cfg.teacher_size else 'the student size'} "
            f"(weight {cfg.kd_weight}, temperature {cfg.kd_temperature})"
        )
    init_weights, origin = None, None
    if resume is None and opts.init is not None:
        init_weights, origin = read_init_weights(opts.init, ARCH, folders.classes)
    train_split = balanced_subset(folders.train, cfg.max_images)
    val_split = balanced_subset(folders.val, cfg.max_val_images)
    pp = eval_preprocessing(cfg)
    t_cache = time.perf_counter()
    decoders = max(2, opts.workers)
    train_images = cached_array(
        train_split, train_store_preprocessing(pp.mean, pp.std), opts.cache_dir, workers=decoders
    )
    val_images = cached_array(val_split, pp, opts.cache_dir, workers=decoders)
    cache_s = time.perf_counter() - t_cache
    if cache_s > 5:
        log(
            f"decoded {len(train_split)} train + {len(val_split)} val images in {cache_s:.0f} s "
            f"into {opts.cache_dir}"
        )
    train_labels, val_labels = train_split.labels, val_split.labels
    teacher_summary: dict = {}
    if teacher is not None and cfg.teacher_precision == "int8":
        from serving.train.distill import quantize_teacher

        calibration = np.ascontiguousarray(train_images[balanced_indices(train_labels, TEACHER_CALIBRATION)])
        teacher, kept = quantize_teacher(teacher, calibration, opts.threads)
        teacher_summary = {"teacher_int8_top1_agreement": round(kept, 4)}
        log(
            f"teacher quantized to int8 on {len(calibration)} train images; its top-1 over the classes "
            f"agrees with f32 on {kept:.1%} of them"
        )
    epoch_val = balanced_indices(val_labels, cfg.val_images_per_epoch)
    val_subset_images = val_images if len(epoch_val) == len(val_labels) else val_images[epoch_val]

    schedule = cfg.schedule()
    num_classes = len(folders.classes)
    dev = opts.device
    model = build_model(cfg, num_classes, schedule[0], dev)
    if init_weights is not None:
        from serving.models.weights import load_into

        load_into(model, init_weights, f"--init {opts.init}")  # names what does not fit (e.g. the head)
        log(f"starting from the weights in {opts.init}")
    model.train()
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    steps = steps_per_epoch(len(train_split), cfg.batch_size)
    total_steps = steps * cfg.epochs
    warmup = min(total_steps, int(round(cfg.warmup_epochs * steps)))
    rng = np.random.default_rng([cfg.seed, 0x5EED])

    epoch, step, global_step = 0, 0, 0
    history: list[dict] = []
    sums = _Sums()
    elapsed_before = 0.0
    # The command that started the run is what reproduces it; resumes are listed beside it.
    commands = {"command": opts.command, "resumed_with": [], **({"init": origin} if origin else {})}
    if resume is not None:
        from serving.models.weights import load_into

        load_into(model, resume["model"], f"checkpoint {resume_path}")  # names what does not fit
        load_into(ema.module, resume["ema"], f"checkpoint {resume_path} (EMA)")
        # load_into skips batch-norm step counters; an exact resume wants them back too.
        model.load_state_dict(resume["model"])
        ema.module.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        epoch, step, global_step = resume["epoch"], resume["step"], resume["scheduler"]["global_step"]
        history = list(resume["history"])
        sums = _Sums(**resume["partial"])
        elapsed_before = float(resume["elapsed_s"])
        commands = {
            "command": resume["command"],
            "resumed_with": [*resume.get("resumed_with", []), opts.command],
            **({"init": resume["init"]} if "init" in resume else {}),
        }
        torch.set_rng_state(resume["rng"]["torch"])
        rng.bit_generator.state = resume["rng"]["numpy"]
        random.setstate(resume["rng"]["python"])
        log(f"resuming {resume_path} at epoch {epoch + 1}/{cfg.epochs}, step {step}/{steps}")
    if cfg.channels_last:
        ema.module.to(memory_format=torch.channels_last)
    opts.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = opts.out / "last.pt"
    session_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def checkpoint(epoch_: int, step_: int) -> None:
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "arch": cfg.timm_name,
                "classes": list(folders.classes),
                "config": cfg.to_dict(),
                "epoch": epoch_,
                "step": step_,
                "stage": cfg.stage_of(min(epoch_, cfg.epochs - 1)).index,
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {
                    "kind": "warmup-cosine",
                    "global_step": global_step,
                    "warmup_steps": warmup,
                    "total_steps": total_steps,
                },
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": rng.bit_generator.state,
                    "python": random.getstate(),
                },
                "history": history,
                "partial": sums.as_dict(),
                "elapsed_s": elapsed(),
                # A resume without --export must write where this run was asked to, not the default.
                "export": None if opts.export is None else str(Path(opts.export).resolve()),
                **commands,
            },
            ckpt_path,
        )

    smoothing = cfg.label_smoothing
    with _CtrlC(log) as ctrl_c:
        while epoch < cfg.epochs:
            stage = cfg.stage_of(epoch)
            model.drop_rate = stage.dropout  # timm's EfficientNet reads it on every forward
            aug = Augment(stage.image_size, cfg.crop_scale_min, cfg.randaug_ops, stage.randaug_magnitude)
            batches = EpochBatches(len(train_labels), cfg.batch_size, cfg.seed, epoch, start=step)
            loader = torch.utils.data.DataLoader(
                AugmentedImages(train_images, train_labels, aug),
                batch_sampler=batches,
                num_workers=opts.workers,
                worker_init_fn=worker_init if opts.workers else None,
                prefetch_factor=6 if opts.workers else None,
                pin_memory=dev.startswith("cuda"),
                # Its own generator: creating a loader must not draw from the trainer's RNG stream.
                generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
            )
            desc = f"epoch {epoch + 1}/{cfg.epochs} {stage.image_size}px"
            bar = _progress(opts.progress, steps, step, desc)
            t_epoch = time.perf_counter()
            cpu_start = _cpu_seconds()
            for x, y in loader:
                lr = lr_at(cfg, global_step, total_steps, warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                x = normalize_batch(x, pp, cfg.channels_last, dev)
                y = y.to(dev, non_blocking=True)
                target = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
                hard = y
                if stage.mixup_alpha > 0:
                    lam = float(rng.beta(stage.mixup_alpha, stage.mixup_alpha))
                    x = x.mul(lam).add_(x.flip(0), alpha=1 - lam)
                    target = target.mul(lam).add_(target.flip(0), alpha=1 - lam)
                    hard = y if lam >= 0.5 else y.flip(0)
                with torch.autocast(_autocast_type(dev), dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits = model(x)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
                if teacher is not None:
                    t_logits = teacher_logits(teacher, x, pp.mean, pp.std)
                    kd = distillation_loss(logits, t_logits, cfg.kd_temperature)
                    loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd
                    sums.teacher_correct += int((t_logits.argmax(1) == hard).sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                global_step += 1
                ema.update(model, step=global_step)
                step += 1
                sums.loss += loss.item() * len(y)
                sums.correct += int((logits.argmax(1) == hard).sum())
                sums.seen += len(y)
                now = time.perf_counter()
                sums.seconds += now - t_epoch
                t_epoch = now
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{sums.loss / sums.seen:.3f}",
                        acc=f"{sums.correct / sums.seen:.3f}",
                        img_s=f"{sums.seen / max(sums.seconds, 1e-9):.0f}",
                        lr=f"{lr:.2e}",
                        refresh=False,
                    )
                if opts.on_step is not None:
                    opts.on_step(epoch, step)
                if ctrl_c.requested and step < steps:
                    break
            if bar is not None:
                bar.close()
            del loader  # joins the workers, so their CPU time is counted below
            cpu = {k: v - cpu_start[k] for k, v in _cpu_seconds().items()}
            if ctrl_c.requested and step < steps:
                checkpoint(epoch, step)
                _write_log(opts.out, cfg, history, None, commands)
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch + 1}/{cfg.epochs}, step {step}/{steps}; checkpoint saved "
                    f"to {ckpt_path}; resume with: {opts.resume_command}"
                )
            full_val = epoch == stage.last_epoch or epoch == cfg.epochs - 1
            val = (
                evaluate(ema.module, val_images, val_labels, pp, cfg, dev)
                if full_val
                else evaluate(ema.module, val_subset_images, val_labels[epoch_val], pp, cfg, dev)
            )
            record = {
                "epoch": epoch + 1,
                "stage": stage.index + 1,
                "image_size": stage.image_size,
                "dropout": stage.dropout,
                "randaug_magnitude": stage.randaug_magnitude,
                "mixup_alpha": stage.mixup_alpha,
                "lr_end": optimizer.param_groups[0]["lr"],
                "train_loss": sums.loss / max(1, sums.seen),
                "train_top1": sums.correct / max(1, sums.seen),
                **({"teacher_train_top1": sums.teacher_correct / max(1, sums.seen)} if teacher else {}),
                "train_images": sums.seen,
                "train_seconds": round(sums.seconds, 2),
                "images_per_second": round(sums.seen / max(sums.seconds, 1e-9), 1),
                # CPU time survives a busy machine better than wall time: on an idle one the two
                # cores run about (trainer + workers) / 2 seconds of it per second.
                "cpu_seconds_trainer": round(cpu["trainer"], 2),
                "cpu_seconds_workers": round(cpu["workers"], 2),
                "val_top1_ema": val["top1"],
                "val_loss_ema": val["loss"],
                "val_images": val["images"],
                "val_seconds": round(val["seconds"], 2),
                "elapsed_s": round(elapsed(), 1),
            }
            history.append(record)
            epoch, step, sums = epoch + 1, 0, _Sums()
            checkpoint(epoch, 0)
            _write_log(opts.out, cfg, history, None, commands)
            log(
                f"epoch {record['epoch']}/{cfg.epochs} stage {record['stage']} {stage.image_size}px: "
                f"loss {record['train_loss']:.3f} train acc {record['train_top1']:.3f} "
                + (f"(teacher {record['teacher_train_top1']:.3f}) " if teacher else "")
                + f"{record['images_per_second']:.0f} img/s | val EMA top-1 {val['top1']:.4f} "
                f"on {val['images']} ({record['elapsed_s'] / 60:.1f} min)"
            )
            if ctrl_c.requested and epoch < cfg.epochs:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch}/{cfg.epochs}; checkpoint saved to {ckpt_path}; "
                    f"resume with: {opts.resume_command}"
                )

    final_ema = evaluate(ema.module, val_images, val_labels, pp, cfg, dev)
    final_raw = evaluate(model, val_images, val_labels, pp, cfg, dev)
    export = opts.export or opts.out / f"{cfg.name}.safetensors"
    summary = {
        "val_top1_ema": final_ema["top1"],
        "val_top1_raw": final_raw["top1"],
        "val_images": final_ema["images"],
        "wall_s": round(elapsed(), 1),
        "peak_memory": peak_memory_mib(),
        "exported": str(export),
        **teacher_summary,
    }
    manifest = export_weights(ema.module, export, cfg, folders, pp, summary, opts, commands)
    summary["sha256"] = manifest["sha256"]
    # The log is what gets committed as a result: it carries the date and machine, as the manifest does.
    stamp = {"date": manifest["date"], "machine": manifest["machine"]}
    _write_log(opts.out, cfg, history, summary, {**commands, **stamp})
    log(
        f"done: val top-1 EMA {final_ema['top1']:.4f} (raw {final_raw['top1']:.4f}) on {final_ema['images']} "
        f"images; wall {summary['wall_s'] / 60:.1f} min; peak RSS {summary['peak_memory']['main_mib']:.0f} "
        f"MiB (loader/decode children {summary['peak_memory']['largest_child_mib']:.0f} MiB); "
        f"weights {export} sha256 {manifest['sha256'][:16]}..."
    )
    return summary


def export_weights(
    module: nn.Module,
    path: Path,
    cfg: TrainConfig,
    folders: ImageFolders,
    pp: Preprocessing,
    summary: dict,
    opts: RunOptions,
    commands: dict,
) -> dict:
    """fp16 .safetensors (what the zoo loads) + a JSON manifest beside it with sha256 and command."""
    import timm
    from safetensors.torch import save_file

    from serving.runtimes.cpu import cpu_info

    sd = {
        k: v.detach().to("cpu", torch.float16).contiguous()
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"model": cfg.name, "arch": cfg.timm_name, "format": "rtq-train"})
    os.replace(tmp, path)
    manifest = {
        "model": cfg.name,
        "timm_name": cfg.timm_name,
        "file": path.name,
        "sha256": sha256_of(path),
        "bytes": path.stat().st_size,
        "dtype": "float16",
        "weights": "EMA",
        "classes": list(folders.classes),
        "preprocessing": pp.to_dict(),
        **commands,
        "data": str(folders.root),
        "config": cfg.to_dict(),
        "results": summary,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_info()[0],  # the model name; platform.processor() says only "x86_64" on Linux
            "cores": os.cpu_count(),
            "threads": opts.threads,
            "device": opts.device,
            **({"gpu": torch.cuda.get_device_name(opts.device)} if opts.device.startswith("cuda") else {}),
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_log(
    out: Path, cfg: TrainConfig, history: list[dict], summary: dict | None, commands: dict
) -> None:
    payload = {
        "config": cfg.to_dict(),
        "schedule": [s.__dict__ for s in cfg.schedule()],
        **commands,
        "history": history,
        "summary": summary,
    }
    tmp = out / ".log.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out / "log.json")
    if history and summary is None:  # the final call has no new epoch to draw
        plot_curves(history, cfg, out / "curves.png")


def plot_curves(history: list[dict], cfg: TrainConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (smoothed, mixed targets)")
    ax_loss.plot(epochs, [h["val_loss_ema"] for h in history], label="val (EMA)")
    ax_acc.plot(epochs, [h["train_top1"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_top1_ema"] for h in history], label="val (EMA)")
    for stage in cfg.schedule()[1:]:
        for ax in (ax_loss, ax_acc):
            ax.axvline(stage.first_epoch + 0.5, color="grey", lw=0.6, ls=":")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "top-1")):
        ax.set_xlabel("epoch")
        ax.set_title(f"{cfg.name}: {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    sizes = "/".join(str(s.image_size) for s in cfg.schedule())
    fig.suptitle(f"progressive stages (dotted): {sizes} px", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _progress(enabled: bool, total: int, done: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="step", dynamic_ncols=True, leave=False)
