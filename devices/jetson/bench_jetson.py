#!/usr/bin/env python3
"""Benchmark a classifier on an NVIDIA Jetson (or any NVIDIA GPU) with TensorRT; writes the suite's JSON.

Copy this one file and the model to the device. Engines are tied to the GPU and TensorRT version
that built them, so the usual flow is to build on the device from the ONNX:

  python3 bench_jetson.py --onnx source-int8.onnx --precision int8 --save-engine model.plan
  python3 bench_jetson.py --engine model.plan --runs 500 --out jetson.json

Needs numpy and, for the GPU path, TensorRT's Python bindings (JetPack: python3-libnvinfer) plus
device memory from PyTorch or cuda-python (whichever is installed). Without TensorRT or a GPU it
falls back to ONNX Runtime on --onnx (CUDA provider if present, else CPU) and says so in the
result's notes. Precision of an engine comes from the ONNX (strongly typed build): FP32 ONNX,
FP16 ONNX, or Q/DQ INT8 ONNX; --precision only labels it on TensorRT >= 9 and sets the builder
flag on older TensorRT (JetPack 5).
"""

from __future__ import annotations

import argparse
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


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}
    model = Path("/proc/device-tree/model")  # Jetson boards name themselves here
    if model.is_file():
        info["board"] = model.read_text(errors="ignore").strip("\x00\n ")
    return info


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


# --- device memory: PyTorch if present, else cuda-python ---------------------------------------------


class TorchMemory:
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.handle = self.stream.cuda_stream
        self.gpu = torch.cuda.get_device_name(0)

    def empty(self, shape: tuple[int, ...]):
        return self.torch.empty(shape, dtype=self.torch.float32, device="cuda")

    def ptr(self, buf) -> int:
        return buf.data_ptr()

    def upload(self, buf, host: np.ndarray) -> None:
        buf.copy_(self.torch.from_numpy(host))

    def download(self, buf) -> np.ndarray:
        return buf.cpu().numpy()

    def sync(self) -> None:
        self.stream.synchronize()


class CudaPythonMemory:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        err, self.handle = cudart.cudaStreamCreate()
        self._check(err, "cudaStreamCreate")
        err, props = cudart.cudaGetDeviceProperties(0)
        self._check(err, "cudaGetDeviceProperties")
        self.gpu = props.name.decode(errors="ignore").strip("\x00")
        self._sizes: dict[int, tuple[int, ...]] = {}

    def _check(self, err, what: str) -> None:
        if int(err) != 0:
            raise RuntimeError(f"{what} failed: {err}")

    def empty(self, shape: tuple[int, ...]) -> int:
        err, ptr = self.rt.cudaMalloc(int(np.prod(shape)) * 4)
        self._check(err, "cudaMalloc")
        self._sizes[int(ptr)] = shape
        return int(ptr)

    def ptr(self, buf: int) -> int:
        return buf

    def upload(self, buf: int, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        (err,) = self.rt.cudaMemcpy(buf, host.ctypes.data, host.nbytes, kind)
        self._check(err, "cudaMemcpy H2D")

    def download(self, buf: int) -> np.ndarray:
        host = np.empty(self._sizes[buf], dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        (err,) = self.rt.cudaMemcpy(host.ctypes.data, buf, host.nbytes, kind)
        self._check(err, "cudaMemcpy D2H")
        return host

    def sync(self) -> None:
        (err,) = self.rt.cudaStreamSynchronize(self.handle)
        self._check(err, "cudaStreamSynchronize")


def device_memory():
    errors = []
    for cls in (TorchMemory, CudaPythonMemory):
        try:
            return cls()
        except Exception as exc:  # noqa: BLE001 - try the next provider, report all at the end
            errors.append(f"{cls.name}: {exc}")
    raise RuntimeError("no CUDA device memory: " + "; ".join(errors))


# --- TensorRT ----------------------------------------------------------------------------------------


def build_engine(
    trt, onnx: Path, precision: str, max_batch: int, cache: Path | None
) -> tuple[bytes, list[str]]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        sys.exit(
            "TensorRT rejected the ONNX: "
            + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    flags = ["STRONGLY_TYPED"] if strong is not None else []
    if strong is None and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.INT8)
        flags.append(precision.upper())
    inp = network.get_input(0)
    shape = tuple(inp.shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (1, *shape), (min(8, max_batch), *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    timing = config.create_timing_cache(cache.read_bytes() if cache and cache.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        sys.exit(f"TensorRT could not build an engine from {onnx}")
    if cache:
        cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan), flags


class TrtModel:
    def __init__(self, trt, plan: bytes, mem) -> None:
        self.trt, self.mem = trt, mem
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            sys.exit(
                f"TensorRT {trt.__version__} could not load this engine: it was built by another TensorRT "
                "version or for another GPU. Rebuild it here with --onnx"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inp = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.inp)[1:])
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.inp, 0)[2][0])
        self._bufs: dict[int, tuple] = {}

    def buffers(self, batch: int):
        if batch not in self._bufs:
            self.context.set_input_shape(self.inp, (batch, *self.shape))
            x = self.mem.empty((batch, *self.shape))
            y = self.mem.empty(tuple(self.context.get_tensor_shape(self.out)))
            self._bufs[batch] = (x, y)
        return self._bufs[batch]

    def run(self, batch: int, host: np.ndarray | None = None) -> np.ndarray | None:
        """Device-resident timing by default (host=None); with host data, copy in and out."""
        x, y = self.buffers(batch)
        self.context.set_input_shape(self.inp, (batch, *self.shape))
        self.context.set_tensor_address(self.inp, self.mem.ptr(x))
        self.context.set_tensor_address(self.out, self.mem.ptr(y))
        if host is not None:
            self.mem.upload(x, host)
        self.context.execute_async_v3(self.mem.handle)
        self.mem.sync()
        return self.mem.download(y) if host is not None else None


# --- ONNX Runtime fallback -----------------------------------------------------------------------------


class OrtModel:
    def __init__(self, onnx: Path, threads: int) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        self.provider = (
            "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else "CPUExecutionProvider"
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx), opts, providers=[self.provider])
        i = self.session.get_inputs()[0]
        self.inp, self.shape = i.name, tuple(int(d) for d in i.shape[1:])
        self.max_batch = 1 << 30
        self._x: dict[int, np.ndarray] = {}

    def run(self, batch: int, host: np.ndarray | None = None) -> np.ndarray:
        x = (
            host
            if host is not None
            else self._x.setdefault(batch, np.zeros((batch, *self.shape), np.float32))
        )
        return self.session.run(None, {self.inp: x})[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of)")
    src.add_argument("--engine", type=Path, help="serialized TensorRT engine (.plan) built on this device")
    src.add_argument(
        "--onnx", type=Path, help="ONNX to build an engine from here (or to run with ONNX Runtime)"
    )
    p.add_argument(
        "--precision", choices=("fp32", "fp16", "int8"), default="fp32", help="label / old-TRT flag"
    )
    p.add_argument("--save-engine", type=Path, help="write the engine built from --onnx")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache to reuse and update")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of the optimization profile")
    p.add_argument("--runs", type=int, default=300, help="timed batch-1 runs (>= 200 for a valid result)")
    p.add_argument("--warmup", type=int, default=50, help="untimed runs first (>= 10 for a valid result)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes for throughput, comma-separated")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per throughput measurement")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (ONNX Runtime fallback)"
    )
    p.add_argument("--cpu", action="store_true", help="skip TensorRT: ONNX Runtime on --onnx")
    p.add_argument("--name", help="variant name in the report")
    p.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    if not args.engine and not args.onnx:
        p.error("give --engine or --onnx")
    for f in (args.engine, args.onnx):
        if f and not f.is_file():
            p.error(f"{f} does not exist")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    notes: list[str] = []
    versions = {"numpy": np.__version__, "python": platform.python_version()}

    model = None
    device = "cpu"
    flags: list[str] = []
    if not args.cpu:
        try:
            import tensorrt as trt

            mem = device_memory()
            versions["tensorrt"] = trt.__version__
            versions["device_memory"] = mem.name
            if args.engine:
                plan = args.engine.read_bytes()
            else:
                plan, flags = build_engine(trt, args.onnx, args.precision, args.max_batch, args.timing_cache)
                if args.save_engine:
                    args.save_engine.write_bytes(plan)
            model = TrtModel(trt, plan, mem)
            device = f"cuda ({mem.gpu})"
        except ImportError:
            notes.append("TensorRT absent (python bindings not importable): ONNX Runtime fallback")
        except RuntimeError as exc:
            notes.append(f"no usable CUDA GPU ({exc}): ONNX Runtime fallback")
    if model is None:
        if not args.onnx:
            sys.exit(
                "TensorRT is unavailable here and --engine cannot run without it; "
                "pass --onnx for the fallback"
            )
        model = OrtModel(args.onnx, args.threads)
        versions["onnxruntime"] = __import__("onnxruntime").__version__
        device = "cuda (onnxruntime)" if model.provider.startswith("CUDA") else "cpu"
        notes.append(f"ONNX Runtime {model.provider}")

    for _ in range(args.warmup):
        model.run(1)
    samples = []
    for _ in range(args.runs):
        t = time.perf_counter_ns()
        model.run(1)
        samples.append(time.perf_counter_ns() - t)
    throughput = {}
    for b in batches:
        if b > model.max_batch:
            notes.append(f"batch {b} skipped: above the engine's profile max {model.max_batch}")
            continue
        model.run(b)
        n, start = 0, time.perf_counter()
        while n < 5 or time.perf_counter() - start < args.seconds:
            model.run(b)
            n += 1
        throughput[str(b)] = round(n * b / (time.perf_counter() - start), 1)
    if isinstance(model, TrtModel):
        notes.append("latency is device-resident (input already on the GPU), as trtexec's GPU compute time")

    reasons = []
    if args.runs < MIN_RUNS:
        reasons.append(f"{args.runs} timed runs < {MIN_RUNS}")
    if args.warmup < MIN_WARMUP:
        reasons.append(f"warm-up {args.warmup} < {MIN_WARMUP}")
    source = args.engine or args.onnx
    backend = "tensorrt" if isinstance(model, TrtModel) else "onnxruntime"
    variant = {
        "variant": args.name or f"{source.stem}-{args.precision}-{backend}",
        "model": source.name,
        "trained": True,
        "backend": backend,
        "precision": args.precision,
        "execution_precision": args.precision,
        "file_bytes": source.stat().st_size,
        "latency_ms": percentiles(samples),
        "throughput_ips": throughput,
        "validity": {"valid": not reasons, "reasons": reasons},
        "device": device,
        "builder_flags": flags,
        "notes": notes,
    }
    result = {
        "benchmark": "device-jetson",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "tool_versions": versions,
        "settings": {"runs": args.runs, "warmup": args.warmup, "batches": batches, "threads": args.threads},
        "variants": [variant],
        "speedups": [],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    lat = variant["latency_ms"]
    print(
        f"{variant['variant']} on {device}: p50 {lat['p50']} ms, p99 {lat['p99']} ms; throughput {throughput}"
    )
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
