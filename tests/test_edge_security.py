"""Bearer token, TLS, loopback default and SIGTERM drain of `rtq serve`, each against a real server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from serving.edge.server import EdgeConfig, EdgeServer

MODEL = "efficientnet_lite0-int8-onnxruntime"


def one_image() -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    return [inp]


def unauthenticated(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "rtq_requests_total" and s.labels.get("code") == "UNAUTHENTICATED"
    )


def inflight(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "rtq_inflight_requests"
    )


def test_bearer_token_is_required_and_failures_are_counted(small_repository: Path):
    srv = EdgeServer(
        EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[MODEL], token="s3cret")
    ).start()
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        for headers, words in (
            (None, "missing 'authorization: Bearer"),
            ({"authorization": "Bearer nope"}, "invalid bearer token"),
        ):
            with pytest.raises(InferenceServerException) as exc:
                c.infer(MODEL, one_image(), headers=headers)
            assert exc.value.status() == "StatusCode.UNAUTHENTICATED" and words in exc.value.message()
        with pytest.raises(InferenceServerException) as exc:
            c.get_model_metadata(MODEL)
        assert exc.value.status() == "StatusCode.UNAUTHENTICATED"
        assert unauthenticated(srv.metrics_port) == 2
        good = {"authorization": "Bearer s3cret"}
        assert c.is_server_ready(headers=good)
        assert c.infer(MODEL, one_image(), headers=good).as_numpy("logits").shape == (1, 1000)
        c.close()
    finally:
        srv.stop()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_serves_tls_clients_only(small_repository: Path, tmp_path: Path):
    cert, key = self_signed(tmp_path)
    srv = EdgeServer(
        EdgeConfig(
            small_repository, grpc_port=0, metrics_port=None, models=[MODEL], tls_cert=cert, tls_key=key
        )
    ).start()
    try:
        url = f"127.0.0.1:{srv.grpc_port}"
        secure = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))
        assert secure.infer(MODEL, one_image()).as_numpy("logits").shape == (1, 1000)
        secure.close()
        plain = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException):
            plain.infer(MODEL, one_image(), client_timeout=5)
        plain.close()
    finally:
        srv.stop()


def test_binds_loopback_only_by_default(small_repository: Path):
    assert EdgeConfig(small_repository).host == "127.0.0.1"
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[MODEL])).start(
        wait_loaded=False
    )
    try:
        # Some address of this machine other than loopback must not reach the port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            own = s.getsockname()[0]
        if own.startswith("127."):
            pytest.skip("no non-loopback address on this machine")
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((own, srv.grpc_port))
    finally:
        srv.stop()


def test_sigterm_drains_in_flight_requests_then_exits(small_repository: Path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--repository",
            str(small_repository),
            "--models",
            "efficientnet_lite0-fp32-openvino",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events = []
        while not any(e.get("event") == "model" for e in events):
            line = proc.stdout.readline()
            assert line, f"server exited: {proc.stderr.read()[-500:]}"
            events.append(json.loads(line))
        listening = next(e for e in events if e["event"] == "listening")
        assert listening["grpc"].startswith("127.0.0.1:")
        c = grpcclient.InferenceServerClient(listening["grpc"])
        big = grpcclient.InferInput("input", [8, 3, 224, 224], "FP32")
        big.set_data_from_numpy(np.zeros((8, 3, 224, 224), np.float32))
        out: list[tuple[object, object]] = []
        for _ in range(6):
            c.async_infer(
                "efficientnet_lite0-fp32-openvino",
                [big],
                callback=lambda result, error: out.append((result, error)),
            )
        deadline = time.monotonic() + 30
        while inflight(listening["metrics"]) < 6 and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while len(out) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        c.close()
        assert len(out) == 6 and not [e for _, e in out if e], [e for _, e in out if e]
        assert json.loads(proc.stdout.readline())["event"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--repository", "/nonexistent/repo"], "holds no variants"),
        (["--tls-cert", "/tmp/cert.pem"], "TLS needs both --tls-cert and --tls-key"),
        (["--token-file", "/nonexistent/token"], "cannot read token file"),
    ],
)
def test_serve_refuses_bad_setups_in_one_line(small_repository: Path, args: list[str], words: str):
    base = ["--repository", str(small_repository)] if "--repository" not in args else []
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            *base,
            *args,
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("rtq: error: ") and words in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_busy_ports_are_one_clear_error(small_repository: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flags, words in (
            (["--grpc-port", str(port), "--metrics-port", "-1"], f"cannot bind gRPC to 127.0.0.1:{port}"),
            (["--grpc-port", "0", "--metrics-port", str(port)], f"cannot bind metrics to 127.0.0.1:{port}"),
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "serving.cli", "serve", "--repository", str(small_repository), *flags],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 2 and f"rtq: error: {words}" in proc.stderr
            assert "Traceback" not in proc.stderr
