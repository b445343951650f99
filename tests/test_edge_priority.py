"""Inference threads run below the event loop's priority, and the runtimes' own pools with them."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from serving.bench.stress import start_edge_process
from serving.edge.priority import lower_current_thread, nice_of_current_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")

ORT = "efficientnet_lite0-int8-onnxruntime"
OV = "efficientnet_lite0-int8-openvino"


def _threads(pid: int) -> list[tuple[str, int]]:
    """(name, nice) of every thread of a process."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out.append((name, os.getpriority(os.PRIO_PROCESS, int(task.name))))
        except (ProcessLookupError, FileNotFoundError, OSError):
            continue  # ended while listed
    return out


def test_a_lowered_thread_starts_lowered_threads_and_leaves_its_caller_alone():
    base = nice_of_current_thread()
    seen: list[int] = []

    def work() -> None:
        lower_current_thread(3)
        seen.append(nice_of_current_thread())
        t = threading.Thread(target=lambda: seen.append(nice_of_current_thread()))
        t.start()
        t.join()
        lower_current_thread(100)  # capped, not an error
        seen.append(nice_of_current_thread())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [min(19, base + 3), min(19, base + 3), 19]
    assert nice_of_current_thread() == base


def test_rtq_serve_computes_lowered_while_grpc_and_the_event_loop_do_not(small_repository: Path):
    """OpenVINO's import forks (telemetry) and gRPC restarts its threads from the forking thread:
    the server imports the runtimes before lowering, so gRPC's threads keep their priority."""
    edge = start_edge_process(small_repository, [ORT, OV])
    try:
        base = nice_of_current_thread()  # what `rtq serve` started with, from this thread
        threads = _threads(edge.proc.pid)
        lowered = [name for name, n in threads if n == min(19, base + 10)]
        # Two instance threads, ONNX Runtime's intra-op worker and OpenVINO's workers.
        assert len(lowered) >= 3, threads
        grpc_threads = [
            (name, n) for name, n in threads if name.startswith(("event_engine", "grpc", "lifeguard"))
        ]
        assert grpc_threads and all(n == base for _, n in grpc_threads), grpc_threads
        # The main thread runs the event loop (`rtq serve`): not lowered.
        assert os.getpriority(os.PRIO_PROCESS, edge.proc.pid) == base
    finally:
        edge.stop()
