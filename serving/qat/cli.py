"""Arguments and entry point of `rtq qat` (serving/cli.py only wires the subcommand to these)."""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

from serving.cli import _nonnegative, _positive
from serving.errors import RtqError
from serving.settings import DATA_ROOT_ENV, PROJECT_ROOT

DEFAULT_MODEL = "efficientnetv2_b0_imagenette"
DEFAULT_PLAN = "w4a4"


def _widths(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("none", "off", ""):
        return ()
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated bit widths like 8,4,2 or none, got {text!r}"
        ) from None


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive epoch counts like 1,5, got {text!r}")
    return counts


def add_arguments(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from serving.qat.config import PRESETS, QatConfig

    d = QatConfig()
    sp.description = (
        "Quantization-aware training with distillation: BN folded, LSQ step sizes for weights and "
        "activations, progressive bit reduction, oscillating weights frozen, gradients clipped. Writes "
        "the trained integers (.npz) and a `method: qat` plan that `rtq build` / `rtq bench lowbit` take."
    )
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"zoo model (default: {DEFAULT_MODEL})")
    sp.add_argument(
        "--plan",
        default=DEFAULT_PLAN,
        help=f"{' | '.join(PRESETS)} (first/last layers 8-bit) or a plan YAML (default: {DEFAULT_PLAN})",
    )
    sp.add_argument("--weights", default=None, help="teacher checkpoint (default: the zoo's)")
    sp.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"0 = PTQ baseline (default: {d.epochs}, or the sum of --phase-epochs)",
    )
    sp.add_argument(
        "--progressive",
        type=_widths,
        default=d.progressive,
        help="bit widths to step down through before the plan's own, or none (default: 8,4,2)",
    )
    sp.add_argument(
        "--phase-epochs",
        type=_counts,
        default=(),
        help="epochs per progressive phase, e.g. 1,5 with --progressive 4,2: most epochs at the bits "
        "that ship (default: an even split, the last phase taking the remainder)",
    )
    sp.add_argument(
        "--asymmetric",
        action="store_true",
        help="a per-channel integer zero point on every weight grid under 8 bits, learned (plan name "
        "gets 'asym'); at 2 bits a symmetric grid has one positive level (-2, -1, 0, 1)",
    )
    sp.add_argument("--no-kd", dest="kd", action="store_false", help="cross-entropy on labels, no teacher")
    sp.add_argument(
        "--temperature", type=float, default=d.temperature, help=f"KD temperature (default: {d.temperature})"
    )
    sp.add_argument("--lr", type=float, default=d.lr, help=f"weights (default: {d.lr})")
    sp.add_argument(
        "--step-lr", type=float, default=d.step_lr, help=f"step sizes and offsets (default: {d.step_lr})"
    )
    sp.add_argument(
        "--mixup",
        type=float,
        default=d.mixup,
        help="Beta alpha of mixup on the training batches, 0 = off (default: 0)",
    )
    sp.add_argument(
        "--ema-decay",
        type=float,
        default=d.ema_decay,
        help="evaluate and export an exponential average of the last phase's weights with this decay "
        "per step, e.g. 0.998 (~the last 500 steps); 0 = the last step's (default: 0)",
    )
    sp.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default: {d.batch_size}")
    sp.add_argument(
        "--image-size", type=int, default=None, help="training crops (default: serving resolution)"
    )
    sp.add_argument(
        "--freeze-threshold",
        type=float,
        default=d.freeze_threshold,
        help=f"oscillation frequency that pins a weight (default: {d.freeze_threshold})",
    )
    sp.add_argument(
        "--no-freeze", dest="freeze_threshold", action="store_const", const=None, help="never pin weights"
    )
    sp.add_argument(
        "--calibration-images", type=int, default=d.calibration_images, help="for activation ranges"
    )
    sp.add_argument("--max-images", type=int, default=None, help="class-balanced train subset")
    sp.add_argument("--max-val-images", type=int, default=None, help="class-balanced val subset")
    sp.add_argument("--seed", type=int, default=d.seed)
    sp.add_argument("--data", default="imagenette", help="folder with train/ and val/ class folders")
    sp.add_argument(
        "--data-root", type=Path, default=None, help=f"default: ${DATA_ROOT_ENV} or ../shared/data"
    )
    sp.add_argument("--out", type=Path, default=None, help="default: .cache/qat/<model>-<plan>")
    sp.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run after its last finished epoch, with its own plan and settings "
        "(default checkpoint: <out>/last.pt)",
    )
    sp.add_argument(
        "--cache-dir", type=Path, default=None, help="decoded-image cache (default: .cache/train/data)"
    )
    add_compile_flag(sp)
    sp.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    sp.add_argument("--threads", type=_positive, default=2, help="torch threads (default: 2)")
    sp.add_argument("--workers", type=_nonnegative, default=1, help="augmentation processes (default: 1)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=main)
    return sp


def add_compile_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="run the fake quantizers eager (default: fused by torch.compile, the same values, a faster "
        "step; eager where it cannot compile)",
    )


def resolve_plan(text: str, asymmetric: bool = False):
    from dataclasses import replace

    from serving.qat.config import PRESETS, preset_plan
    from serving.quantize.plan import load_plan

    if text in PRESETS:
        plan = preset_plan(text)
    elif not text.endswith((".yaml", ".yml")) and not Path(text).exists():
        raise RtqError(f"--plan {text!r} is neither a built-in plan ({', '.join(PRESETS)}) nor a YAML file")
    else:
        plan = load_plan(text)
    if asymmetric and plan.weights.symmetric:
        plan = replace(plan, name=f"{plan.name}asym", weights=replace(plan.weights, symmetric=False))
    return plan


def open_qat_data(
    loaded, data: str, data_root: Path | None, cache_dir: Path, max_images: int | None, max_val: int | None
):
    """The model's own label space from `<data>/{train,val}`, decoded once into the training cache."""
    from serving.models.zoo import class_wnids
    from serving.qat.loop import QatData
    from serving.train.data import balanced_subset, cached_array, open_folders, train_store_preprocessing

    classes = tuple(class_wnids(loaded.spec.classes))
    folders = open_folders(data, data_root)
    if folders.classes != classes:
        raise RtqError(
            f"{folders.root} has the classes {list(folders.classes)[:3]}..., {loaded.spec.name} predicts "
            f"{list(classes)[:3]}...: QAT trains on data of the model's own label space"
        )
    pp = loaded.spec.preprocessing
    train_split = balanced_subset(folders.train, max_images)
    val_split = balanced_subset(folders.val, max_val)
    return QatData(
        train_images=cached_array(train_split, train_store_preprocessing(pp.mean, pp.std), cache_dir),
        train_labels=train_split.labels,
        val_images=cached_array(val_split, pp, cache_dir),
        val_labels=val_split.labels,
        pp=pp,
        source=str(folders.root),
    )


def teacher(model: str, weights: str | None):
    from serving.models.zoo import create_model

    loaded = create_model(model, weights)
    if not loaded.trained:
        raise RtqError(f"{model} has no trained weights here; QAT needs a trained FP32 teacher (--weights)")
    return loaded


def default_out(model: str, plan_name: str) -> Path:
    return PROJECT_ROOT / ".cache" / "qat" / f"{model}-{plan_name}"


# flag -> QatConfig field, for the flags that change what is trained (refused with --resume when
# given with another value than the checkpoint's: a resumed run continues the run it came from).
_CONFIG_FLAGS = (
    "epochs", "progressive", "phase_epochs", "kd", "temperature", "lr", "step_lr", "batch_size", "mixup",
    "ema_decay", "image_size", "freeze_threshold", "calibration_images", "max_images", "max_val_images",
    "seed",
)  # fmt: skip


def _resumed(args: argparse.Namespace, command: str):
    """(checkpoint, plan, config, out) of the run --resume continues; flags that contradict it refused."""
    from dataclasses import fields

    from serving.qat.config import QatConfig
    from serving.qat.loop import CHECKPOINT, read_checkpoint
    from serving.quantize.plan import parse_plan

    if args.resume == "last":
        out = args.out or default_out(args.model, resolve_plan(args.plan, args.asymmetric).name)
        ckpt = read_checkpoint(out / CHECKPOINT)
    else:
        given = Path(args.resume)
        ckpt = read_checkpoint(given)
        out = given if given.is_dir() else given.parent
        if args.out is not None and args.out.resolve() != out.resolve():
            raise RtqError(f"--out {args.out} is not the folder of checkpoint {args.resume}; drop --out")
    saved = dict(ckpt["config"])
    for f in fields(QatConfig):
        if isinstance(saved.get(f.name), list):
            saved[f.name] = tuple(saved[f.name])
    cfg = QatConfig(**saved)
    plan = parse_plan(ckpt["plan"], f"checkpoint {out / CHECKPOINT}")
    defaults = QatConfig()
    clashes = []
    for name in _CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value != getattr(defaults, name) and value != getattr(cfg, name):
            clashes.append(f"--{name.replace('_', '-')} {value} (checkpoint: {getattr(cfg, name)})")
    if args.model not in (DEFAULT_MODEL, ckpt["model"]):
        clashes.append(f"model {args.model} (checkpoint: {ckpt['model']})")
    if args.plan != DEFAULT_PLAN or args.asymmetric:
        asked = resolve_plan(args.plan, args.asymmetric).name
        if asked != plan.name:
            clashes.append(f"--plan {asked} (checkpoint: {plan.name})")
    if clashes:
        raise RtqError(
            "--resume continues the checkpoint's own run, but these differ: "
            + "; ".join(clashes)
            + " (drop them, or start a new run with another --out)"
        )
    ckpt["resumed_with"] = [*ckpt.get("resumed_with", []), command]
    return ckpt, plan, cfg, out


def main(args: argparse.Namespace) -> int:
    import torch

    from serving.qat.config import QatConfig
    from serving.qat.loop import CHECKPOINT
    from serving.train.loop import check_device

    argv = sys.argv[1:]
    if argv[:1] != ["qat"]:
        argv = ["qat", *argv]
    command = "rtq " + " ".join(shlex.quote(a) for a in argv)
    check_device(args.device)
    torch.set_num_threads(max(1, args.threads))
    resume = None
    if args.resume is not None:
        resume, plan, cfg, out = _resumed(args, command)
        loaded = teacher(resume["model"], args.weights)
        if loaded.weights_sha256 != resume["weights_sha256"]:
            raise RtqError(
                f"the teacher's weights are not those {out / CHECKPOINT} was trained from "
                f"(sha256 {str(loaded.weights_sha256)[:12]} vs {str(resume['weights_sha256'])[:12]}); "
                "pass the run's --weights"
            )
        command = resume["command"]  # what reproduces the run; the resume is listed beside it
        return _run(args, loaded, plan, cfg, out, command, resume)
    plan = resolve_plan(args.plan, args.asymmetric)
    epochs = args.epochs
    if epochs is None:
        epochs = sum(args.phase_epochs) if args.phase_epochs else QatConfig().epochs
    cfg = QatConfig(
        epochs=epochs,
        progressive=args.progressive,
        phase_epochs=args.phase_epochs,
        kd=args.kd,
        temperature=args.temperature,
        lr=args.lr,
        step_lr=args.step_lr,
        batch_size=args.batch_size,
        mixup=args.mixup,
        ema_decay=args.ema_decay,
        image_size=args.image_size,
        freeze_threshold=args.freeze_threshold,
        calibration_images=args.calibration_images,
        max_images=args.max_images,
        max_val_images=args.max_val_images,
        seed=args.seed,
    )
    if cfg.epochs:  # a split that cannot run is refused before the data is decoded
        from serving.qat.prepare import progressive_phases

        progressive_phases(plan, cfg.progressive, cfg.epochs, cfg.phase_epochs)
    out = args.out or default_out(args.model, plan.name)
    if (out / CHECKPOINT).exists():
        raise RtqError(
            f"{out} holds an unfinished run ({CHECKPOINT}); pass --resume to continue it, or another --out"
        )
    loaded = teacher(args.model, args.weights)
    return _run(args, loaded, plan, cfg, out, command, None)


def _run(args: argparse.Namespace, loaded, plan, cfg, out: Path, command: str, resume: dict | None) -> int:
    from serving.qat.fake_quant import EAGER, compiled_kernels
    from serving.qat.loop import CHECKPOINT, run_qat

    cache_dir = args.cache_dir or PROJECT_ROOT / ".cache" / "train" / "data"
    data = open_qat_data(loaded, args.data, args.data_root, cache_dir, cfg.max_images, cfg.max_val_images)
    log = functools.partial(print, flush=True)
    kernels = compiled_kernels(args.device, log) if args.compile else EAGER
    try:
        result = run_qat(
            loaded, plan, data, cfg, out, device=args.device, workers=args.workers, command=command,
            progress=not args.quiet and sys.stderr.isatty(), log=log, resume=resume, kernels=kernels,
        )  # fmt: skip
    except KeyboardInterrupt:
        if (out / CHECKPOINT).exists():
            again = f"rtq qat --resume {out / CHECKPOINT}"
            print(f"rtq: interrupted; `{again}` continues after the last finished epoch", file=sys.stderr)
        raise
    print(f"plan for rtq build / rtq bench lowbit: {result.plan_path}")
    return 0
