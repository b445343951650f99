"""Triton `config.pbtxt` written and checked through Triton's own schema (tritonclient's protobufs)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import RtqError

MODEL_FILES = {
    "onnxruntime": "model.onnx",
    "openvino": "model.xml",
    "tensorrt": "model.plan",
    "litert": "model.tflite",
}
# Triton ships no LiteRT/TFLite backend: a litert variant's config carries neither platform nor
# backend, and is served by `rtq serve` (edge server) or `rtq triton` (python backend) instead.
LITERT_NOTE = (
    "no native Triton backend for LiteRT: serve with `rtq serve` or `rtq triton` (python backend); "
    "a full Triton refuses this config"
)
LABELS_FILE = "labels.txt"
# Real-time defaults: short queue delay so batching never costs a 30-FPS frame its deadline.
MAX_QUEUE_DELAY_US = 2000
PREFERRED_BATCH_SIZES = (4, 8)


def native_config(
    name: str,
    backend: str,
    input_name: str,
    input_shape: tuple[int, ...],
    output_name: str,
    num_classes: int,
    max_batch_size: int,
    threads: int,
    execution_precision: str = "f32",
) -> mc.ModelConfig:
    """The config a full Triton (onnxruntime / openvino / tensorrt backends) loads this variant with."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    kind = mc.ModelInstanceGroup.KIND_CPU
    if backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        kind = mc.ModelInstanceGroup.KIND_GPU  # an engine is bound to the GPU it was built for
        params: dict[str, str] = {}
    elif backend == "litert":
        params = {"num_threads": str(threads), "rtq_note": LITERT_NOTE}
    elif backend == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        params = {"intra_op_thread_count": str(threads), "inter_op_thread_count": "1"}
    elif backend == "openvino":
        cfg.backend = "openvino"
        params = {
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": execution_precision,
            "PERFORMANCE_HINT": "LATENCY",
        }
    else:
        raise RtqError(f"no Triton config for backend {backend!r}")
    cfg.default_model_filename = MODEL_FILES[backend]
    cfg.input.add(name=input_name, data_type=mc.TYPE_FP32, dims=list(input_shape))
    cfg.output.add(name=output_name, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename=LABELS_FILE)
    cfg.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    cfg.dynamic_batching.preferred_batch_size.extend(b for b in PREFERRED_BATCH_SIZES if b <= max_batch_size)
    cfg.instance_group.add(count=1, kind=kind)
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def to_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_config(text: str, where: str = "config.pbtxt") -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as exc:
        raise RtqError(f"{where} does not follow Triton's ModelConfig schema: {exc}") from None
    return cfg


def read_config(path: Path) -> mc.ModelConfig:
    if not path.is_file():
        raise RtqError(f"{path} does not exist")
    return parse_config(path.read_text(), str(path))
