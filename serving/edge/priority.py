"""Inference threads run below the priority of the gRPC event loop.

When a model saturates the cores, the event loop (admission, refusals, answers) otherwise waits for
a scheduler slice behind the compute threads: under overload a refusal then takes tens of ms
instead of about one. Linux keeps a nice value per thread and a new thread inherits its creator's,
so a runtime session created from a lowered thread starts its worker pool lowered too.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

MAX_NICE = 19


def lower_current_thread(by: int) -> None:
    """Raise this thread's nice value by `by` (capped at 19); a no-op for 0 or where threads have
    no priority of their own (not Linux)."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + by))


def call_lowered(fn: Callable[[], T], by: int) -> T:
    """fn() on a new thread lowered by `by`; its result, or its exception raised here."""
    if by <= 0:
        return fn()
    box: list = []

    def run() -> None:
        lower_current_thread(by)
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            box.append((False, exc))

    t = threading.Thread(target=run, name="lowered-load", daemon=True)
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def nice_of_current_thread() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
