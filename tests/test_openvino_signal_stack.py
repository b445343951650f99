"""OpenVINO's CPU plugin swaps the thread's alternate signal stack: a later signal must still be handled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.settings import PROJECT_ROOT

# Two runners alive at once, released first-in-first-out (what hot reload, `rtq bench` and a test
# session do), then a signal with a Python handler: Python installs its handlers with SA_ONSTACK, so
# the kernel builds the handler's frame on the alternate stack. Before the fix that stack was the
# first plugin's, unmapped by then: the process died with SIGSEGV and no traceback.
SCRIPT = """
import faulthandler, gc, os, signal, sys
faulthandler.enable()
from serving.runtimes import open_runner
from serving.runtimes.signal_stack import signal_stack
before = signal_stack()
first = open_runner("openvino", sys.argv[1], "int8")
second = open_runner("openvino", sys.argv[1], "int8")
del first; gc.collect()
del second; gc.collect()
handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled" if handled else "not handled", signal_stack() == before)
"""


def test_a_signal_after_two_openvino_runners_is_handled(small_repository: Path):
    model = small_repository / "efficientnet_lite0-int8-openvino/1/model.xml"
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["handled", "True"], r.stdout
