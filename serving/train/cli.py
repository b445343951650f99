"""Arguments and entry point of `rtq train` (serving/cli.py only wires the subcommand to these)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from serving.cli import _positive  # one argparse type for every rtq command
from serving.errors import RtqError
from serving.settings import DATA_ROOT_ENV, PROJECT_ROOT
from serving.train.config import DEFAULT_NAME, TEACHER_PRECISIONS, TrainConfig

DEFAULT_EXPORT = PROJECT_ROOT / "weights" / f"{DEFAULT_NAME}.safetensors"
_DEFAULTS = TrainConfig()

# flag -> TrainConfig field, for the flags that change what is trained (refused with --resume when
# they disagree with the checkpoint: a resumed run continues exactly the run it came from).
_CONFIG_FLAGS = {
    "epochs": "epochs",
    "stages": "stages",
    "batch_size": "batch_size",
    "min_size": "min_size",
    "max_size": "max_size",
    "eval_size": "eval_size",
    "lr": "lr",
    "warmup_epochs": "warmup_epochs",
    "max_images": "max_images",
    "max_val_images": "max_val_images",
    "val_images_per_epoch": "val_images_per_epoch",
    "seed": "seed",
    "bf16": "bf16",
    "data": "data",
    "teacher": "teacher",
    "kd_weight": "kd_weight",
    "kd_temperature": "kd_temperature",
    "teacher_size": "teacher_size",
    "teacher_precision": "teacher_precision",
    "dropout": "dropout",
    "randaug": "randaug",
    "mixup": "mixup",
}


def _first_last(text: str) -> tuple[float, float]:
    """'FIRST,LAST' (the first and last stage's value) or one value for every stage."""
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected a number or FIRST,LAST (e.g. 0.1,0.2), got {text!r}")
    return (values[0], values[-1])


def add_arguments(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = _DEFAULTS
    sp.description = (
        "Train EfficientNetV2-B0 (timm tf_efficientnetv2_b0, from scratch) on imagenette with progressive "
        "learning: image size, dropout, RandAugment and mixup grow together over the stages."
    )
    sp.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"folder holding imagenette/ (default: ${DATA_ROOT_ENV} or ../shared/data)",
    )
    pos = {"type": _positive, "default": None}
    sp.add_argument(
        "--data", default=None, help=f"folder with train/ and val/ class folders (default: {d.data})"
    )
    sp.add_argument("--epochs", **pos, help=f"total epochs (default: {d.epochs})")
    sp.add_argument("--stages", **pos, help=f"progressive stages (default: {d.stages})")
    sp.add_argument("--batch-size", **pos, help=f"default: {d.batch_size}")
    sp.add_argument("--min-size", **pos, help=f"first stage's image size (default: {d.min_size})")
    sp.add_argument("--max-size", **pos, help=f"last stage's image size (default: {d.max_size})")
    sp.add_argument("--eval-size", **pos, help=f"val and serving resolution (default: {d.eval_size})")
    sp.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate (default: {d.lr})")
    sp.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help=f"linear learning-rate warm-up (default: {d.warmup_epochs})",
    )
    reg = {"type": _first_last, "default": None, "metavar": "FIRST,LAST"}
    sp.add_argument(
        "--dropout",
        **reg,
        help=f"classifier dropout: first,last stage or one value (default: {_pair(d.dropout)})",
    )
    sp.add_argument(
        "--randaug",
        **reg,
        help=f"RandAugment magnitude 0-10: first,last stage or one value (default: {_pair(d.randaug)})",
    )
    sp.add_argument(
        "--mixup",
        **reg,
        help=f"mixup alpha: first,last stage or one value (default: {_pair(d.mixup)})",
    )
    sp.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="WEIGHTS",
        help="start from these weights instead of from scratch (an rtq train last.pt: its EMA; or an "
        "exported .safetensors), e.g. to fine-tune at the eval size with --stages 1",
    )
    sp.add_argument("--max-images", **pos, help="class-balanced train subset (smoke runs)")
    sp.add_argument("--max-val-images", **pos, help="class-balanced val subset")
    sp.add_argument(
        "--val-images-per-epoch",
        **pos,
        help=f"val images after each epoch; all after a stage's last (default: {d.val_images_per_epoch})",
    )
    sp.add_argument("--seed", type=int, default=None, help=f"default: {d.seed}")
    sp.add_argument(
        "--bf16",
        dest="bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where the CPU does bf16 natively, avx512_bf16/amx_bf16, or on a "
        "GPU; emulated bf16 is 10x slower than fp32)",
    )
    sp.add_argument(
        "--teacher",
        default=None,
        help="distil from this zoo ImageNet-1k classifier, e.g. efficientnet_lite0: its logits over the "
        f"data's classes teach on the same augmented batch (default: {d.teacher or 'none, labels only'})",
    )
    sp.add_argument(
        "--kd-weight",
        type=float,
        default=None,
        help=f"share of the loss from the teacher (default: {d.kd_weight})",
    )
    sp.add_argument(
        "--kd-temperature",
        type=float,
        default=None,
        help=f"distillation temperature (default: {d.kd_temperature})",
    )
    sp.add_argument(
        "--teacher-size",
        type=int,
        default=None,
        help=f"teacher input side, the batch resized; 0: the student's size (default: {d.teacher_size})",
    )
    sp.add_argument(
        "--teacher-precision",
        choices=TEACHER_PRECISIONS,
        default=None,
        help="int8: the teacher quantized by NNCF on 300 of the run's train images: the teacher 1.65x "
        "faster at 160 px, a training epoch ~7%% faster (OpenVINO on the CPU only) "
        f"(default: {d.teacher_precision})",
    )
    sp.add_argument(
        "--out", type=Path, default=None, help="checkpoint and log folder (default: .cache/train/<name>)"
    )
    sp.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run exactly from a last.pt or its folder (default: <out>/last.pt); it goes on "
        "writing into the checkpoint's folder unless --out is given",
    )
    sp.add_argument(
        "--export",
        type=Path,
        default=None,
        help=f"fp16 .safetensors to write at the end (default: {DEFAULT_EXPORT.relative_to(PROJECT_ROOT)} "
        "for full-data runs, <out>/<name>.safetensors with --max-images)",
    )
    sp.add_argument(
        "--cache-dir", type=Path, default=None, help="decoded-image cache (default: .cache/train/data)"
    )
    sp.add_argument("--threads", type=_positive, default=2, help="torch threads (default: 2)")
    sp.add_argument("--workers", type=int, default=1, help="augmentation worker processes (default: 1)")
    sp.add_argument(
        "--device",
        default="cpu",
        help="cpu (the recipe's target: 2 cores) or cuda[:N] to check the recipe on a GPU (default: cpu)",
    )
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar (epoch lines still print)")
    sp.set_defaults(func=main)
    return sp


def _pair(values: tuple[float, float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def default_bf16(device: str) -> bool:
    """bf16 autocast where it is fast: a GPU, or a CPU with bf16 instructions (unknown CPUs: on)."""
    from serving.runtimes.cpu import native_bf16

    return not device.startswith("cpu") or native_bf16() is not False


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {
        f: getattr(args, flag) for flag, f in _CONFIG_FLAGS.items() if getattr(args, flag, None) is not None
    }
    if "bf16" not in given:
        given["bf16"] = default_bf16(getattr(args, "device", "cpu"))
    return TrainConfig(**given)


def _resume_config(ckpt: dict, args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_dict(ckpt["config"])
    clashes = [
        f"--{flag.replace('_', '-')} {getattr(args, flag)} (checkpoint: {getattr(cfg, f)})"
        for flag, f in _CONFIG_FLAGS.items()
        if getattr(args, flag, None) is not None and getattr(args, flag) != getattr(cfg, f)
    ]
    if clashes:
        raise RtqError(
            "--resume continues the checkpoint's own configuration, but these flags differ: "
            + "; ".join(clashes)
            + " (drop them, or start a new run with another --out)"
        )
    return cfg


def export_path(given: Path | None, cfg: TrainConfig, resume: dict | None) -> Path | None:
    """--export, else where the resumed run was started to export, else the default for its kind of run."""
    if given is not None:
        return given
    if resume is not None:
        if "export" in resume:
            return None if resume["export"] is None else Path(resume["export"])
        # Checkpoints from before the key existed: the flag is in the command that started the run.
        started = shlex.split(resume.get("command", ""))
        for i, arg in enumerate(started):
            if arg.startswith("--export="):
                return Path(arg.split("=", 1)[1])
            if arg == "--export" and i + 1 < len(started):
                return Path(started[i + 1])
    return DEFAULT_EXPORT if cfg.max_images is None and cfg.max_val_images is None else None


def run_folder(out: Path | None, resume: str | None, default: Path) -> tuple[Path, Path | None]:
    """(folder the run writes to, checkpoint it resumes from): a resumed checkpoint's run stays in its
    own folder unless --out moves it elsewhere."""
    if resume is None:
        return out or default, None
    if resume == "last":
        folder = out or default
        return folder, folder / "last.pt"
    given = Path(resume)
    checkpoint = given / "last.pt" if given.is_dir() else given
    return out or checkpoint.parent, checkpoint


def main(args: argparse.Namespace) -> int:
    from serving.train.loop import RunOptions, TrainingInterrupted, read_checkpoint, train

    argv = sys.argv[1:]
    if argv[:1] != ["train"]:  # run as `python -m serving.train.cli`
        argv = ["train", *argv]
    command = "rtq " + " ".join(shlex.quote(a) for a in argv)
    name = DEFAULT_NAME
    out, resume_path = run_folder(args.out, args.resume, PROJECT_ROOT / ".cache" / "train" / name)
    resume = None
    if resume_path is not None:
        if getattr(args, "init", None) is not None:
            raise RtqError("--init starts a new run from weights; --resume continues one: pass only one")
        resume = read_checkpoint(resume_path)
        cfg = _resume_config(resume, args)
    else:
        cfg = config_from_args(args)
        if (out / "last.pt").exists():
            raise RtqError(
                f"{out} already holds a run (last.pt); pass --resume to continue it, or --out for a new run"
            )
    if args.workers < 0:
        raise RtqError(f"--workers must be 0 or more, got {args.workers}")
    fast_bf16 = default_bf16(args.device)
    if args.bf16 is None and resume is None and not cfg.bf16:
        print(
            "note: bf16 autocast off: this CPU has no bf16 instructions (avx512_bf16, amx_bf16)", flush=True
        )
    elif cfg.bf16 and not fast_bf16:
        print(
            "note: bf16 autocast on a CPU without bf16 instructions is emulated, ~10x slower than fp32"
            + (" (the checkpoint's setting)" if resume is not None else "; --no-bf16 turns it off"),
            flush=True,
        )
    export = export_path(args.export, cfg, resume)
    resume_cmd = ["rtq", "train", "--out", str(out), "--resume"]
    if resume_path is not None and args.resume != "last":
        resume_cmd[-1:] = ["--resume", str(out / "last.pt")]
    if args.data_root is not None:
        resume_cmd += ["--data-root", str(args.data_root)]
    log = print
    opts = RunOptions(
        out=out,
        cache_dir=args.cache_dir or PROJECT_ROOT / ".cache" / "train" / "data",
        data_root=args.data_root,
        export=export,
        init=getattr(args, "init", None),
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet and sys.stderr.isatty(),
        command=command,
        resume_command=" ".join(shlex.quote(a) for a in resume_cmd),
        log=lambda msg: log(msg, flush=True),
    )
    try:
        train(cfg, opts, resume, resume_path)
    except TrainingInterrupted as exc:
        print(f"rtq: {exc}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # lets the trainer run before serving/cli.py wires `rtq train`
    parser = add_arguments(argparse.ArgumentParser(prog="rtq train"))
    try:
        sys.exit(main(parser.parse_args()))
    except RtqError as exc:
        print(f"rtq: error: {exc}", file=sys.stderr)
        sys.exit(2)
