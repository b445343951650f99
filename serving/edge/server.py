"""The edge server process: gRPC (grpc.aio) + Prometheus endpoint + model loading + graceful drain.

`EdgeServer.start()` runs it on a background thread (tests, benchmarks); `serve()` runs it in the
foreground until SIGTERM/SIGINT, then stops taking requests, lets in-flight ones finish (up to
`grace_s`), and unloads the models.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from serving.edge.auth import TokenCheck, server_credentials
from serving.edge.batching import DEFAULT_ADMIT_FRACTION
from serving.edge.metrics import EdgeMetrics, serve_metrics
from serving.edge.models import DEFAULT_MAX_QUEUE, ServedModel, import_runtimes, load_repository
from serving.edge.priority import lower_current_thread
from serving.edge.service import InferenceService, generic_handler
from serving.edge.shared_memory import SharedMemoryRegions
from serving.errors import RtqError
from serving.repository.layout import list_variants

DEFAULT_MAX_MESSAGE = 32 * 1024 * 1024
LOOPBACK = "127.0.0.1"


@dataclass
class EdgeConfig:
    repository: Path
    host: str = LOOPBACK
    grpc_port: int = 8001
    metrics_port: int | None = 8002  # None: no scrape endpoint
    max_queue: int = DEFAULT_MAX_QUEUE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: mutual TLS, clients need a certificate signed by this CA
    models: list[str] | None = None  # None: every variant of the repository
    threads: int | None = None  # None: each config's intra-op threads
    compute_nice: int = 10  # inference threads this far below the event loop (serving/edge/priority.py)
    admit_fraction: float = DEFAULT_ADMIT_FRACTION  # serving/edge/batching.py: admission
    grace_s: float = 10.0
    handler_threads: int = 4  # image decoding pool
    shared_memory: bool = True  # Triton's system shared memory extension (serving/edge/shared_memory.py)
    # How often each loaded variant's files are compared with what was loaded (None: never).
    watch_interval_s: float | None = 2.0


class EdgeServer:
    def __init__(self, config: EdgeConfig, registry: CollectorRegistry | None = None):
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = EdgeMetrics(self.registry)
        names = config.models or list_variants(config.repository)
        if not names:
            raise RtqError(f"{config.repository} holds no variants; run `rtq build` or pass --repository")
        if bool(config.tls_cert) != bool(config.tls_key):
            raise RtqError("TLS needs both --tls-cert and --tls-key")
        if config.tls_client_ca and not config.tls_cert:
            raise RtqError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        # Every variant is known (not ready, "loading") from the first request on.
        self.models: dict[str, ServedModel] = {
            n: ServedModel(name=n, version="1", labels=("", "", "")) for n in names
        }
        self.service = InferenceService(
            self.models,
            self.metrics,
            TokenCheck(config.token),
            config.max_message_bytes,
            config.handler_threads,
            SharedMemoryRegions(enabled=config.shared_memory),
        )
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.loaded = threading.Event()
        self._watch_stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    async def _start_grpc(self) -> None:
        # gRPC's own limit sits above ours, so an oversized request reaches ModelInfer and is
        # answered (and counted) there; far larger ones are cut off by gRPC itself.
        hard_limit = 4 * self.config.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", hard_limit),
                ("grpc.max_send_message_length", hard_limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._server.add_generic_rpc_handlers((generic_handler(self.service),))
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            if self.config.tls_cert:
                port = self._server.add_secure_port(
                    address,
                    server_credentials(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca),
                )
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc raises "Failed to bind ..." with a multi-line hint
            port = 0
        if port == 0:
            raise RtqError(f"cannot bind gRPC to {address} (port in use?)")
        self.grpc_port = port
        await self._server.start()
        if self.config.metrics_port is not None:
            try:
                self._metrics_http, _ = serve_metrics(
                    self.registry, self.config.host, self.config.metrics_port
                )
            except OSError as exc:
                raise RtqError(
                    f"cannot bind metrics to {self.config.host}:{self.config.metrics_port}: {exc.strerror}"
                ) from None
            self.metrics_port = self._metrics_http.server_port

    def _load(self, on_loaded: Callable[[ServedModel], None] | None, owns_process: bool) -> None:
        # `import openvino` starts a telemetry thread that forks a process, and gRPC restarts its
        # own threads after a fork from the forking thread: imported first, neither inherits the
        # lowered priority. Every thread that computes is started below: the runtimes' worker
        # pools and the batchers' instance threads run lowered (priority.py).
        import_runtimes(self.config.repository, list(self.models))
        lower_current_thread(self.config.compute_nice)

        def publish(m: ServedModel) -> None:
            self.models[m.name] = m
            if on_loaded:
                on_loaded(m)

        load_repository(
            self.config.repository,
            self.metrics,
            self.config.max_queue,
            only=list(self.models),
            threads=self.config.threads,
            on_loaded=publish,
            admit_fraction=self.config.admit_fraction,
        )
        if owns_process:
            # A full collection walks every object the runtimes' imports and the models left behind
            # (>100 ms under load here, with the interpreter lock held: every request in flight
            # stalls behind it). Those live as long as the process, so they leave the collector's
            # view. Not done for a server embedded in another program, whose heap is not ours.
            gc.collect()
            gc.freeze()
        self.service.loading_done = True
        self.loaded.set()

    async def _main(self, on_loaded: Callable[[ServedModel], None] | None, install_signals: bool) -> None:
        self._stopped = asyncio.Event()
        try:
            await self._start_grpc()
        except BaseException as exc:
            self._error = exc
            if self._server is not None:
                await self._server.stop(0)
            self._started.set()
            return
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stopped.set)
        self._started.set()
        loader = threading.Thread(
            target=self._load, args=(on_loaded, install_signals), name="loader", daemon=True
        )
        loader.start()
        if self.config.watch_interval_s:
            threading.Thread(target=self._watch, name="file-watch", daemon=True).start()
        await self._stopped.wait()
        await self._drain()

    def _watch(self) -> None:
        """Turn a variant not-ready (with the reason) while its repository files are gone or changed."""
        while not self._watch_stop.wait(self.config.watch_interval_s):
            for m in list(self.models.values()):
                try:
                    m.check_files()
                except Exception:  # noqa: BLE001, S112 - a watcher failure must never stop serving
                    continue

    async def _drain(self) -> None:
        """Finish every accepted request, refuse new ones with UNAVAILABLE, then stop.

        gRPC's own stop() races a call that arrives as it begins: such a call can be cancelled
        without reaching a handler. So the models refuse new requests first (UNAVAILABLE, "server
        is shutting down") while gRPC still answers, the queues run empty, and only then gRPC
        stops; its grace covers handlers still writing their answers.
        """
        self._watch_stop.set()
        self.service.draining = True
        until = time.monotonic() + self.config.grace_s
        batchers = [m.batcher for m in list(self.models.values()) if m.batcher is not None]
        for b in batchers:
            b.refuse_new()
        while time.monotonic() < until and not all(b.idle() for b in batchers):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # answers computed just now are being written
        await self._server.stop(max(0.5, until - time.monotonic()))
        # Handlers gRPC started during its stop are still tasks on this loop: let them end here
        # rather than be destroyed with the loop.
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if leftovers:
            await asyncio.wait(leftovers, timeout=1.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        for m in list(self.models.values()):
            if m.batcher is not None:
                m.batcher.stop()
        self.service.close()

    def start(self, wait_loaded: bool = True, timeout: float = 300.0) -> EdgeServer:
        """Serve on a background thread; returns once gRPC is bound (and models loaded if asked)."""

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._main(None, install_signals=False))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="edge-server", daemon=True)
        self._thread.start()
        self._started.wait(timeout)
        if self._error:
            raise self._error
        if wait_loaded and not self.loaded.wait(timeout):
            raise RtqError(f"models did not load within {timeout:.0f} s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(self.config.grace_s + 30)

    def serve(
        self,
        on_ready: Callable[[EdgeServer], None] | None = None,
        on_loaded: Callable[[ServedModel], None] | None = None,
    ) -> None:
        """Foreground: run until SIGTERM/SIGINT, then drain."""
        self._loop = asyncio.new_event_loop()

        async def main() -> None:
            task = asyncio.ensure_future(self._main(on_loaded, install_signals=True))
            await asyncio.get_running_loop().run_in_executor(None, self._started.wait)
            if self._error:
                raise self._error
            if on_ready:
                on_ready(self)
            await task

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()
