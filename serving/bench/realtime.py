"""`rtq bench realtime`: one command from repository to report, edge server and Triton side by side.

For each server: check (or build) the variants, start the server on loopback, run the scenarios
(accuracy, single-stream, offline, server search at the p99 bound, 30-FPS streams search), a short
headless `locust -f loadtest/realtime.py` run, scrape its Prometheus endpoint, stop it. Then the
load generator's own capacity, against an empty server (serving/bench/null_server.py). Then one
summary JSON, Markdown, PNG plots and a single-file HTML report (serving/bench/report.py).

Any failure (server will not start, dies mid-run, bad input) ends that part with one clear line;
the report is still written, marked incomplete, with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from serving.errors import RtqError
from serving.settings import PROJECT_ROOT, default_results_dir

DEFAULT_VARIANTS = ("efficientnet_lite0-int8-openvino", "efficientnet_lite0-int8-onnxruntime")
SERVERS = ("edge", "triton")


@dataclass(frozen=True)
class RealtimeSettings:
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    servers: tuple[str, ...] = SERVERS
    images: int = 200
    seconds: float = 5.0  # measured seconds per scenario run (plus warm-up)
    warmup_s: float = 1.0
    slo_ms: float = 33.0
    fps: float = 30.0
    search_steps: int = 5
    input: str = "tensor"
    locust_seconds: float = 10.0  # 0: no Locust run
    locust_workers: int = 0
    # Seconds per Locust trial against the null server (serving/bench/null_server.py); 0: not measured.
    generator_seconds: float = 10.0
    generator_steps: int = 6
    build_missing: bool = False
    data: str = "imagenet-val"

    def __post_init__(self) -> None:
        bad = [s for s in self.servers if s not in SERVERS]
        if bad or not self.servers:
            raise RtqError(f"unknown server(s) {bad}; choose from {SERVERS}")
        if self.images < 1 or self.seconds <= 0 or self.fps <= 0 or self.slo_ms <= 0:
            raise RtqError("--images, --seconds, --fps and --slo-ms must be positive")
        if self.generator_seconds < 0:
            raise RtqError("--generator-seconds must be 0 (not measured) or positive")
        if not self.variants:
            raise RtqError("no variants given")
        if self.input == "jpeg" and "triton" in self.servers:
            raise RtqError(
                "JPEG input is edge-only (Triton's python backend takes FP32 tensors); add --servers edge"
            )


def add_arguments(sp: argparse.ArgumentParser) -> None:
    d = RealtimeSettings()
    sp.add_argument("--variants", nargs="+", default=list(d.variants), help="variants (default: %(default)s)")
    sp.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(d.servers),
        help="servers to compare (default: both)",
    )
    sp.add_argument(
        "--images", type=int, default=d.images, help="labelled images cycled (default: %(default)s)"
    )
    sp.add_argument(
        "--seconds",
        type=float,
        default=d.seconds,
        help="measured seconds per scenario run (default: %(default)s)",
    )
    sp.add_argument("--slo-ms", type=float, default=d.slo_ms, help="p99 bound (default: %(default)s)")
    sp.add_argument("--fps", type=float, default=d.fps, help="camera FPS for streams (default: %(default)s)")
    sp.add_argument("--input", choices=("tensor", "jpeg"), default=d.input, help="frame encoding")
    sp.add_argument(
        "--locust-seconds",
        type=float,
        default=d.locust_seconds,
        help="headless Locust run per server, 0 = none (default: %(default)s)",
    )
    sp.add_argument(
        "--locust-workers",
        type=int,
        default=d.locust_workers,
        help="Locust workers (0: one local process) (default: %(default)s)",
    )
    sp.add_argument(
        "--generator-seconds",
        type=float,
        default=None,
        help="seconds per trial of the load generator's own capacity, measured against an empty "
        "server with the same Locust workers, tensor and JPEG frames; 0 = not measured (default: "
        f"{d.generator_seconds:g}; 0 with --quick)",
    )
    sp.add_argument("--build", action="store_true", help="build variants missing from the repository")
    sp.add_argument(
        "--quick", action="store_true", help="a ~2-minute smoke run: 2 s per scenario, 100 images"
    )
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")


@dataclass
class ServerRun:
    name: str
    url: str = ""
    metrics_url: str = ""
    variants: dict[str, dict] = field(default_factory=dict)
    locust: dict | None = None
    scrape: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_variants(repository: Path, s: RealtimeSettings, data_root: Path | None, command: str, log) -> dict:
    from serving.repository.layout import list_variants, read_manifest

    present = set(list_variants(repository)) if repository.is_dir() else set()
    missing = [v for v in s.variants if v not in present]
    if missing and s.build_missing:
        from serving.repository.build import build
        from serving.repository.spec import load_spec

        log(f"building missing variants {missing} with specs/default.yaml")
        build(load_spec(), repository, command, data_root, progress=False, log=log)
        present = set(list_variants(repository))
        missing = [v for v in s.variants if v not in present]
    if missing:
        raise RtqError(f"variants {missing} not in {repository}; run `rtq build` or pass --build")
    return {v: read_manifest(repository / v) for v in s.variants}


def _offline_reference(repository: Path, variants: list[str], frames) -> dict[str, float]:
    """Top-1 of the in-process runner on exactly the frames sent (the 'offline accuracy' reference)."""
    import numpy as np

    from serving.repository.layout import open_variant
    from serving.runtimes import open_runner

    out = {}
    for name in variants:
        v = open_variant(repository, name)
        with open_runner(v.manifest["backend"], v.model_path, v.manifest["precision"], 2) as runner:
            hits = [int(runner.infer(f.payload).argmax()) == f.label for f in frames if f.label >= 0]
        out[name] = round(float(np.mean(hits)), 5) if hits else None
    return out


class _Edge:
    def __init__(self, repository: Path, variants: list[str]):
        self.grpc, self.metrics = _free_port(), _free_port()
        cmd = [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--repository",
            str(repository),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            "--quiet",
            "--models",
            *variants,
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        self.url = f"127.0.0.1:{self.grpc}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics}/metrics"

    def wait(self, variants: list[str], timeout: float = 300) -> None:
        from serving.bench.serving_bench import wait_ready

        try:
            wait_ready(self.url, self.proc, variants, timeout)
        except RtqError:
            self.log.seek(0)
            tail = self.log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RtqError(f"edge server did not become ready: {tail[0][:200]}") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class _Triton:
    def __init__(self, repository: Path, variants: list[str]):
        from serving.triton.launcher import TritonConfig, TritonServer

        grpc, metrics = _free_port(), _free_port()
        self.server = TritonServer(
            TritonConfig(
                repository, grpc_port=grpc, http_port=_free_port(), metrics_port=metrics, models=variants
            )
        )
        self.url = f"127.0.0.1:{grpc}"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"

    def wait(self, variants: list[str], timeout: float = 600) -> None:
        self.server.start(timeout=timeout)

    def alive(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    def stop(self) -> None:
        self.server.stop()


def _scrape(url: str) -> dict:
    """Series of interest from one scrape, summed per (metric, model)."""
    from serving.bench.serving_bench import scrape

    try:
        values = scrape(url)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return {"error": f"scrape of {url} failed: {exc}"}
    keep = (
        "rtq_requests_total",
        "rtq_request_duration_seconds_count",
        "rtq_request_duration_seconds_sum",
        "rtq_predictions_labelled_total",
        "rtq_predictions_correct_total",
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    )
    out: dict[str, float] = {}
    for (name, labels), v in values.items():
        if name in keep:
            model = dict(labels).get("model", "")
            key = f"{name}{{model={model}}}" if model else name
            out[key] = out.get(key, 0.0) + v
    return out


def _locust(
    kind: str,
    url: str,
    model: str,
    users: int,
    s: RealtimeSettings,
    out: Path,
    log,
    input_mode: str | None = None,
    seconds: float | None = None,
) -> dict:
    """A headless `locust -f loadtest/realtime.py` run (the settings' input and duration unless
    given); its realtime summary (or why it failed)."""
    input_mode = input_mode or s.input
    seconds = s.locust_seconds if seconds is None else seconds
    prefix = out / f"locust-{kind}-{model}-{input_mode}-{users}"
    common = [
        "--host",
        url,
        "--model",
        model,
        "--fps",
        str(s.fps),
        "--images",
        str(s.images),
        "--input",
        input_mode,
        "--warmup-s",
        str(s.warmup_s),
        "--data",
        s.data,
    ]
    locust = [sys.executable, "-m", "locust", "-f", str(PROJECT_ROOT / "loadtest" / "realtime.py")]
    run_for = f"{max(1, int(seconds + s.warmup_s))}s"
    head = ["--headless", "-u", str(users), "-r", str(users), "-t", run_for, "--csv", str(prefix)]
    workers: list[subprocess.Popen] = []
    if s.locust_workers > 0:
        port = _free_port()
        cmd = [
            *locust,
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            str(s.locust_workers),
            "--expect-workers-max-wait",
            "60",
            *head,
            *common,
        ]
        workers = [
            subprocess.Popen(
                [*locust, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port), *common],
                cwd=PROJECT_ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(s.locust_workers)
        ]
    else:
        cmd = [*locust, *head, *common]
    log(
        f"  locust: {users} streams x {s.fps:g} FPS for {run_for}"
        + (f" ({s.locust_workers} workers)" if workers else "")
    )
    try:
        r = subprocess.run(
            cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=seconds + s.warmup_s + 120
        )
    except subprocess.TimeoutExpired:
        return {"error": "locust did not finish in time", "complete": False}
    finally:
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
    summary_path = Path(f"{prefix}_realtime.json")
    if not summary_path.is_file():
        lines = [ln for ln in r.stderr.splitlines() if "realtime.py:" in ln or "error" in ln.lower()]
        return {"error": (lines[-1] if lines else r.stderr[-300:]).strip(), "complete": False}
    summary = json.loads(summary_path.read_text())
    summary["locust_workers"] = s.locust_workers
    summary["stats_csv"] = str(Path(f"{prefix}_stats.csv").name)
    return summary


def generator_held(summary: dict, max_miss_rate: float = 0.01) -> bool:
    """Against a server that computes nothing, a trial holds when every frame was sent and fewer than
    1% missed their deadline: then the misses a real server's run counts are not the generator's."""
    return (
        bool(summary.get("complete"))
        and not summary.get("not_sent_overloaded")
        and summary.get("deadline_miss_rate") is not None
        and summary["deadline_miss_rate"] < max_miss_rate
    )


def next_streams(held: int, failed: int | None) -> int | None:
    """Doubling until a trial fails, then halving the gap; None once the gap is closed."""
    if failed is None:
        return 2 * held if held else 1
    step = (held + failed) // 2
    return step if step > held else None


def _generator_capacity(s: RealtimeSettings, server_max_qps: float | None, out: Path, log) -> dict:
    """The load generator's own capacity: Locust (same workers) against the null server at rising
    stream counts, for tensor and JPEG frames; the largest rate that held, against the servers' best
    max qps of this run."""
    from serving.bench import null_server

    model = s.variants[0]
    start = max(1, math.ceil(server_max_qps / s.fps)) if server_max_qps else 1
    result: dict = {
        "server_max_qps": server_max_qps,
        "workers": s.locust_workers,
        "seconds_per_trial": s.generator_seconds,
        "by_input": {},
    }
    proc = None
    try:
        proc, url = null_server.start([model])
        for mode in ("tensor", "jpeg"):
            held, failed, n = 0, None, start
            best: dict | None = None
            trials = []
            for _ in range(s.generator_steps):
                log(f"generator capacity ({mode}): {n} streams against the null server")
                r = _locust("null", url, model, n, s, out, lambda m: None, mode, s.generator_seconds)
                ok = generator_held(r)
                trials.append(
                    {
                        "streams": n,
                        "offered_per_s": round(n * s.fps, 1),
                        "held": ok,
                        **{
                            k: r.get(k)
                            for k in (
                                "throughput_per_s",
                                "p50_ms",
                                "p99_ms",
                                "send_lag_p99_ms",
                                "deadline_miss_rate",
                                "not_sent_overloaded",
                                "complete",
                                "error",
                            )
                        },
                    }
                )
                if ok:
                    held, best = n, r
                else:
                    failed = n
                nxt = next_streams(held, failed)
                if nxt is None or proc.poll() is not None:
                    break
                n = nxt
            rate = best.get("throughput_per_s") if best else None
            result["by_input"][mode] = {
                "max_streams": held,
                "max_frames_per_s": rate,
                "vs_server_max": round(rate / server_max_qps, 2) if rate and server_max_qps else None,
                "trials": trials,
            }
    except RtqError as exc:
        result["error"] = str(exc)
    finally:
        if proc is not None:
            null_server.stop(proc)
    return result


def best_server_max(servers: dict) -> float | None:
    """The highest max qps within the p99 bound of any server and variant in this run."""
    found = [
        res["server"]["max_qps_within_bound"]
        for srv in servers.values()
        for res in srv.get("variants", {}).values()
        if res.get("server", {}).get("max_qps_within_bound")
    ]
    return max(found) if found else None


def _run_server(
    kind: str, repository: Path, s: RealtimeSettings, frames, tensor_frames, out: Path, log
) -> ServerRun:
    from serving.bench import scenarios as sc

    run = ServerRun(kind)
    server = _Edge(repository, list(s.variants)) if kind == "edge" else _Triton(repository, list(s.variants))
    run.url, run.metrics_url = server.url, server.metrics_url
    try:
        log(f"{kind}: starting on {server.url}")
        server.wait(list(s.variants))
        base = sc.TestSettings(
            "single_stream",
            min_duration_s=s.seconds,
            warmup_s=s.warmup_s,
            min_query_count=max(20, int(s.seconds * 20)),
            latency_bound_ms=s.slo_ms,
            fps=s.fps,
        )
        for variant in s.variants:
            log(f"{kind}: {variant}")
            target = sc.Target(server.url, variant)
            res: dict = {}
            try:
                acc = sc.run(target, frames, replace(base, scenario="accuracy", min_query_count=len(frames)))
                res["accuracy"] = acc.to_dict()
                ss = sc.run(target, frames, base)
                res["single_stream"] = ss.to_dict()
                # Offline sends batched FP32 tensors whatever the stream encoding.
                off = sc.run(target, tensor_frames, replace(base, scenario="offline", min_query_count=5))
                res["offline"] = off.to_dict()
                high = max(10.0, 1.1 * off.metrics["samples_per_s"])
                best, tried = sc.server_search(
                    target,
                    frames,
                    replace(base, scenario="server", target_qps=1.0),
                    high=high,
                    steps=s.search_steps,
                    log=log,
                )
                res["server"] = {
                    "max_qps_within_bound": best,
                    "bound_p99_ms": s.slo_ms,
                    "runs": [t.to_dict() for t in tried],
                }
                max_streams = max(1, math.ceil(off.metrics["samples_per_s"] / s.fps))
                n, tried = sc.streams_search(
                    target, frames, replace(base, scenario="streams"), max_streams=max_streams, log=log
                )
                res["streams"] = {
                    "max_streams": n,
                    "fps": s.fps,
                    "max_miss_rate": base.max_miss_rate,
                    "share_of_offline": round(n * s.fps / off.metrics["samples_per_s"], 4)
                    if off.metrics["samples_per_s"]
                    else None,
                    "runs": [t.to_dict() for t in tried],
                }
            except RtqError as exc:
                run.errors.append(f"{variant}: {exc}")
            finally:
                target.close()
                run.variants[variant] = res
            if not server.alive():
                run.errors.append(f"{kind} server died during the run")
                break
        if s.locust_seconds > 0 and server.alive():
            primary = s.variants[0]
            users = max(1, run.variants.get(primary, {}).get("streams", {}).get("max_streams", 1))
            run.locust = _locust(kind, server.url, primary, users, s, out, log)
            if not run.locust.get("complete", False):
                run.errors.append(
                    "locust run incomplete: "
                    + str(run.locust.get("error") or run.locust.get("incomplete_reasons"))
                )
        run.scrape = _scrape(server.metrics_url) if server.alive() else {"error": "server not running"}
    except RtqError as exc:
        run.errors.append(str(exc))
        log(f"{kind}: error: {exc}")
    finally:
        server.stop()
    return run


def run_realtime(
    repository: Path,
    s: RealtimeSettings,
    out_dir: Path,
    data_root: Path | None = None,
    command: str = "",
    log=print,
) -> dict:
    from serving.bench.frames import load_frames
    from serving.bench.report import write_report
    from serving.repository.build import machine, tool_versions

    load_before = [round(v, 2) for v in os.getloadavg()]
    started = dt.datetime.now(dt.UTC)
    stem = f"realtime-{started.strftime('%Y%m%d-%H%M%S')}"
    work = out_dir / stem
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "benchmark": "realtime",
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "settings": asdict(s),
        "repository": str(repository),
        "servers": {},
        "errors": [],
    }
    try:
        manifests = _check_variants(repository, s, data_root, command, log)
        result["variants"] = {
            v: {
                "backend": m["backend"],
                "precision": m["precision"],
                "file_mb": round(m.get("file_bytes", 0) / 2**20, 2),
                "top1_manifest": (m.get("top1") or {}).get("imagenet-val"),
            }
            for v, m in manifests.items()
        }
        frames = load_frames(s.data, s.images, s.input, s.variants[0], repository, data_root)
        tensor_frames = (
            frames
            if s.input == "tensor"
            else load_frames(s.data, s.images, "tensor", s.variants[0], repository, data_root)
        )
        log(f"offline reference top-1 on the same {len(frames)} images")
        result["offline_accuracy"] = _offline_reference(repository, list(s.variants), tensor_frames)
        for kind in s.servers:
            r = _run_server(kind, repository, s, frames, tensor_frames, work, log)
            result["servers"][kind] = asdict(r)
        if s.generator_seconds > 0:
            result["generator"] = _generator_capacity(s, best_server_max(result["servers"]), work, log)
            if "error" in result["generator"]:
                result["errors"].append("generator capacity: " + result["generator"]["error"])
    except RtqError as exc:
        result["errors"].append(str(exc))
        log(f"rtq bench realtime: error: {exc}")
    reasons = list(result["errors"])
    for kind, r in result["servers"].items():
        reasons += [f"{kind}: {e}" for e in r["errors"]]
    result["complete"] = not reasons
    result["incomplete_reasons"] = reasons
    result["load_average_1_5_15"] = {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}
    result["machine"] = machine()
    result["tool_versions"] = tool_versions()
    paths = write_report(result, out_dir, stem)
    log("wrote " + ", ".join(str(p) for p in paths))
    result["files"] = [str(p) for p in paths]
    return result


def main(args: argparse.Namespace, command: str) -> int:
    s = RealtimeSettings(
        variants=tuple(args.variants),
        servers=tuple(args.servers),
        images=args.images,
        seconds=args.seconds,
        slo_ms=args.slo_ms,
        fps=args.fps,
        input=args.input,
        locust_seconds=args.locust_seconds,
        locust_workers=args.locust_workers,
        generator_seconds=RealtimeSettings.generator_seconds
        if args.generator_seconds is None
        else args.generator_seconds,
        build_missing=args.build,
    )
    if args.quick:
        s = replace(
            s,
            seconds=2.0,
            images=min(s.images, 100),
            search_steps=3,
            locust_seconds=min(s.locust_seconds, 5.0),
            generator_seconds=args.generator_seconds or 0.0,
        )
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    result = run_realtime(Path(args.repository), s, Path(args.out), args.data_root, command, log)
    if not result["complete"]:
        print("rtq bench realtime: INCOMPLETE: " + "; ".join(result["incomplete_reasons"]), file=sys.stderr)
        return 1
    return 0
