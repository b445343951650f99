"""Bearer token, TLS, loopback default and SIGTERM drain of `rtq serve`, each against a real server."""

from __future__ import annotations

import json
import shutil
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
from serving.errors import RtqError
from serving.repository.layout import open_variant

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


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificate_authority(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}-ca.pem", tmp / f"{name}-ca.key"
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name} CA",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def signed(tmp: Path, name: str, ca: tuple[Path, Path], san: str | None = None) -> tuple[Path, Path]:
    """A key and a certificate for `name` signed by `ca` (an openssl CSR, then `x509 -req`)."""
    cert, key, csr, ext = (tmp / f"{name}.pem", tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.ext")
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr)
    )
    ext.write_text(f"subjectAltName={san}\n" if san else "extendedKeyUsage=clientAuth\n")
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def test_tls_serves_tls_clients_only(small_repository: Path, tmp_path: Path):
    ca = certificate_authority(tmp_path, "ours")
    cert, key = signed(tmp_path, "server", ca, san="IP:127.0.0.1,DNS:localhost")
    srv = EdgeServer(
        EdgeConfig(
            small_repository, grpc_port=0, metrics_port=None, models=[MODEL], tls_cert=cert, tls_key=key
        )
    ).start()
    try:
        url = f"127.0.0.1:{srv.grpc_port}"
        secure = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(ca[0]))
        assert secure.infer(MODEL, one_image()).as_numpy("logits").shape == (1, 1000)
        secure.close()
        plain = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException):
            plain.infer(MODEL, one_image(), client_timeout=5)
        plain.close()
    finally:
        srv.stop()


def test_mutual_tls_serves_only_clients_with_a_ca_signed_certificate(small_repository: Path, tmp_path: Path):
    ours, rogue = certificate_authority(tmp_path, "ours"), certificate_authority(tmp_path, "rogue")
    server_cert, server_key = signed(tmp_path, "server", ours, san="IP:127.0.0.1,DNS:localhost")
    good = signed(tmp_path, "camera", ours)
    bad = signed(tmp_path, "intruder", rogue)
    srv = EdgeServer(
        EdgeConfig(
            small_repository,
            grpc_port=0,
            metrics_port=None,
            models=[MODEL],
            tls_cert=server_cert,
            tls_key=server_key,
            tls_client_ca=ours[0],
        )
    ).start()
    url = f"127.0.0.1:{srv.grpc_port}"

    def client(pair: tuple[Path, Path] | None) -> grpcclient.InferenceServerClient:
        extra = {"certificate_chain": str(pair[0]), "private_key": str(pair[1])} if pair else {}
        return grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(ours[0]), **extra)

    try:
        c = client(good)
        assert c.infer(MODEL, one_image()).as_numpy("logits").shape == (1, 1000)
        c.close()
        for pair in (None, bad):  # no certificate, or one from another CA: the handshake fails
            c = client(pair)
            with pytest.raises(InferenceServerException) as exc:
                c.infer(MODEL, one_image(), client_timeout=10)
            assert exc.value.status() == "StatusCode.UNAVAILABLE"
            c.close()
        c = client(good)  # and the server still serves after refusing both
        assert c.is_model_ready(MODEL)
        c.close()
    finally:
        srv.stop()


def test_model_names_and_versions_from_requests_never_reach_files(small_repository: Path, tmp_path: Path):
    # A real, loadable variant just outside the repository: traversal that reached the filesystem
    # would find and serve it.
    outside = tmp_path / "outside"
    shutil.copytree(small_repository / MODEL, outside / MODEL)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MODEL).symlink_to(small_repository / MODEL, target_is_directory=True)
    srv = EdgeServer(EdgeConfig(repo, grpc_port=0, metrics_port=None, models=[MODEL])).start()
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    names = [
        f"../outside/{MODEL}",
        f"{tmp_path}/outside/{MODEL}",
        f"..%2Foutside%2F{MODEL}",
        f"{MODEL}/../../outside/{MODEL}",
        f"{MODEL}\x00",
        "../../../../etc/passwd",
    ]
    try:
        for name in names:
            for call in (
                lambda n: c.infer(n, one_image()),
                lambda n: c.get_model_metadata(n),
                lambda n: c.get_model_config(n),
                lambda n: c.get_inference_statistics(n),
            ):
                with pytest.raises(InferenceServerException) as exc:
                    call(name)
                assert exc.value.status() == "StatusCode.NOT_FOUND", (name, exc.value.message())
            assert not c.is_model_ready(name)
        for version in ("../1", "1/../../outside", "/etc/passwd", "2"):
            with pytest.raises(InferenceServerException) as exc:
                c.infer(MODEL, one_image(), model_version=version)
            assert exc.value.status() == "StatusCode.NOT_FOUND" and "unknown version" in exc.value.message()
        assert c.infer(MODEL, one_image()).as_numpy("logits").shape == (1, 1000)
    finally:
        c.close()
        srv.stop()


def test_a_manifest_pointing_outside_its_variant_is_refused(small_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    shutil.copytree(small_repository / MODEL, repo / MODEL)
    manifest = repo / MODEL / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model_file"] = f"../../../{MODEL}/1/{data['model_file']}"
    manifest.write_text(json.dumps(data))
    with pytest.raises(RtqError, match="model_file must be a plain file name"):
        open_variant(repo, MODEL)
    srv = EdgeServer(EdgeConfig(repo, grpc_port=0, metrics_port=None)).start()
    try:
        served = srv.models[MODEL]
        assert not served.ready and "model_file must be a plain file name" in served.reason
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
        (["--tls-client-ca", "/tmp/ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert"),
        (["--models", "../outside"], "invalid variant name '../outside'"),
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
