"""`rtq bench qat`: PTQ vs QAT vs QAT+KD, with and without progressive bit reduction, per precision.

Every cell is the same student code path (fold, LSQ quantizers, calibration) evaluated fake-quantized
on the full val split beside the FP32 teacher; PTQ is that path with zero training epochs
(round-to-nearest on MSE-optimal steps, calibrated activation ranges).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

from serving.cli import _nonnegative, _positive
from serving.errors import RtqError
from serving.qat.cli import add_compile_flag
from serving.settings import DATA_ROOT_ENV, PROJECT_ROOT, default_results_dir

METHODS = {
    "ptq": {"epochs": 0, "kd": False, "progressive": ()},
    "qat": {"kd": False, "progressive": ()},
    "qat-kd": {"kd": True, "progressive": ()},
    "qat-kd-progressive": {"kd": True, "progressive": (8, 4, 2)},
}


NOTE = (
    "fake-quantized top-1 in PyTorch (weights per-channel, symmetric unless the precision ends in asym, "
    "activations per-tensor asymmetric at the plan's bits; stem and classifier 8-bit)"
)


def _names(text: str, allowed, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; expected some of {', '.join(allowed)}")
    return names


def add_arguments(sp: argparse.ArgumentParser) -> None:
    from serving.qat.config import PRESETS, QatConfig

    d = QatConfig()
    sp.add_argument("model", nargs="?", default="efficientnetv2_b0_imagenette")
    sp.add_argument("--weights", default=None, help="teacher checkpoint (default: the zoo's)")
    sp.add_argument(
        "--precisions",
        type=lambda t: _names(t, PRESETS, "precisions"),
        default=list(PRESETS),
        help=f"comma-separated (default: {','.join(PRESETS)})",
    )
    sp.add_argument(
        "--methods",
        type=lambda t: _names(t, METHODS, "methods"),
        default=list(METHODS),
        help=f"comma-separated (default: {','.join(METHODS)})",
    )
    sp.add_argument("--epochs", type=int, default=d.epochs, help=f"per trained cell (default: {d.epochs})")
    sp.add_argument("--batch-size", type=int, default=d.batch_size)
    sp.add_argument(
        "--image-size", type=int, default=None, help="training crops (default: serving resolution)"
    )
    sp.add_argument("--mixup", type=float, default=d.mixup, help="Beta alpha of mixup, 0 = off (default: 0)")
    sp.add_argument(
        "--ema-decay", type=float, default=d.ema_decay,
        help="export an exponential average of the last phase's weights, 0 = off (default: 0)",
    )  # fmt: skip
    sp.add_argument(
        "--no-freeze", dest="freeze_threshold", action="store_const", const=None, default=d.freeze_threshold,
        help="never pin oscillating weights",
    )  # fmt: skip
    sp.add_argument(
        "--rerun",
        action="store_true",
        help="train every cell again (default: a cell finished with the same settings and teacher is "
        "reused, an interrupted one resumed from its last.pt)",
    )
    sp.add_argument("--max-images", type=int, default=None, help="class-balanced train subset")
    sp.add_argument("--max-val-images", type=int, default=None, help="class-balanced val subset")
    sp.add_argument("--data", default="imagenette")
    sp.add_argument("--data-root", type=Path, default=None, help=f"${DATA_ROOT_ENV} or ../shared/data")
    add_compile_flag(sp)
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--threads", type=_positive, default=2)
    sp.add_argument("--workers", type=_nonnegative, default=1)
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.add_argument(
        "--collect",
        nargs="+",
        type=Path,
        default=None,
        metavar="DIR",
        help="train nothing: tabulate finished `rtq qat --out DIR` runs (their log.json) as one result",
    )


def method_of(config: dict) -> str:
    """The grid's name for how a run was trained (progressive widths other than 8,4,2 are named)."""
    if config["epochs"] == 0:
        return "ptq"
    if not config["kd"]:
        return "qat"
    widths = list(config["progressive"])
    mix = f"-mixup{config['mixup']:g}" if config.get("mixup") else ""
    # Logs from before `--no-freeze` carry a threshold: they froze.
    mix += "-nofreeze" if "freeze_threshold" in config and config["freeze_threshold"] is None else ""
    mix += f"-ema{config['ema_decay']:g}" if config.get("ema_decay") else ""
    if not widths:
        return "qat-kd" + mix
    prog = "progressive" if widths == [8, 4, 2] else f"progressive-{'-'.join(map(str, widths))}"
    if config.get("phase_epochs"):
        prog += f"-{'+'.join(map(str, config['phase_epochs']))}ep"
    return f"qat-kd-{prog}{mix}"


def collect(dirs: list[Path]) -> list[dict]:
    rows = []
    for d in dirs:
        log = d / "log.json"
        if not log.is_file():
            raise RtqError(f"{d} holds no log.json; pass folders that `rtq qat --out` finished")
        try:
            run = json.loads(log.read_text())
            s, cfg = run["summary"], run["config"]
            rows.append({
                "model": s["model"], "precision": s["plan"], "method": method_of(cfg),
                "epochs": cfg["epochs"], "kd": cfg["kd"], "progressive": list(cfg["progressive"]),
                "image_size": cfg.get("image_size"),
                "top1": s["qat_top1"], "top1_fp32": s["fp32_top1"], "delta_pts": s["delta_pp"],
                "frozen_weights": s["frozen_weights"], "wall_s": s["wall_s"], "val_images": s["val_images"],
                "history": run["history"], "command": run["command"], "run": str(d),
            })  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RtqError(f"{log} is not an `rtq qat` log ({type(exc).__name__}: {exc})") from None
    # Runs that differ only in length share a cell name: each is named with its epochs then.
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["precision"], r["method"]), []).append(r)
    for same in groups.values():
        if len({r["epochs"] for r in same}) > 1:
            for r in same:
                r["method"] = f"{r['method']}-{r['epochs']}ep"
    from serving.qat.config import PRESETS

    def rank(name: str, order) -> tuple[int, str]:
        order = list(order)
        return (order.index(name) if name in order else len(order), name)

    # The grid's order (W8A8 first, PTQ first), whatever order the folders came in.
    return sorted(rows, key=lambda r: (rank(r["precision"], PRESETS), rank(r["method"], METHODS)))


def _same_config(saved: dict, cfg) -> bool:
    from dataclasses import asdict

    from serving.qat.config import QatConfig

    # A field added since the cell was trained counts as its default: that is what the run did.
    saved = {**asdict(QatConfig()), **saved}
    return json.loads(json.dumps(saved)) == json.loads(json.dumps(asdict(cfg)))


def finished_cell(out: Path, cfg, plan_name: str, teacher_sha256: str | None) -> tuple[dict, list] | None:
    """(summary, history) of a finished run in `out` with these settings, plan and teacher, else None."""
    try:
        run = json.loads((out / "log.json").read_text())
        s = run["summary"]
        same = _same_config(run["config"], cfg) and s["plan"] == plan_name
        return (s, run["history"]) if same and s.get("teacher_sha256") == teacher_sha256 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resumable_cell(out: Path, cfg, plan_name: str, teacher_sha256: str | None) -> dict | None:
    """The checkpoint of an interrupted run in `out` with these settings, plan and teacher, else None."""
    from serving.qat.loop import CHECKPOINT, read_checkpoint

    if not (out / CHECKPOINT).is_file():
        return None
    try:
        ckpt = read_checkpoint(out)
    except RtqError:
        return None
    same = _same_config(ckpt["config"], cfg) and ckpt["plan"]["name"] == plan_name
    return ckpt if same and ckpt["weights_sha256"] == teacher_sha256 else None


def main(args: argparse.Namespace, command: str) -> int:
    import torch

    from serving.qat.cli import open_qat_data, teacher
    from serving.qat.config import QatConfig, preset_plan
    from serving.qat.fake_quant import EAGER, compiled_kernels
    from serving.qat.loop import evaluate, run_qat
    from serving.qat.prepare import progressive_phases
    from serving.repository.build import machine
    from serving.train.loop import check_device

    if args.collect:
        rows = collect(args.collect)
        models = sorted({r["model"] for r in rows})
        if len(models) > 1:
            raise RtqError(f"the runs are of different models {models}; collect one model's runs at a time")
        now = dt.datetime.now(dt.UTC)
        payload = {
            "benchmark": "qat-ablation", "model": models[0], "command": command,
            "date": now.isoformat(timespec="seconds"), "machine": machine(), "device": "see each run",
            "train_images": "all unless a run's command limits them", "eval_set": "the runs' val split",
            "rows": rows,
            "note": "collected from finished `rtq qat` runs (each row's command); " + NOTE,
        }  # fmt: skip
        _write(Path(args.out), f"qat-ablation-{models[0]}", now, payload)
        return 0
    check_device(args.device)
    torch.set_num_threads(max(1, args.threads))
    if args.epochs < 1 and any(m != "ptq" for m in args.methods):
        raise RtqError("--epochs must be at least 1 for the trained methods")
    loaded = teacher(args.model, args.weights)
    cache = PROJECT_ROOT / ".cache" / "train" / "data"
    data = open_qat_data(loaded, args.data, args.data_root, cache, args.max_images, args.max_val_images)
    base = QatConfig(
        epochs=args.epochs, batch_size=args.batch_size, max_images=args.max_images,
        max_val_images=args.max_val_images, image_size=args.image_size, mixup=args.mixup,
        freeze_threshold=args.freeze_threshold, ema_decay=args.ema_decay,
    )  # fmt: skip
    grid = [(p, m) for p in args.precisions for m in args.methods]
    cells = [(p, m, preset_plan(p), replace(base, **METHODS[m])) for p, m in grid]
    phases = {}
    for p, m, plan, cfg in cells:  # refuse a grid that cannot run before hours of training start
        if cfg.epochs:
            phases[p, m] = progressive_phases(plan, cfg.progressive, cfg.epochs, cfg.phase_epochs)
    rows = []
    fp32 = evaluate(loaded.module.to(args.device).eval(), data, args.device)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    kernels = compiled_kernels(args.device, print) if args.compile else EAGER
    for precision, method, plan, cfg in cells:
        # Progressive with nothing above the plan's bits (W8A8) trains exactly what direct QAT+KD does.
        mine = phases.get((precision, method))
        twin = next(
            (r for r in rows if r["precision"] == precision and r["kd"] == cfg.kd and r["epochs"]
             and phases.get((precision, r["method"])) == mine),
            None,
        )  # fmt: skip
        if twin is not None and cfg.epochs:
            print(
                f"== {precision} {method}: the same phases as {twin['method']}, not trained twice", flush=True
            )
            rows.append(twin | {"method": method, "same_as": twin["method"]})
            continue
        out = PROJECT_ROOT / ".cache" / "qat" / "ablation" / f"{args.model}-{precision}-{method}"
        finished = None if args.rerun else finished_cell(out, cfg, plan.name, loaded.weights_sha256)
        if finished is not None:
            print(
                f"== {precision} {method}: finished earlier with these settings ({out}), reused", flush=True
            )
            s, history = finished
        else:
            resume = None if args.rerun else resumable_cell(out, cfg, plan.name, loaded.weights_sha256)
            print(f"== {precision} {method}" + (" (resumed)" if resume else ""), flush=True)
            res = run_qat(
                loaded, plan, data, cfg, out, device=args.device, workers=args.workers, command=command,
                log=log, fp32=fp32, resume=resume, kernels=kernels,
            )  # fmt: skip
            s, history = res.summary, res.history
        rows.append({
            "precision": precision, "method": method, "epochs": cfg.epochs, "kd": cfg.kd,
            "progressive": list(cfg.progressive), "image_size": cfg.image_size, "top1": s["qat_top1"],
            "top1_fp32": s["fp32_top1"], "delta_pts": s["delta_pp"], "frozen_weights": s["frozen_weights"],
            "wall_s": s["wall_s"], "val_images": s["val_images"], "history": history,
        })  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": "qat-ablation", "model": args.model, "command": command,
        "date": now.isoformat(timespec="seconds"), "machine": machine(), "device": args.device,
        "train_images": len(data.train_labels), "eval_set": data.source, "rows": rows,
        "note": NOTE,
    }  # fmt: skip
    _write(Path(args.out), f"qat-ablation-{args.model}", now, payload)
    return 0


def _write(out: Path, prefix: str, now: dt.datetime, payload: dict) -> None:
    """JSON and Markdown, and beside them the val top-1 curves of every trained cell."""
    from serving.bench.results import write_results
    from serving.qat.curves import plot_ablation

    stem = write_results(out, prefix, now, payload, markdown(payload))
    if any(r.get("history") for r in payload["rows"]):
        png = stem.with_suffix(".png")
        plot_ablation(payload["rows"], f"{payload['model']}: val top-1 per epoch ({payload['date']})", png)
        with stem.with_suffix(".md").open("a") as f:
            f.write(f"\n![val top-1 per epoch, per precision]({png.name})\n")


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fp32 = rows[0]["top1_fp32"] if rows else float("nan")
    lines = [
        f"# QAT ablation: {payload['model']}",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores; device {payload['device']}",
        f"- train images: {payload['train_images']}; val {rows[0]['val_images'] if rows else 0} images of "
        f"{payload['eval_set']}; FP32 teacher {100 * fp32:.2f}%",
        f"- {payload['note']}",
        "",
        "| precision | " + " | ".join(methods) + " |",
        "| --- | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for precision in dict.fromkeys(r["precision"] for r in rows):
        cells = []
        for m in methods:
            r = next((r for r in rows if r["precision"] == precision and r["method"] == m), None)
            cells.append("-" if r is None else f"{100 * r['top1']:.2f} ({r['delta_pts']:+.2f})")
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| precision | method | epochs | crop px | top-1 | Δ pts | Δ images | weights frozen | wall min "
        "| command |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        # Δ in images: a rounded Δ pts can read as on a target the count is one image short of.
        images = round((r["top1"] - r["top1_fp32"]) * r["val_images"])
        method = f"{r['method']} (= {r['same_as']})" if r.get("same_as") else r["method"]
        lines.append(
            f"| {r['precision']} | {method} | {r['epochs']} | {r.get('image_size') or 'serving'} | "
            f"{100 * r['top1']:.2f} | {r['delta_pts']:+.2f} | {images:+d} | {r['frozen_weights']} | "
            f"{r['wall_s'] / 60:.1f} | `{r.get('command', payload['command'])}` |"
        )
    lines.append("")
    return "\n".join(lines)
