"""Triton `config.pbtxt` written and checked through Triton's own schema (tritonclient's protobufs)."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.errors import RtqError

MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "model.xml"}
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
    """The config a full Triton (onnxruntime / openvino backends) loads this variant with."""
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
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
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
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
