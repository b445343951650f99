"""`rtq bench realtime` from one command: real servers, real Locust, report files; partial runs marked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.settings import PROJECT_ROOT

ORT = "efficientnet_lite0-int8-onnxruntime"


def rtq(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )


def bench_args(repo: Path, out: Path, servers: list[str]) -> list[str]:
    return [
        "bench",
        "realtime",
        "--repository",
        str(repo),
        "--variants",
        ORT,
        "--servers",
        *servers,
        "--quick",
        "--seconds",
        "1",
        "--images",
        "30",
        "--locust-seconds",
        "2",
        "--out",
        str(out),
        "-q",
    ]


def check_report(out: Path, servers: list[str]) -> dict:
    (summary,) = out.glob("realtime-*.json")
    result = json.loads(summary.read_text())
    for suffix in (".md", ".html", "-latency-cdf.png", "-throughput-p99.png", "-pareto.png"):
        assert Path(str(summary)[: -len(".json")] + suffix).is_file(), suffix
    page = summary.with_suffix(".html").read_text()
    assert page.count("data:image/png;base64,") == 3  # one file: plots inline
    for kind in servers:
        run = result["servers"][kind]
        assert run["variants"][ORT]["single_stream"]["result"] in ("VALID", "INVALID")
        assert run["variants"][ORT]["accuracy"]["metrics"]["accuracy"] > 0.5
        assert run["locust"]["queries"] > 0 and run["locust"]["p99_ms"] > 0
        assert f"<h2>{kind}</h2>" in page
    return result


def test_bench_realtime_edge_end_to_end(small_repository: Path, tmp_path: Path):
    r = rtq(bench_args(small_repository, tmp_path, ["edge"]))
    assert r.returncode == 0, r.stderr[-2000:]
    result = check_report(tmp_path, ["edge"])
    assert result["complete"] and result["offline_accuracy"][ORT] > 0.5


def test_missing_variant_gives_a_partial_report_marked_incomplete(small_repository: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "efficientnet_lite0-fp32-onnxruntime").symlink_to(
        small_repository / "efficientnet_lite0-fp32-onnxruntime"
    )
    r = rtq(bench_args(repo, tmp_path / "out", ["edge"]), timeout=120)
    assert r.returncode == 1 and "INCOMPLETE" in r.stderr and "rtq build" in r.stderr, r.stderr[-1500:]
    (summary,) = (tmp_path / "out").glob("realtime-*.json")
    result = json.loads(summary.read_text())
    assert not result["complete"] and summary.with_suffix(".html").is_file()


@pytest.mark.slow
def test_bench_realtime_edge_and_triton_side_by_side(small_repository: Path, tmp_path: Path):
    if shutil.which("tritonserver") is None:
        from serving.triton.launcher import TritonPaths

        TritonPaths.find()  # raises with its own reason if the slim Triton is not installed
    r = rtq(bench_args(small_repository, tmp_path, ["edge", "triton"]), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    check_report(tmp_path, ["edge", "triton"])
