"""Dynamic batching for one model: a bounded queue and one thread per instance, each with its own runner.

Each model has its own queue and instance threads, so a slow or saturated model never holds back
another one (no head-of-line blocking across models). Within a model, requests stay in FIFO order.

Batch forming follows the model's `dynamic_batching` config: at most `max_batch_size` images, the
largest preferred size that is already queued, and otherwise a wait of at most
`max_queue_delay_microseconds` for the next preferred size. The wait is spent only when requests
arrive faster than the delay (estimated from recent inter-arrival times): under light load,
waiting could never fill a batch and would only add the whole delay to every request.

Admission: `submit` raises at once when the queue is full (QueueFull) or when a request's deadline
is too short for the work already queued ahead of it (CannotMeetDeadline): under overload the excess
is refused fast instead of timing out in the queue. The predicted wait (images ahead x the median
compute time per image of the last batches) is corrected by how it has recently erred: every
admitted request reports actual/predicted time, and a quantile of the last 256 ratios (of long
predictions, once there are some) multiplies the next predictions: the 95th percentile while the
model is overloaded, the median otherwise. Uncorrected, a queue filled right up to the deadline
missed it for 40% of the admitted requests at 2x capacity, since batch times vary under load.
`admit_fraction` (0.9 by default) keeps the rest of each deadline for the answer's way back.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.runtimes.base import Runner

# Smoothing of the inter-arrival estimate: ~10 recent requests dominate.
_EWMA = 0.2
# The compute time per image that predicts a new request's wait: the median of the last batches. An
# average let one batch stalled by the machine (40 ms) inflate it 2.5x, and the next few requests,
# with a short queue ahead and 98 ms left, were refused as if they could not be served in time.
_COMPUTE_WINDOW = 16
# The wait correction: a high quantile of actual/predicted over recent requests, bounded. p99 let
# three slow outliers in 256 shut admission down to a fifth of capacity on a noisy machine; p90
# left ~1% of admitted requests late at 2x overload; p95 (13 outliers needed) left 0.1-0.2%.
_RATIO_WINDOW = 256
_RATIO_QUANTILE = 0.95
_MAX_CORRECTION = 4.0
# Only predictions that used a fifth of their request's time or more teach the correction, once 16
# of them are at hand: short waits err by a few ms of fixed overhead, which as a ratio (p95 ~1.6 at
# 150 req/s) inflated the rare long prediction of a short-lived swell (p95 of its own ratio ~1.3)
# past the deadline, and refused requests that would have been answered in time.
_LONG_SHARE = 0.2
_LONG_MIN = 16
# The quantile depends on load. Overloaded (the last half second brought more work than a half
# second of compute), a queue stays full and every admitted request is at the edge of its deadline:
# the p95 keeps them in time. Below that, a queue swells only for a moment (a machine stall, a burst
# of arrivals) and the typical error (median) decides: at 80% load the p95 refused 141 requests in
# 10 min whose predictions were 48-72 ms against 75-99 ms left, each a sure error instead of a likely
# success.
_LOAD_WINDOW_S = 0.5
_TYPICAL_QUANTILE = 0.5
# The answer still has to travel back once computed: admitting right up to the deadline left ~1%
# of admitted requests at 100-102 ms against a 100 ms SLO at 2x overload; keeping 5% back still
# left the admitted p99 at 101.0 ms, as seen by a load generator on the same 2 cores (12-02), so
# 10% is kept back.
DEFAULT_ADMIT_FRACTION = 0.9


class QueueFull(Exception):
    """The model's queue holds `max_queue_size` requests already."""


class Expired(Exception):
    """The request's deadline passed while it waited; it was dropped before compute."""


class CannotMeetDeadline(Expired):
    """Refused on arrival: the work queued ahead would outlast the request's deadline."""


class ModelStopped(Exception):
    """The model was unloaded (server shutting down) before the request ran."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 64
    instances: int = 1
    # Of a request's remaining time, the share the corrected predicted wait may use.
    admit_fraction: float = DEFAULT_ADMIT_FRACTION

    def __post_init__(self) -> None:
        if not 0 < self.admit_fraction <= 1:
            raise ValueError(f"admit_fraction must be in (0, 1], got {self.admit_fraction}")


@dataclass
class Pending:
    """One request in the queue: `done(logits, None)` or `done(None, exc)` is called exactly once."""

    batch: np.ndarray
    deadline: float | None  # time.monotonic() seconds
    done: Callable[[np.ndarray | None, BaseException | None], None]
    enqueued: float = field(default_factory=time.monotonic)
    predicted_s: float | None = None  # enqueue -> answer, as admission predicted it (uncorrected)
    long_wait: bool = False  # the prediction used _LONG_SHARE of the request's time or more
    # Run on the instance thread just before compute (e.g. uint8 -> normalised float32): keeps that
    # work off the event loop, and a request refused on arrival never pays for it.
    prepare: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def size(self) -> int:
        return int(self.batch.shape[0])

    def model_input(self) -> np.ndarray:
        return self.batch if self.prepare is None else self.prepare(self.batch)


def model_input(batch: Sequence[Pending]) -> np.ndarray:
    """One array for the runtime. Requests sharing one `prepare` are joined first and prepared in
    one pass (uint8 pixels are a quarter of the float bytes to copy)."""
    prepares = {id(p.prepare) for p in batch}
    if len(prepares) == 1:
        joined = batch[0].batch if len(batch) == 1 else np.concatenate([p.batch for p in batch])
        return joined if batch[0].prepare is None else batch[0].prepare(joined)
    return np.concatenate([p.model_input() for p in batch])


def wait_correction(ratios: Sequence[float], quantile: float = _RATIO_QUANTILE) -> float:
    """What predicted waits are multiplied by: a quantile (p95 unless told) of recent
    actual/predicted ratios, never below 1 (an early finish is no reason to admit more) nor above 4."""
    if not ratios:
        return 1.0
    ordered = sorted(ratios)
    q = ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]
    return min(_MAX_CORRECTION, max(1.0, q))


@dataclass
class BatchObserver:
    """Where the batcher reports what it did (metrics); no-ops by default."""

    queued: Callable[[float], None] = lambda seconds: None
    computed: Callable[[int, float], None] = lambda images, seconds: None
    depth: Callable[[int], None] = lambda depth: None


class ModelBatcher:
    def __init__(self, runners: list[Runner], policy: BatchPolicy, observer: BatchObserver | None = None):
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.policy = policy
        self.observer = observer or BatchObserver()
        self._runners = runners
        self._queue: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._refusing = False  # draining: what is queued runs, nothing new is taken
        self._last_arrival: float | None = None
        self._interarrival = float("inf")
        self._per_image_s: float | None = None  # recent compute time per image; None until a batch ran
        self._per_image_recent: deque[float] = deque(maxlen=_COMPUTE_WINDOW)
        self._ratios: deque[float] = deque(maxlen=_RATIO_WINDOW)  # actual / predicted wait
        self._long_ratios: deque[float] = deque(maxlen=_RATIO_WINDOW)  # the same, long waits only
        self._correction = 1.0  # p95: while overloaded
        self._typical_correction = 1.0  # median: otherwise
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, images) in the last _LOAD_WINDOW_S
        self._arriving_images = 0
        self._queued_images = 0
        self._computing_images = 0  # in batches being computed now
        self._threads = [
            threading.Thread(target=self._loop, args=(r,), name=f"instance-{i}", daemon=True)
            for i, r in enumerate(runners)
        ]
        for t in self._threads:
            t.start()

    def submit(self, item: Pending) -> None:
        with self._cond:
            if self._stopping or self._refusing:
                raise ModelStopped()
            now = item.enqueued
            self._arrivals.append((now, item.size))
            self._arriving_images += item.size
            while self._arrivals[0][0] < now - _LOAD_WINDOW_S:
                self._arriving_images -= self._arrivals.popleft()[1]
            if len(self._queue) >= self.policy.max_queue_size:
                raise QueueFull()
            ahead = self._computing_images + self._queued_images
            if self._per_image_s is not None:
                capacity = self.policy.instances / self._per_image_s  # images per second
                overloaded = self._arriving_images >= capacity * _LOAD_WINDOW_S
                correction = self._correction if overloaded else self._typical_correction
                wait = (ahead + item.size) * self._per_image_s / self.policy.instances
                remaining = None if item.deadline is None else item.deadline - now
                # Under overload a request that cannot be served in time is told so at once,
                # instead of waiting out its whole deadline in the queue and being dropped then.
                # With nothing ahead it always runs: that keeps the estimate and its correction
                # current (a correction learned in a burst would otherwise refuse everything).
                if (
                    ahead
                    and remaining is not None
                    and wait * correction > self.policy.admit_fraction * remaining
                ):
                    raise CannotMeetDeadline()
                item.predicted_s = wait
                item.long_wait = remaining is not None and wait >= _LONG_SHARE * remaining
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._interarrival = (
                    gap
                    if self._interarrival == float("inf")
                    else ((1 - _EWMA) * self._interarrival + _EWMA * gap)
                )
            self._last_arrival = now
            self._queue.append(item)
            self._queued_images += item.size
            self.observer.depth(len(self._queue))
            self._cond.notify_all()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def refuse_new(self) -> None:
        """First step of a drain: new requests get ModelStopped; queued and running ones finish."""
        with self._cond:
            self._refusing = True

    def idle(self) -> bool:
        """Nothing queued and nothing computing."""
        with self._cond:
            return not self._queue and not self._computing_images

    def _ready(self, queued: int) -> bool:
        return queued >= self.policy.max_batch_size or queued in self.policy.preferred_batch_sizes

    def _take(self, now: float) -> list[Pending]:
        """Pop a batch (lock held): live requests only, FIFO, within max_batch_size, cut back to the
        largest preferred size when one is reachable by a prefix of the queue."""
        batch: list[Pending] = []
        total = 0
        while self._queue:
            head = self._queue[0]
            # One that would finish after its deadline even if computed now is dropped too when
            # others wait behind it: its client has given up by then, and they can use the compute.
            late = now + (self._per_image_s or 0.0) * head.size if len(self._queue) > 1 else now
            if head.deadline is not None and head.deadline <= late:
                self._queue.popleft()
                self._queued_images -= head.size
                head.done(None, Expired())
                continue
            if total + head.size > self.policy.max_batch_size:
                break
            batch.append(self._queue.popleft())
            total += head.size
        preferred = set(self.policy.preferred_batch_sizes)
        if preferred and total not in preferred:
            sums = np.cumsum([p.size for p in batch]).tolist()
            cuts = [i + 1 for i, s in enumerate(sums) if s in preferred]
            if cuts:
                for p in reversed(batch[cuts[-1] :]):
                    self._queue.appendleft(p)
                batch = batch[: cuts[-1]]
        taken = sum(p.size for p in batch)
        self._queued_images -= taken
        self._computing_images += taken
        return batch

    def _gather(self) -> list[Pending] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._queue:
                return None
            delay = self.policy.max_queue_delay_s
            if delay > 0 and self._interarrival < delay:
                wait_until = self._queue[0].enqueued + delay
                while not self._stopping and not self._ready(sum(p.size for p in self._queue)):
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch = self._take(time.monotonic())
            self.observer.depth(len(self._queue))
            return batch

    def _loop(self, runner: Runner) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            if not batch:
                continue
            start = time.monotonic()
            images = sum(p.size for p in batch)
            for p in batch:
                self.observer.queued(start - p.enqueued)
            try:
                x = model_input(batch)
                logits = runner.infer(x)
                # Rows are handed out by position: a runner answering the wrong count would give
                # requests each other's (or no) results.
                rows = getattr(logits, "shape", (None,))[0]
                if rows != x.shape[0]:
                    raise RuntimeError(f"runner returned {rows} rows for a batch of {x.shape[0]} images")
            except Exception as exc:  # a runtime failure fails this batch, not the instance
                with self._cond:
                    self._computing_images -= images
                self._settle([(p, None, exc) for p in batch])
                continue
            finished = time.monotonic()
            seconds = finished - start
            self.observer.computed(images, seconds)
            with self._cond:
                self._computing_images -= images
                measured = [(p, (finished - p.enqueued) / p.predicted_s) for p in batch if p.predicted_s]
                if measured:
                    self._ratios.extend(r for _, r in measured)
                    self._long_ratios.extend(r for p, r in measured if p.long_wait)
                    long_enough = len(self._long_ratios) >= _LONG_MIN
                    learned = self._long_ratios if long_enough else self._ratios
                    self._correction = wait_correction(learned)
                    self._typical_correction = wait_correction(learned, _TYPICAL_QUANTILE)
                self._per_image_recent.append(seconds / max(1, images))
                self._per_image_s = statistics.median(self._per_image_recent)
            offset = 0
            answers = []
            for p in batch:
                answers.append((p, logits[offset : offset + p.size], None))
                offset += p.size
            self._settle(answers)

    @staticmethod
    def _settle(answers: list[tuple[Pending, np.ndarray | None, BaseException | None]]) -> None:
        # A failing callback (its event loop already closed) must not end this instance thread or
        # leave the rest of the batch unanswered.
        for p, logits, exc in answers:
            try:
                p.done(logits, exc)
            except Exception:  # noqa: BLE001, S112
                continue

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the instance threads and close the runners."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        with self._cond:
            while self._queue:
                self._queue.popleft().done(None, ModelStopped())
            self._queued_images = 0
        for r in self._runners:
            r.close()
