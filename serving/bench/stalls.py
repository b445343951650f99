"""Machine stalls seen from outside the server and the load generator: a real-time sleeper process.

A soak's rare errors come in bursts when the whole machine stops for tens of ms (on a shared VM the
host can preempt both cores). Neither the server nor the load generator can tell that from their own
slowness; a third process that only sleeps 1 ms at a time, at real-time priority where allowed, can:
when it wakes late, nothing on the machine was running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

_PERIOD_S = 0.001


@dataclass(frozen=True)
class Stall:
    start: float  # time.monotonic() seconds (CLOCK_MONOTONIC: the same clock in every process)
    end: float

    @property
    def ms(self) -> float:
        return 1000 * (self.end - self.start)


def _raise_priority() -> str:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "normal"


def watch(threshold_s: float, out=sys.stdout) -> None:
    """Sleep `_PERIOD_S` at a time forever; print each late wake-up as a JSON [start, end] line."""
    print(json.dumps({"priority": _raise_priority()}), file=out, flush=True)
    last = time.monotonic()
    while True:
        time.sleep(_PERIOD_S)
        now = time.monotonic()
        if now - last - _PERIOD_S > threshold_s:
            print(json.dumps([last, now]), file=out, flush=True)
        last = now


class StallWatch:
    """Runs `watch` in its own process while the block runs; `stalls` and `priority` after it."""

    def __init__(self, threshold_ms: float = 20.0):
        self.threshold_ms = threshold_ms
        self.stalls: list[Stall] = []
        self.priority = "not started"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> StallWatch:
        cmd = [sys.executable, "-m", "serving.bench.stalls", "--threshold-ms", str(self.threshold_ms)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.priority = json.loads(self._proc.stdout.readline() or "{}").get("priority", "failed to start")
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None, "StallWatch is not running"
        return self._proc.pid

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        lines, _ = self._proc.communicate(timeout=10)
        self.stalls = [Stall(*json.loads(line)) for line in lines.splitlines() if line.startswith("[")]

    def near(self, due: float, slo_s: float) -> Stall | None:
        """A stall within (due - slo_s, due + slo_s): one that could have made that request miss,
        directly or through the queue it left behind (at 80% load the work piled up in a stall drains
        at a fifth of compute speed: a 35 ms stall takes ~140 ms)."""
        return next((s for s in self.stalls if s.start < due + slo_s and s.end > due - slo_s), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="print late wake-ups of a 1 ms sleeper (machine stalls)")
    ap.add_argument("--threshold-ms", type=float, default=20.0)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        watch(args.threshold_ms / 1000)


if __name__ == "__main__":
    main()
