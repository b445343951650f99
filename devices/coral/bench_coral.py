#!/usr/bin/env python3
"""Benchmark a .tflite on a Coral Edge TPU, or on the CPU where there is none; writes the suite's JSON.

Copy this one file and the model to the board. Needs numpy and one LiteRT interpreter:
`ai-edge-litert` (pip) or `tflite-runtime` (Coral's older wheels); the Edge TPU also needs the
libedgetpu runtime (Debian package libedgetpu1-std) and a model compiled by edgetpu_compiler
(`*_edgetpu.tflite`). Pillow is needed only for --data (top-1 on a labelled folder).

  python3 bench_coral.py --model model_edgetpu.tflite --edgetpu --out coral.json
  python3 bench_coral.py --model model.tflite --cpu --runs 300       # CPU fallback (XNNPACK)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

MIN_RUNS = 200
MIN_WARMUP = 10
EDGETPU_LIBS = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
INSTALL = (
    "install the Edge TPU runtime (libedgetpu1-std from Coral's apt repository "
    "coral-edgetpu-stable) and plug in the device"
)


def interpreter_api():
    """(Interpreter, load_delegate, package name and version) from whichever LiteRT is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "tflite-runtime"
    except ImportError:
        sys.exit("no LiteRT interpreter: `pip install ai-edge-litert` (or Coral's tflite-runtime wheel)")


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a version is informative only
        return "unknown"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def percentiles(samples_ns: list[int]) -> dict:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p90": round(float(np.percentile(ms, 90)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
        "min": round(float(ms.min()), 3),
        "runs": len(ms),
    }


def is_compiled(path: Path) -> bool:
    # edgetpu_compiler replaces the mapped ops with one custom op of this name.
    return b"edgetpu-custom-op" in path.read_bytes()


def open_interpreter(args) -> tuple[object, str, list[str]]:
    Interpreter, load_delegate, _ = interpreter_api()
    notes: list[str] = []
    compiled = is_compiled(args.model)
    want_tpu = args.edgetpu or (not args.cpu and compiled)
    delegates = []
    device = "cpu"
    if want_tpu:
        if not compiled:
            sys.exit(f"{args.model} is not compiled for the Edge TPU: run edgetpu_compiler on it first")
        lib = args.delegate_lib or EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")
        try:
            delegates = [load_delegate(lib, {"device": args.device} if args.device else {})]
            device = "edgetpu"
        except (ValueError, OSError, RuntimeError) as exc:
            sys.exit(f"Edge TPU delegate {lib} could not be loaded ({exc}); {INSTALL}")
    else:
        notes.append("Edge TPU not used: CPU fallback (XNNPACK)" + (" by --cpu" if args.cpu else ""))
        if compiled:
            sys.exit(
                f"{args.model} is compiled for the Edge TPU and cannot run on the CPU; "
                "pass the uncompiled file"
            )
    interp = Interpreter(
        model_path=str(args.model), num_threads=args.threads, experimental_delegates=delegates or None
    )
    interp.allocate_tensors()
    return interp, device, notes


def load_labelled(folder: Path, limit: int | None) -> list[tuple[Path, int]]:
    with (folder / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [(folder / r["file"], int(r["index"])) for r in rows[:limit]]


def pixels(path: Path, size: int) -> np.ndarray:
    """Resize the short side to size/0.875 (bicubic), centre-crop: the suite's Lite0 preprocessing."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    short = int(size / 0.875)
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_input(rgb_uint8: np.ndarray, detail: dict, mean: float, std: float) -> np.ndarray:
    x = (rgb_uint8.astype(np.float32) - mean) / std
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zp = detail["quantization"]
    lim = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zp, lim.min, lim.max).astype(dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, required=True, help=".tflite file (the *_edgetpu.tflite for the TPU)"
    )
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs (>= 200 for a valid result)")
    p.add_argument("--warmup", type=int, default=30, help="untimed runs first (>= 10 for a valid result)")
    p.add_argument("--batches", default="1,4,8", help="batch sizes for throughput, comma-separated")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per throughput measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU interpreter threads")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--edgetpu", action="store_true", help="require the Edge TPU (fail if unavailable)")
    g.add_argument("--cpu", action="store_true", help="never use the Edge TPU")
    p.add_argument("--delegate-lib", help="libedgetpu path or name (default: the platform's)")
    p.add_argument("--device", help="Edge TPU device, e.g. usb:0 or pci:0 (default: first)")
    p.add_argument("--data", type=Path, help="labelled folder (labels.csv: file,wnid,index) for top-1")
    p.add_argument("--limit", type=int, help="first N images of --data")
    p.add_argument("--mean", type=float, default=127.0, help="input normalisation (Lite0: 127)")
    p.add_argument("--std", type=float, default=128.0, help="input normalisation (Lite0: 128)")
    p.add_argument("--name", help="variant name in the report (default: from the path)")
    p.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    if not args.model.is_file():
        p.error(f"{args.model} does not exist")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    interp, device, notes = open_interpreter(args)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    shape = [int(d) for d in inp["shape"]]
    rng = np.random.default_rng(0)
    x = to_input(rng.integers(0, 256, size=shape[1:], dtype=np.uint8), inp, args.mean, args.std)[None]

    def run_one(arr: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], arr)
        interp.invoke()
        return interp.get_tensor(out["index"])

    for _ in range(args.warmup):
        run_one(x)
    samples = []
    for _ in range(args.runs):
        t = time.perf_counter_ns()
        run_one(x)
        samples.append(time.perf_counter_ns() - t)
    throughput = {}
    for b in batches:  # the graph is batch 1 (as the Edge TPU runs it): a batch is b back-to-back calls
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < args.seconds:
            for _ in range(b):
                run_one(x)
            n += 1
        throughput[str(b)] = round(n * b / (time.perf_counter() - start), 1)

    accuracy = None
    if args.data:
        items = load_labelled(args.data, args.limit)
        hits = 0
        for path, label in items:
            y = run_one(to_input(pixels(path, shape[1]), inp, args.mean, args.std)[None])
            hits += int(np.argmax(y.reshape(-1)) == label)
        accuracy = {"eval_set": args.data.name, "n": len(items), "top1": round(hits / max(len(items), 1), 4)}

    reasons = []
    if args.runs < MIN_RUNS:
        reasons.append(f"{args.runs} timed runs < {MIN_RUNS}")
    if args.warmup < MIN_WARMUP:
        reasons.append(f"warm-up {args.warmup} < {MIN_WARMUP}")
    integer = np.dtype(inp["dtype"]).kind in "iu" and np.dtype(out["dtype"]).kind in "iu"
    _, _, pkg = interpreter_api()
    variant = {
        "variant": args.name or args.model.parent.parent.name or args.model.stem,
        "model": args.model.name,
        "trained": True,
        "backend": "litert",
        "precision": "int8" if integer else "fp32",
        "execution_precision": "int8 (edgetpu)" if device == "edgetpu" else ("int8" if integer else "fp32"),
        "file_bytes": args.model.stat().st_size,
        "latency_ms": percentiles(samples),
        "throughput_ips": throughput,
        "validity": {"valid": not reasons, "reasons": reasons},
        "device": device,
        "notes": notes,
    }
    if accuracy:
        variant["accuracy"] = accuracy
    result = {
        "benchmark": "device-coral",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "tool_versions": {
            pkg: package_version(pkg),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "settings": {"runs": args.runs, "warmup": args.warmup, "batches": batches, "threads": args.threads},
        "variants": [variant],
        "speedups": [],
    }
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    lat = variant["latency_ms"]
    print(
        f"{variant['variant']} on {device}: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms; "
        f"throughput {throughput}" + (f"; top-1 {accuracy['top1']} on {accuracy['n']}" if accuracy else "")
    )
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
