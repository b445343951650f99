"""The real tritonserver (nvidia-pytriton) on our repository, and the configs it and a full Triton load."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc

from serving.edge.server import EdgeConfig, EdgeServer
from serving.models.preprocessing import preprocess
from serving.repository.layout import CONFIG, list_variants, open_variant
from serving.repository.triton_config import native_config, read_config
from serving.runtimes import open_runner
from serving.triton.pyrepo import python_config, threads_from, write_python_repository

OV = "efficientnet_lite0-int8-openvino"
ORT = "efficientnet_lite0-int8-onnxruntime"
BROKEN = "efficientnet_lite0-broken-onnxruntime"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_native_and_python_backend_configs(small_repository: Path, tmp_path: Path):
    names = write_python_repository(small_repository, tmp_path / "py")
    assert names == list_variants(small_repository) and len(names) == 4
    for name in names:
        variant = open_variant(small_repository, name)
        native = read_config(variant.root / CONFIG)
        # What a full Triton loads natively: the backend's own platform and the model file in 1/.
        if variant.manifest["backend"] == "onnxruntime":
            assert native.platform == "onnxruntime_onnx" and native.default_model_filename == "model.onnx"
        else:
            assert native.backend == "openvino" and native.default_model_filename == "model.xml"
        assert (variant.root / "1" / native.default_model_filename).is_file()
        # What the slim Triton runs: same tensors, batching and instances, python backend.
        py = read_config(tmp_path / "py" / name / CONFIG)
        assert py.backend == "python" and not py.platform and py.name == name
        assert py.input == native.input and py.output == native.output
        assert py.max_batch_size == native.max_batch_size
        assert py.dynamic_batching == native.dynamic_batching
        assert [g.count for g in py.instance_group] == [g.count for g in native.instance_group]
        assert all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in py.instance_group)
        assert Path(py.parameters["rtq_variant_dir"].string_value) == variant.root.resolve()
        assert int(py.parameters["rtq_threads"].string_value) >= 1
        assert (tmp_path / "py" / name / "1" / "model.py").is_file()
        assert (tmp_path / "py" / name / "labels.txt").read_text() == (
            variant.root / "labels.txt"
        ).read_text()


@pytest.mark.parametrize("backend", ["tensorrt", "litert"])
def test_gpu_and_litert_native_configs_become_cpu_hosted_python_models(backend: str, tmp_path: Path):
    """A TensorRT (KIND_GPU, tensorrt_plan) or LiteRT config: the stub runs on CPU, our runner picks
    its device; the native-only parameters are dropped and the thread count carried over."""
    native = native_config(f"m-{backend}", backend, "input", (3, 224, 224), "logits", 1000, 8, 3)
    if backend == "tensorrt":
        assert native.platform == "tensorrt_plan"
        assert native.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    py = python_config(native, tmp_path / f"m-{backend}", threads_from(native, {"threads": 2}))
    assert py.backend == "python" and not py.platform and not py.default_model_filename
    assert py.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert set(py.parameters) == {"rtq_variant_dir", "rtq_threads", "rtq_site_packages", "rtq_project_root"}
    assert py.parameters["rtq_threads"].string_value == ("3" if backend == "litert" else "2")


def labelled(data_root: Path, n: int) -> list[Path]:
    folder = data_root / "imagenet-val"
    with (folder / "labels.csv").open() as f:
        return [folder / r["file"] for r in list(csv.DictReader(f))[:n]]


def top1(url: str, model: str, x: np.ndarray) -> np.ndarray:
    c = grpcclient.InferenceServerClient(url)
    out = []
    for i in range(len(x)):
        inp = grpcclient.InferInput("input", [1, *x.shape[1:]], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        out.append(int(c.infer(model, [inp]).as_numpy("logits").argmax()))
    c.close()
    return np.asarray(out)


@pytest.fixture(scope="module")
def triton(small_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """`rtq triton` as users start it, on two good variants and a broken one; yields its ready event."""
    repo = tmp_path_factory.mktemp("repo")
    for name in (OV, ORT):
        (repo / name).symlink_to(small_repository / name)
    shutil.copytree(small_repository / ORT, repo / BROKEN)
    (repo / BROKEN / "1" / "model.onnx").write_bytes(b"not an onnx file")
    config = repo / BROKEN / "config.pbtxt"
    config.write_text(config.read_text().replace(ORT, BROKEN))
    ports = {"--grpc-port": free_port(), "--http-port": free_port(), "--metrics-port": free_port()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "triton",
            "--repository",
            str(repo),
            "--json",
            "--timeout",
            "120",
            "--work-dir",
            str(tmp_path_factory.mktemp("triton")),
            *[str(a) for kv in ports.items() for a in kv],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"rtq triton exited {proc.wait()}: {proc.stderr.read()[-800:]}")
    ready = json.loads(line)
    yield ready, proc
    if proc.poll() is None:
        proc.kill()


def test_triton_serves_the_repository_with_the_same_top1(triton, small_repository: Path, data_root: Path):
    """The same 200 imagenet-val images: identical top-1 through the runner, the edge server and Triton."""
    ready, _ = triton
    assert ready["event"] == "ready" and ready["grpc"].startswith("127.0.0.1:")
    c = grpcclient.InferenceServerClient(ready["grpc"])
    assert c.is_server_ready() and c.is_model_ready(OV) and c.is_model_ready(ORT)
    # One broken variant is reported with its reason and does not stop the others.
    assert ready["models"][BROKEN]["state"] == "UNAVAILABLE" and ready["models"][BROKEN]["reason"]
    assert not c.is_model_ready(BROKEN) and ready["models"][OV]["state"] == "READY"
    meta = c.get_model_metadata(OV)
    assert meta.inputs[0].name == "input" and list(meta.outputs[0].shape) == [-1, 1000]
    assert c.get_model_config(OV).config.backend == "python"
    # Triton's classification extension through the python backend: top-k with our labels.
    names = (small_repository / OV / "labels.txt").read_text().splitlines()
    inp = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    top = c.infer(OV, [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=2)])
    _, idx, name = top.as_numpy("logits")[0, 0].decode().split(":", 2)
    assert name == names[int(idx)]
    c.close()
    with urllib.request.urlopen(f"http://{ready['http']}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    assert "nv_inference_count" in urllib.request.urlopen(ready["metrics"], timeout=10).read().decode()

    variant = open_variant(small_repository, OV)
    x = np.stack([preprocess(p, variant.preprocessing) for p in labelled(data_root, 200)])
    with open_runner("openvino", variant.model_path, "int8", 2) as runner:
        ref = np.asarray([int(runner.infer(x[i : i + 1]).argmax()) for i in range(len(x))])
    edge = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[OV])).start()
    try:
        edge_top1 = top1(f"127.0.0.1:{edge.grpc_port}", OV, x)
    finally:
        edge.stop()
    triton_top1 = top1(ready["grpc"], OV, x)
    assert (edge_top1 == ref).all(), f"{int((edge_top1 != ref).sum())} of 200 differ (edge)"
    assert (triton_top1 == ref).all(), f"{int((triton_top1 != ref).sum())} of 200 differ (Triton)"


def test_triton_stops_gracefully_on_sigterm(triton):
    _, proc = triton
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    stopped = json.loads(proc.stdout.readline())
    assert stopped == {"event": "stopped", "returncode": 0}
