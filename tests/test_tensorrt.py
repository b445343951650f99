"""TensorRT: everything up to the GPU runs here (Q/DQ ONNX, configs, build records, compatibility
checks, clear errors); engine build and inference run only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving.errors import RtqError
from serving.export.tensorrt_export import (
    EngineConfig,
    check_compatible,
    check_qdq_for_tensorrt,
    cuda_device,
    prepare_onnx,
    quantize_qdq_for_tensorrt,
    record_path,
)
from serving.repository.layout import open_variant
from serving.repository.recipes import RECIPES
from serving.repository.triton_config import native_config, parse_config, to_text
from serving.runtimes import open_runner, runner_class
from serving.runtimes.onnxruntime_runner import exact_session


def _gpu_reason() -> str | None:
    """Why the hardware half cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT not importable (pip install -e '.[tensorrt]' on an NVIDIA machine)"
    try:
        cuda_device()
    except RtqError as exc:
        return str(exc)
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"hardware boundary: {GPU_REASON}")
no_gpu = pytest.mark.skipif(
    GPU_REASON is None, reason="TensorRT and a GPU are here: the error path does not apply"
)


@pytest.fixture(scope="module")
def calibration(data_root):
    from serving.models.zoo import get_spec
    from serving.quantize.calibration import calibration_inputs

    return calibration_inputs(
        "imagenet-calib", get_spec("efficientnet_lite0").preprocessing, 32, data_root, False
    )


@pytest.fixture(scope="module")
def qdq_onnx(small_repository, calibration, tmp_path_factory) -> Path:
    fp32 = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime").model_path
    return quantize_qdq_for_tensorrt(fp32, tmp_path_factory.mktemp("trt") / "int8_qdq.onnx", calibration)


def _session(path: Path, exact: bool = False) -> ort.InferenceSession:
    if exact:
        # ORT's fused u8 x s8 kernels saturate on x86 without VNNI (CI's and this host's CPUs).
        return exact_session(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_qdq_onnx_is_symmetric_int8_and_keeps_fp32_accuracy(qdq_onnx, small_repository, data_root):
    from serving.data.datasets import open_labelled
    from serving.data.loader import load_uint8
    from serving.models.preprocessing import normalize

    stats = check_qdq_for_tensorrt(qdq_onnx)
    assert stats["qdq_nodes"] > 100
    variant = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime")
    pp = variant.preprocessing
    x = normalize(load_uint8(open_labelled("imagenet-val", data_root).head(48), pp, False), pp)
    fp32 = _session(variant.model_path).run(None, {"input": x})[0].argmax(1)
    int8 = _session(qdq_onnx, exact=True).run(None, {"input": x})[0].argmax(1)
    assert (fp32 == int8).mean() >= 0.9  # the same graph TensorRT will run, with TensorRT's exact arithmetic


def test_serving_int8_onnx_is_refused_for_tensorrt(small_repository):
    # ORT's serving INT8 (u8 asymmetric activations, int32 bias) is not explicit-quantization ready.
    path = open_variant(small_repository, "efficientnet_lite0-int8-onnxruntime").model_path
    with pytest.raises(RtqError, match=r"TensorRT cannot take.*(int32|zero-point|uint8)"):
        check_qdq_for_tensorrt(path)
    fp32 = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime").model_path
    with pytest.raises(RtqError, match="no QuantizeLinear"):
        check_qdq_for_tensorrt(fp32)


def test_prepare_onnx_fp16_keeps_fp32_io(small_repository, tmp_path):
    fp32 = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime").model_path
    out = prepare_onnx(fp32, "fp16", tmp_path / "fp16.onnx", None)
    s = _session(out)
    assert s.get_inputs()[0].type == "tensor(float)" and s.get_outputs()[0].type == "tensor(float)"
    with pytest.raises(RtqError, match="precision must be one of"):
        prepare_onnx(fp32, "int4", tmp_path / "x.onnx", None)
    with pytest.raises(RtqError, match="calibration"):
        prepare_onnx(fp32, "int8", tmp_path / "x.onnx", None)


def test_engine_config_profile_and_validation():
    cfg = EngineConfig(precision="int8", min_batch=1, opt_batch=4, max_batch=16)
    assert cfg.profile() == {"min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [16, 3, 224, 224]}
    with pytest.raises(RtqError, match="min <= opt <= max"):
        EngineConfig(opt_batch=64, max_batch=32)
    with pytest.raises(RtqError, match="precision"):
        EngineConfig(precision="int2")


def test_engine_from_another_gpu_or_tensorrt_is_refused_with_the_reason():
    record = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin (nvgpu)",
        "compute_capability": "8.7",
        "source_onnx": "source-int8.onnx",
    }
    here = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_version": "13.0"}
    with pytest.raises(RtqError) as err:
        check_compatible(record, "11.4.0", here)
    msg = str(err.value)
    assert "TensorRT 10.3.0 built it, this machine has 11.4.0" in msg
    assert "Orin (nvgpu) (compute capability 8.7)" in msg and "H100" in msg and "source-int8.onnx" in msg
    check_compatible(record, "10.3.0", {**here, "compute_capability": "8.7"})  # same GPU + TRT: fine


def test_triton_config_for_tensorrt_plan():
    cfg = native_config("m-int8-tensorrt", "tensorrt", "input", (3, 224, 224), "logits", 1000, 32, 2)
    back = parse_config(to_text(cfg))
    assert back.platform == "tensorrt_plan" and back.default_model_filename == "model.plan"
    assert back.instance_group[0].kind == back.instance_group[0].KIND_GPU
    assert "intra_op_thread_count" not in back.parameters and back.max_batch_size == 32


def test_runner_is_registered_and_needs_its_build_record(tmp_path):
    assert runner_class("tensorrt").__name__ == "TensorRtRunner"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    with pytest.raises(RtqError, match=r"model\.plan\.json.*missing"):
        open_runner("tensorrt", plan, "int8", 1)


@no_gpu
def test_runner_stops_at_the_hardware_boundary_with_what_to_install(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 16)
    record_path(plan).write_text(json.dumps({"tensorrt_version": "11.4.0", "compute_capability": "9.0"}))
    with pytest.raises(RtqError, match=r"TensorRT is not importable.*tensorrt-cu13|no CUDA GPU visible"):
        open_runner("tensorrt", plan, "int8", 1)


@no_gpu
def test_build_recipe_fails_fast_here_with_a_clear_error(tmp_path):
    class NoSources:  # the recipe must stop before touching any source
        calibration = None

        def onnx_fp32(self) -> Path:
            raise AssertionError("recipe touched the ONNX before checking for TensorRT")

    with pytest.raises(RtqError, match=r"TensorRT is not importable|no CUDA GPU"):
        RECIPES["tensorrt"].make(NoSources(), "int8", tmp_path / "model.plan")


@needs_gpu
def test_engines_build_and_match_onnxruntime_on_the_gpu(qdq_onnx, small_repository, tmp_path, data_root):
    from serving.data.datasets import open_labelled
    from serving.data.loader import load_uint8
    from serving.export.tensorrt_export import build_engine
    from serving.models.preprocessing import normalize

    variant = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime")
    pp = variant.preprocessing
    x = normalize(load_uint8(open_labelled("imagenet-val", data_root).head(32), pp, False), pp)
    ref = _session(variant.model_path).run(None, {"input": x})[0]
    sources = {
        "fp32": variant.model_path,
        "fp16": prepare_onnx(variant.model_path, "fp16", tmp_path / "fp16.onnx", None),
        "int8": qdq_onnx,
    }
    for precision, onnx in sources.items():
        plan = tmp_path / f"{precision}.plan"
        rec = build_engine(
            onnx, plan, EngineConfig(precision, max_batch=16, timing_cache=str(tmp_path / "tc"))
        )
        assert rec.profiles[0]["max"][0] == 16 and (tmp_path / "tc").is_file()
        with open_runner("tensorrt", plan, precision, 1) as runner:
            y = runner.infer(x)  # 32 images > profile max 16: the runner splits
        agree = (y.argmax(1) == ref.argmax(1)).mean()
        assert agree >= (0.99 if precision == "fp32" else 0.9), (precision, agree)
    np.testing.assert_array_equal(y.shape, ref.shape)
