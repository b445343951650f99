"""MLPerf LoadGen-style scenarios against a KServe v2 gRPC server (edge or Triton), settings as data.

  single_stream  one query in flight, the next sent when the last returns; metric: p90 latency
  server         Poisson arrivals at a target rate, open loop, latency from the due time; VALID
                 when p99 <= the bound; `server_search` finds the largest such rate
  streams        N cameras at a fixed FPS, deadline = frame interval (also the gRPC deadline, so
                 the server can shed what cannot make it); VALID when < 1% frames miss;
                 `streams_search` finds the most cameras that fit
  offline        every query at once (batched requests), metric: samples per second
  accuracy       every image once, top-1 against its label, no timing

Each result says whether its own rules held (minimum query count and duration, warm-up excluded,
bound met): "VALID" or "INVALID" with the reasons, as LoadGen's summary does. Our minimums are far
below MLPerf's (server: 270,336 queries and 600 s) so a run fits a shared 2-core machine; they are
stated in every result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from serving.bench.frames import Frame, infer_inputs
from serving.bench.schedule import FrameSchedule, PoissonSchedule, StreamStats
from serving.errors import RtqError

SCENARIOS = ("single_stream", "server", "streams", "offline", "accuracy")


@dataclass(frozen=True)
class TestSettings:
    """One scenario's rules (LoadGen's TestSettings): what a VALID run needs."""

    scenario: str
    min_query_count: int = 200
    min_duration_s: float = 5.0
    warmup_s: float = 1.0
    target_qps: float = 0.0  # server
    latency_bound_ms: float = 33.0  # server: p99 bound; streams: per-frame deadline is 1/fps
    streams: int = 1  # streams
    fps: float = 30.0  # streams
    max_miss_rate: float = 0.01  # streams
    offline_batch: int = 8  # offline
    offline_in_flight: int = 4
    seed: int = 0
    # A query not answered in this long counts as an error; nothing waits forever.
    query_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise RtqError(f"unknown scenario {self.scenario!r}; expected one of {SCENARIOS}")
        if self.min_duration_s <= 0 or self.min_query_count < 1 or self.warmup_s < 0:
            raise RtqError("min_duration_s and min_query_count must be positive, warmup_s >= 0")
        if self.scenario == "server" and not self.target_qps > 0:
            raise RtqError(f"server scenario needs target_qps > 0, got {self.target_qps}")
        if self.scenario == "streams" and (self.streams < 1 or not self.fps > 0):
            raise RtqError(f"streams scenario needs streams >= 1 and fps > 0, got {self.streams}, {self.fps}")


@dataclass
class ScenarioResult:
    settings: TestSettings
    metrics: dict
    valid: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "VALID" if self.valid else "INVALID"

    def to_dict(self) -> dict:
        return {
            "scenario": self.settings.scenario,
            "settings": asdict(self.settings),
            "metrics": self.metrics,
            "result": self.verdict,
            "reasons": self.reasons,
        }


class Target:
    """One model on one server, through tritonclient.grpc as users call it."""

    def __init__(self, url: str, model: str, send_labels: bool | None = None):
        import tritonclient.grpc as grpcclient

        self.url, self.model = url, model
        self.client = grpcclient.InferenceServerClient(url)
        try:
            ready = self.client.is_server_ready(client_timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means unreachable
            raise RtqError(f"server {url} unreachable: {str(exc).splitlines()[0][:160]}") from None
        if not ready or not self.client.is_model_ready(model, client_timeout=5):
            raise RtqError(f"model {model!r} is not ready at {url}")
        if send_labels is None:  # only our edge server counts labels (Triton ignores them)
            send_labels = self.client.get_server_metadata(client_timeout=5).name != "triton"
        self.send_labels = send_labels

    def close(self) -> None:
        self.client.close()

    def infer(self, frame: Frame, timeout: float) -> np.ndarray:
        params = {"label": frame.label} if self.send_labels and frame.label >= 0 else None
        r = self.client.infer(self.model, infer_inputs(frame), parameters=params, client_timeout=timeout)
        return r.as_numpy("logits")

    def async_infer(self, frame: Frame, timeout: float, callback: Callable) -> None:
        params = {"label": frame.label} if self.send_labels and frame.label >= 0 else None
        self.client.async_infer(
            self.model, infer_inputs(frame), callback, parameters=params, client_timeout=timeout
        )


def _error_name(exc: Exception) -> str:
    status = getattr(exc, "status", lambda: None)()
    return str(status or type(exc).__name__).removeprefix("StatusCode.")


def _correct(logits: np.ndarray | None, frame: Frame) -> bool | None:
    if logits is None or frame.label < 0:
        return None
    return int(logits[0].argmax()) == frame.label


def _open_loop(
    target: Target,
    frames: list[Frame],
    schedules: list,
    s: TestSettings,
    deadline_s: float,
    grpc_deadline_s: float | None = None,
) -> dict:
    """Queries leave at their due times (merged over schedules) and never wait for answers.

    `deadline_s` decides a miss; `grpc_deadline_s` (default: the query timeout) is what the server
    is told, counted from the due time."""
    grpc_deadline_s = s.query_timeout_s if grpc_deadline_s is None else grpc_deadline_s
    stats = StreamStats()
    lock = threading.Lock()
    start = time.monotonic()
    warm_until = start + s.warmup_s
    # LoadGen runs until both minimums hold: at low rates the query count sets the duration.
    rate = s.target_qps if s.scenario == "server" else s.streams * s.fps
    seconds = max(s.min_duration_s, s.min_query_count / rate)
    stop_at = warm_until + seconds
    pending = [0]
    # Precompute due times so the sender only sleeps and sends (its own lateness still counts).
    # Poisson counts are random: extend the window (bounded) until the measured count is met too.
    for _ in range(20):
        due_list = []
        for si, sched in enumerate(schedules):
            k = 0
            while (d := sched.due(k)) < stop_at:
                due_list.append((d, si, k))
                k += 1
        if sum(d >= warm_until for d, _, _ in due_list) >= s.min_query_count:
            break
        stop_at += max(0.1, 0.25 * s.min_query_count / rate)
    seconds = stop_at - warm_until
    due_list.sort()
    done = threading.Event()

    def finish() -> None:
        with lock:
            pending[0] -= 1
            if pending[0] == 0 and sent_all.is_set():
                done.set()

    sent_all = threading.Event()
    for i, (due, _si, _k) in enumerate(due_list):
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        frame = frames[i % len(frames)]
        measured = due >= warm_until
        sent_at = time.monotonic()

        def callback(result, error, due=due, frame=frame, measured=measured, sent_at=sent_at) -> None:
            finished = time.monotonic()
            if measured:
                logits = None if error is not None else result.as_numpy("logits")
                with lock:
                    stats.record(
                        due,
                        finished,
                        sent_at,
                        deadline_s,
                        None if error is None else _error_name(error),
                        _correct(logits, frame),
                    )
            finish()

        with lock:
            pending[0] += 1
        timeout = max(0.001, due + grpc_deadline_s - sent_at)
        try:
            target.async_infer(frame, timeout, callback)
        except Exception as exc:  # noqa: BLE001 - counted; the schedule goes on
            with lock:
                pending[0] -= 1
                if measured:
                    stats.record(due, time.monotonic(), sent_at, deadline_s, _error_name(exc))
    with lock:
        sent_all.set()
        if pending[0] == 0:
            done.set()
    answered_in_time = done.wait(s.query_timeout_s + 5)
    with lock:
        summary = stats.summary(seconds=seconds)
        summary["latency_hist"] = stats.latency.to_dict()
    summary["unanswered_at_end"] = 0 if answered_in_time else pending[0]
    return summary


def _verdict(s: TestSettings, m: dict, extra: list[str]) -> tuple[bool, list[str]]:
    reasons = list(extra)
    if (m.get("queries") or 0) < s.min_query_count:
        reasons.append(f"{m.get('queries', 0)} queries < min_query_count {s.min_query_count}")
    if (m.get("seconds") or 0) < s.min_duration_s * 0.99:
        reasons.append(f"measured {m.get('seconds')} s < min_duration_s {s.min_duration_s}")
    if m.get("unanswered_at_end"):
        reasons.append(f"{m['unanswered_at_end']} queries unanswered at the end")
    return not reasons, reasons


def run_single_stream(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    stats = StreamStats()
    start = time.monotonic()
    warm_until = start + s.warmup_s
    i = 0
    # Bounded: the loop ends at the minimum duration once the minimum count is met, or at 4x it.
    while True:
        now = time.monotonic()
        measured_for = now - warm_until
        if measured_for >= s.min_duration_s and stats.sent >= s.min_query_count:
            break
        if measured_for >= 4 * s.min_duration_s:
            break
        frame = frames[i % len(frames)]
        i += 1
        t0 = time.monotonic()
        try:
            logits, err = target.infer(frame, s.query_timeout_s), None
        except Exception as exc:  # noqa: BLE001 - counted
            logits, err = None, _error_name(exc)
        if t0 >= warm_until:
            stats.record(t0, time.monotonic(), t0, s.query_timeout_s, err, _correct(logits, frame))
    m = stats.summary(seconds=time.monotonic() - warm_until)
    m["latency_hist"] = stats.latency.to_dict()
    valid, reasons = _verdict(s, m, [f"{m['errors']} errors"] if m["errors"] else [])
    return ScenarioResult(s, m, valid, reasons)


def run_server(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    sched = PoissonSchedule(s.target_qps, time.monotonic(), seed=s.seed)
    m = _open_loop(target, frames, [sched], s, deadline_s=s.latency_bound_ms / 1000)
    m["target_qps"] = s.target_qps
    extra = []
    p = m.get("p99_ms")
    if m["errors"]:
        extra.append(f"{m['errors']} errors")
    if p is None or p > s.latency_bound_ms:
        extra.append(f"p99 {p} ms > bound {s.latency_bound_ms} ms")
    valid, reasons = _verdict(s, m, extra)
    return ScenarioResult(s, m, valid, reasons)


def run_streams(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    start = time.monotonic()
    schedules = [FrameSchedule(s.fps, start, phase=i / s.streams / s.fps) for i in range(s.streams)]
    # A camera's frame is worth nothing after its interval, and the server is told so (as
    # loadtest/realtime.py does): it refuses or drops what cannot make it instead of queueing stale
    # frames ahead of fresh ones. Told 10 s instead, 2x overload turned every frame into a miss.
    m = _open_loop(target, frames, schedules, s, deadline_s=1 / s.fps, grpc_deadline_s=1 / s.fps)
    m["streams"], m["fps"] = s.streams, s.fps
    extra = []
    rate = m.get("deadline_miss_rate")
    if rate is None or rate >= s.max_miss_rate:
        extra.append(f"deadline miss rate {rate} >= {s.max_miss_rate}")
    valid, reasons = _verdict(s, m, extra)
    return ScenarioResult(s, m, valid, reasons)


def run_offline(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    """Max throughput: batched tensor requests kept in flight back to back (the offline scenario)."""
    import tritonclient.grpc as grpcclient

    if frames[0].payload.dtype == np.object_:
        raise RtqError("the offline scenario sends batched FP32 tensors; use tensor input")
    b = s.offline_batch
    batch = np.concatenate([frames[i % len(frames)].payload for i in range(b)])
    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    lock = threading.Lock()
    counts = {"samples": 0, "errors": 0, "queries": 0}
    start = time.monotonic()
    warm_until = start + s.warmup_s
    stop_at = warm_until + s.min_duration_s

    def worker() -> None:
        c = grpcclient.InferenceServerClient(target.url)
        while (t0 := time.monotonic()) < stop_at:
            try:
                c.infer(target.model, [inp], client_timeout=s.query_timeout_s)
                ok = True
            except Exception:  # noqa: BLE001 - counted
                ok = False
            if t0 >= warm_until:
                with lock:
                    counts["queries"] += 1
                    counts["samples" if ok else "errors"] += b if ok else 1
        c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(s.offline_in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(s.min_duration_s + s.warmup_s + s.query_timeout_s + 5)
    seconds = max(1e-9, time.monotonic() - warm_until)
    m = {
        "queries": counts["queries"],
        "samples": counts["samples"],
        "errors": counts["errors"],
        "samples_per_s": round(counts["samples"] / seconds, 2),
        "batch": b,
        "in_flight": s.offline_in_flight,
        "seconds": round(seconds, 3),
    }
    valid, reasons = _verdict(s, m, [f"{m['errors']} errors"] if m["errors"] else [])
    return ScenarioResult(s, m, valid, reasons)


def run_accuracy(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    correct, labelled, errors = 0, 0, 0
    t0 = time.monotonic()
    for f in frames:
        try:
            ok = _correct(target.infer(f, s.query_timeout_s), f)
        except Exception:  # noqa: BLE001 - counted
            errors += 1
            continue
        if ok is not None:
            labelled += 1
            correct += int(ok)
    m = {
        "images": len(frames),
        "labelled": labelled,
        "errors": errors,
        "accuracy": round(correct / labelled, 5) if labelled else None,
        "seconds": round(time.monotonic() - t0, 3),
    }
    reasons = [f"{errors} errors"] if errors else []
    if labelled < s.min_query_count:
        reasons.append(f"{labelled} labelled images < min_query_count {s.min_query_count}")
    return ScenarioResult(s, m, not reasons, reasons)


RUNNERS = {
    "single_stream": run_single_stream,
    "server": run_server,
    "streams": run_streams,
    "offline": run_offline,
    "accuracy": run_accuracy,
}


def run(target: Target, frames: list[Frame], s: TestSettings) -> ScenarioResult:
    if not frames:
        raise RtqError("no frames to send")
    return RUNNERS[s.scenario](target, frames, s)


def server_search(
    target: Target,
    frames: list[Frame],
    base: TestSettings,
    high: float,
    steps: int = 5,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[float, list[ScenarioResult]]:
    """Largest Poisson rate whose p99 stays within the bound: bisection on (0, high] qps.

    `high` is a rate known not to fit (e.g. the offline throughput); bounded to `steps` runs.
    """
    from dataclasses import replace

    tried: list[ScenarioResult] = []
    best, lo, hi = 0.0, 0.0, high
    for _ in range(steps):
        rate = round((lo + hi) / 2, 1)
        r = run_server(target, frames, replace(base, scenario="server", target_qps=rate))
        tried.append(r)
        log(f"  server @ {rate:g} qps: p99 {r.metrics.get('p99_ms')} ms -> {r.verdict}")
        if r.valid:
            best = lo = rate
        else:
            hi = rate
        # Stop when the step is small, or when nothing fits even at 1/16 of `high`: at such rates
        # the minimum query count would make each run minutes long for no useful answer.
        if hi - lo < max(1.0, 0.03 * hi) or (not best and hi < high / 16):
            break
    return best, tried


def streams_search(
    target: Target,
    frames: list[Frame],
    base: TestSettings,
    max_streams: int,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[int, list[ScenarioResult]]:
    """Most cameras at base.fps with < base.max_miss_rate deadline misses: bisection on the count."""
    from dataclasses import replace

    tried: list[ScenarioResult] = []
    lo, hi = 0, max_streams + 1  # lo fits (0 trivially), hi does not
    while hi - lo > 1:
        n = (lo + hi) // 2
        r = run_streams(target, frames, replace(base, scenario="streams", streams=n))
        tried.append(r)
        miss = r.metrics.get("deadline_miss_rate")
        log(f"  {n} streams @ {base.fps:g} FPS: miss rate {miss} -> {r.verdict}")
        if r.valid:
            lo = n
        else:
            hi = n
    return lo, tried
