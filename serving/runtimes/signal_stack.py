"""Keep the calling thread's alternate signal stack across code that swaps it and frees it later.

OpenVINO's CPU plugin (for AMX's larger signal frames) installs a signal stack of its own on the
thread that creates it, and on destruction puts back the one it found and unmaps its own. Two
plugins alive at once and destroyed first-in-first-out leave the thread pointing at unmapped memory;
Python installs every handler with SA_ONSTACK, so the next handled signal (Ctrl-C, SIGTERM, torch's
SIGCHLD) kills the process with SIGSEGV and no traceback. Putting the previous stack back right after
the plugin is created makes every plugin save that same live stack, whatever order they go in.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

_SS_DISABLE = 2


class _Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def signal_stack() -> tuple[int, int] | None:
    """(address, size) of this thread's alternate signal stack; (0, 0) when it has none; None off Linux."""
    libc = _libc()
    if libc is None:
        return None
    st = _Stack()
    if libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return (0, 0) if st.ss_flags & _SS_DISABLE else (st.ss_sp or 0, st.ss_size)


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Whatever runs inside may install a signal stack; the thread's previous one is back afterwards."""
    libc = _libc()
    before = _Stack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    before.ss_flags &= _SS_DISABLE  # drop SS_ONSTACK: a report, not a flag sigaltstack accepts
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)
