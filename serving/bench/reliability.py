"""`rtq bench reliability`: fuzzing, overload, SIGTERM under load and soak, one report.

Each step runs against a fresh real server process (so one step's memory or queue state does not
colour the next): the edge server (`rtq serve`) for everything, Triton for the fuzz comparison.
Results go to benchmarks/results/reliability-<stamp>.{md,json} with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from serving.errors import RtqError

DEFAULT_MODEL = "efficientnet_lite0-int8-onnxruntime"
STEPS = ("fuzz", "overload", "sigterm", "soak")


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", default=DEFAULT_MODEL, help="variant to stress (default: %(default)s)")
    sp.add_argument(
        "--steps", nargs="+", choices=STEPS, default=list(STEPS), help="which steps (default: all)"
    )
    sp.add_argument("--fuzz-cases", type=int, default=10_000, help="cases against the edge server")
    sp.add_argument(
        "--triton-cases",
        type=int,
        default=2_000,
        help="the first N of the same cases against Triton (0: skip Triton; default: %(default)s)",
    )
    sp.add_argument("--seed", type=int, default=0, help="fuzz seed (default: %(default)s)")
    sp.add_argument("--slo-ms", type=float, default=100.0, help="per-request deadline (default: %(default)s)")
    sp.add_argument(
        "--max-queue", type=int, default=64, help="edge server queue limit (default: %(default)s)"
    )
    sp.add_argument("--overload-s", type=float, default=60.0, help="burst length (default: %(default)s)")
    sp.add_argument("--soak-s", type=float, default=600.0, help="soak length (default: %(default)s)")
    sp.add_argument("--soak-window-s", type=float, default=60.0, help="soak window (default: %(default)s)")
    sp.add_argument(
        "--soak-warmup-s",
        type=float,
        default=60.0,
        help="the same load before the soak's measured span; memory growth counts from its end "
        "(0: none; default: %(default)s)",
    )
    sp.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("fuzz_cases", "slo_ms", "overload_s", "soak_s", "soak_window_s", "max_queue"):
        if getattr(args, name) <= 0:
            raise RtqError(f"--{name.replace('_', '-')} must be positive")
    if args.triton_cases < 0:
        raise RtqError("--triton-cases must be 0 or more")
    if args.soak_warmup_s < 0:
        raise RtqError("--soak-warmup-s must be 0 or more")
    if args.soak_window_s > args.soak_s:
        raise RtqError("--soak-window-s must not exceed --soak-s")


def _fuzz(args: argparse.Namespace, repository: Path, say) -> dict:
    from serving.bench.fuzz import compare, fuzz_table_markdown, run_fuzz
    from serving.bench.stress import start_edge_process
    from serving.edge.server import DEFAULT_MAX_MESSAGE

    limit = DEFAULT_MAX_MESSAGE  # what start_edge_process's `rtq serve` enforces
    edge = start_edge_process(repository, [args.model], max_queue=args.max_queue)
    try:
        say(f"fuzz: {args.fuzz_cases} cases against the edge server at {edge.url}")
        edge_r = run_fuzz(edge.url, args.model, args.fuzz_cases, args.seed, pid=edge.pid,
                          progress=not args.quiet, max_message_bytes=limit)  # fmt: skip
        alive = edge.proc.poll() is None
        edge_r.target = f"edge server ({edge_r.target})"  # the tables name servers by target
    finally:
        edge.stop()
    results, diffs, triton_note = [edge_r], None, ""
    if args.triton_cases:
        import tempfile

        from serving.bench.serving_bench import free_port
        from serving.triton.launcher import TritonConfig, TritonServer

        with tempfile.TemporaryDirectory() as work:
            triton = TritonServer(
                TritonConfig(repository, grpc_port=free_port(), http_port=free_port(),
                             metrics_port=free_port(), models=[args.model], work_dir=Path(work))
            ).start()  # fmt: skip
            try:
                n = min(args.triton_cases, args.fuzz_cases)
                say(f"fuzz: the first {n} of the same cases against Triton")
                triton_r = run_fuzz(f"127.0.0.1:{triton.config.grpc_port}", args.model, n, args.seed,
                                    pid=triton.process.pid, progress=not args.quiet,
                                    max_message_bytes=limit, rss_children=True)  # fmt: skip
            finally:
                triton.stop()
        triton_r.target = f"Triton ({triton_r.target})"
        results.append(triton_r)
        diffs = compare(edge_r, triton_r)
        triton_note = (
            f"Triton answered {sum(d.cases for d in diffs if not d.same)} of {triton_r.sent} shared cases "
            "differently from the edge server (table below); its 'unexpected' column counts answers outside "
            "the edge server's contract, not Triton bugs.\n"
        )
    checks = {
        f"all {args.fuzz_cases} cases sent": edge_r.sent >= args.fuzz_cases,
        "0 crashes": edge_r.crashes == 0 and alive,
        "0 malformed replies": edge_r.malformed == 0,
        "every answer within its category's contract": not edge_r.unexpected,
    }
    md = "## Fuzzing (raw ModelInfer messages)\n\n" + triton_note + "\n" + fuzz_table_markdown(results, diffs)
    return {
        "markdown": md,
        "checks": checks,
        "json": {
            "edge": edge_r.to_dict(),
            "triton": results[1].to_dict() if len(results) > 1 else None,
            "differences": [asdict(d) for d in diffs or []],
        },  # fmt: skip
    }


def _capacity(args: argparse.Namespace, url: str, say) -> tuple[float, str, dict]:
    """The rate overload and soak scale from: the highest open-loop rate meeting the SLO, searched
    below the closed-loop saturation throughput (which batches full and ignores deadlines)."""
    from serving.bench.stress import (
        capacity_markdown,
        probe_capacity,
        probe_sustainable_rate,
        sustainable_markdown,
    )

    # Closed loop within max_queue + a batch, or the probe itself is refused.
    cap = probe_capacity(url, args.model, seconds=15, concurrency=min(16, args.max_queue))
    if cap.throughput_rps <= 0:
        raise RtqError(f"capacity probe answered nothing: {cap.errors}")
    say(f"capacity: closed loop {cap.throughput_rps} req/s; searching the sustainable open-loop rate")
    sus = probe_sustainable_rate(url, args.model, cap.throughput_rps, slo_ms=args.slo_ms)
    if sus.rate_rps <= 0:
        raise RtqError(f"no open-loop rate met p99 <= {args.slo_ms:g} ms: {sus.trials}")
    md = capacity_markdown(cap) + "\n" + sustainable_markdown(sus)
    return sus.rate_rps, md, {"closed_loop": asdict(cap), "sustainable": asdict(sus)}


def _overload(args: argparse.Namespace, repository: Path, say) -> dict:
    from serving.bench.stress import overload_markdown, run_overload, start_edge_process

    edge = start_edge_process(repository, [args.model], max_queue=args.max_queue)
    try:
        capacity, cap_md, cap_json = _capacity(args, edge.url, say)
        say(f"overload: 2x {capacity} req/s for {args.overload_s:g} s")
        r = run_overload(
            edge.url,
            args.model,
            capacity,
            metrics_url=edge.metrics_url,
            queue_limit=args.max_queue,
            slo_ms=args.slo_ms,
            overload_s=args.overload_s,
        )
    finally:
        edge.stop()
    md = "## Overload (open loop, 2x the sustainable rate)\n\n" + cap_md + "\n" + overload_markdown(r)
    return {"markdown": md, "checks": r.checks(), "json": {"capacity": cap_json, "overload": asdict(r)},
            "capacity_rps": capacity}  # fmt: skip


def _sigterm(args: argparse.Namespace, repository: Path, say) -> dict:
    from serving.bench.stress import drain_markdown, run_sigterm_under_load

    say("sigterm: SIGTERM to rtq serve with a backlog queued")
    r = run_sigterm_under_load(repository, args.model, seconds=6, at=2.0, batch=8)
    return {"markdown": "## Faults: SIGTERM under load\n\n" + drain_markdown(r), "checks": r.checks(),
            "json": asdict(r)}  # fmt: skip


def _soak(args: argparse.Namespace, repository: Path, say, capacity: float | None) -> dict:
    from serving.bench.stress import run_soak, soak_markdown, start_edge_process

    edge = start_edge_process(repository, [args.model], max_queue=args.max_queue)
    cap_md, cap_json = "", None  # measured here only when the overload step did not
    try:
        if capacity is None:
            capacity, cap_md, cap_json = _capacity(args, edge.url, say)
        say(f"soak: {0.8 * capacity:.1f} req/s (80% of {capacity} req/s) for {args.soak_s:g} s "
            f"after {args.soak_warmup_s:g} s of warm-up")  # fmt: skip
        r = run_soak(edge.url, args.model, capacity, server_pid=edge.pid, duration_s=args.soak_s,
                     window_s=args.soak_window_s, slo_ms=args.slo_ms,
                     warmup_s=args.soak_warmup_s)  # fmt: skip
    finally:
        edge.stop()
    md = "## Soak\n\n" + (cap_md + "\n" if cap_md else "") + soak_markdown(r)
    payload = asdict(r) | ({"capacity": cap_json} if cap_json else {})
    return {"markdown": md, "checks": r.checks(), "json": payload}


def run_reliability(args: argparse.Namespace, command: str, say=print) -> tuple[dict, str]:
    """All chosen steps in order; returns (JSON payload, Markdown)."""
    from serving.repository.build import machine
    from serving.repository.layout import open_variant

    _check_args(args)
    repository = Path(args.repository)
    open_variant(repository, args.model)  # a clear error before any server starts
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    load_before = [round(v, 2) for v in os.getloadavg()]
    parts: dict[str, dict] = {}
    t0 = time.monotonic()
    if "fuzz" in args.steps:
        parts["fuzz"] = _fuzz(args, repository, say)
    capacity = None
    if "overload" in args.steps:
        parts["overload"] = _overload(args, repository, say)
        capacity = parts["overload"]["capacity_rps"]
    if "sigterm" in args.steps:
        parts["sigterm"] = _sigterm(args, repository, say)
    if "soak" in args.steps:
        parts["soak"] = _soak(args, repository, say, capacity)
    load_after = [round(v, 2) for v in os.getloadavg()]
    env = machine()
    verdicts = [f"| {step} | {name} | {'PASS' if ok else 'FAIL'} |"
                for step, part in parts.items() for name, ok in part["checks"].items()]  # fmt: skip
    md = "\n".join(
        [
            f"# Reliability: `{args.model}` on the edge server",
            "",
            f"- command: `{command}`",
            f"- date: {started.isoformat()}; wall {time.monotonic() - t0:.0f} s",
            f"- machine: {env['cpu']}, {env['cores']} cores; 1-min load average {load_before[0]} before, "
            f"{load_after[0]} after (the load generator shares the machine)",
            "",
            "| step | check | verdict |",
            "| --- | --- | --- |",
            *verdicts,
            "",
            *(part["markdown"] for part in parts.values()),
        ]
    )
    payload = {
        "command": command,
        "date": started.isoformat(),
        "machine": env,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "model": args.model,
        "checks": {step: part["checks"] for step, part in parts.items()},
        "results": {step: part["json"] for step, part in parts.items()},
    }
    return payload, md


def main(args: argparse.Namespace, command: str) -> int:
    from serving.settings import default_results_dir

    payload, md = run_reliability(args, command, say=(lambda m: None) if args.quiet else print)
    out = Path(args.out) if args.out else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"reliability-{payload['date'].replace(':', '').replace('-', '')[:15].replace('T', '-')}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(md + "\n")
    print(md.split("\n## ")[0])
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    failed = [n for checks in payload["checks"].values() for n, ok in checks.items() if not ok]
    return 0 if not failed else 1
