"""Inference threads run below the priority of the gRPC event loop.

When a model saturates the cores, the event loop (admission, refusals, answers) otherwise waits for
a scheduler slice behind the compute threads: under overload a refusal then takes tens of ms
instead of about one. Linux keeps a nice value per thread and a new thread inherits its creator's,
so the server lowers the one thread that loads the models: the runtimes' worker pools and the
batchers' instance threads it starts run lowered, the event loop and gRPC's threads do not.
"""

from __future__ import annotations

import os
import sys
import threading

MAX_NICE = 19


def lower_current_thread(by: int) -> None:
    """Raise this thread's nice value by `by` (capped at 19); a no-op for 0 or where threads have
    no priority of their own (not Linux)."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + by))


def nice_of_current_thread() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
