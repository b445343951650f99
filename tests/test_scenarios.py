"""MLPerf-style scenarios against a real edge server on 127.0.0.1: verdicts follow their own rules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serving.bench import scenarios as sc
from serving.bench.frames import load_frames
from serving.edge.server import EdgeConfig, EdgeServer
from serving.errors import RtqError
from serving.repository.layout import open_variant
from serving.runtimes import open_runner

OV = "efficientnet_lite0-int8-openvino"


def test_settings_refuse_bad_values():
    with pytest.raises(RtqError, match="unknown scenario"):
        sc.TestSettings("multi_stream")
    with pytest.raises(RtqError, match="target_qps"):
        sc.TestSettings("server", target_qps=0)
    with pytest.raises(RtqError, match="streams"):
        sc.TestSettings("streams", streams=0)
    with pytest.raises(RtqError, match="positive"):
        sc.TestSettings("offline", min_duration_s=-1)


@pytest.fixture(scope="module")
def edge(small_repository: Path):
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[OV])).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def frames(small_repository: Path, data_root: Path):
    return load_frames("imagenet-val", 40, "tensor", OV, small_repository, data_root)


@pytest.fixture(scope="module")
def target(edge):
    t = sc.Target(f"127.0.0.1:{edge.grpc_port}", OV)
    yield t
    t.close()


def test_accuracy_scenario_matches_the_offline_runner(target, frames, small_repository: Path):
    r = sc.run(target, frames, sc.TestSettings("accuracy", min_query_count=len(frames)))
    v = open_variant(small_repository, OV)
    with open_runner("openvino", v.model_path, "int8", 2) as runner:
        ref = np.mean([int(runner.infer(f.payload).argmax()) == f.label for f in frames])
    assert r.verdict == "VALID" and r.metrics["accuracy"] == pytest.approx(ref, abs=1e-9)
    short = sc.run(target, frames[:5], sc.TestSettings("accuracy", min_query_count=10))
    assert short.verdict == "INVALID" and "min_query_count" in short.reasons[0]


def test_single_stream_offline_and_server_verdicts(target, frames):
    base = sc.TestSettings("single_stream", min_duration_s=1.0, warmup_s=0.3, min_query_count=10)
    ss = sc.run(target, frames, base)
    assert ss.verdict == "VALID", ss.reasons
    assert 0 < ss.metrics["p50_ms"] <= ss.metrics["p90_ms"] <= ss.metrics["p99_ms"]
    off = sc.run(target, frames, replace(base, scenario="offline", min_query_count=3))
    assert off.verdict == "VALID" and off.metrics["samples_per_s"] > 10
    # 20 queries/s is far below capacity; a 0.01 ms bound cannot hold.
    ok = sc.run(target, frames, replace(base, scenario="server", target_qps=20, latency_bound_ms=200))
    assert ok.verdict == "VALID", ok.reasons
    # Poisson counts over ~1 s vary by about sqrt(20) either way.
    assert 8 < ok.metrics["throughput_per_s"] < 35 and ok.metrics["queries"] >= 10
    bad = sc.run(target, frames, replace(base, scenario="server", target_qps=20, latency_bound_ms=0.01))
    assert bad.verdict == "INVALID" and any("> bound" in why for why in bad.reasons)
    # Query count sets the duration at low rates (LoadGen: both minimums must hold).
    slow = sc.run(
        target,
        frames,
        replace(base, scenario="server", target_qps=10, min_query_count=25, latency_bound_ms=200),
    )
    assert slow.metrics["queries"] >= 25 and slow.verdict == "VALID", slow.reasons


def test_server_and_streams_searches_stop_and_agree_with_their_runs(target, frames):
    base = sc.TestSettings(
        "server", target_qps=1, min_duration_s=1.0, warmup_s=0.3, min_query_count=10, latency_bound_ms=200
    )
    best, tried = sc.server_search(target, frames, base, high=400, steps=3)
    assert 1 <= len(tried) <= 3
    assert best == max([t.settings.target_qps for t in tried if t.valid], default=0.0)
    n, runs = sc.streams_search(target, frames, replace(base, scenario="streams", fps=10), max_streams=3)
    assert n == max([r.settings.streams for r in runs if r.valid], default=0)
    assert all(r.metrics["deadline_miss_rate"] < 0.01 for r in runs if r.valid)


def test_streams_tell_the_server_each_frames_deadline(target, frames):
    """Past capacity a camera's stale frames are refused or dropped by the server (DEADLINE_EXCEEDED,
    counted as misses) instead of queueing ahead of fresh ones: told a 10 s deadline instead, the
    queue filled and every frame missed (p99 ~300 ms at 2x capacity). The bound leaves room for the
    load generator's own lag on 2 shared cores (CI once saw 43 ms for 20 ms frames)."""
    s = sc.TestSettings("streams", streams=8, fps=50, min_duration_s=1.0, warmup_s=0.3, min_query_count=50)
    r = sc.run_streams(target, frames, s)
    m = r.metrics
    assert m["error_codes"].get("DEADLINE_EXCEEDED", 0) > 0, m["error_codes"]
    # None: not one frame answered in time, when the generator itself ran later than a frame interval
    # (one in-tree run saw its send lag p99 at 62 ms): still nothing queued.
    assert m["p99_ms"] is None or m["p99_ms"] < 100, (m["p99_ms"], m["send_lag_p99_ms"])
    assert not m["unanswered_at_end"]


def test_unreachable_server_and_unknown_model_are_one_clear_error(edge):
    with pytest.raises(RtqError, match="unreachable"):
        sc.Target("127.0.0.1:9", OV)
    with pytest.raises(RtqError, match="not ready"):
        sc.Target(f"127.0.0.1:{edge.grpc_port}", "no-such-model")
