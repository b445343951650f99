"""Overload and soak benchmarks against a running KServe v2 gRPC server (the edge server or Triton).

The load generator is open loop: request k is due at a time fixed in advance (a fixed interval per
phase), it leaves at that time whether or not earlier ones returned, and its latency counts from
the due time (no coordinated omission). Each request carries a gRPC deadline of `slo_ms` from its
due time. Requests are raw ModelInfer messages (tritonclient's protobufs, serialized once), sent on
grpc.aio without client-side checks or response parsing, so one Python process can offer several
times what a 2-core server computes.

- `probe_capacity`: closed-loop saturation throughput (requests/s answered OK).
- `run_overload`: baseline rate, then a burst at `overload_factor` x capacity, then the baseline
  again: admitted p99, how fast and how the excess is refused, the queue depth the server exported,
  and how long latency takes to return to the baseline.
- `run_soak`: `soak_fraction` x capacity for `duration_s`: errors, p99 per window (first vs last)
  and the server's resident memory (first vs last window).

Both return dataclasses (`asdict` for JSON) and have Markdown renderings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from serving.bench.stalls import StallWatch

_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# What a refusal is: the server said no (queue full, or cannot meet the deadline) rather than failed.
REFUSAL_CODES = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
_MAX_MESSAGE = 64 * 1024 * 1024


# -- requests ------------------------------------------------------------------------------------
def infer_request(
    model: str,
    shape: tuple[int, ...] = (1, 3, 224, 224),
    datatype: str = "UINT8",
    input_name: str = "input",
    seed: int = 0,
) -> bytes:
    """One serialized ModelInferRequest: UINT8 pixels (a camera frame after resize/crop, 150 KB) by
    default, or an FP32 tensor (600 KB, what Triton's python backend here takes)."""
    rng = np.random.default_rng(seed)
    if datatype == "UINT8":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
    elif datatype == "FP32":
        x = rng.uniform(-1, 1, shape).astype("<f4")
    else:
        raise ValueError(f"datatype must be UINT8 or FP32, got {datatype!r}")
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()


@dataclass(frozen=True)
class Shot:
    """One request: when it was due, sent and answered (monotonic seconds), and its gRPC code."""

    due: float
    sent: float
    finished: float
    code: str
    details: str = ""  # the status message: tells the server's own refusals from timeouts

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.finished - self.due)

    @property
    def answer_ms(self) -> float:
        """From the moment it left: how fast the server answered (a refusal's speed)."""
        return 1000 * (self.finished - self.sent)


def refused_up_front(shot: Shot, slo_ms: float) -> bool:
    """A DEADLINE_EXCEEDED the server gave on arrival (cannot make it), not one admitted that then
    missed: it counts as a refusal, however slowly it came back, and not against the admitted p99.

    The edge server says which in its message; for others (Triton), an answer well before the
    deadline can only be a refusal."""
    if "refused on arrival" in shot.details:
        return True
    if "dropped before compute" in shot.details:
        return False
    return shot.answer_ms < slo_ms / 2


def _schedule(phases: list[tuple[float, float]], start: float) -> list[float]:
    """Due times for (rate per s, seconds) phases back to back, a fixed interval within each."""
    due: list[float] = []
    t = start
    for rate, seconds in phases:
        if rate <= 0 or seconds <= 0:
            t += max(0.0, seconds)
            continue
        n = int(math.floor(rate * seconds))
        due.extend(t + k / rate for k in range(n))
        t += seconds
    return due


def _channel(url: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        url,
        options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ],
    )


async def _open_loop(url: str, payload: bytes, due_times: list[float], deadline_s: float) -> list[Shot]:
    shots: list[Shot] = []
    async with _channel(url) as channel:
        call = channel.unary_unary(_METHOD)  # bytes in, bytes out: no parsing on this side

        async def one(due: float) -> None:
            sent = time.monotonic()
            # The deadline runs from the due time: a late send leaves the server less time.
            timeout = max(0.001, due + deadline_s - sent)
            details = ""
            try:
                await call(payload, timeout=timeout)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code().name, exc.details() or ""
            shots.append(Shot(due, sent, time.monotonic(), code, details))

        tasks: set[asyncio.Task] = set()
        for due in due_times:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return shots


@contextlib.contextmanager
def _quiet_collector():
    """While measuring: what the caller already holds (a test session's imports: millions of
    objects) leaves the collector's view, so a full collection cannot stall the generator for
    100 ms and show up as the server's latency."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def open_loop(
    url: str, payload: bytes, phases: list[tuple[float, float]], deadline_s: float
) -> tuple[float, list[Shot]]:
    """Send on the schedule of `phases`; returns (start time, shots sorted by due time)."""
    start = time.monotonic() + 0.2  # the channel connects first
    with _quiet_collector():
        shots = asyncio.run(_open_loop(url, payload, _schedule(phases, start), deadline_s))
    return start, sorted(shots, key=lambda s: s.due)


async def _closed_loop(url: str, payload: bytes, concurrency: int, seconds: float, warmup_s: float):
    ok: list[float] = []
    errors: Counter[str] = Counter()
    async with _channel(url) as channel:
        call = channel.unary_unary(_METHOD)
        await channel.channel_ready()
        t0 = time.monotonic()
        counted_from = t0 + warmup_s
        stop = counted_from + seconds

        async def worker() -> None:
            while (now := time.monotonic()) < stop:
                try:
                    await call(payload, timeout=10.0)
                except grpc.aio.AioRpcError as exc:
                    if now >= counted_from:
                        errors[exc.code().name] += 1
                    continue
                if now >= counted_from:
                    ok.append(time.monotonic())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


@dataclass
class Capacity:
    model: str
    concurrency: int
    seconds: float
    throughput_rps: float  # answered OK per second, warm-up excluded
    errors: dict[str, int]


def probe_capacity(
    url: str,
    model: str,
    seconds: float = 10.0,
    concurrency: int = 16,
    warmup_s: float = 2.0,
    payload: bytes | None = None,
) -> Capacity:
    """Closed-loop saturation: `concurrency` requests always in flight; what the server completes."""
    payload = payload or infer_request(model)
    with _quiet_collector():
        ok, errors = asyncio.run(_closed_loop(url, payload, concurrency, seconds, warmup_s))
    return Capacity(model, concurrency, seconds, round(len(ok) / seconds, 1), dict(errors))


@dataclass
class SustainableRate:
    """The highest open-loop rate whose p99 stays within the SLO with under `max_error_pct` errors:
    the capacity a real-time client can use (closed-loop saturation overstates it: its requests wait
    for each other, so batches fill and nobody's deadline counts)."""

    model: str
    slo_ms: float
    rate_rps: float  # 0 when even the lowest rate tried failed
    trials: list[dict] = field(default_factory=list)  # rate, p99_ms, error_pct, passed


def probe_sustainable_rate(
    url: str,
    model: str,
    upper_rps: float,
    slo_ms: float = 100.0,
    seconds: float = 6.0,
    steps: int = 6,
    max_error_pct: float = 1.0,
    payload: bytes | None = None,
    confirm_s: float = 18.0,
    confirm_tries: int = 3,
) -> SustainableRate:
    """Bisection over open-loop rates in (0, upper_rps] (e.g. the closed-loop capacity), then the rate
    found must hold for `confirm_s` with no error at all, else 10% less is tried (up to
    `confirm_tries` times): a 6 s trial once passed 245 req/s on a machine whose 10 min soak at
    196 req/s then failed 1.9%, and confirmations passed at 0.69% errors twice before soaks that
    each failed with thousands of errors (the soak's own check is 0 errors)."""
    payload = payload or infer_request(model)
    result = SustainableRate(model, slo_ms, 0.0)

    def passes(rate: float, secs: float, confirm: bool = False) -> bool:
        start, shots = open_loop(url, payload, [(rate, secs)], slo_ms / 1000)
        measured = [s for s in shots if s.due >= start + 1.0]  # the first second warms up
        failed = sum(s.code != "OK" for s in measured)
        errors = 100 * failed / max(1, len(measured))
        p99 = _pct(_ok_latencies(measured), 99)
        ok = p99 is not None and p99 <= slo_ms and (failed == 0 if confirm else errors < max_error_pct)
        result.trials.append({"rate_rps": round(rate, 1), "p99_ms": p99, "error_pct": round(errors, 2),
                              "passed": ok, "seconds": secs, "confirm": confirm})  # fmt: skip
        return ok

    lo, hi = 0.0, upper_rps
    if passes(hi, seconds):
        lo = hi
    else:
        for _ in range(steps):
            mid = (lo + hi) / 2
            if passes(mid, seconds):
                lo = mid
            else:
                hi = mid
    for _ in range(confirm_tries):
        if lo <= 0 or passes(lo, confirm_s, confirm=True):
            break
        lo *= 0.9
    else:
        lo = 0.0
    result.rate_rps = round(lo, 1)
    return result


# -- sampling the server while it runs ------------------------------------------------------------
class _Sampler:
    """Polls a callable every `interval_s` on a thread: (monotonic time, value) pairs."""

    def __init__(self, fn: Callable[[], float | None], interval_s: float):
        self.fn = fn
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                v = self.fn()
            except Exception:  # noqa: BLE001 - a missed scrape is a missing sample, not a failure
                v = None
            if v is not None:
                self.samples.append((time.monotonic(), float(v)))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def queue_depth_reader(metrics_url: str, model: str) -> Callable[[], float | None]:
    """rtq_queue_depth of `model` from the edge server's Prometheus endpoint.

    Read by a line scan, not the full exposition parser: it runs 20 times a second inside the load
    generator, where a parse of every series held the generator's GIL long enough to delay sends."""
    label = f'model="{model}"'

    def read() -> float | None:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
        for line in text.splitlines():
            if line.startswith("rtq_queue_depth{") and label in line:
                return float(line.rsplit(" ", 1)[1])
        return None

    return read


Scrape = dict[tuple[str, tuple], float]  # serving.bench.serving_bench.scrape: (name, labels) -> value


def _model_sums(values: Scrape, model: str, sample: str, by: str) -> Counter[str]:
    """The `sample` series of `model` in one scrape, summed per value of label `by`."""
    out: Counter[str] = Counter()
    for (name, labels), v in values.items():
        ls = dict(labels)
        if name == sample and ls.get("model") == model:
            out[ls[by]] += int(v)
    return out


def server_refusal_buckets(values: Scrape, model: str) -> Counter[float]:
    """rtq_refusal_duration_seconds of `model`, all codes: cumulative count per bucket edge (s)."""
    sums = _model_sums(values, model, "rtq_refusal_duration_seconds_bucket", "le")
    return Counter({float(le): n for le, n in sums.items()})


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative {edge: count}: linear within the bucket the
    quantile falls in; None without observations, the last finite edge if it falls in +Inf."""
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for edge in edges:
        if buckets[edge] >= rank:
            if math.isinf(edge):
                return lower
            inside = buckets[edge] - below
            return lower + (edge - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = edge, buckets[edge]
    return lower


def server_codes(values: Scrape, model: str) -> Counter[str]:
    """rtq_requests_total of `model` by gRPC code: what the server itself answered."""
    return _model_sums(values, model, "rtq_requests_total", "code")


def rss_reader(pid: int) -> Callable[[], float]:
    """Resident memory (MiB) of a process and its children."""
    import psutil

    root = psutil.Process(pid)

    def read() -> float:
        procs = [root, *root.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20

    return read


# -- figures -------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _ok_latencies(shots: list[Shot]) -> list[float]:
    return [s.latency_ms for s in shots if s.code == "OK"]


@dataclass
class OverloadResult:
    model: str
    url: str
    capacity_rps: float
    slo_ms: float
    baseline_rps: float
    overload_rps: float
    baseline_s: float
    overload_s: float
    recovery_window_s: float
    queue_limit: int | None
    # Baseline phase (OK answers, latency from the due time).
    baseline_p50_ms: float | None = None
    baseline_p99_ms: float | None = None
    # Burst phase.
    overload_sent: int = 0
    overload_admitted: int = 0  # not refused up front: answered OK or missed the deadline later
    overload_answered_ok: int = 0
    overload_missed_deadline: int = 0  # admitted, then DEADLINE_EXCEEDED at ~the deadline
    overload_ok_rps: float = 0.0
    # Admitted requests, latency from the due time; a missed deadline counts with its latency.
    overload_admitted_p50_ms: float | None = None
    overload_admitted_p99_ms: float | None = None
    # Refused up front: RESOURCE_EXHAUSTED (queue full), or DEADLINE_EXCEEDED answered in under
    # half the SLO (the server saw it could not make it); later ones count as admitted but late.
    refused_by_code: dict[str, int] = field(default_factory=dict)
    # How fast the server said no, seen by the client from the moment the request left (per refusal
    # code and all). On a machine the load generator shares, this includes the generator's own lag.
    refusal_p50_ms: float | None = None
    refusal_p99_ms: float | None = None
    refusal_p99_ms_by_code: dict[str, float | None] = field(default_factory=dict)
    # The same at the server (rtq_refusal_duration_seconds: received -> status sent), whole run:
    # p99 as Prometheus interpolates it, and the share within the limit read off a bucket edge.
    refusal_limit_ms: float = 5.0  # a bucket edge of the server's histogram
    server_refusals: int = 0
    server_refusal_p99_ms: float | None = None
    server_refused_within_limit_pct: float | None = None
    send_lag_p99_ms: float = 0.0
    other_errors: dict[str, int] = field(default_factory=dict)  # neither OK nor a refusal
    # What the server counted itself over the whole run (rtq_requests_total); a client-side
    # DEADLINE_EXCEEDED that the server never counted timed out before the server could answer.
    server_answers: dict[str, int] = field(default_factory=dict)
    max_queue_depth: float | None = None
    queue_samples: int = 0
    # After the burst: p99 per window and when it is back within the threshold: recovery_factor x
    # baseline p99, or recovery_floor_ms where that is higher.
    recovery_threshold_ms: float | None = None
    recovery_p99_ms: list[float | None] = field(default_factory=list)
    recovery_s: float | None = None  # None: not back within the recovery phase
    max_send_lag_ms: float = 0.0  # how late the generator itself sent (should be ~0)

    def checks(self, recovery_limit_s: float = 5.0) -> dict[str, bool]:
        """The issue's criteria, each True when met."""
        return {
            "queue bounded": self.max_queue_depth is not None
            and (self.queue_limit is None or self.max_queue_depth <= self.queue_limit),
            "admitted p99 within SLO": self.overload_admitted_p99_ms is not None
            and self.overload_admitted_p99_ms <= self.slo_ms,
            f"refusal p99 <= {self.refusal_limit_ms:g} ms at the server": self.server_refused_within_limit_pct
            is not None
            and self.server_refused_within_limit_pct >= 99.0,
            "no errors besides refusals": not self.other_errors,
            f"recovered within {recovery_limit_s:g} s": self.recovery_s is not None
            and self.recovery_s <= recovery_limit_s,
        }


def run_overload(
    url: str,
    model: str,
    capacity_rps: float,
    *,
    metrics_url: str | None = None,
    queue_limit: int | None = None,
    slo_ms: float = 100.0,
    overload_factor: float = 2.0,
    baseline_fraction: float = 0.5,
    baseline_s: float = 10.0,
    overload_s: float = 60.0,
    recovery_s: float = 10.0,
    window_s: float = 0.5,
    recovery_factor: float = 1.5,
    recovery_floor_ms: float = 0.0,
    hold_s: float = 2.0,
    payload: bytes | None = None,
    refusal_limit_ms: float = 5.0,
) -> OverloadResult:
    """Baseline, burst at overload_factor x capacity, baseline again; figures per phase.

    Refusal speed counts from the send (the server's answer time); admitted latency counts from the
    due time. "Recovered" is the first window after the burst from which `hold_s` of windows have
    only OK answers and a p99 within recovery_factor x the baseline p99, or within
    `recovery_floor_ms` (a noise floor for shared machines, where a half-second window's p99 swings
    by tens of ms while the burst's backlog sits at the SLO).
    """
    payload = payload or infer_request(model)
    base_rate = baseline_fraction * capacity_rps
    over_rate = overload_factor * capacity_rps
    phases = [(base_rate, baseline_s), (over_rate, overload_s), (base_rate, recovery_s)]
    result = OverloadResult(
        model=model,
        url=url,
        capacity_rps=capacity_rps,
        slo_ms=slo_ms,
        baseline_rps=round(base_rate, 1),
        overload_rps=round(over_rate, 1),
        baseline_s=baseline_s,
        overload_s=overload_s,
        recovery_window_s=window_s,
        queue_limit=queue_limit,
        refusal_limit_ms=refusal_limit_ms,
    )
    depth = _Sampler(queue_depth_reader(metrics_url, model) if metrics_url else lambda: None, 0.05)
    from serving.bench.serving_bench import scrape

    before = scrape(metrics_url) if metrics_url else {}
    with depth:
        start, shots = open_loop(url, payload, phases, slo_ms / 1000)
    if metrics_url:
        time.sleep(0.2)  # the last answers' counts land just after the answers
        after = scrape(metrics_url)
        delta = server_codes(after, model) - server_codes(before, model)
        result.server_answers = dict(sorted(delta.items()))
        after_run, before_run = server_refusal_buckets(after, model), server_refusal_buckets(before, model)
        buckets = {le: after_run[le] - before_run[le] for le in after_run}
        result.server_refusals = int(buckets.get(math.inf, 0))
        p99 = histogram_quantile(0.99, buckets)
        result.server_refusal_p99_ms = None if p99 is None else round(1000 * p99, 3)
        limit = refusal_limit_ms / 1000
        if result.server_refusals and limit in buckets:
            within = 100 * buckets[limit] / result.server_refusals
            result.server_refused_within_limit_pct = round(within, 2)
    burst_at, calm_at = start + baseline_s, start + baseline_s + overload_s
    # The first second of the baseline warms the connection and the batcher's estimates.
    base = [s for s in shots if start + min(1.0, baseline_s / 4) <= s.due < burst_at]
    burst = [s for s in shots if burst_at <= s.due < calm_at]
    after = [s for s in shots if s.due >= calm_at]

    base_ok = _ok_latencies(base)
    result.baseline_p50_ms, result.baseline_p99_ms = _pct(base_ok, 50), _pct(base_ok, 99)
    result.overload_sent = len(burst)
    late = [s for s in burst if s.code == "DEADLINE_EXCEEDED" and not refused_up_front(s, slo_ms)]
    refused = [s for s in burst if s.code in REFUSAL_CODES and s not in set(late)]
    admitted = _ok_latencies(burst) + [s.latency_ms for s in late]
    result.overload_admitted = len(admitted)
    result.overload_answered_ok = sum(s.code == "OK" for s in burst)
    result.overload_missed_deadline = len(late)
    result.overload_ok_rps = round(result.overload_answered_ok / overload_s, 1)
    result.overload_admitted_p50_ms, result.overload_admitted_p99_ms = _pct(admitted, 50), _pct(admitted, 99)
    result.refused_by_code = dict(Counter(s.code for s in refused))
    result.refusal_p50_ms = _pct([s.answer_ms for s in refused], 50)
    result.refusal_p99_ms = _pct([s.answer_ms for s in refused], 99)
    result.refusal_p99_ms_by_code = {
        code: _pct([s.answer_ms for s in refused if s.code == code], 99) for code in result.refused_by_code
    }
    other = [s.code for s in shots if s.code != "OK" and s.code not in REFUSAL_CODES]
    result.other_errors = dict(Counter(other))
    result.max_send_lag_ms = round(max((1000 * (s.sent - s.due) for s in shots), default=0.0), 3)
    result.send_lag_p99_ms = _pct([1000 * (s.sent - s.due) for s in shots], 99) or 0.0
    if depth.samples:
        result.max_queue_depth = max(v for _, v in depth.samples)
        result.queue_samples = len(depth.samples)

    if result.baseline_p99_ms is not None:
        threshold = max(recovery_factor * result.baseline_p99_ms, recovery_floor_ms)
        result.recovery_threshold_ms = round(threshold, 3)
        n_windows = max(1, int(recovery_s / window_s))
        good: list[bool] = []
        for i in range(n_windows):
            lo, hi = calm_at + i * window_s, calm_at + (i + 1) * window_s
            w = [s for s in after if lo <= s.due < hi]
            p99 = _pct(_ok_latencies(w), 99)
            result.recovery_p99_ms.append(p99)
            good.append(
                bool(w)
                and all(s.code == "OK" for s in w)
                and p99 is not None
                and p99 <= result.recovery_threshold_ms
            )
        # Recovered: the first window from which latency stays at the baseline for hold_s (a
        # lone slow window later, on a shared machine, is noise rather than the burst's backlog).
        hold = max(1, int(round(hold_s / window_s)))
        first = next((i for i in range(len(good) - hold + 1) if all(good[i : i + hold])), None)
        result.recovery_s = None if first is None else round(first * window_s, 3)
    return result


@dataclass
class SoakResult:
    model: str
    url: str
    capacity_rps: float
    rate_rps: float
    duration_s: float
    window_s: float
    slo_ms: float
    sent: int = 0
    answered_ok: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    # "CODE: first words of the status message" -> count, and when (s from the start): tells an
    # admission refusal from a request that waited and missed, and a burst from scattered ones.
    error_reasons: dict[str, int] = field(default_factory=dict)
    error_times_s: list[float] = field(default_factory=list)
    p50_ms: float | None = None
    p99_ms: float | None = None
    p99_by_window_ms: list[float | None] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # one sample per window, at its end
    rss_growth_pct: float | None = None  # last vs first window
    # The same load for warmup_s before the measured span: the server's memory grows once as gRPC
    # threads, allocator arenas and ORT's buffers reach their working size (+14% in the first minute
    # of the 12-02 soak, then flat); a leak is growth after that, so the verdict reads the measured span.
    warmup_s: float = 0.0
    warmup_sent: int = 0
    warmup_errors_by_code: dict[str, int] = field(default_factory=dict)
    rss_start_mb: float | None = None  # first sample, before any load
    rss_warm_mb: float | None = None  # at the end of the warm-up
    p99_drift_pct: float | None = None  # last vs first window
    max_send_lag_ms: float = 0.0
    # Late wake-ups of a real-time 1 ms sleeper (serving.bench.stalls): [s from the start, ms], and
    # how many errors had one within an SLO of their due time (before it: the queue it left).
    stall_priority: str = ""
    machine_stalls: list[list[float]] = field(default_factory=list)
    errors_near_stalls: int = 0
    # Errors of requests the load generator itself sent > 10 ms late (their deadline runs from the due
    # time, so the server had that much less): on shared cores the generator starves too.
    errors_sent_late: int = 0

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    def checks(self, rss_limit_pct: float = 5.0, drift_limit_pct: float = 10.0) -> dict[str, bool]:
        return {
            "0 errors": self.errors == 0 and self.sent > 0,
            f"RSS growth < {rss_limit_pct:g}%": self.rss_growth_pct is not None
            and self.rss_growth_pct < rss_limit_pct,
            f"p99 drift < {drift_limit_pct:g}%": self.p99_drift_pct is not None
            and self.p99_drift_pct < drift_limit_pct,
        }


_LATE_SEND_S = 0.010


def run_soak(
    url: str,
    model: str,
    capacity_rps: float,
    *,
    server_pid: int | None = None,
    duration_s: float = 600.0,
    fraction: float = 0.8,
    window_s: float = 60.0,
    slo_ms: float = 100.0,
    payload: bytes | None = None,
    warmup_s: float = 0.0,
) -> SoakResult:
    """`fraction` x capacity, open loop, for `warmup_s` + `duration_s`: errors, p99 per window,
    server RSS, over the `duration_s` after the warm-up (the warm-up's own errors and RSS are kept).

    Drift and growth compare the last window with the first (without a warm-up, the first second,
    where connections and caches warm up, is left out of the first window). RSS is the server's
    process tree, sampled every second; each window's value is its last sample, and the growth is
    measured from the end of the warm-up.
    """
    payload = payload or infer_request(model)
    rate = fraction * capacity_rps
    result = SoakResult(
        model, url, capacity_rps, round(rate, 1), duration_s, window_s, slo_ms, warmup_s=warmup_s
    )
    rss = _Sampler(rss_reader(server_pid) if server_pid else lambda: None, 1.0)
    with rss, StallWatch() as stalls:
        t0, everything = open_loop(url, payload, [(rate, warmup_s + duration_s)], slo_ms / 1000)
    start = t0 + warmup_s
    warm = [s for s in everything if s.due < start]
    result.warmup_sent = len(warm)
    result.warmup_errors_by_code = dict(Counter(s.code for s in warm if s.code != "OK"))
    shots = [s for s in everything if s.due >= start]
    before = [v for _, v in rss.samples if v is not None]
    result.rss_start_mb = round(before[0], 1) if before else None
    if warmup_s > 0:
        at_warm = [v for t, v in rss.samples if t < start and v is not None]
        result.rss_warm_mb = round(at_warm[-1], 1) if at_warm else None
    measured = shots if warmup_s > 0 else [s for s in shots if s.due >= start + min(1.0, window_s / 4)]
    result.sent = len(shots)
    result.answered_ok = sum(s.code == "OK" for s in shots)
    failed = [s for s in shots if s.code != "OK"]
    result.errors_by_code = dict(Counter(s.code for s in failed))
    result.error_reasons = dict(Counter(f"{s.code}: {s.details[:48]}" for s in failed).most_common(5))
    result.error_times_s = [round(s.due - start, 1) for s in failed[:20]]
    result.stall_priority = stalls.priority
    result.machine_stalls = [[round(st.start - start, 2), round(st.ms, 1)] for st in stalls.stalls]
    result.errors_near_stalls = sum(stalls.near(s.due, slo_ms / 1000) is not None for s in failed)
    result.errors_sent_late = sum(s.sent - s.due > _LATE_SEND_S for s in failed)
    ok = _ok_latencies(measured)
    result.p50_ms, result.p99_ms = _pct(ok, 50), _pct(ok, 99)
    result.max_send_lag_ms = round(max((1000 * (s.sent - s.due) for s in shots), default=0.0), 3)
    result.send_lag_p99_ms = _pct([1000 * (s.sent - s.due) for s in shots], 99) or 0.0
    n_windows = max(1, int(duration_s / window_s))
    for i in range(n_windows):
        lo, hi = start + i * window_s, start + (i + 1) * window_s
        result.p99_by_window_ms.append(_pct(_ok_latencies([s for s in measured if lo <= s.due < hi]), 99))
        in_window = [v for t, v in rss.samples if t < hi]
        if in_window:
            result.rss_mb.append(round(in_window[-1], 1))
    base = result.rss_warm_mb if result.rss_warm_mb is not None else (result.rss_mb or [None])[0]
    if base and len(result.rss_mb) >= (1 if result.rss_warm_mb is not None else 2):
        result.rss_growth_pct = round(100 * (result.rss_mb[-1] - base) / base, 2)
    first, last = result.p99_by_window_ms[0], result.p99_by_window_ms[-1]
    if n_windows >= 2 and first and last is not None:
        result.p99_drift_pct = round(100 * (last - first) / first, 2)
    return result


# -- SIGTERM under load ---------------------------------------------------------------------------
Ledger = list[tuple[int, float, float, str, str]]  # (index, sent, finished, code, details) per request


async def ledger_under_load(
    url: str, payload: bytes, rate: float, seconds: float, at: float, act: Callable[[], None]
) -> Ledger:
    """Open loop at `rate` for `seconds`, calling act() once `at` s in; every request's outcome as
    (index, sent, finished, code, details). The timeout is long: nothing ends by the client's clock."""
    out: Ledger = []
    async with _channel(url) as channel:
        call = channel.unary_unary(_METHOD)
        await channel.channel_ready()

        async def one(k: int) -> None:
            sent = time.monotonic()
            try:
                await call(payload, timeout=60)
                out.append((k, sent, time.monotonic(), "OK", ""))
            except grpc.aio.AioRpcError as exc:
                out.append((k, sent, time.monotonic(), exc.code().name, exc.details() or ""))

        tasks = []
        t0 = time.monotonic()
        acted = False
        for k in range(int(rate * seconds)):
            due = t0 + k / rate
            if not acted and due >= t0 + at:
                act()
                acted = True
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(k)))
        await asyncio.gather(*tasks)
    return out


@dataclass
class DrainResult:
    """SIGTERM with a backlog: every request's fate, from the client's ledger."""

    model: str
    rate_rps: float
    batch: int
    sent: int
    answered_ok: int
    refused_unavailable: int
    # Not OK although sent before the first refusal (the server had accepted it): must stay empty.
    lost: dict[str, int]
    backlog_served: int  # sent before the signal, answered OK after it: the drain really drained
    # Accepted although sent after the client held a refusal. Send order is not arrival order (large
    # messages share one HTTP/2 connection, so a later stream can finish arriving first), so this
    # counts only what the client sent once it had seen the server refuse.
    ok_after_first_refusal: int
    exit_code: int | None
    drain_s: float  # signal -> process exit
    refusal_reasons: dict[str, int] = field(default_factory=dict)  # UNAVAILABLE details, first 40 chars
    # Sent after the first refusal but answered with another code than UNAVAILABLE (e.g. CANCELLED by
    # gRPC's transport as the port closes): not lost work, but not the clean refusal either.
    refused_other: dict[str, int] = field(default_factory=dict)

    def checks(self) -> dict[str, bool]:
        return {
            "0 accepted requests lost": not self.lost,
            # gRPC's stop() cancels a call that reached the socket but no handler as the port closes:
            # a new request, refused all the same, and at most one on a connection.
            "new requests refused with UNAVAILABLE (<= 1 CANCELLED at close)": self.refused_unavailable > 0
            and set(self.refused_other) <= {"CANCELLED"}
            and sum(self.refused_other.values()) <= 1,
            "a real backlog was drained": self.backlog_served > 0,
            "no acceptance after the first refusal": self.ok_after_first_refusal == 0,
            "exit code 0": self.exit_code == 0,
        }


def run_sigterm_under_load(
    repository,
    model: str,
    rate: float | None = None,
    seconds: float = 4.0,
    at: float = 1.5,
    batch: int = 8,
    overload: float = 1.5,
) -> DrainResult:
    """`rtq serve` in its own process gets SIGTERM `at` s into an open loop of `batch`-image requests
    at `rate`/s; by default `overload` x the capacity measured first, so a backlog is queued when the
    signal comes on any machine."""
    import signal

    edge = start_edge_process(repository, [model], max_queue=256)
    payload = infer_request(model, shape=(batch, 3, 224, 224))
    if rate is None:
        try:
            cap = probe_capacity(edge.url, model, seconds=3, concurrency=4, warmup_s=1, payload=payload)
        except BaseException:
            edge.stop()
            raise
        rate = max(5.0, round(overload * cap.throughput_rps, 1))
    signalled: list[float] = []

    def term() -> None:
        signalled.append(time.monotonic())
        edge.proc.send_signal(signal.SIGTERM)

    try:
        with _quiet_collector():
            out = asyncio.run(ledger_under_load(edge.url, payload, rate, seconds, at, term))
        exit_code = edge.proc.wait(120)
        exited = time.monotonic()
    finally:
        edge.stop()
    return drain_result(out, model, rate, batch, signalled[0], exited, exit_code)


def drain_result(
    out: Ledger, model: str, rate: float, batch: int, signalled: float, exited: float, exit_code: int | None
) -> DrainResult:
    """Judge a SIGTERM ledger of (index, sent, finished, code, details) per request."""
    codes = Counter(code for *_, code, _ in out)
    refused = [k for k, *_, code, _ in out if code == "UNAVAILABLE"]
    first_refused = min(refused) if refused else len(out)
    refusal_seen = min((fin for _, _, fin, code, _ in out if code == "UNAVAILABLE"), default=float("inf"))
    return DrainResult(
        model=model,
        rate_rps=rate,
        batch=batch,
        sent=len(out),
        answered_ok=codes.get("OK", 0),
        refused_unavailable=codes.get("UNAVAILABLE", 0),
        lost=dict(Counter(code for k, *_, code, _ in out if k < first_refused and code != "OK")),
        backlog_served=sum(1 for _, sent, fin, code, _ in out if code == "OK" and sent < signalled < fin),
        ok_after_first_refusal=sum(1 for _, sent, _, code, _ in out if code == "OK" and sent > refusal_seen),
        exit_code=exit_code,
        drain_s=round(exited - signalled, 2),
        refusal_reasons=dict(Counter(d.split(";")[0][:40] for *_, code, d in out if code == "UNAVAILABLE")),
        refused_other=dict(
            Counter(code for k, *_, code, _ in out if k > first_refused and code not in ("OK", "UNAVAILABLE"))
        ),
    )


# -- Markdown ------------------------------------------------------------------------------------
def _f(v: object, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.1f}{unit}" if abs(v) >= 10 else f"{v:.2f}{unit}"
    return f"{v}{unit}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _verdicts(checks: dict[str, bool]) -> list[str]:
    return [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]


def capacity_markdown(c: Capacity) -> str:
    errs = _counts(c.errors)
    return (
        f"Capacity of `{c.model}`: **{_f(c.throughput_rps)} req/s** "
        f"(closed loop, {c.concurrency} in flight, {c.seconds:g} s; errors: {errs})\n"
    )


def sustainable_markdown(r: SustainableRate) -> str:
    def one(t: dict) -> str:
        held = f"held {t['seconds']:g} s: " if t.get("confirm") else ""
        return (
            f"{held}{t['rate_rps']:g}/s {'ok' if t['passed'] else 'no'} "
            f"(p99 {_f(t['p99_ms'])} ms, {t['error_pct']:g}% err)"
        )

    return (
        f"Sustainable open-loop rate of `{r.model}`: **{_f(r.rate_rps)} req/s** at p99 <= {r.slo_ms:g} ms "
        f"and < 1% errors in the bisection, then held longer with 0 errors "
        f"({', '.join(one(t) for t in r.trials)})\n"
    )


def overload_markdown(r: OverloadResult) -> str:
    refused = _counts(r.refused_by_code)
    by_code = ", ".join(f"{k} {_f(v, ' ms')}" for k, v in sorted(r.refusal_p99_ms_by_code.items())) or "–"
    other = _counts(r.other_errors)
    queue = f"{_f(r.max_queue_depth)} (limit {_f(r.queue_limit)}, {r.queue_samples} samples)"
    lines = [
        f"### Overload: `{r.model}` at {r.overload_rps:g} req/s for {r.overload_s:g} s "
        f"({r.overload_rps / r.capacity_rps:.1f}x capacity {r.capacity_rps:g} req/s)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| SLO (per-request deadline from its due time) | {r.slo_ms:g} ms |",
        f"| baseline ({r.baseline_rps:g} req/s) p50 / p99 | {_f(r.baseline_p50_ms)} / "
        f"{_f(r.baseline_p99_ms)} ms |",
        f"| burst: sent / admitted / OK / admitted but late | {r.overload_sent} / {r.overload_admitted} / "
        f"{r.overload_answered_ok} ({_f(r.overload_ok_rps)} req/s) / {r.overload_missed_deadline} |",
        f"| burst: admitted p50 / p99 | {_f(r.overload_admitted_p50_ms)} / "
        f"{_f(r.overload_admitted_p99_ms)} ms |",
        f"| burst: refused by code | {refused} |",
        f"| refusal time at the server (received -> status sent): p99 / within {r.refusal_limit_ms:g} ms | "
        f"{_f(r.server_refusal_p99_ms)} ms / {_f(r.server_refused_within_limit_pct, '%')} "
        f"of {r.server_refusals} |",
        f"| refusal time at the client (sent -> answer) p50 / p99 | {_f(r.refusal_p50_ms)} / "
        f"{_f(r.refusal_p99_ms)} ms (the load generator's own send lag p99 {_f(r.send_lag_p99_ms)} ms) |",
        f"| client refusal p99 by code | {by_code} |",
        f"| other errors | {other} |",
        f"| server's own count by code (whole run) | "
        f"{', '.join(f'{k} {v}' for k, v in r.server_answers.items()) or '–'} |",
        f"| max queue depth (rtq_queue_depth) | {queue} |",
        f"| recovery: back within {_f(r.recovery_threshold_ms)} ms p99 after | "
        f"{_f(r.recovery_s, ' s') if r.recovery_s is not None else 'not recovered'} |",
        f"| recovery p99 per {r.recovery_window_s:g} s window | "
        f"{', '.join(_f(v) for v in r.recovery_p99_ms)} |",
        f"| load generator max send lag | {_f(r.max_send_lag_ms)} ms |",
        "",
        *_verdicts(r.checks()),
        "",
    ]
    return "\n".join(lines)


def soak_markdown(r: SoakResult) -> str:
    errs = _counts(r.errors_by_code)
    longest = sorted(r.machine_stalls, key=lambda s: -s[1])[:8]
    stalls = ", ".join(f"{at:g} s: {ms:g}" for at, ms in sorted(longest)) or "none"
    if len(r.machine_stalls) > len(longest):
        stalls += f" (longest {len(longest)} of {len(r.machine_stalls)})"
    growth_from = "last vs first window"
    warmup = []
    if r.warmup_s > 0:
        growth_from = "last window vs end of warm-up"
        warmup = [
            f"| warm-up (same rate, not in the figures below): sent / errors | {r.warmup_sent} / "
            f"{_counts(r.warmup_errors_by_code)} |",
            f"| server RSS before load / after warm-up (MiB) | {_f(r.rss_start_mb)} / {_f(r.rss_warm_mb)} |",
        ]
    lines = [
        f"### Soak: `{r.model}` at {r.rate_rps:g} req/s ({r.rate_rps / r.capacity_rps:.0%} of "
        f"{r.capacity_rps:g} req/s) for {r.duration_s:g} s"
        + (f" after a {r.warmup_s:g} s warm-up" if r.warmup_s > 0 else ""),
        "",
        "| figure | value |",
        "| --- | --- |",
        *warmup,
        f"| sent / OK | {r.sent} / {r.answered_ok} |",
        f"| errors | {errs} |",
        f"| most frequent reasons | {_counts(r.error_reasons)} |",
        f"| first errors at (s) | {', '.join(f'{t:g}' for t in r.error_times_s) or '–'} |",
        f"| p50 / p99 (SLO {r.slo_ms:g} ms) | {_f(r.p50_ms)} / {_f(r.p99_ms)} ms |",
        f"| p99 per {r.window_s:g} s window | {', '.join(_f(v) for v in r.p99_by_window_ms)} |",
        f"| p99 drift, last vs first window | {_f(r.p99_drift_pct, '%')} |",
        f"| server RSS per window (MiB) | {', '.join(_f(v) for v in r.rss_mb) or '–'} |",
        f"| RSS growth, {growth_from} | {_f(r.rss_growth_pct, '%')} |",
        f"| load generator max send lag | {_f(r.max_send_lag_ms)} ms |",
        f"| machine stalls > 20 ms ({r.stall_priority} 1 ms sleeper): at s, ms | {stalls} |",
        f"| errors within one SLO of a stall (before or after their due time) | "
        f"{r.errors_near_stalls} of {r.errors} |",
        f"| errors the load generator sent > {1000 * _LATE_SEND_S:g} ms late | "
        f"{r.errors_sent_late} of {r.errors} |",
        "",
        *_verdicts(r.checks()),
        "",
    ]
    return "\n".join(lines)


def drain_markdown(r: DrainResult) -> str:
    lost = _counts(r.lost)
    lines = [
        f"### SIGTERM under load: `{r.model}`, {r.rate_rps:g} requests/s of {r.batch} images",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| sent / OK / refused UNAVAILABLE | {r.sent} / {r.answered_ok} / {r.refused_unavailable} |",
        f"| accepted (sent before the first refusal) but not answered OK | {lost} |",
        f"| later requests refused with another code | {_counts(r.refused_other)} |",
        f"| sent before the signal, answered after it | {r.backlog_served} |",
        f"| OK although sent after a refusal came back | {r.ok_after_first_refusal} |",
        f"| exit code, signal to exit | {r.exit_code}, {r.drain_s:g} s |",
        "",
        *_verdicts(r.checks()),
        "",
    ]
    return "\n".join(lines)


# -- a server to measure -------------------------------------------------------------------------
@dataclass
class EdgeProcess:
    """`rtq serve` in its own process (so the load generator never shares its GIL)."""

    proc: object  # subprocess.Popen
    url: str
    metrics_url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_edge_process(
    repository, models: list[str], max_queue: int = 64, threads: int | None = None, timeout: float = 300.0
) -> EdgeProcess:
    """Start `python -m serving.cli serve` on free loopback ports and wait until `models` are ready."""
    import json
    import subprocess
    import sys

    from serving.errors import RtqError
    from serving.settings import PROJECT_ROOT

    cmd = [sys.executable, "-m", "serving.cli", "serve", "--repository", str(repository), "--models", *models]
    cmd += ["--grpc-port", "0", "--metrics-port", "0", "--max-queue", str(max_queue), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    deadline = time.monotonic() + timeout
    listening, states = None, {}
    while len(states) < len(models) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RtqError(f"rtq serve exited with code {proc.wait()} before its models loaded")
        event = json.loads(line)
        if event.get("event") == "listening":
            listening = event
        elif event.get("event") == "model":
            states[event["name"]] = (event["state"], event["reason"])
    bad = {n: why for n, (st, why) in states.items() if st != "READY"}
    if listening is None or len(states) < len(models) or bad:
        proc.kill()
        raise RtqError(f"rtq serve did not get {models} ready: {bad or 'timed out'}")
    # Later events are not read; a closed pipe would only matter if the server logged a lot.
    return EdgeProcess(proc, listening["grpc"], listening["metrics"])
