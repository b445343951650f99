"""`rtq bench serving`: edge server vs real Triton vs the raw runtime, side by side in one run.

Both servers run as their own processes on loopback with the whole repository loaded (that is the
memory figure); the client is this process, using tritonclient.grpc as users do. Measured:
  1. top-1 parity: the same labelled images through the offline runner, the edge server, Triton;
  2. batch-1 latency, interleaved in rounds (raw runtime / edge / Triton) so drift hits all alike;
  3. closed-loop throughput at rising concurrency; the best rate whose p99 stays within the SLO;
  4. resident memory of each server process tree; the edge metrics scrape checked against the
     requests sent (histogram count and success counter).
Each result carries its own validity verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from serving.bench import null_server
from serving.bench.results import write_results
from serving.errors import RtqError
from serving.settings import PROJECT_ROOT, default_data_root, default_results_dir

DEFAULT_VARIANT = "efficientnet_lite0-int8-openvino"
SLO_MS = 33.0
ROUND = 25
PACE_S = 0.002


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--variant", default=DEFAULT_VARIANT, help="variant under load (default: %(default)s)")
    sp.add_argument(
        "--images", type=int, default=200, help="labelled images for the parity check (default: 200)"
    )
    sp.add_argument("--latency-runs", type=int, default=300, help="batch-1 runs per target (default: 300)")
    sp.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="closed-loop client counts (default: 1 2 4 8 16)",
    )
    sp.add_argument("--seconds", type=float, default=6.0, help="seconds per concurrency level (default: 6)")
    sp.add_argument("--slo-ms", type=float, default=SLO_MS, help="p99 bound for max throughput (default: 33)")
    sp.add_argument("--no-triton", action="store_true", help="edge server and raw runtime only")
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")


# -- data ---------------------------------------------------------------------------------------
def labelled_images(data_root: Path | None, n: int) -> list[tuple[Path, str]]:
    folder = (data_root or default_data_root()) / "imagenet-val"
    table = folder / "labels.csv"
    if not table.is_file():
        raise RtqError(f"no {table}; point --data-root at the folder holding imagenet-val/")
    with table.open() as f:
        rows = list(csv.DictReader(f))[:n]
    return [(folder / r["file"], r["wnid"]) for r in rows]


def tensors_for(variant, images: list[tuple[Path, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed FP32 NCHW batch and model label indices, through the variant's own preprocessing."""
    from serving.models.preprocessing import preprocess
    from serving.models.zoo import class_wnids

    index = {w: i for i, w in enumerate(class_wnids(variant.manifest["classes"]))}
    x = np.stack([preprocess(p, variant.preprocessing) for p, _ in images])
    y = np.asarray([index.get(w, -1) for _, w in images])
    return x, y


# -- clients ------------------------------------------------------------------------------------
def _client(url: str):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def _request(x: np.ndarray, datatype: str = "FP32"):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return [inp]


SHM_REGION = "rtq_bench_frame"


@contextlib.contextmanager
def shared_frame(clients: dict, x1: np.ndarray):
    """A /dev/shm object sized for one frame, registered on each server that offers Triton's system
    shared memory: yields (write the frame, inputs that point at it, {server name: client})."""
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    key = f"/rtq-bench-{os.getpid()}"
    handle = shm.create_shared_memory_region(SHM_REGION, key, x1.nbytes)
    registered = {}
    try:
        for name, c in clients.items():
            if "system_shared_memory" not in c.get_server_metadata().extensions:
                continue
            try:
                c.register_system_shared_memory(SHM_REGION, key, x1.nbytes)
            except Exception as exc:  # noqa: BLE001 - that server's shm row is left out, the rest runs
                print(f"{name}: system shared memory refused ({exc}); no {name}_shm row", file=sys.stderr)
                continue
            registered[name] = c
        inp = grpcclient.InferInput("input", list(x1.shape), "FP32")
        inp.set_shared_memory(SHM_REGION, x1.nbytes)
        yield (lambda: shm.set_shared_memory_region(handle, [x1])), [inp], registered
    finally:
        for c in registered.values():
            with contextlib.suppress(Exception):
                c.unregister_system_shared_memory(SHM_REGION)
        shm.destroy_shared_memory_region(handle)


def server_top1(url: str, model: str, x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Top-1 class per image, one batch-1 request each (labels, if given, go in as a parameter)."""
    client = _client(url)
    out = []
    for i in range(len(x)):
        params = {"label": int(labels[i])} if labels is not None else None
        r = client.infer(model, _request(x[i : i + 1]), parameters=params)
        out.append(int(r.as_numpy("logits").argmax()))
    client.close()
    return np.asarray(out)


def _pcts(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "n": len(a),
    }


def closed_loop(url: str, model: str, x1: np.ndarray, clients: int, seconds: float) -> dict:
    """`clients` threads each sending batch-1 requests back to back for `seconds`."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    sent = [0] * clients
    stop = time.monotonic() + seconds
    warm = time.monotonic() + min(1.0, seconds / 5)

    def worker(i: int) -> None:
        c = _client(url)
        req = _request(x1)
        while True:
            t0 = time.monotonic()
            if t0 >= stop:
                break
            sent[i] += 1
            try:
                c.infer(model, req)
            except Exception:  # noqa: BLE001 - counted, the load goes on
                errors[i] += 1
                continue
            if t0 >= warm:
                lat[i].append(1000 * (time.monotonic() - t0))
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ms = [v for ls in lat for v in ls]
    window = seconds - min(1.0, seconds / 5)
    return {
        "clients": clients,
        "throughput_rps": round(len(all_ms) / window, 1),
        "errors": sum(errors),
        "sent": sum(sent),
        "latency_ms": _pcts(all_ms) if all_ms else None,
    }


# -- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_memory(pid: int) -> dict:
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in procs)
    uss = sum(p.memory_full_info().uss for p in procs)
    return {"processes": len(procs), "rss_mb": round(rss / 2**20, 1), "uss_mb": round(uss / 2**20, 1)}


def start_edge(repository: Path, grpc_port: int, metrics_port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        "--repository",
        str(repository),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--quiet",
    ]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen, models: list[str], timeout: float = 300) -> float:
    start = time.monotonic()
    client = _client(url)
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RtqError(
                f"server exited with code {proc.returncode}: "
                f"{(proc.stderr.read() if proc.stderr else b'').decode()[-300:]}"
            )
        try:
            if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise RtqError(f"server at {url} not ready within {timeout:.0f} s")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def metric(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and all((k, labels[k]) in ls for k in labels))


# -- the run ------------------------------------------------------------------------------------
def run_serving_bench(
    repository: Path,
    variant_name: str,
    data_root: Path | None,
    out_dir: Path,
    n_images: int = 200,
    latency_runs: int = 300,
    concurrency: tuple[int, ...] = (1, 2, 4, 8),
    seconds: float = 6.0,
    slo_ms: float = SLO_MS,
    triton: bool = True,
    command: str = "",
    log=print,
) -> dict:
    from serving.models.preprocessing import load_image, resize_crop
    from serving.repository.build import machine, tool_versions
    from serving.repository.layout import list_variants, open_variant
    from serving.runtimes import open_runner

    variant = open_variant(repository, variant_name)
    all_models = list_variants(repository)
    images = labelled_images(data_root, n_images)
    x, y = tensors_for(variant, images)
    # The same first frame as camera pixels (UINT8, the server normalises): a quarter of the bytes.
    u1 = resize_crop(load_image(images[0][0]), variant.preprocessing)[None]
    runner = open_runner(
        variant.manifest["backend"],
        variant.model_path,
        variant.manifest["precision"],
        int(variant.manifest.get("threads", 2)),
    )
    procs: dict[str, subprocess.Popen] = {}
    triton_server = None
    null_proc = None
    targets: dict[str, str] = {}
    load_before = [round(v, 2) for v in os.getloadavg()]
    result: dict = {
        "benchmark": "serving",
        "command": command,
        "variant": variant_name,
        "repository": str(repository),
        "models_loaded": all_models,
    }
    try:
        eg, em = free_port(), free_port()
        log(f"starting edge server with {len(all_models)} variants")
        procs["edge"] = start_edge(repository, eg, em)
        targets["edge"] = f"127.0.0.1:{eg}"
        load_s = {"edge": round(wait_ready(targets["edge"], procs["edge"], all_models), 1)}
        if triton:
            from serving.triton.launcher import TritonConfig, TritonServer

            tg = free_port()
            log("starting tritonserver with the same repository")
            t0 = time.monotonic()
            triton_server = TritonServer(
                TritonConfig(repository, grpc_port=tg, http_port=free_port(), metrics_port=free_port())
            )
            triton_server.start(timeout=600)
            load_s["triton"] = round(time.monotonic() - t0, 1)
            targets["triton"] = f"127.0.0.1:{tg}"
            procs["triton"] = triton_server.process
        result["load_seconds"] = load_s
        null_proc, null_url = null_server.start([variant_name])
        time.sleep(2)  # let start-up work settle before measuring memory
        result["memory"] = {k: tree_memory(p.pid) for k, p in procs.items()}

        log(f"parity: {len(x)} images through runner, " + ", ".join(targets))
        ref = np.asarray([int(runner.infer(x[i : i + 1]).argmax()) for i in range(len(x))])
        parity = {"images": len(x), "runner_top1_acc": round(float((ref == y).mean()), 4)}
        for name, url in targets.items():
            got = server_top1(url, variant_name, x, y if name == "edge" else None)
            parity[f"{name}_identical_top1"] = int((got == ref).sum())
        result["parity"] = parity

        log(f"batch-1 latency: {latency_runs} runs each, interleaved")
        x1 = x[:1]
        clients = {name: _client(url) for name, url in targets.items()}
        reqs = _request(x1)
        u8_reqs = _request(u1, "UINT8")
        edge_fp32 = clients["edge"].infer(variant_name, reqs).as_numpy("logits")
        result["parity"]["edge_uint8_identical_logits"] = bool(
            np.array_equal(clients["edge"].infer(variant_name, u8_reqs).as_numpy("logits"), edge_fp32)
        )
        with shared_frame(clients, x1) as (write_frame, shm_reqs, shm_clients):
            # "<server>_shm": the frame goes through /dev/shm (written before every call, as a camera
            # process beside the server would), the request only names it. "edge_uint8": the frame
            # as pixels, normalised by the server (Triton's python-backend models take FP32 only).
            calls = {name: (lambda c=c: c.infer(variant_name, reqs)) for name, c in clients.items()}
            calls["edge_uint8"] = lambda: clients["edge"].infer(variant_name, u8_reqs)
            for name, c in shm_clients.items():
                calls[f"{name}_shm"] = lambda c=c: (write_frame(), c.infer(variant_name, shm_reqs))
            # "null": the same request to a server that computes nothing (serving/bench/null_server.py):
            # the floor of client + gRPC + a Python handler under any server's batch-1 latency.
            null_client = _client(null_url)
            calls["null"] = lambda: null_client.infer(variant_name, reqs)
            # "raw_paced" idles PACE_S between calls, as a server's runtime does between requests: on
            # a busy machine the scheduler favours threads that sleep, so back-to-back calls alone
            # would make the raw runtime look slower than the same runtime inside a server.
            samples: dict[str, list[float]] = {"raw": [], "raw_paced": [], **{k: [] for k in calls}}
            for _ in range(20):
                runner.infer(x1)
                for call in calls.values():
                    call()
            before = clients["edge"].get_inference_statistics(variant_name).model_stats[0].inference_stats
            done = 0
            while done < latency_runs:
                step = min(ROUND, latency_runs - done)
                for _ in range(step):
                    t0 = time.perf_counter()
                    runner.infer(x1)
                    samples["raw"].append(1000 * (time.perf_counter() - t0))
                for _ in range(step):
                    time.sleep(PACE_S)
                    t0 = time.perf_counter()
                    runner.infer(x1)
                    samples["raw_paced"].append(1000 * (time.perf_counter() - t0))
                for name, call in calls.items():
                    for _ in range(step):
                        t0 = time.perf_counter()
                        call()
                        samples[name].append(1000 * (time.perf_counter() - t0))
                done += step
            after = clients["edge"].get_inference_statistics(variant_name).model_stats[0].inference_stats
            null_client.close()

        def mean_ms(field: str) -> float:
            a, b = getattr(after, field), getattr(before, field)
            return round((a.ns - b.ns) / max(1, a.count - b.count) / 1e6, 3)

        # Inside the edge server during the latency phase: whole request, queue wait, runtime call.
        result["edge_server_side_mean_ms"] = {
            "request": mean_ms("success"),
            "queue": mean_ms("queue"),
            "compute": mean_ms("compute_infer"),
        }
        result["latency_ms"] = {k: _pcts(v) for k, v in samples.items()}
        lat = result["latency_ms"]
        result["edge_vs_raw_p50"] = round(lat["edge"]["p50"] / lat["raw"]["p50"], 3)
        result["edge_vs_raw_paced_p50"] = round(lat["edge"]["p50"] / lat["raw_paced"]["p50"], 3)
        for kind in ("edge_shm", "edge_uint8", "null"):
            if kind in lat:
                result[f"{kind}_vs_raw_p50"] = round(lat[kind]["p50"] / lat["raw"]["p50"], 3)
        runner.close()
        runner = None

        result["throughput"] = {}
        for name, url in targets.items():
            levels = []
            for c in concurrency:
                log(f"throughput: {name}, {c} clients, {seconds:.0f} s")
                levels.append(closed_loop(url, variant_name, x1, c, seconds))
            ok = [lv for lv in levels if lv["latency_ms"] and lv["latency_ms"]["p99"] <= slo_ms]
            best = max(ok, key=lambda lv: lv["throughput_rps"]) if ok else None
            result["throughput"][name] = {
                "levels": levels,
                "max_rps_within_slo": best["throughput_rps"] if best else 0.0,
                "at_clients": best["clients"] if best else None,
            }
        if "triton" in targets and result["throughput"]["triton"]["max_rps_within_slo"]:
            result["edge_vs_triton_throughput"] = round(
                result["throughput"]["edge"]["max_rps_within_slo"]
                / result["throughput"]["triton"]["max_rps_within_slo"],
                3,
            )

        edge_levels = result["throughput"]["edge"]["levels"]
        values = scrape(f"http://127.0.0.1:{em}/metrics")
        labels = {"model": variant_name}
        stats = _client(targets["edge"]).get_inference_statistics(variant_name).model_stats[0]
        result["edge_metrics"] = {
            "request_histogram_count": metric(values, "rtq_request_duration_seconds_count", **labels),
            "queue_histogram_count": metric(values, "rtq_queue_duration_seconds_count", **labels),
            "requests_sent": len(x)
            + 2  # the UINT8 parity pair
            + (20 + latency_runs) * sum(k in ("edge", "edge_shm", "edge_uint8") for k in result["latency_ms"])
            + sum(lv["sent"] for lv in edge_levels),
            "requests_ok": metric(values, "rtq_requests_total", code="OK", **labels),
            "requests_failed": metric(values, "rtq_requests_total", **labels)
            - metric(values, "rtq_requests_total", code="OK", **labels),
            "server_success_count": stats.inference_stats.success.count,
            "labelled": metric(values, "rtq_predictions_labelled_total", **labels),
            "correct": metric(values, "rtq_predictions_correct_total", **labels),
        }
    finally:
        if runner is not None:
            runner.close()
        if null_proc is not None:
            null_server.stop(null_proc)
        if triton_server is not None:
            triton_server.stop()
        if "edge" in procs and procs["edge"].poll() is None:
            procs["edge"].terminate()
            procs["edge"].wait(60)
    m = result["edge_metrics"]
    reasons = []
    if not m["request_histogram_count"] == m["requests_sent"] == m["requests_ok"] + m["requests_failed"]:
        reasons.append("edge request histogram count differs from the requests sent")
    for name in targets:
        if result["parity"][f"{name}_identical_top1"] != result["parity"]["images"]:
            reasons.append(f"{name} top-1 differs from the runner on some images")
    if not result["parity"]["edge_uint8_identical_logits"]:
        reasons.append("edge logits for UINT8 pixels differ from the same frame sent as FP32")
    if latency_runs < 200:
        reasons.append(f"{latency_runs} latency runs < 200")
    now = dt.datetime.now(dt.UTC)
    # Other work on the same cores skews every figure here; the load says how much there was.
    result["load_average_1_5_15"] = {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}
    result |= {
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "tool_versions": tool_versions(),
        "settings": {
            "images": n_images,
            "latency_runs": latency_runs,
            "concurrency": list(concurrency),
            "seconds_per_level": seconds,
            "slo_p99_ms": slo_ms,
            "client": "tritonclient.grpc, batch 1, FP32 raw tensors (_shm rows: Triton system shared "
            "memory), same machine",
        },
        "validity": {"valid": not reasons, "reasons": reasons},
    }
    write_results(out_dir, "serving", now, result, markdown(result), log)
    return result


def markdown(r: dict) -> str:
    lat = r["latency_ms"]
    side = r["edge_server_side_mean_ms"]
    verdict = "VALID" if r["validity"]["valid"] else "INVALID: " + "; ".join(r["validity"]["reasons"])
    lines = [
        f"# Serving benchmark: {r['variant']}",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['system']}; "
        "client and servers share the same cores",
        f"- load average (1/5/15 min) before {r['load_average_1_5_15']['before']}, after "
        f"{r['load_average_1_5_15']['after']} (other jobs on the machine count here)",
        f"- client: {r['settings']['client']}; servers loaded with all {len(r['models_loaded'])} variants",
        f"- validity: {verdict}",
        "",
        "## Batch-1 latency (ms, end to end at the client; raw = runtime call in-process)",
        "",
        "| target | p50 | p90 | p99 | mean | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, v in lat.items():
        lines.append(
            f"| {k} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {v['mean']:.2f} | {v['n']} |"
        )
    lines += [
        "",
        f"Edge p50 / raw runtime p50: **{r['edge_vs_raw_p50']:.2f}x** back to back, "
        f"**{r['edge_vs_raw_paced_p50']:.2f}x** paced ({1000 * PACE_S:.0f} ms idle between calls); "
        "target <= 1.15x. "
        + (
            f"Through system shared memory (`edge_shm`: the frame written to /dev/shm before each "
            f"call, the request only names it): **{r['edge_shm_vs_raw_p50']:.2f}x**. "
            if "edge_shm_vs_raw_p50" in r
            else ""
        )
        + (
            "As UINT8 pixels (`edge_uint8`, a quarter of the bytes, normalised by the server; identical "
            f"logits: {r['parity'].get('edge_uint8_identical_logits')}): "
            f"**{r['edge_uint8_vs_raw_p50']:.2f}x**. "
            if "edge_uint8_vs_raw_p50" in r
            else ""
        )
        + (
            f"The same FP32 request to an empty server (`null`: no model, answers zeros) takes "
            f"{lat['null']['p50']:.2f} ms p50 ({r['null_vs_raw_p50']:.2f}x the raw runtime), while 1.15x "
            f"leaves {0.15 * lat['raw']['p50']:.2f} ms for transport and handling together. "
            if "null_vs_raw_p50" in r
            else ""
        )
        + "Inside the edge server during this phase (ModelStatistics means over all request kinds): request "
        f"{side['request']:.2f} ms, queue {side['queue']:.2f} ms, runtime call {side['compute']:.2f} ms.",
        "",
        "## Throughput, closed loop, batch-1 requests "
        f"(max within p99 <= {r['settings']['slo_p99_ms']:.0f} ms)",
        "",
        "| server | clients | req/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, t in r["throughput"].items():
        for lv in t["levels"]:
            lm = lv["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
            lines.append(
                f"| {name} | {lv['clients']} | {lv['throughput_rps']:.0f} | {lm['p50']:.1f} | "
                f"{lm['p99']:.1f} | {lv['errors']} |"
            )
    lines.append("")
    for name, t in r["throughput"].items():
        lines.append(
            f"- {name}: max {t['max_rps_within_slo']:.0f} req/s within the SLO ({t['at_clients']} clients)"
        )
    if "edge_vs_triton_throughput" in r:
        lines.append(f"- edge / Triton: **{r['edge_vs_triton_throughput']:.2f}x** (aim >= 1.3x)")
    lines += [
        "",
        "## Memory with the whole repository loaded",
        "",
        "| server | processes | RSS MB | USS MB | load s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in r["memory"].items():
        lines.append(
            f"| {name} | {m['processes']} | {m['rss_mb']:.0f} | {m['uss_mb']:.0f} | "
            f"{r['load_seconds'][name]} |"
        )
    p = r["parity"]
    lines += [
        "",
        "## Top-1 parity and metrics",
        "",
        f"- {p['images']} imagenet-val images: runner top-1 accuracy {p['runner_top1_acc']:.3f}; identical "
        "top-1 vs runner: "
        + ", ".join(
            f"{k.split('_')[0]} {v}/{p['images']}" for k, v in p.items() if k.endswith("identical_top1")
        ),
        f"- edge scrape: requests sent {r['edge_metrics']['requests_sent']}, request histogram count "
        f"{r['edge_metrics']['request_histogram_count']:.0f}, "
        f"OK {r['edge_metrics']['requests_ok']:.0f}, failed {r['edge_metrics']['requests_failed']:.0f}, "
        f"labelled {r['edge_metrics']['labelled']:.0f}, correct {r['edge_metrics']['correct']:.0f}",
    ]
    return "\n".join(lines) + "\n"


def bench_main(args: argparse.Namespace, command: str) -> int:
    run_serving_bench(
        Path(args.repository),
        args.variant,
        args.data_root,
        Path(args.out),
        n_images=args.images,
        latency_runs=args.latency_runs,
        concurrency=tuple(args.concurrency),
        seconds=args.seconds,
        slo_ms=args.slo_ms,
        triton=not args.no_triton,
        command=command,
        log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
    )
    return 0
