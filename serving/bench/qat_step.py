"""`rtq bench qat-step`: one `rtq qat` training step, as it runs now and without its speed-ups.

The step timed is `serving.qat.loop.train_step` itself (teacher forward, student forward and
backward, gradient clipping, AdamW, oscillation tracking) on the student `rtq qat` builds, at the
plan's own bits, on random batches (the time does not depend on the pixels), in three setups:
`rtq qat`'s own (fake quantizers fused by torch.compile, the teacher on OpenVINO on the CPU), the
same with eager fake quantizers (`--no-compile`), and eager with the teacher in PyTorch too (the
step before either). Rounds alternate the setups, so a slow minute on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from serving.cli import _positive
from serving.settings import default_results_dir

# setup -> (fake quantizers, teacher on OpenVINO on the CPU)
SETUPS = {"compiled": ("compiled", True), "eager": ("eager", True), "eager-torch-teacher": ("eager", False)}


def add_arguments(sp: argparse.ArgumentParser) -> None:
    from serving.qat.cli import DEFAULT_MODEL
    from serving.qat.config import PRESETS, QatConfig

    sp.add_argument("--model", default=DEFAULT_MODEL, help="zoo model (default: %(default)s)")
    sp.add_argument("--weights", default=None, help="its checkpoint (default: the zoo's)")
    sp.add_argument(
        "--plans",
        nargs="+",
        default=["w4a4", "w2a4"],
        help=f"built-in plans ({', '.join(PRESETS)}) or plan YAML files (default: w4a4 w2a4)",
    )
    sp.add_argument("--image-size", type=_positive, default=144, help="training crop side (default: 144)")
    sp.add_argument(
        "--batch-size",
        type=_positive,
        default=QatConfig.batch_size,
        help="(default: %(default)s, as rtq qat)",
    )
    sp.add_argument("--steps", type=_positive, default=5, help="timed steps a setup a round (default: 5)")
    sp.add_argument("--warmup", type=_positive, default=3, help="untimed steps before each (default: 3)")
    sp.add_argument("--rounds", type=_positive, default=2, help="rounds through the setups (default: 2)")
    sp.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    sp.add_argument("--threads", type=_positive, default=2, help="torch threads (default: 2)")
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _markdown(payload: dict) -> str:
    m = payload["machine"]
    setups = payload["setups"]
    lines = [
        "# One `rtq qat` step: compiled vs eager fake quantizers, OpenVINO vs PyTorch teacher",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; machine: {m['cpu']}, {m['cores']} cores, {payload['threads']} torch "
        f"threads; torch {payload['torch']}",
        f"- model: {payload['model']}; batch {payload['batch_size']} at {payload['image_size']} px; "
        f"{payload['rounds']} rounds of {payload['warmup']} untimed + {payload['steps']} timed steps per "
        f"setup; compiling took {payload['compile_s']} s",
        f"- 1-min load average before / after: {payload['load_average_1m']['before']} / "
        f"{payload['load_average_1m']['after']}",
        "",
        "| plan | " + " | ".join(f"{k} ms/img" for k in setups) + f" | compiled vs eager | vs {setups[-1]} |",
        "| --- | " + " | ".join("---:" for _ in setups) + " | ---: | ---: |",
    ]
    for r in payload["rows"]:
        ms = r["ms_per_image"]
        lines.append(
            f"| {r['plan']} | " + " | ".join(f"{ms[k]:.1f}" for k in setups)
            + f" | x{r['speedup']['kernels']:.2f} | x{r['speedup']['total']:.2f} |"
        )  # fmt: skip
    lines += [
        "",
        "Medians over all timed steps of a setup (ms per image; speed-ups are ratios of those medians).",
        "Compiled and eager fake quantizers compute the same values (checked before timing).",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> int:
    import torch

    from serving.bench.results import write_results
    from serving.errors import RtqError
    from serving.qat.cli import resolve_plan, teacher
    from serving.qat.config import QatConfig
    from serving.qat.fake_quant import EAGER, compiled_kernels
    from serving.qat.loop import make_optimizer, make_student, teacher_forward, train_step
    from serving.qat.prepare import calibrate, set_bits, use_kernels
    from serving.repository.build import machine
    from serving.train.loop import check_device

    check_device(args.device)
    torch.set_num_threads(args.threads)
    plans = [resolve_plan(p) for p in args.plans]
    loaded = teacher(args.model, args.weights)
    notes: list[str] = []
    t0 = time.perf_counter()
    kernels = {"eager": EAGER, "compiled": compiled_kernels(args.device, notes.append)}
    compile_s = round(time.perf_counter() - t0, 1)
    if kernels["compiled"] is EAGER:
        raise RtqError(f"nothing to compare: {notes[-1].removeprefix('note: ')}")
    cfg = QatConfig(batch_size=args.batch_size, image_size=args.image_size)
    # Where the teacher runs on PyTorch anyway (a GPU), the PyTorch-teacher setup is the eager one.
    setups = [k for k, (_, ov) in SETUPS.items() if ov or torch.device(args.device).type == "cpu"]
    load_before = os.getloadavg()[0]
    per_setup = args.rounds * (args.warmup + args.steps)
    bar = tqdm(total=len(plans) * len(setups) * per_setup, desc="qat steps", disable=args.quiet, leave=False)
    rows = []
    forwards = None  # the teacher, converted once for every plan
    for plan in plans:
        torch.manual_seed(0)
        teacher_m, student, layers, _ = make_student(loaded, plan, args.image_size, EAGER, args.device)
        forwards = forwards or {True: teacher_forward(teacher_m, cfg, args.device), False: teacher_m}
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        calibrate(student, layers, [torch.randn(shape, device=args.device)])
        set_bits(layers, min(q.target_bits for q in layers), plan.act_bits)  # the bits that ship
        opt = make_optimizer(student, cfg)
        x = torch.randn(shape, device=args.device)
        y = torch.randint(0, 10, (args.batch_size,), device=args.device)
        samples: dict[str, list[float]] = {k: [] for k in setups}
        for _ in range(args.rounds):
            for name in setups:
                kernel_name, openvino = SETUPS[name]
                use_kernels(layers, kernels[kernel_name])
                for i in range(args.warmup + args.steps):
                    t = time.perf_counter()
                    train_step(forwards[openvino], student, layers, opt, cfg, x, y)
                    if i >= args.warmup:
                        samples[name].append(1000 * (time.perf_counter() - t) / args.batch_size)
                    bar.update(1)
        ms = {k: round(statistics.median(v), 2) for k, v in samples.items()}
        rows.append({
            "plan": plan.name, "ms_per_image": ms,
            "speedup": {"kernels": round(ms["eager"] / ms["compiled"], 3),
                        "total": round(ms[setups[-1]] / ms["compiled"], 3)},
            "samples_ms_per_image": {k: [round(t, 2) for t in v] for k, v in samples.items()},
        })  # fmt: skip
    bar.close()
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": "qat-step", "command": command, "date": now.isoformat(timespec="seconds"),
        "machine": machine(), "torch": torch.__version__, "threads": args.threads, "device": args.device,
        "model": loaded.spec.name, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "compile_s": compile_s,
        "setups": setups,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "rows": rows,
    }  # fmt: skip
    write_results(Path(args.out), "qat-step", now, payload, _markdown(payload))
    return 0
