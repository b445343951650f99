"""`rtq bench int8-kernels`: ONNX Runtime's two x86 INT8 kernel families side by side per variant.

On x86 without VNNI, ORT's default u8 x s8 kernels add pairs of products in int16 and saturate;
u8 x u8 kernels (`session.x64quantprecision`) are exact and slower (RTQ_ORT_INT8_KERNELS=u8u8 or
auto turns them on). This command shows what they cost and buy on this machine: top-1 against FP32 on
the same images, and batch-1 latency and batch-8 throughput measured in interleaved rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.settings import default_results_dir

KERNELS = ("u8s8", "u8u8")
ROUND = 50
_FLOAT = {"fp32", "fp16"}  # precisions with no INT8 kernels to choose between


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "variants", nargs="*", help="ONNX Runtime variants (default: every integer ONNX Runtime variant)"
    )
    sp.add_argument(
        "--eval",
        default=None,
        help="labelled folder (default: imagenet-val for ImageNet models, imagenette/val for 10-class ones)",
    )
    sp.add_argument("--eval-images", type=int, default=None, help="first N images only")
    sp.add_argument("--runs", type=int, default=300, help="timed batch-1 runs per kernel (default: 300)")
    sp.add_argument("--warmup", type=int, default=30, help="untimed runs first (default: 30)")
    sp.add_argument("--threads", type=int, default=2, help="runtime threads (default: 2)")
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")


def _variants(repository: Path, names: list[str]) -> list:
    from serving.errors import RtqError
    from serving.repository.layout import list_variants, open_variant

    chosen = [open_variant(repository, n) for n in (names or list_variants(repository))]
    if names:
        wrong = [v.name for v in chosen if v.manifest["backend"] != "onnxruntime"]
        if wrong:
            raise RtqError(f"not ONNX Runtime variants: {', '.join(wrong)}; INT8 kernels are ORT's choice")
        floats = [v.name for v in chosen if v.manifest["precision"] in _FLOAT]
        if floats:
            raise RtqError(f"float variants run no INT8 kernels: {', '.join(floats)}")
    chosen = [v for v in chosen if v.manifest["backend"] == "onnxruntime"]
    chosen = [v for v in chosen if v.manifest["precision"] not in _FLOAT]
    if not chosen:
        raise RtqError(f"{repository} holds no integer ONNX Runtime variants; run `rtq build` first")
    return chosen


def _accuracy(variant, runners: dict, args: argparse.Namespace, progress: bool, loaded: dict) -> dict | None:
    """Top-1 of each kernel family on the same images, or None (with the reason printed) without data.
    `loaded` keeps decoded images per (folder, classes, preprocessing): variants of one model share them."""
    from serving.bench.accuracy import predict_top5, reference_top5, score
    from serving.bench.evaluate import fp32_model_of
    from serving.data.datasets import open_labelled
    from serving.data.loader import load_uint8
    from serving.errors import RtqError
    from serving.models.zoo import class_wnids
    from serving.repository.build import DEFAULT_EVAL
    from serving.settings import PROJECT_ROOT

    m = variant.manifest
    folder = args.eval or DEFAULT_EVAL[m["classes"]]
    key = (folder, m["classes"], variant.preprocessing)
    if key not in loaded:
        try:
            images, labels = open_labelled(folder, args.data_root).for_classes(class_wnids(m["classes"]))
        except RtqError as exc:
            print(f"accuracy columns skipped: {exc}")
            return None
        images = images.head(args.eval_images)
        loaded[key] = (images, labels[: len(images)], load_uint8(images, variant.preprocessing, progress))
    images, labels, uint8 = loaded[key]
    names = [it.path.name for it in images.items]
    ref5 = reference_top5(fp32_model_of(m), uint8, names, PROJECT_ROOT / ".cache" / "reference", progress)
    out = {}
    for kernels, runner in runners.items():
        pred5 = predict_top5(runner.infer, uint8, variant.preprocessing, desc=f"{variant.name} {kernels}",
                             progress=progress)  # fmt: skip
        out[kernels] = score(images.name, pred5, ref5, labels).to_dict()
    return out


def _latency(runners: dict, x: np.ndarray, runs: int, warmup: int, progress: bool) -> dict[str, list[int]]:
    """Batch-1 times in rounds that alternate the kernels, so a slow minute hits both alike."""
    for r in runners.values():
        for _ in range(warmup):
            r.infer(x)
    samples: dict[str, list[int]] = {k: [] for k in runners}
    bar = tqdm(total=runs * len(runners), desc="batch-1 latency", disable=not progress, leave=False)
    while len(next(iter(samples.values()))) < runs:
        step = min(ROUND, runs - len(next(iter(samples.values()))))
        for k, r in runners.items():
            for _ in range(step):
                t = time.perf_counter_ns()
                r.infer(x)
                samples[k].append(time.perf_counter_ns() - t)
            bar.update(step)
    bar.close()
    return samples


def _markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# INT8 kernels on ONNX Runtime: u8 x s8 (ORT's default) vs u8 x u8 (exact)",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; machine: {m['cpu']}, {m['cores']} cores, {payload['threads']} "
        f"runtime threads; VNNI: {m.get('int8_vnni')}; `auto` would pick **{payload['auto']}** here",
        f"- 1-min load average before / after: {payload['load_average_1m']['before']} / "
        f"{payload['load_average_1m']['after']}",
        f"- accuracy: {', '.join(payload['eval_sets']) or 'not measured (no labelled images: --data-root)'}",
        "",
        "| variant | kernels | top-1 | FP32 | Δ pts | agree FP32 | p50 ms | p99 ms | img/s @ batch 8 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in payload["rows"]:
        a = r.get("accuracy")
        acc = (
            f"{100 * a['top1']:.1f} | {100 * a['top1_fp32']:.1f} | "
            f"{100 * (a['top1'] - a['top1_fp32']):+.1f} | {100 * a['agreement_fp32']:.1f}"
            if a
            else "– | – | – | –"
        )
        lat = r["latency_ms"]
        lines.append(
            f"| {r['variant']} | {r['kernels']} | {acc} | {lat['p50']:.2f} | {lat['p99']:.2f} | "
            f"{r['throughput_ips_batch8']:.1f} |"
        )
    lines += ["", "u8u8 / u8s8, same run:", ""]
    for v in payload["ratios"]:
        lines.append(
            f"- {v['variant']}: p50 x{v['p50_ratio']:.2f}, batch-8 throughput x{v['throughput_ratio']:.2f}"
            + (f", top-1 {v['top1_delta_pts']:+.1f} pts" if v.get("top1_delta_pts") is not None else "")
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace, command: str) -> int:
    from serving.bench.offline import latency_percentiles, throughput
    from serving.bench.results import write_results
    from serving.errors import RtqError
    from serving.repository.build import machine, tool_versions
    from serving.runtimes.onnxruntime_runner import OnnxRuntimeRunner, resolve_int8_kernels

    for name in ("runs", "warmup", "threads"):
        if getattr(args, name) <= 0:
            raise RtqError(f"--{name} must be positive")
    if args.eval_images is not None and args.eval_images <= 0:
        raise RtqError("--eval-images must be positive")
    progress = not args.quiet
    variants = _variants(Path(args.repository), args.variants)
    load_before = os.getloadavg()[0]
    rows, ratios, eval_sets, loaded = [], [], set(), {}
    for v in variants:
        runners = {
            k: OnnxRuntimeRunner(v.model_path, v.manifest["precision"], args.threads, int8_kernels=k)
            for k in KERNELS
        }
        try:
            accuracy = _accuracy(v, runners, args, progress, loaded)
            x = np.random.default_rng(0).standard_normal((1, *v.manifest["input"]["shape"]), dtype=np.float32)
            samples = _latency(runners, x, args.runs, args.warmup, progress)
            tput = {k: throughput(r, x, 8) for k, r in runners.items()}
        finally:
            for r in runners.values():
                r.close()
        for k in KERNELS:
            rows.append({
                "variant": v.name, "precision": v.manifest["precision"], "kernels": k,
                "accuracy": accuracy[k] if accuracy else None,
                "latency_ms": latency_percentiles(samples[k]), "throughput_ips_batch8": round(tput[k], 1),
            })  # fmt: skip
        if accuracy:
            eval_sets.add(f"{accuracy[KERNELS[0]]['eval_set']} ({accuracy[KERNELS[0]]['n']} images)")
        u8s8, u8u8 = rows[-2], rows[-1]
        ratios.append({
            "variant": v.name,
            "p50_ratio": round(u8u8["latency_ms"]["p50"] / u8s8["latency_ms"]["p50"], 3),
            "throughput_ratio": round(u8u8["throughput_ips_batch8"] / u8s8["throughput_ips_batch8"], 3),
            "top1_delta_pts": round(100 * (accuracy["u8u8"]["top1"] - accuracy["u8s8"]["top1"]), 2)
            if accuracy else None,
        })  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": "int8-kernels", "command": command, "date": now.isoformat(timespec="seconds"),
        "machine": machine(), "tool_versions": tool_versions(), "threads": args.threads,
        "auto": resolve_int8_kernels("auto"), "eval_sets": sorted(eval_sets),
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "rows": rows, "ratios": ratios,
    }  # fmt: skip
    write_results(Path(args.out), "int8-kernels", now, payload, _markdown(payload))
    return 0
