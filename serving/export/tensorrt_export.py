"""TensorRT engines from our ONNX exports: FP32, FP16 and explicitly quantized INT8 (Q/DQ).

Precision lives in the ONNX graph, not in builder flags: TensorRT 11 removed the weak-typing flags
(FP16, INT8, calibrators) and builds every network strongly typed, and 10.x accepts the same
strongly typed build. So the FP16 engine is built from the FP16 ONNX (FP32 I/O) and the INT8 one
from a Q/DQ ONNX whose scales TensorRT can take as they are: signed int8, zero-point 0 (symmetric)
for weights and activations, biases left in float. ORT's serving INT8 variant (u8 asymmetric
activations) does not qualify, hence `quantize_qdq_for_tensorrt`.

An engine is tied to the GPU model and the TensorRT version that built it; every plan gets a
`<plan>.json` build record (versions, GPU, compute capability, profiles, flags) that the runner
checks before deserializing, so a mismatch is a clear error rather than a null engine.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.errors import RtqError

INSTALL_TENSORRT = (
    'install TensorRT\'s Python package matching the CUDA driver (`pip install -e ".[tensorrt]"`, i.e. '
    "tensorrt-cu13; tensorrt-cu12 for CUDA 12 drivers; on Jetson it comes with JetPack: "
    "apt install python3-libnvinfer)"
)
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine; recorded verbatim in the plan's build record."""

    precision: str = "fp32"
    input_name: str = "input"
    input_shape: tuple[int, int, int] = (3, 224, 224)
    # One optimization profile: batch min / opt / max. opt is the batch TensorRT tunes kernels for.
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    optimization_level: int = 3  # TensorRT's default; 5 searches longer for faster kernels
    timing_cache: str | None = None  # path; reused across builds on the same GPU/TRT, then updated

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RtqError(f"TensorRT precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise RtqError(
                f"optimization profile needs 1 <= min <= opt <= max batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    def profile(self) -> dict[str, list[int]]:
        shape = list(self.input_shape)
        return {
            "min": [self.min_batch, *shape],
            "opt": [self.opt_batch, *shape],
            "max": [self.max_batch, *shape],
        }


@dataclass
class BuildRecord:
    """The `<plan>.json` beside every engine: what it was built from, with what, for which GPU."""

    precision: str
    source_onnx: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    cuda_version: str | None
    profiles: list[dict]
    builder_flags: list[str]
    network_flags: list[str]
    workspace_mib: int
    optimization_level: int
    timing_cache: str | None
    build_seconds: float
    built_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)


def record_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


# --- ONNX side: runs anywhere -------------------------------------------------------------------------


def quantize_qdq_for_tensorrt(
    src: Path, dst: Path, calibration: np.ndarray, input_name: str = "input"
) -> Path:
    """Q/DQ INT8 ONNX in the form TensorRT's explicit quantization takes: symmetric s8, float bias."""
    from serving.quantize.int8_onnxruntime import quantize_int8

    if calibration is None or len(calibration) == 0:
        raise RtqError("the TensorRT INT8 build needs calibration images")
    quantize_int8(src, dst, calibration, input_name, symmetric=True)
    check_qdq_for_tensorrt(dst)
    return dst


def check_qdq_for_tensorrt(path: Path) -> dict:
    """Every Q/DQ pair int8 with zero-point 0, or RtqError naming the first offenders."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    bad: list[str] = []
    count = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name:
            bad.append(f"{node.name}: no zero-point, so ONNX means uint8")
            continue
        zp = inits.get(zp_name)
        if zp is None:
            bad.append(f"{node.name}: zero-point {zp_name} is not a constant")
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype != np.int8:
            bad.append(f"{node.name}: {arr.dtype} (TensorRT wants int8)")
        elif np.any(arr != 0):
            bad.append(f"{node.name}: zero-point {int(arr.flat[np.flatnonzero(arr)[0]])} (must be 0)")
    if count == 0:
        raise RtqError(
            f"{path} has no QuantizeLinear/DequantizeLinear nodes: not an explicitly quantized model"
        )
    if bad:
        raise RtqError(
            f"{path}: {len(bad)} Q/DQ node(s) TensorRT cannot take: {'; '.join(bad[:4])}. Re-quantize with "
            "quantize_qdq_for_tensorrt (symmetric s8)"
        )
    return {"qdq_nodes": count}


def prepare_onnx(onnx_fp32: Path, precision: str, dst: Path, calibration: np.ndarray | None) -> Path:
    """The ONNX an engine of `precision` is built from (kept beside the plan for rebuilds on device)."""
    import shutil

    if precision == "fp32":
        shutil.copyfile(onnx_fp32, dst)
    elif precision == "fp16":
        from serving.export.onnx_export import convert_fp16

        convert_fp16(onnx_fp32, dst)
    elif precision == "int8":
        quantize_qdq_for_tensorrt(onnx_fp32, dst, calibration)
    else:
        raise RtqError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    return dst


# --- GPU side ----------------------------------------------------------------------------------------


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RtqError(f"TensorRT is not importable ({exc}); {INSTALL_TENSORRT}") from None
    return trt


def cuda_device() -> dict:
    """The GPU an engine would be built for / run on, or RtqError when there is none."""
    try:
        import torch
    except ImportError:
        raise RtqError("PyTorch (CUDA build) is needed for TensorRT buffers and GPU facts") from None
    if not torch.cuda.is_available():
        raise RtqError(
            "no CUDA GPU visible (torch.cuda.is_available() is False): TensorRT needs an NVIDIA GPU"
        )
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "gpu_name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
    }


def require_tensorrt_gpu():
    """(tensorrt module, device facts): the hardware boundary every TensorRT path crosses first."""
    trt = import_tensorrt()
    return trt, cuda_device()


def _flag_names(enum, value: int) -> list[str]:
    return sorted(name for name, member in enum.__members__.items() if value & (1 << int(member)))


def build_engine(onnx_path: Path, plan: Path, cfg: EngineConfig) -> BuildRecord:
    """Parse the ONNX, build a strongly typed engine with one batch profile, write plan + record."""
    import time

    trt, device = require_tensorrt_gpu()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: required for our Q/DQ + FP16 graphs on 10.x, the only mode (and ignored) on 11.x.
    flags = 0
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong is not None:
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RtqError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    config.builder_optimization_level = cfg.optimization_level
    if strong is None:  # TensorRT < 9 (old JetPack): weak typing, precision through builder flags
        if cfg.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif cfg.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    p = cfg.profile()
    profile.set_shape(cfg.input_name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    cache = config.create_timing_cache(
        cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    )
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RtqError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    record = BuildRecord(
        precision=cfg.precision,
        source_onnx=onnx_path.name,
        tensorrt_version=trt.__version__,
        gpu_name=device["gpu_name"],
        compute_capability=device["compute_capability"],
        cuda_version=device["cuda_version"],
        profiles=[p],
        builder_flags=_flag_names(trt.BuilderFlag, int(config.flags)),
        network_flags=_flag_names(trt.NetworkDefinitionCreationFlag, flags),
        workspace_mib=cfg.workspace_mib,
        optimization_level=cfg.optimization_level,
        timing_cache=str(cache_path) if cache_path else None,
        build_seconds=round(seconds, 2),
    )
    record_path(plan).write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    return record


def check_compatible(record: dict, trt_version: str, device: dict) -> None:
    """An engine runs only on the GPU model (compute capability) and TensorRT version that built it."""
    problems = []
    if record.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {record.get('tensorrt_version')} built it, this machine has {trt_version}")
    if record.get("compute_capability") != device["compute_capability"]:
        problems.append(
            f"it was built for {record.get('gpu_name')} "
            f"(compute capability {record.get('compute_capability')}), "
            f"this GPU is {device['gpu_name']} ({device['compute_capability']})"
        )
    if problems:
        raise RtqError(
            "TensorRT engine is not portable to this machine: "
            + "; ".join(problems)
            + f". Rebuild it here from {record.get('source_onnx', 'its ONNX')} "
            "(`rtq build` with a tensorrt backend, or devices/jetson/bench_jetson.py --onnx)"
        )


def build_engine_for_recipe(
    onnx_fp32: Path, precision: str, dst: Path, calibration: np.ndarray | None
) -> None:
    """`rtq build` hook: fails fast here (no TensorRT/GPU) before spending minutes on the ONNX side."""
    require_tensorrt_gpu()
    source = dst.with_name(f"source-{precision}.onnx")
    prepare_onnx(onnx_fp32, precision, source, calibration)
    build_engine(
        source, dst, EngineConfig(precision=precision, timing_cache=str(dst.parent / "timing.cache"))
    )


def plan_weight_stats(path: Path):
    """Weights of the ONNX the plan was built from (a plan hides its weight layout)."""
    from serving.repository.weight_stats import onnx_weight_stats

    record = json.loads(record_path(path).read_text())
    return onnx_weight_stats(path.with_name(record["source_onnx"]))
