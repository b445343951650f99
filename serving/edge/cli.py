"""`rtq serve`: arguments and the foreground run of the edge server (heavy imports happen on use)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.edge.batching import DEFAULT_ADMIT_FRACTION


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: loopback; use 0.0.0.0 only with --token and TLS)",
    )
    sp.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    sp.add_argument(
        "--metrics-port",
        type=int,
        default=8002,
        help="Prometheus scrape port (default: %(default)s; -1 disables)",
    )
    sp.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="serve only these variants (default: all in the repository)",
    )
    sp.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per instance (default: each config.pbtxt's)",
    )
    sp.add_argument(
        "--compute-nice",
        type=int,
        choices=range(0, 20),
        default=10,
        metavar="0-19",
        help="inference threads run this much below the gRPC loop's priority, so admission and "
        "refusals stay fast when compute fills the cores (Linux; 0: same priority; default: %(default)s)",
    )
    sp.add_argument(
        "--admit-within",
        type=_fraction,
        default=DEFAULT_ADMIT_FRACTION,
        metavar="FRACTION",
        help="admit a request only if the work queued ahead is predicted (and corrected by how "
        "recent predictions erred) to take at most this fraction of its remaining deadline "
        "(default: %(default)s)",
    )
    sp.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="queued requests per model before RESOURCE_EXHAUSTED (default: %(default)s; "
        "a config's default_queue_policy.max_queue_size wins)",
    )
    sp.add_argument(
        "--max-message-mb",
        type=float,
        default=32.0,
        help="largest request accepted, MiB (default: %(default)s)",
    )
    sp.add_argument("--token", default=None, help="require 'authorization: Bearer TOKEN' (visible in ps)")
    sp.add_argument("--token-file", type=Path, default=None, help="read the bearer token from this file")
    sp.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain for TLS")
    sp.add_argument("--tls-key", type=Path, default=None, help="PEM private key for TLS")
    sp.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    sp.add_argument(
        "--no-shared-memory",
        action="store_true",
        help="refuse Triton's system shared memory (by default clients on this host may pass tensors "
        "through /dev/shm objects they register; anyone allowed to call the server can then make it "
        "read and write such objects)",
    )
    sp.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM (default: %(default)s)",
    )
    sp.add_argument("--json", action="store_true", help="log startup and model states as JSON lines")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:  # also false for NaN
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def serve_main(args: argparse.Namespace) -> int:
    from serving.edge.auth import read_token
    from serving.edge.server import EdgeConfig, EdgeServer
    from serving.errors import RtqError
    from serving.repository.layout import check_variant_name

    if args.max_message_mb <= 0:
        raise RtqError("--max-message-mb must be positive")
    for name in args.models or ():
        check_variant_name(name)
    config = EdgeConfig(
        repository=Path(args.repository),
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        max_queue=args.max_queue,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        token=read_token(args.token, args.token_file),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        models=args.models,
        threads=args.threads,
        compute_nice=args.compute_nice,
        admit_fraction=args.admit_within,
        grace_s=args.grace,
        shared_memory=not args.no_shared_memory,
    )

    def say(event: dict, text: str) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif not args.quiet or event.get("event") == "error":
            print(text, file=sys.stderr, flush=True)

    def on_ready(server: EdgeServer) -> None:
        metrics = f"http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else "off"
        say(
            {
                "event": "listening",
                "grpc": f"{config.host}:{server.grpc_port}",
                "metrics": metrics,
                "tls": bool(config.tls_cert),
                "mutual_tls": bool(config.tls_client_ca),
                "token": bool(config.token),
            },
            f"rtq serve: gRPC on {config.host}:{server.grpc_port}, metrics {metrics}; loading models",
        )

    def on_loaded(m) -> None:
        state = "READY" if m.ready else "UNAVAILABLE"
        say(
            {"event": "model", "name": m.name, "state": state, "reason": m.reason},
            f"  {m.name}: {state}" + ("" if m.ready else f" ({m.reason})"),
        )

    if (
        not config.host.startswith("127.")
        and config.host != "localhost"
        and not (config.token and config.tls_cert)
    ):
        say(
            {"event": "warning", "text": "non-loopback bind without --token and TLS"},
            f"rtq serve: warning: listening on {config.host} without both a token and TLS",
        )
    server = EdgeServer(config)
    server.serve(on_ready=on_ready, on_loaded=on_loaded)
    say({"event": "stopped"}, "rtq serve: drained and stopped")
    return 0
