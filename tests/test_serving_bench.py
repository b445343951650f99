"""`rtq bench serving` at a CI size: a real edge server, the raw runtime, shared memory and UINT8 pixels."""

from __future__ import annotations

import json
from pathlib import Path

from serving.bench.serving_bench import run_serving_bench

OV = "efficientnet_lite0-int8-openvino"


def test_serving_bench_measures_edge_plain_shared_memory_and_pixels_beside_the_raw_runtime(
    small_repository: Path, data_root: Path, tmp_path: Path
):
    r = run_serving_bench(
        small_repository,
        OV,
        data_root,
        tmp_path,
        n_images=8,
        latency_runs=25,
        concurrency=(1,),
        seconds=1.0,
        triton=False,
        command="pytest",
        log=lambda msg: None,
    )
    lat = r["latency_ms"]
    assert set(lat) == {"raw", "raw_paced", "edge", "edge_shm", "edge_uint8", "null"}
    assert all(v["n"] == 25 and 0 < v["p50"] <= v["p99"] for v in lat.values())
    assert r["edge_shm_vs_raw_p50"] == round(lat["edge_shm"]["p50"] / lat["raw"]["p50"], 3)
    assert r["parity"]["edge_identical_top1"] == 8 and r["parity"]["edge_uint8_identical_logits"]
    assert r["edge_uint8_vs_raw_p50"] == round(lat["edge_uint8"]["p50"] / lat["raw"]["p50"], 3)
    m = r["edge_metrics"]  # both latency kinds counted: the scrape matches every request sent
    assert m["request_histogram_count"] == m["requests_sent"] == m["requests_ok"]
    assert r["validity"]["reasons"] == ["25 latency runs < 200"]
    written = json.loads(next(tmp_path.glob("serving-*.json")).read_text())
    assert written["latency_ms"]["edge_shm"] == lat["edge_shm"]
    # The empty server's round trip is the floor under the edge server's; both measured in this run.
    assert r["null_vs_raw_p50"] == round(lat["null"]["p50"] / lat["raw"]["p50"], 3)
    assert lat["null"]["p50"] < lat["edge"]["p50"]
    md = next(tmp_path.glob("serving-*.md")).read_text()
    assert "edge_shm" in md and "empty server" in md
    assert not list(Path("/dev/shm").glob("rtq-bench-*"))  # the frame's object is removed
