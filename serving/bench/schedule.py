"""Open-loop load scheduling: when each query is due, and latency counted from that moment.

A closed-loop client sends the next query only after the previous one returned, so a slow answer
delays the following sends and the queueing it caused is never measured (coordinated omission).
Here every query has a due time fixed in advance (a camera frame every 1/fps s, or Poisson
arrivals); the sender never waits for answers, and latency runs from the due time, so a late send
(an overloaded load generator) and server queueing both count.

Pure Python + numpy: imported by the Locust file (no OpenVINO there) and by the scenarios.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FrameSchedule:
    """A camera stream: frame k is due at start + phase + k / fps."""

    fps: float
    start: float
    phase: float = 0.0

    def __post_init__(self) -> None:
        if not self.fps > 0 or not math.isfinite(self.fps):
            raise ValueError(f"fps must be a positive number, got {self.fps}")

    @property
    def interval(self) -> float:
        return 1.0 / self.fps

    def due(self, k: int) -> float:
        return self.start + self.phase + k * self.interval


class PoissonSchedule:
    """Poisson arrivals at `rate` per second (MLPerf's server scenario): exponential gaps, seeded."""

    def __init__(self, rate: float, start: float, seed: int = 0):
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number, got {rate}")
        self.rate = rate
        self._rng = random.Random(seed)
        self._times = [start]

    def due(self, k: int) -> float:
        # Sequential use is the norm; the list keeps earlier due times stable if asked again.
        while len(self._times) <= k:
            self._times.append(self._times[-1] + self._rng.expovariate(self.rate))
        return self._times[k]


def latency_from_schedule(due: float, finished: float) -> float:
    """Seconds from when the query was due (not when it was actually sent) to its answer."""
    return max(0.0, finished - due)


# Relative bucket width 1%: percentiles good to ~0.5% at any scale, merges are dict sums.
_GROWTH = 1.01
_FLOOR_MS = 0.01


class LatencyHistogram:
    """Log-bucketed latencies in ms, mergeable across processes (Locust workers) as plain dicts."""

    def __init__(self, counts: dict[int, int] | None = None):
        self.counts: dict[int, int] = dict(counts or {})

    @staticmethod
    def _bucket(ms: float) -> int:
        return int(math.floor(math.log(max(ms, _FLOOR_MS) / _FLOOR_MS, _GROWTH)))

    @staticmethod
    def _value(bucket: int) -> float:
        # Upper edge: a percentile never understates the latency.
        return _FLOOR_MS * _GROWTH ** (bucket + 1)

    def add(self, ms: float) -> None:
        b = self._bucket(ms)
        self.counts[b] = self.counts.get(b, 0) + 1

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def merge(self, other: LatencyHistogram | dict) -> None:
        counts = other.counts if isinstance(other, LatencyHistogram) else other
        for b, n in counts.items():
            b = int(b)  # JSON (Locust's worker reports) turns keys into strings
            self.counts[b] = self.counts.get(b, 0) + int(n)

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> float | None:
        """Latency (ms) at quantile q in [0, 100]; None when empty."""
        total = self.n
        if total == 0:
            return None
        rank = max(1, math.ceil(q / 100 * total))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return round(self._value(b), 3)
        return round(self._value(max(self.counts)), 3)

    def to_dict(self) -> dict[str, int]:
        return {str(b): n for b, n in self.counts.items()}

    def cdf(self) -> tuple[list[float], list[float]]:
        """(latency ms, fraction of queries at or below it) per occupied bucket, for plots."""
        total, seen, xs, ys = self.n, 0, [], []
        for b in sorted(self.counts):
            seen += self.counts[b]
            xs.append(round(self._value(b), 3))
            ys.append(seen / total)
        return xs, ys


@dataclass
class StreamStats:
    """What a load generator saw, mergeable: counts plus latency (from due time) and send lag."""

    sent: int = 0
    answered: int = 0
    errors: int = 0
    deadline_misses: int = 0
    overloaded: int = 0  # frames not sent: too many still in flight (counted as misses too)
    labelled: int = 0
    correct: int = 0
    first_due: float | None = None
    last_due: float | None = None
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    send_lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    error_codes: dict[str, int] = field(default_factory=dict)

    def record(
        self,
        due: float,
        finished: float,
        sent_at: float,
        deadline_s: float,
        error: str | None = None,
        correct: bool | None = None,
    ) -> bool:
        """Count one measured query; returns True when it missed its deadline."""
        self.sent += 1
        self.first_due = due if self.first_due is None else min(self.first_due, due)
        self.last_due = due if self.last_due is None else max(self.last_due, due)
        self.send_lag.add(1000 * max(0.0, sent_at - due))
        latency_s = latency_from_schedule(due, finished)
        missed = error is not None or latency_s > deadline_s
        if error is not None:
            self.errors += 1
            self.error_codes[error] = self.error_codes.get(error, 0) + 1
        else:
            self.answered += 1
            self.latency.add(1000 * latency_s)
            if correct is not None:
                self.labelled += 1
                self.correct += int(correct)
        self.deadline_misses += int(missed)
        return missed

    def record_overload(self, due: float) -> None:
        self.sent += 1
        self.overloaded += 1
        self.deadline_misses += 1
        self.first_due = due if self.first_due is None else min(self.first_due, due)
        self.last_due = due if self.last_due is None else max(self.last_due, due)

    def merge(self, other: StreamStats | dict) -> None:
        o = other if isinstance(other, StreamStats) else StreamStats.from_dict(other)
        for name in ("sent", "answered", "errors", "deadline_misses", "overloaded", "labelled", "correct"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        if o.first_due is not None:
            self.first_due = o.first_due if self.first_due is None else min(self.first_due, o.first_due)
        if o.last_due is not None:
            self.last_due = o.last_due if self.last_due is None else max(self.last_due, o.last_due)
        self.latency.merge(o.latency)
        self.send_lag.merge(o.send_lag)
        for k, n in o.error_codes.items():
            self.error_codes[k] = self.error_codes.get(k, 0) + n

    def to_dict(self) -> dict:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "errors": self.errors,
            "deadline_misses": self.deadline_misses,
            "overloaded": self.overloaded,
            "labelled": self.labelled,
            "correct": self.correct,
            "first_due": self.first_due,
            "last_due": self.last_due,
            "latency": self.latency.to_dict(),
            "send_lag": self.send_lag.to_dict(),
            "error_codes": dict(self.error_codes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StreamStats:
        s = cls(
            **{
                k: d[k]
                for k in (
                    "sent",
                    "answered",
                    "errors",
                    "deadline_misses",
                    "overloaded",
                    "labelled",
                    "correct",
                    "first_due",
                    "last_due",
                )
            }
        )
        s.latency.merge(d.get("latency", {}))
        s.send_lag.merge(d.get("send_lag", {}))
        s.error_codes = dict(d.get("error_codes", {}))
        return s

    def summary(self, seconds: float | None = None) -> dict:
        """p50/p90/p99 from due time, throughput over the measured window, miss rate, accuracy."""
        if seconds is None and self.first_due is not None and self.last_due is not None:
            seconds = self.last_due - self.first_due
        rate = self.answered / seconds if seconds and seconds > 0 else None
        return {
            "queries": self.sent,
            "answered": self.answered,
            "errors": self.errors,
            "error_codes": dict(self.error_codes),
            "deadline_misses": self.deadline_misses,
            "deadline_miss_rate": round(self.deadline_misses / self.sent, 5) if self.sent else None,
            "not_sent_overloaded": self.overloaded,
            "p50_ms": self.latency.percentile(50),
            "p90_ms": self.latency.percentile(90),
            "p99_ms": self.latency.percentile(99),
            "send_lag_p99_ms": self.send_lag.percentile(99),
            "throughput_per_s": round(rate, 2) if rate is not None else None,
            "labelled": self.labelled,
            "accuracy": round(self.correct / self.labelled, 5) if self.labelled else None,
            "seconds": round(seconds, 3) if seconds else None,
        }
