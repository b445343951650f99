"""`rtq bench offline`: raw runtime latency and throughput per variant, side by side in one run.

Batch-1 runs are interleaved across variants in rounds, so a slow minute of the machine hits
every variant alike and ratios between them stay fair. Each result carries its own validity
verdict (MLPerf-style): enough timed runs, warm-up excluded.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.bench.results import write_results
from serving.errors import RtqError
from serving.repository.build import machine, tool_versions
from serving.repository.layout import list_variants, open_variant
from serving.runtimes import open_runner

MIN_RUNS = 200
MIN_WARMUP = 10
ROUND = 50
THROUGHPUT_SECONDS = 1.0


def latency_percentiles(samples_ns: list[int]) -> dict:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "p50": round(float(np.percentile(ms, 50)), 3),
        "p90": round(float(np.percentile(ms, 90)), 3),
        "p99": round(float(np.percentile(ms, 99)), 3),
        "mean": round(float(ms.mean()), 3),
        "min": round(float(ms.min()), 3),
        "runs": len(ms),
    }


def throughput(runner, x: np.ndarray, batch: int) -> float:
    """Images per second at `batch` (the single image repeated), timed for THROUGHPUT_SECONDS."""
    xb = np.repeat(x, batch, axis=0)
    for _ in range(3):
        runner.infer(xb)
    n, start = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - start < THROUGHPUT_SECONDS:
        runner.infer(xb)
        n += 1
    return n * batch / (time.perf_counter() - start)


def _markdown(result: dict) -> str:
    lines = [
        "# Offline benchmark: raw runtime, no server",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"{result['settings']['threads']} runtime threads; 1-min load average "
        f"{result['load_average_1m']['before']} before, {result['load_average_1m']['after']} after",
        f"- batch-1 latency: {result['settings']['warmup']} warm-up runs excluded, then "
        f"{result['settings']['runs']} timed runs interleaved across variants in rounds of {ROUND}",
        "",
        "| variant | backend | precision | runs in | MB | p50 ms | p90 ms | p99 ms "
        "| best img/s (batch) | valid |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in result["variants"]:
        lat = v["latency_ms"]
        best = max(v["throughput_ips"].items(), key=lambda kv: kv[1])
        verdict = "VALID" if v["validity"]["valid"] else "INVALID: " + "; ".join(v["validity"]["reasons"])
        lines.append(
            f"| {v['variant']} | {v['backend']} | {v['precision']} | {v['execution_precision']} | "
            f"{v['file_bytes'] / 1e6:.1f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | "
            f"{best[1]:.0f} ({best[0]}) | {verdict} |"
        )
    if result["speedups"]:
        lines += [
            "",
            "## Quantized vs FP32, same model and backend, same run",
            "",
            "| model | backend | precision | p50 ms | FP32 p50 ms | speed-up |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for s in result["speedups"]:
            lines.append(
                f"| {s['model']} | {s['backend']} | {s['precision']} | {s['p50_ms']:.2f} | "
                f"{s['fp32_p50_ms']:.2f} | {s['speedup_p50']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def run_offline(
    repository: Path,
    names: list[str],
    out_dir: Path,
    runs: int = 300,
    warmup: int = 30,
    batches: tuple[int, ...] = (1, 4, 8, 16, 32),
    threads: int = 2,
    command: str = "",
    progress: bool = True,
) -> dict:
    names = names or list_variants(repository)
    if not names:
        raise RtqError(f"{repository} holds no variants; run `rtq build` first")
    variants = [open_variant(repository, n) for n in names]
    runners = [
        open_runner(v.manifest["backend"], v.model_path, v.manifest["precision"], threads) for v in variants
    ]
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, *v.manifest["input"]["shape"]), dtype=np.float32) for v in variants]
    samples: list[list[int]] = [[] for _ in variants]
    try:
        for r, x in zip(runners, inputs, strict=True):
            for _ in range(warmup):
                r.infer(x)
        bar = tqdm(total=runs * len(variants), desc="batch-1 latency", disable=not progress)
        done = 0
        while done < runs:
            step = min(ROUND, runs - done)
            for i, (r, x) in enumerate(zip(runners, inputs, strict=True)):
                for _ in range(step):
                    t = time.perf_counter_ns()
                    r.infer(x)
                    samples[i].append(time.perf_counter_ns() - t)
                bar.update(step)
            done += step
        bar.close()
        results = []
        for v, r, x, s in tqdm(
            list(zip(variants, runners, inputs, samples, strict=True)),
            desc="throughput",
            disable=not progress,
        ):
            max_batch = v.manifest.get("max_batch_size", 32)
            tput = {str(b): round(throughput(r, x, b), 1) for b in batches if b <= max(max_batch, 1)}
            reasons = []
            if len(s) < MIN_RUNS:
                reasons.append(f"{len(s)} timed runs < {MIN_RUNS}")
            if warmup < MIN_WARMUP:
                reasons.append(f"warm-up {warmup} < {MIN_WARMUP}")
            m = v.manifest
            results.append(
                {
                    "variant": v.name,
                    "model": m["model"],
                    "trained": m.get("trained", True),
                    "backend": m["backend"],
                    "precision": m["precision"],
                    "execution_precision": r.execution_precision,
                    "file_bytes": m["file_bytes"],
                    "latency_ms": latency_percentiles(s),
                    "throughput_ips": tput,
                    "validity": {"valid": not reasons, "reasons": reasons},
                }
            )
    finally:
        for r in runners:
            r.close()
    fp32 = {(v["model"], v["backend"]): v for v in results if v["precision"] == "fp32"}
    speedups = [
        {
            "model": v["model"],
            "backend": v["backend"],
            "precision": v["precision"],
            "p50_ms": v["latency_ms"]["p50"],
            "fp32_p50_ms": fp32[key]["latency_ms"]["p50"],
            "speedup_p50": round(fp32[key]["latency_ms"]["p50"] / v["latency_ms"]["p50"], 3),
        }
        for v in results
        if v["precision"] != "fp32" and (key := (v["model"], v["backend"])) in fp32
    ]
    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "offline",
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "tool_versions": tool_versions(),
        "settings": {"runs": runs, "warmup": warmup, "batches": list(batches), "threads": threads},
        # Other processes on the same cores inflate latency: the load average says how quiet it was.
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "variants": results,
        "speedups": speedups,
    }
    write_results(out_dir, "offline", now, result, _markdown(result))
    return result
