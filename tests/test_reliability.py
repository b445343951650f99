"""Overload, faults and a drain under load, CI-sized, each against real servers on 127.0.0.1.

The full-size figures (60 s overload, 10 min soak) come from serving/bench/stress.py; here the same
code runs for seconds and the assertions are on behaviour (who got which answer), not on speed of
this shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.bench.stalls import StallWatch
from serving.bench.stress import (
    Shot,
    drain_markdown,
    drain_result,
    histogram_quantile,
    infer_request,
    ledger_under_load,
    overload_markdown,
    probe_capacity,
    refused_up_front,
    run_overload,
    run_sigterm_under_load,
    run_soak,
    soak_markdown,
    start_edge_process,
)
from serving.edge.server import EdgeConfig, EdgeServer
from serving.settings import PROJECT_ROOT

OV = "efficientnet_lite0-int8-openvino"
ORT = "efficientnet_lite0-int8-onnxruntime"


def fp32(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_variants(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir()
    for n in names:
        shutil.copytree(src / n, dst / n)
    return dst


# -- overload ------------------------------------------------------------------------------------
def test_overload_at_twice_capacity_is_refused_fast_and_latency_recovers(small_repository: Path):
    edge = start_edge_process(small_repository, [ORT], max_queue=16)
    try:
        # Closed loop within the queue bound, so the probe itself is never refused.
        cap = probe_capacity(edge.url, ORT, seconds=3, concurrency=12, warmup_s=1)
        assert cap.throughput_rps > 10 and not cap.errors, cap
        r = run_overload(
            edge.url,
            ORT,
            cap.throughput_rps,
            metrics_url=edge.metrics_url,
            queue_limit=16,
            baseline_s=3,
            overload_s=4,
            recovery_s=5,
            # This machine is shared: a 2x band around the baseline p99 tells the burst's backlog
            # from neighbours' noise, and half the SLO is the floor of that band: CI once saw every
            # half-second window after the burst at a p99 of 24-50 ms (baseline ~15 ms), nothing
            # queued, while the burst's admitted p99 sits at the 100 ms SLO.
            recovery_factor=2.0,
            recovery_floor_ms=50.0,
            hold_s=1.5,
        )
        print(overload_markdown(r))
        # Every request was answered OK or refused; nothing failed otherwise or went unanswered.
        assert not r.other_errors, r.other_errors
        # The queue never grew past its bound, and the scrape saw it under load.
        assert r.queue_samples > 20 and r.max_queue_depth is not None and r.max_queue_depth <= 16
        # The server refused the excess itself (its own counters), up front rather than at the deadline.
        server_refused = sum(r.server_answers.get(c, 0) for c in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"))
        assert server_refused > 0 and sum(r.refused_by_code.values()) > 0, r.server_answers
        # Compute runs below the event loop's priority, so a refusal does not wait for a core
        # (1.2-1.7 ms p50 measured here; 53-64 ms before, with the event loop at the same priority).
        assert r.refusal_p50_ms is not None and r.refusal_p50_ms < 10, r.refusal_p50_ms
        # The server timed its own refusals (received -> status sent): each one it counted by code,
        # except requests that waited in the queue and expired there (not refusals).
        assert 0 < r.server_refusals <= server_refused, (r.server_refusals, r.server_answers)
        assert r.server_refusal_p99_ms is not None and r.server_refused_within_limit_pct is not None
        # No collapse: the admitted work still ran during the burst, and admission left enough
        # slack that it ran in time (0-32 of ~650 late here; 40% with an uncorrected prediction).
        assert r.overload_answered_ok >= 0.3 * cap.throughput_rps * 4, r.overload_answered_ok
        assert r.overload_missed_deadline <= 0.1 * r.overload_admitted, r.overload_missed_deadline
        assert r.recovery_s is not None and r.recovery_s <= 3.5, r.recovery_p99_ms
        c = grpcclient.InferenceServerClient(edge.url)
        assert c.infer(ORT, fp32(np.zeros((1, 3, 224, 224), np.float32))).as_numpy("logits").shape == (
            1,
            1000,
        )
        c.close()
        assert edge.proc.poll() is None
    finally:
        assert edge.stop() == 0


def test_histogram_quantile_interpolates_like_prometheus():
    inf = float("inf")
    assert histogram_quantile(0.99, {0.001: 0, 0.005: 0, inf: 0}) is None
    # 100 observations: 50 up to 1 ms, 98 up to 5 ms, 2 beyond: p50 at the first edge, p99 in +Inf.
    buckets = {0.001: 50, 0.005: 98, inf: 100}
    assert histogram_quantile(0.5, buckets) == 0.001
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.001 + 0.004 * 25 / 48)
    assert histogram_quantile(0.99, buckets) == 0.005  # beyond the last finite edge: that edge
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.0005)


def test_a_slow_refusal_still_counts_as_a_refusal_and_a_dropped_request_as_a_miss():
    """Under overload the refusal itself can come back late (the server's event loop is busy): the
    edge server's message, not the answer time, says whether the request was ever admitted."""
    slow = 0.080  # answered 80 ms after sending, past half of a 100 ms SLO
    assert refused_up_front(Shot(0, 0, slow, "DEADLINE_EXCEEDED", "cannot meet ... refused on arrival"), 100)
    assert not refused_up_front(Shot(0, 0, 0.010, "DEADLINE_EXCEEDED", "... dropped before compute"), 100)
    # Without the edge server's words (Triton, or the client's own timeout) the time decides.
    assert refused_up_front(Shot(0, 0, 0.010, "DEADLINE_EXCEEDED", "Deadline Exceeded"), 100)
    assert not refused_up_front(Shot(0, 0, slow, "DEADLINE_EXCEEDED", "Deadline Exceeded"), 100)


def test_soak_reports_errors_memory_and_drift_per_window(small_repository: Path):
    edge = start_edge_process(small_repository, [ORT])
    try:
        # A 2 s deadline: a neighbour's CPU spike on this shared machine is not an error here,
        # a failed or unanswered request is.
        r = run_soak(
            edge.url, ORT, 40.0, server_pid=edge.pid, duration_s=6, window_s=2, fraction=0.5, slo_ms=2000,
            warmup_s=2,
        )  # fmt: skip
        print(soak_markdown(r))
        # Warm-up misses are what it is there to absorb (a busy machine's first inferences), not failures.
        assert r.warmup_sent == 20 * 2 and set(r.warmup_errors_by_code) <= {"DEADLINE_EXCEEDED"}
        assert r.sent == int(20 * 6) and r.errors == 0, r.errors_by_code
        assert len(r.p99_by_window_ms) == 3 and all(v is not None for v in r.p99_by_window_ms)
        assert len(r.rss_mb) == 3 and r.rss_mb[0] > 100  # two runtimes' worth of a real server
        assert r.rss_start_mb is not None and r.rss_warm_mb is not None
        # Growth counts from the end of the warm-up, not from the idle server.
        assert r.rss_growth_pct == round(100 * (r.rss_mb[-1] - r.rss_warm_mb) / r.rss_warm_mb, 2)
        assert abs(r.rss_growth_pct) < 20 and "after a 2 s warm-up" in soak_markdown(r)
        assert r.p99_drift_pct is not None and set(r.checks()) >= {"0 errors"}
    finally:
        edge.stop()


def test_a_sustainable_rate_must_also_hold_for_longer(monkeypatch):
    """A machine that meets the SLO up to 200 req/s in short trials but only up to 150 req/s when held:
    the bisection finds ~200, the longer confirmation steps down by 10% until one holds."""
    from serving.bench import stress

    def fake_open_loop(url, payload, phases, deadline_s):
        ((rate, secs),) = phases
        limit = 200 if secs < 10 else 150
        n = int(rate * secs)
        late = 0.5 if rate > limit else 0.01  # answer time, s: past the 100 ms SLO above the limit
        return 0.0, [Shot(k / rate, k / rate, k / rate + late, "OK") for k in range(n)]

    monkeypatch.setattr(stress, "open_loop", fake_open_loop)
    r = stress.probe_sustainable_rate("unused", ORT, 400.0, seconds=6, steps=6, payload=b"x", confirm_s=18)
    short = [t for t in r.trials if not t["confirm"]]
    held = [t for t in r.trials if t["confirm"]]
    assert len(short) == 7 and max(t["rate_rps"] for t in short if t["passed"]) == 200
    assert [t["passed"] for t in held] == [False, False, False]  # 200, 180, 162
    assert r.rate_rps == 0.0  # none held within three steps: no figure rather than a wrong one
    r = stress.probe_sustainable_rate("unused", ORT, 400.0, seconds=6, payload=b"x", confirm_tries=4)
    assert r.rate_rps == 145.8 and r.trials[-1] == {**r.trials[-1], "confirm": True, "passed": True}
    assert "held 18 s: 145.8/s ok" in stress.sustainable_markdown(r)


def test_holding_a_rate_allows_no_error_where_the_bisection_allowed_under_1pct(monkeypatch):
    """A machine that answers in time up to 200 req/s but, above 150 req/s, misses 1 request in 200
    (0.5%: a bisection trial passes): the confirmation steps down to a rate with none."""
    from serving.bench import stress

    def fake_open_loop(url, payload, phases, deadline_s):
        ((rate, secs),) = phases
        n = int(rate * secs)
        late = 0.5 if rate > 200 else 0.01
        code = (lambda k: "DEADLINE_EXCEEDED" if k % 200 == 199 else "OK") if rate > 150 else (lambda k: "OK")
        return 0.0, [Shot(k / rate, k / rate, k / rate + late, code(k)) for k in range(n)]

    monkeypatch.setattr(stress, "open_loop", fake_open_loop)
    r = stress.probe_sustainable_rate("unused", ORT, 400.0, seconds=6, payload=b"x", confirm_tries=4)
    short = [t for t in r.trials if not t["confirm"]]
    held = [t for t in r.trials if t["confirm"]]
    assert max(t["rate_rps"] for t in short if t["passed"]) == 200  # 0.5% errors pass a short trial
    assert [t["passed"] for t in held] == [False, False, False, True]  # 200, 180, 162, 145.8
    assert held[0]["error_pct"] == 0.5 and r.rate_rps == 145.8


def test_stall_watch_sees_a_frozen_process_and_places_requests_against_it():
    """The sleeper that tells the soak's machine stalls from the server's: frozen 80 ms (SIGSTOP, as a
    host preempting the VM would), it reports one stall of about that length, at that time."""
    with StallWatch(threshold_ms=20) as watch:
        time.sleep(0.3)
        frozen_at = time.monotonic()
        os.kill(watch.pid, signal.SIGSTOP)
        time.sleep(0.08)
        os.kill(watch.pid, signal.SIGCONT)
        time.sleep(0.3)
    assert watch.priority in ("SCHED_FIFO", "nice -10", "normal")
    # Only the frozen one is long (a loaded CI machine may add short ones at normal priority).
    stall = max(watch.stalls, key=lambda st: st.ms)
    assert all(st.ms < 50 for st in watch.stalls if st is not stall), watch.stalls
    assert 60 < stall.ms < 500 and abs(stall.start - frozen_at) < 0.05
    assert watch.near(frozen_at - 0.05, 0.1) is stall  # due 50 ms before, 100 ms to answer: hit
    assert watch.near(frozen_at - 0.2, 0.1) is None  # answered before the stall began
    assert watch.near(stall.end + 0.05, 0.1) is stall  # due just after: behind the queue it left
    assert watch.near(stall.end + 0.15, 0.1) is None  # due more than an SLO after it ended


# -- SIGTERM under load --------------------------------------------------------------------------
def test_drain_verdict_follows_what_the_client_saw_not_send_order():
    """Large requests share one HTTP/2 connection, so request 5 can arrive (and be accepted) before
    request 4 arrives and is refused: that is no violation. Accepting a request sent after a refusal
    had come back is one."""
    ledger = [
        (0, 0.0, 0.9, "OK", ""),  # backlog: sent before the signal at 0.5, answered after it
        (1, 0.1, 1.0, "OK", ""),
        (2, 0.2, 1.1, "OK", ""),
        (3, 0.3, 1.2, "OK", ""),
        (4, 0.6, 0.62, "UNAVAILABLE", "server is shutting down"),
        (5, 0.6, 1.3, "OK", ""),  # sent beside 4, arrived before it
        (6, 0.7, 0.71, "UNAVAILABLE", "server is shutting down"),
    ]
    r = drain_result(ledger, "m", 10.0, 8, signalled=0.5, exited=1.5, exit_code=0)
    assert all(r.checks().values()), r.checks()
    assert (r.backlog_served, r.answered_ok, r.refused_unavailable) == (4, 5, 2)
    late = [*ledger, (7, 0.8, 0.9, "OK", "")]  # sent after the refusal at 0.62 came back
    r = drain_result(late, "m", 10.0, 8, signalled=0.5, exited=1.5, exit_code=0)
    assert r.ok_after_first_refusal == 1 and not r.checks()["no acceptance after the first refusal"]
    lost = [(k, s, f, "CANCELLED" if k == 2 else c, d) for k, s, f, c, d in ledger]
    assert drain_result(lost, "m", 10.0, 8, 0.5, 1.5, 0).lost == {"CANCELLED": 1}
    # A new request cancelled by gRPC as the port closes is refused, not lost: one is tolerated.
    closing = [*ledger, (7, 0.8, 0.81, "CANCELLED", "")]
    assert all(drain_result(closing, "m", 10.0, 8, 0.5, 1.5, 0).checks().values())
    closing.append((8, 0.8, 0.81, "CANCELLED", ""))
    assert not all(drain_result(closing, "m", 10.0, 8, 0.5, 1.5, 0).checks().values())


def test_sigterm_under_load_answers_every_accepted_request(small_repository: Path):
    """`rtq serve` gets SIGTERM with a backlog queued: every accepted request is answered OK, every
    later one is refused UNAVAILABLE, and the process exits 0."""
    # Batches of 8 at 1.5x the capacity measured first: a backlog is queued when the signal comes.
    r = run_sigterm_under_load(small_repository, ORT, seconds=4, at=1.5, batch=8)
    assert r.sent == int(r.rate_rps * 4), "a request got no outcome at all"
    assert not r.lost and r.answered_ok > 0 and r.refused_unavailable > 0, r
    # gRPC's stop() cancels a call that reached the socket but no handler yet; that can only be a
    # new request (the refusals began long before), and it is rare: at most one.
    assert set(r.refused_other) <= {"CANCELLED"} and sum(r.refused_other.values()) <= 1, r.refused_other
    assert r.backlog_served >= 2, r  # requests sent before the signal and answered after it
    assert r.ok_after_first_refusal == 0 and r.exit_code == 0, r
    checks = r.checks()
    assert checks["0 accepted requests lost"] and checks["a real backlog was drained"], checks
    assert "0 accepted requests lost" in drain_markdown(r)
    # Refused by the draining server ("shutting down") or, once it closed, by the connection.
    assert all("shutting down" in d or "connect" in d for d in r.refusal_reasons), r.refusal_reasons


def test_stop_under_load_ledger_matches_the_servers_own_count(small_repository: Path):
    """In process, the server's counters are readable after the drain: OK answers on both sides
    are equal, and the server cancelled or failed nothing."""
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[ORT])).start()
    payload = infer_request(ORT, shape=(4, 3, 224, 224))
    stopper = threading.Thread(target=srv.stop)
    out = asyncio.run(
        ledger_under_load(
            f"127.0.0.1:{srv.grpc_port}", payload, rate=60, seconds=3, at=1.2, act=stopper.start
        )
    )
    stopper.join(60)
    served = {
        s.labels["code"]: int(s.value)
        for fam in srv.registry.collect()
        for s in fam.samples
        if s.name == "rtq_requests_total"
    }
    codes = Counter(code for *_, code, _ in out)
    first_refused = min((k for k, *_, code, _ in out if code == "UNAVAILABLE"), default=len(out))
    assert all(code == "OK" for k, *_, code, _ in out if k < first_refused), codes
    # After the refusals began, gRPC's own stop may cancel a call still in transit; it never reached
    # a handler (the server counted no CANCELLED below), so no accepted request was lost.
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert served.get("OK", 0) == codes["OK"] > 0
    assert set(served) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, served
    assert served.get("RESOURCE_EXHAUSTED", 0) == 0


# -- files removed or corrupted while serving ----------------------------------------------------
def _index(url: str) -> dict[str, tuple[str, str]]:
    c = grpcclient.InferenceServerClient(url)
    try:
        return {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
    finally:
        c.close()


def _wait_state(url: str, name: str, state: str, timeout: float = 15) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _index(url)[name]
        if got[0] == state:
            return got
        time.sleep(0.2)
    pytest.fail(f"{name} not {state} within {timeout} s: {_index(url)[name]}")


def test_files_corrupted_or_removed_while_serving(small_repository: Path, tmp_path: Path):
    """OpenVINO maps its weights file: truncating it used to kill the whole server (SIGBUS). Now the
    variant turns not-ready with the reason, the other variant serves throughout, and a restored
    file brings it back."""
    repo = copy_variants(small_repository, tmp_path / "repo", [OV, ORT])
    edge = start_edge_process(repo, [OV, ORT])
    stop = threading.Event()
    errors: list[str] = []
    served = [0]

    def keep_serving() -> None:  # the other variant, under load through all of it
        c = grpcclient.InferenceServerClient(edge.url)
        x = fp32(np.zeros((1, 3, 224, 224), np.float32))
        while not stop.is_set():
            try:
                c.infer(ORT, x)
                served[0] += 1
            except InferenceServerException as exc:
                errors.append(str(exc))
            time.sleep(0.01)
        c.close()

    load = threading.Thread(target=keep_serving)
    load.start()
    try:
        c = grpcclient.InferenceServerClient(edge.url)
        one = fp32(np.ones((1, 3, 224, 224), np.float32))
        before = c.infer(OV, one).as_numpy("logits")
        weights = repo / OV / "1" / "model.bin"
        original = weights.read_bytes()
        weights.write_bytes(b"truncated")  # in place, as a botched copy would
        state, reason = _wait_state(edge.url, OV, "UNAVAILABLE")
        assert "model.bin changed while serving" in reason, reason
        with pytest.raises(InferenceServerException) as exc:
            c.infer(OV, one)
        assert exc.value.status() == "StatusCode.UNAVAILABLE" and "model.bin changed" in exc.value.message()
        assert not c.is_model_ready(OV) and c.is_model_ready(ORT) and c.is_server_ready()

        weights.write_bytes(original)  # the same bytes back: serving again, same answers
        _wait_state(edge.url, OV, "READY")
        np.testing.assert_allclose(c.infer(OV, one).as_numpy("logits"), before, rtol=1e-5, atol=1e-5)

        (repo / ORT / "1" / "model.onnx").unlink()
        stop.set()
        load.join(30)
        state, reason = _wait_state(edge.url, ORT, "UNAVAILABLE")
        assert "1/model.onnx was removed while serving" in reason
        assert c.infer(OV, one).as_numpy("logits").shape == (1, 1000)
        c.close()
        assert edge.proc.poll() is None, "the server died"
    finally:
        stop.set()
        load.join(30)
        edge.stop()
    # The other variant answered every request until its own file went (the last few may have
    # raced that removal).
    assert served[0] > 20 and all("not ready" in e for e in errors), errors[:3]


# -- a runner that throws ------------------------------------------------------------------------
class _Faulty:
    """Wraps a runner: a batch holding an image marked 7 raises, one marked 9 gets a row too few."""

    def __init__(self, infer):
        self.infer = infer  # the runner's own bound method
        self.calls: list[tuple[int, str]] = []  # (images, "ok" | "raised" | "short")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        marks = set(np.round(x[:, 0, 0, 0]).tolist())
        if 7.0 in marks:
            self.calls.append((len(x), "raised"))
            raise RuntimeError("injected runtime fault")
        logits = self.infer(x)
        if 9.0 in marks:
            self.calls.append((len(x), "short"))
            return logits[:-1]
        self.calls.append((len(x), "ok"))
        return logits


def test_a_runner_exception_fails_only_its_batch(small_repository: Path):
    srv = EdgeServer(EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[ORT, OV])).start()
    try:
        runner = srv.models[ORT].batcher._runners[0]
        faulty = _Faulty(runner.infer)
        runner.infer = faulty  # the instance thread calls runner.infer: this object answers now
        url = f"127.0.0.1:{srv.grpc_port}"

        def image(mark: float) -> np.ndarray:
            x = np.zeros((1, 3, 224, 224), np.float32)
            x[0, 0, 0, 0] = mark
            return x

        c = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException) as exc:
            c.infer(ORT, fp32(image(7)))
        assert exc.value.status() == "StatusCode.INTERNAL" and "injected runtime fault" in exc.value.message()
        with pytest.raises(InferenceServerException) as exc:
            c.infer(ORT, fp32(image(9)))
        assert exc.value.status() == "StatusCode.INTERNAL" and "returned 0 rows for a batch of 1" in str(
            exc.value
        )
        # The instance thread lived on: the next batch is fine, and so is the other model.
        assert c.infer(ORT, fp32(image(0))).as_numpy("logits").shape == (1, 1000)
        assert c.infer(OV, fp32(image(7))).as_numpy("logits").shape == (1, 1000)

        # Concurrent requests, some batched with a faulty one: exactly the images of failed
        # batches fail, every other request is answered.
        faulty.calls.clear()
        out: list[tuple[int, object]] = []
        lock = threading.Lock()
        marks = [0, 0, 7, 0, 0, 0, 9, 0, 0, 0, 0, 7, 0, 0, 0, 0]

        def answer(i: int):
            def callback(result, error) -> None:
                with lock:
                    out.append((i, error))

            return callback

        for i, m in enumerate(marks):
            c.async_infer(ORT, fp32(image(m)), callback=answer(i))
        deadline = time.monotonic() + 60
        while len(out) < len(marks) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(out) == len(marks)
        failed = [i for i, e in out if e is not None]
        assert all(e.status() == "StatusCode.INTERNAL" for _, e in out if e is not None)
        bad_images = sum(n for n, what in faulty.calls if what != "ok")
        assert len(failed) == bad_images and {2, 6, 11} <= set(failed)
        assert sum(n for n, what in faulty.calls if what == "ok") == len(marks) - len(failed)
        c.close()
    finally:
        srv.stop()


# -- Triton killed mid-run -----------------------------------------------------------------------
def test_a_killed_triton_is_reported_by_the_load_suite_and_restarted(small_repository: Path, tmp_path: Path):
    ports = [free_port() for _ in range(3)]
    triton = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "triton",
            "--repository",
            str(small_repository),
            "--models",
            ORT,
            "--grpc-port",
            str(ports[0]),
            "--http-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
            "--work-dir",
            str(tmp_path / "triton"),
            "--restarts",
            "1",
            "--timeout",
            "120",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
    )
    try:
        line = triton.stdout.readline()
        assert line, triton.stderr.read()[-800:]
        ready = json.loads(line)
        prefix = tmp_path / "killed"
        locust = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(PROJECT_ROOT / "loadtest" / "realtime.py"),
                "--headless",
                "-u",
                "1",
                "-r",
                "1",
                "-t",
                "14s",
                "--host",
                ready["grpc"],
                "--model",
                ORT,
                "--fps",
                "10",
                "--images",
                "5",
                "--warmup-s",
                "0.5",
                "--csv",
                str(prefix),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
        )
        time.sleep(5)
        os.kill(ready["pid"], signal.SIGKILL)  # tritonserver itself, not the rtq wrapper
        restarted = json.loads(triton.stdout.readline())
        assert restarted["event"] == "restarted" and restarted["exit_code"] == -signal.SIGKILL
        assert restarted["models"][ORT]["state"] == "READY" and restarted["pid"] != ready["pid"]
        _, err = locust.communicate(timeout=90)
        assert locust.returncode != 0, err[-1500:]
        (summary,) = list(csv.DictReader((tmp_path / "killed_realtime.csv").open()))
        assert summary["complete"] == "False" and int(summary["errors"]) > 0
        reasons = summary["incomplete_reasons"]
        # Back within DEAD_SERVER_S: an outage the run survived; later: the run ended on it.
        assert "came back" in reasons or "the server is down" in reasons, reasons
        c = grpcclient.InferenceServerClient(ready["grpc"])
        assert c.infer(ORT, fp32(np.zeros((1, 3, 224, 224), np.float32))).as_numpy("logits").shape == (
            1,
            1000,
        )
        c.close()
        triton.send_signal(signal.SIGTERM)
        assert triton.wait(60) == 0
        assert json.loads(triton.stdout.readline()) == {"event": "stopped", "returncode": 0}
    finally:
        for p in (triton,):
            if p.poll() is None:
                p.kill()


# -- the benchmark command -----------------------------------------------------------------------
def test_rtq_bench_reliability_writes_its_figures(small_repository: Path, tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "serving.cli",
        "bench",
        "reliability",
        "-q",
        "--repository",
        str(small_repository),
    ]
    r = subprocess.run(
        [*cmd, "--model", ORT, "--steps", "fuzz", "sigterm", "--fuzz-cases", "120", "--triton-cases", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (md,) = tmp_path.glob("reliability-*.md")
    payload = json.loads(md.with_suffix(".json").read_text())
    assert set(payload["checks"]) == {"fuzz", "sigterm"} and payload["model"] == ORT
    assert all(payload["checks"]["fuzz"].values()), payload["checks"]
    assert payload["checks"]["sigterm"]["0 accepted requests lost"], payload["results"]["sigterm"]
    assert payload["results"]["fuzz"]["edge"]["sent"] == 120
    text = md.read_text()
    assert "| sigterm | 0 accepted requests lost | PASS |" in text and "## Fuzzing" in text
    for args, words in (
        (["--soak-s", "10", "--soak-window-s", "30"], "--soak-window-s must not exceed --soak-s"),
        (["--model", "no-such-variant"], "unknown variant 'no-such-variant'"),
        (["--fuzz-cases", "0"], "--fuzz-cases must be positive"),
    ):
        bad = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
        assert bad.returncode == 2 and bad.stderr.startswith("rtq: error: ") and words in bad.stderr, (
            bad.stderr
        )
