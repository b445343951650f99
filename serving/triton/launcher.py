"""Start, wait for and stop the real `tritonserver` shipped in the nvidia-pytriton wheel.

The wheel's server has only the python backend. Its stub must sit next to libtriton_python.so in
a backend directory we assemble, the bundled libraries come from `nvidia_pytriton.libs`, and every
listener is bound to the address we give (loopback by default).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import RtqError
from serving.settings import PROJECT_ROOT
from serving.triton.pyrepo import site_packages, write_python_repository

_UTILS = "triton_python_backend_utils.py"
# The stub's isolated interpreter imports this module (which imports numpy) before any model.py
# runs, so the environment's site-packages must be on sys.path by then: this shim puts it there
# and then runs the wheel's own module in its place.
_UTILS_SHIM = """import sys
for _p in {paths!r}:
    if _p not in sys.path:
        sys.path.insert(0, _p)
_original = {original!r}
with open(_original) as _f:
    exec(compile(_f.read(), _original, "exec"))
"""


@dataclass
class TritonPaths:
    binary: Path
    backend_python: Path  # folder holding libtriton_python.so
    stub: Path
    libs: Path

    @classmethod
    def find(cls) -> TritonPaths:
        try:
            import pytriton
        except ImportError:
            raise RtqError("nvidia-pytriton is not installed; run `.venv/bin/pip install -e .`") from None
        root = Path(pytriton.__file__).parent / "tritonserver"
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        paths = cls(
            binary=root / "bin" / "tritonserver",
            backend_python=root / "backends" / "python",
            stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
            libs=Path(site_packages()) / "nvidia_pytriton.libs",
        )
        for p in (paths.binary, paths.backend_python, paths.stub, paths.libs):
            if not p.exists():
                raise RtqError(f"nvidia-pytriton lacks {p}; reinstall it for Python {py}")
        return paths


@dataclass
class TritonConfig:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    models: list[str] | None = None
    work_dir: Path | None = None  # derived repository + backend dir; a temp dir by default
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    def __init__(self, config: TritonConfig):
        self.config = config
        self.paths = TritonPaths.find()
        self._own_work = config.work_dir is None
        self.work = Path(config.work_dir or tempfile.mkdtemp(prefix="rtq-triton-"))
        self.process: subprocess.Popen | None = None
        self.log_path = self.work / "tritonserver.log"
        self.model_states: dict[str, tuple[str, str]] = {}
        self.restarts = 0

    def _prepare(self) -> list[str]:
        self.work.mkdir(parents=True, exist_ok=True)
        names = write_python_repository(self.config.repository, self.work / "repository", self.config.models)
        backend = self.work / "backends" / "python"
        if backend.exists():
            shutil.rmtree(backend)
        backend.mkdir(parents=True)
        for f in self.paths.backend_python.iterdir():
            if f.is_file() and f.name != _UTILS:
                (backend / f.name).symlink_to(f)
        (backend / _UTILS).write_text(
            _UTILS_SHIM.format(
                paths=[site_packages(), str(PROJECT_ROOT)], original=str(self.paths.backend_python / _UTILS)
            )
        )
        # The stub is found next to libtriton_python.so; a copy, since the wheel's may be read-only.
        shutil.copy2(self.paths.stub, backend / self.paths.stub.name)
        (backend / self.paths.stub.name).chmod(0o755)
        return names

    def command(self) -> list[str]:
        c = self.config
        return [
            str(self.paths.binary),
            f"--model-repository={self.work / 'repository'}",
            f"--backend-directory={self.work / 'backends'}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--http-address={c.host}",
            f"--http-port={c.http_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            "--allow-gpu-metrics=false",
            # Like the edge server: a broken variant is reported UNAVAILABLE, the others serve.
            "--exit-on-error=false",
            "--strict-readiness=false",
            "--exit-timeout-secs=10",
            f"--log-verbose={c.log_verbose}",
            *c.extra_args,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self.paths.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def start(self, timeout: float = 180.0, log_to_file: bool = True) -> TritonServer:
        self._spawn(timeout, "wb" if log_to_file else None)
        return self

    def _spawn(self, timeout: float, log_mode: str | None) -> None:
        names = self._prepare()
        out = open(self.log_path, log_mode) if log_mode else None  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            self.command(), env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.wait_ready(names, timeout)
        except BaseException:
            self.stop()
            raise

    def crashed(self) -> int | None:
        """The exit code when tritonserver ended by itself (crash, kill), else None."""
        if self.process is None:
            return None
        return self.process.poll()

    def restart(self, timeout: float = 180.0) -> None:
        """Start tritonserver again after it died, on the same ports and work dir; the log is
        appended to, so the crash stays readable above the new start."""
        if self.process is not None and self.process.poll() is None:
            raise RtqError("tritonserver is still running; stop it before a restart")
        self._reap_stubs()
        self.restarts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- rtq: restart {self.restarts} after exit code {self.crashed()} ---\n".encode())
        self._spawn(timeout, "ab")

    def _reap_stubs(self) -> None:
        """A killed tritonserver can leave its python-backend stubs behind in its process group,
        each holding a model's memory: end them before a new server loads its own."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(f"{self.config.host}:{self.config.grpc_port}")

    def wait_ready(self, names: list[str], timeout: float) -> None:
        """Wait until every model has loaded or failed; a failed one is reported, not fatal."""
        deadline = time.monotonic() + timeout
        client = self._client()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RtqError(
                    f"tritonserver exited with code {self.process.returncode} before it was "
                    f"ready: {self.log_tail()}"
                )
            try:
                # Triton opens its endpoints only after the initial load: live means every
                # model has loaded, failed, or was refused before loading (absent from the index).
                if client.is_server_live():
                    index = {m.name: m for m in client.get_model_repository_index().models}
                    self.model_states = {
                        n: (index[n].state, index[n].reason)
                        if n in index
                        else ("UNAVAILABLE", f"not in Triton's repository index; see {self.log_path}")
                        for n in names
                    }
                    if not any(state == "READY" for state, _ in self.model_states.values()):
                        raise RtqError(f"tritonserver loaded no model: {self.log_tail()}")
                    return
            except RtqError:
                raise
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        raise RtqError(f"tritonserver not ready after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        errors = [t for t in text if t.startswith("E") or "error" in t.lower()]
        return " | ".join((errors or text)[-lines:])[:600]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton then finishes in-flight requests, up to --exit-timeout-secs)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
