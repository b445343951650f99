"""`rtq triton`: run the real tritonserver on the repository until SIGTERM/SIGINT, then stop it cleanly."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--host", default="127.0.0.1", help="address for every listener (default: loopback)")
    sp.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default: %(default)s)")
    sp.add_argument("--http-port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    sp.add_argument("--metrics-port", type=int, default=8002, help="Prometheus port (default: %(default)s)")
    sp.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="serve only these variants (default: all)",
    )
    sp.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the derived python-backend repository and log go (default: a temp dir)",
    )
    sp.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for readiness (default: %(default)s)"
    )
    sp.add_argument(
        "--restarts",
        type=int,
        default=0,
        metavar="N",
        help="restart a tritonserver that dies (crash, kill) up to N times; 0: exit with an error "
        "(default: %(default)s)",
    )
    sp.add_argument("--json", action="store_true", help="print events as JSON lines")


def triton_main(args: argparse.Namespace) -> int:
    from serving.triton.launcher import TritonConfig, TritonServer

    config = TritonConfig(
        repository=Path(args.repository),
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        models=args.models,
        work_dir=args.work_dir,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(config)
    server.start(timeout=args.timeout)
    event = {
        "event": "ready",
        "grpc": f"{args.host}:{args.grpc_port}",
        "http": f"{args.host}:{args.http_port}",
        "metrics": f"http://{args.host}:{args.metrics_port}/metrics",
        "log": str(server.log_path),
        "pid": server.process.pid,
    }
    event["models"] = {n: {"state": st, "reason": why} for n, (st, why) in server.model_states.items()}
    if args.json:
        print(json.dumps(event), flush=True)
    elif not args.quiet:
        for n, (st, why) in server.model_states.items():
            print(f"  {n}: {st}" + (f" ({why})" if why else ""), file=sys.stderr)
        print(
            f"rtq triton: ready; gRPC {event['grpc']}, HTTP {event['http']}, metrics {event['metrics']}; "
            f"log {event['log']}",
            file=sys.stderr,
            flush=True,
        )
    if args.restarts < 0:
        print("rtq: error: --restarts must be >= 0", file=sys.stderr)
        server.stop()
        return 2
    while not stop.wait(0.5):
        code = server.crashed()
        if code is None:
            continue
        why = server.log_tail()
        if server.restarts >= args.restarts:
            limit = f" (after {server.restarts} restarts)" if args.restarts else ""
            print(f"rtq: error: tritonserver exited with code {code}{limit}: {why}", file=sys.stderr)
            if args.json:
                print(
                    json.dumps({"event": "exited", "returncode": code, "restarts": server.restarts}),
                    flush=True,
                )
            return 1
        print(
            f"rtq triton: tritonserver exited with code {code}; restarting "
            f"({server.restarts + 1} of {args.restarts})",
            file=sys.stderr,
            flush=True,
        )
        try:
            server.restart(timeout=args.timeout)
        except Exception as exc:  # noqa: BLE001 - reported in one line, like a failed first start
            print(f"rtq: error: tritonserver did not come back: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(
                json.dumps(
                    {
                        "event": "restarted",
                        "exit_code": code,
                        "restart": server.restarts,
                        "pid": server.process.pid,
                        "models": {
                            n: {"state": st, "reason": w} for n, (st, w) in server.model_states.items()
                        },
                    }
                ),
                flush=True,
            )
    code = server.stop()
    if args.json:
        print(json.dumps({"event": "stopped", "returncode": code}), flush=True)
    elif not args.quiet:
        print(f"rtq triton: stopped (exit code {code})", file=sys.stderr)
    return 0
