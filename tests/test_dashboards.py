"""dashboards/: real Prometheus on 127.0.0.1 scrapes a real edge server under load; panels and rules answer"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from serving.bench import scenarios as sc
from serving.bench.frames import load_frames
from serving.edge.server import EdgeConfig, EdgeServer
from serving.settings import PROJECT_ROOT

OV = "efficientnet_lite0-int8-openvino"
DASH = PROJECT_ROOT / "dashboards"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed; run scripts/install-prometheus.sh",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads((DASH / "grafana" / "dashboards" / "rtq-realtime.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def rules() -> list[dict]:
    doc = yaml.safe_load((DASH / "prometheus" / "rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def start_prometheus(tmp_path: Path, job_name: str, target: str) -> tuple[subprocess.Popen, int]:
    """The committed config's `job_name`, pointed at `target`, scraping every second; once ready."""
    config = yaml.safe_load((DASH / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DASH / "prometheus" / "rules.yml")]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == job_name)
    job["static_configs"][0]["targets"] = [target]
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
            break
        except OSError:
            if prom.poll() is not None:
                raise AssertionError(prom.stderr.read().decode()[-800:]) from None
            time.sleep(0.3)
    return prom, port


def test_dashboard_json_and_provisioning_are_consistent():
    dash = json.loads((DASH / "grafana" / "dashboards" / "rtq-realtime.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in (
        "p50 / p99",
        "throughput",
        "by grpc code",
        "queue depth",
        "batch size",
        "accuracy",
        "deadline misses",
        "triton",
    ):
        assert topic in titles, topic
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    ds = yaml.safe_load((DASH / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == dash["templating"]["list"][0]["current"]["value"]
    names = {r.get("alert") for r in rules()}
    assert {"RtqP99OverSLO", "RtqErrorRate", "RtqAccuracyDrop", "RtqDeadlineMisses"} <= names


@needs_prometheus
def test_promtool_accepts_config_and_rules():
    r = subprocess.run(
        [PROMTOOL, "check", "config", str(DASH / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def query(port: int, expr: str) -> list:
    body = api(port, "/api/v1/query", query=expr.replace("$model", ".+"))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@needs_prometheus
def test_prometheus_scrapes_the_edge_server_and_every_panel_and_rule_returns_data(
    small_repository: Path, data_root: Path, tmp_path: Path
):
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=0, models=[OV])).start()
    prom = None
    stop = threading.Event()
    try:
        prom, port = start_prometheus(tmp_path, "rtq-edge", f"127.0.0.1:{srv.metrics_port}")

        # Short real load: labelled 30-FPS streams, plus a few requests too late to be served.
        frames = load_frames("imagenet-val", 30, "tensor", OV, small_repository, data_root)
        target = sc.Target(f"127.0.0.1:{srv.grpc_port}", OV)
        settings = sc.TestSettings(
            "streams", streams=2, fps=30, min_duration_s=1.0, warmup_s=0.0, min_query_count=10
        )

        def load() -> None:
            while not stop.is_set():
                sc.run(target, frames, settings)
                sc.run(
                    target, frames, replace(settings, scenario="server", target_qps=400, min_query_count=50)
                )

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        # Bounded wait until the slowest recording rule (5-minute accuracy rate) has data.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not query(port, "rtq:accuracy:ratio_rate5m"):
            time.sleep(1)
        time.sleep(3)

        edge_panels = [(t, e) for t, e in panel_queries() if "nv_inference" not in e]
        assert len(edge_panels) >= 10
        for title, expr in edge_panels:
            assert query(port, expr), f"panel {title!r}: no data for {expr}"
        # Triton's panels: valid queries here (no Triton scraped in this test); data in the slow test.
        for _title, expr in panel_queries():
            query(port, expr)

        groups = api(port, "/api/v1/rules")["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) == len(rules())
        assert all(r["health"] == "ok" for r in loaded), [r.get("lastError") for r in loaded]
        for rule in rules():
            if "record" in rule:
                if rule["record"].startswith("triton:"):
                    query(port, rule["record"])
                else:
                    assert query(port, rule["record"]), f"recording rule {rule['record']} has no data"
            else:
                query(port, rule["expr"])  # the alert itself: valid, firing or not
                lhs = rule["expr"].split(" > ")[0].split(" < ")[0]
                assert query(port, lhs), f"alert {rule['alert']}: {lhs} has no data"
        acc = float(query(port, "rtq:accuracy:ratio_rate5m")[0]["value"][1])
        assert 0.5 < acc <= 1.0
    finally:
        stop.set()
        if prom is not None:
            prom.terminate()
            prom.wait(20)
        srv.stop()


@needs_prometheus
@pytest.mark.slow
def test_triton_panels_and_rules_return_data(small_repository: Path, data_root: Path, tmp_path: Path):
    """The real tritonserver under short load, scraped by a real Prometheus: Triton's averages have data."""
    from serving.triton.launcher import TritonConfig, TritonServer

    grpc_port, metrics_port = free_port(), free_port()
    triton = TritonServer(
        TritonConfig(
            small_repository,
            grpc_port=grpc_port,
            http_port=free_port(),
            metrics_port=metrics_port,
            models=[OV],
            work_dir=tmp_path / "triton",
        )
    )
    triton.start(timeout=300)
    prom = None
    try:
        prom, port = start_prometheus(tmp_path, "triton", f"127.0.0.1:{metrics_port}")
        frames = load_frames("imagenet-val", 20, "tensor", OV, small_repository, data_root)
        target = sc.Target(f"127.0.0.1:{grpc_port}", OV)
        settings = sc.TestSettings(
            "streams", streams=1, fps=20, min_duration_s=8.0, warmup_s=0.0, min_query_count=10
        )
        sc.run(target, frames, settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not query(port, "triton:queue_duration_ms:avg1m"):
            time.sleep(1)
        for title, expr in panel_queries():
            if "nv_inference" in expr:
                assert query(port, expr), f"panel {title!r}: no data for {expr}"
        for rule in rules():
            if rule.get("record", "").startswith("triton:"):
                assert query(port, rule["record"]), rule["record"]
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(20)
        triton.stop()
