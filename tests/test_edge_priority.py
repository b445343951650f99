"""Inference threads run below the event loop's priority, and the runtimes' own pools with them."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from serving.edge.priority import call_lowered, nice_of_current_thread
from serving.edge.server import EdgeConfig, EdgeServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")

ORT = "efficientnet_lite0-int8-onnxruntime"


def _nice_by_thread() -> dict[int, int]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = os.getpriority(os.PRIO_PROCESS, int(task.name))
        except (ProcessLookupError, OSError):
            continue  # ended while listed
    return out


def test_call_lowered_runs_lowered_and_threads_it_starts_inherit():
    base = nice_of_current_thread()
    seen: list[int] = []

    def work() -> int:
        t = threading.Thread(target=lambda: seen.append(nice_of_current_thread()))
        t.start()
        t.join()
        return nice_of_current_thread()

    assert call_lowered(work, 3) == min(19, base + 3) and seen == [min(19, base + 3)]
    assert nice_of_current_thread() == base  # the caller itself is untouched
    assert call_lowered(work, 0) == base  # 0: runs right here

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        call_lowered(fail, 3)


def test_served_model_computes_lowered_while_the_event_loop_does_not(small_repository: Path):
    base = nice_of_current_thread()
    before = set(_nice_by_thread())
    srv = EdgeServer(
        EdgeConfig(small_repository, grpc_port=0, metrics_port=None, models=[ORT], compute_nice=7)
    )
    srv.start()
    try:
        new = {tid: n for tid, n in _nice_by_thread().items() if tid not in before}
        lowered = [tid for tid, n in new.items() if n == min(19, base + 7)]
        # The instance thread and ONNX Runtime's intra-op pool (2 threads: the caller + 1 worker).
        assert len(lowered) >= 2, new
        # gRPC's threads and the event loop answer at the caller's priority.
        assert any(n == base for n in new.values()), new
        assert srv.models[ORT].ready
    finally:
        srv.stop()
