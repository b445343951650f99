"""devices/*: the copy-to-device scripts run here in their CPU fallback and write the suite's schema.
(devices/coral is covered in test_litert.py, beside the .tflite it measures.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving.repository.layout import open_variant

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"benchmark", "command", "date", "machine", "tool_versions", "settings", "variants"}
LATENCY = {"p50", "p90", "p99", "mean", "min", "runs"}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_jetson_script_falls_back_to_onnxruntime_and_says_tensorrt_is_absent(small_repository, tmp_path):
    script = str(ROOT / "devices" / "jetson" / "bench_jetson.py")
    assert "--engine" in _run([script, "--help"]).stdout
    onnx = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime").model_path
    out = tmp_path / "jetson.json"
    proc = _run([script, "--onnx", str(onnx), "--runs", "30", "--warmup", "3", "--batches", "1,2",
                 "--seconds", "0.2", "--threads", "2", "--out", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) >= SCHEMA
    (v,) = result["variants"]
    assert set(v["latency_ms"]) >= LATENCY and v["latency_ms"]["runs"] == 30
    assert set(v["throughput_ips"]) == {"1", "2"} and v["backend"] == "onnxruntime"
    assert any("TensorRT absent" in n for n in v["notes"]) and "TensorRT absent" in proc.stdout
    assert v["validity"]["valid"] is False
    # A serialized engine cannot run without TensorRT: a clear exit, not a traceback.
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    bad = _run([script, "--engine", str(plan), "--runs", "5"])
    assert bad.returncode != 0 and "TensorRT is unavailable here" in bad.stderr


def test_gpu_script_runs_without_a_gpu_and_says_so(small_repository, tmp_path):
    script = str(ROOT / "devices" / "gpu" / "bench_gpu.py")
    assert "--int8-onnx" in _run([script, "--help"]).stdout
    onnx = open_variant(small_repository, "efficientnet_lite0-fp32-onnxruntime").model_path
    proc = _run([script, "--fp32-onnx", str(onnx), "--limit", "8", "--runs", "3", "--warmup", "1",
                 "--batches", "1", "--seconds", "0.05", "--out-dir", str(tmp_path)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("gpu-*.json")
    result = json.loads(path.read_text())
    assert set(result) >= SCHEMA and result["tensorrt_absent"] is True
    assert any("TensorRT ABSENT" in n for n in result["notes"]) and "TensorRT: ABSENT" in proc.stdout
    names = {v["variant"] for v in result["variants"]}
    assert "efficientnet_lite0-fp32-torch-cpu" in names and "efficientnet_lite0-fp32-onnxruntime-cpu" in names
    for v in result["variants"]:
        assert set(v["latency_ms"]) >= LATENCY and v["accuracy"]["n"] == 8
    assert path.with_suffix(".md").is_file()
