"""The `rtq bench realtime` report: summary JSON, Markdown, PNG plots, one self-contained HTML file.

Plots: latency CDF (single-stream and the best server-scenario run, per server), throughput vs p99
over the server search, and accuracy vs latency vs size per backend (Pareto front marked).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from serving.bench.schedule import LatencyHistogram


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _best_server_run(server_part: dict) -> dict | None:
    runs = [r for r in server_part.get("runs", []) if r["result"] == "VALID"]
    return max(runs, key=lambda r: r["metrics"]["target_qps"]) if runs else None


def rows(result: dict) -> list[dict]:
    """One row per (server, variant): the figures the tables and plots show."""
    out = []
    for kind, srv in result.get("servers", {}).items():
        for variant, res in srv.get("variants", {}).items():
            ss = res.get("single_stream", {}).get("metrics", {})
            srv_part = res.get("server", {})
            best = _best_server_run(srv_part)
            streams = res.get("streams", {})
            acc = res.get("accuracy", {}).get("metrics", {}).get("accuracy")
            out.append(
                {
                    "server": kind,
                    "variant": variant,
                    "backend": result.get("variants", {}).get(variant, {}).get("backend", ""),
                    "file_mb": result.get("variants", {}).get(variant, {}).get("file_mb"),
                    "offline_top1": result.get("offline_accuracy", {}).get(variant),
                    "accuracy": acc,
                    "ss_p50_ms": ss.get("p50_ms"),
                    "ss_p90_ms": ss.get("p90_ms"),
                    "ss_verdict": res.get("single_stream", {}).get("result"),
                    "offline_ips": res.get("offline", {}).get("metrics", {}).get("samples_per_s"),
                    "server_max_qps": srv_part.get("max_qps_within_bound"),
                    "server_p99_ms": best["metrics"]["p99_ms"] if best else None,
                    "streams": streams.get("max_streams"),
                    "streams_share": streams.get("share_of_offline"),
                    "under_load_accuracy": best["metrics"].get("accuracy") if best else None,
                }
            )
    return out


def _plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    slo = result["settings"]["slo_ms"]
    # Latency CDF.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, srv in result.get("servers", {}).items():
        for variant, res in srv.get("variants", {}).items():
            for label, part in (
                ("single-stream", res.get("single_stream")),
                ("server @ max", _best_server_run(res.get("server", {}))),
            ):
                if not part or not part["metrics"].get("latency_hist"):
                    continue
                xs, ys = LatencyHistogram(
                    {int(k): v for k, v in part["metrics"]["latency_hist"].items()}
                ).cdf()
                ax.step(xs, ys, where="post", label=f"{kind} {variant.split('-', 1)[1]} {label}")
    ax.axvline(slo, color="grey", ls="--", lw=1)
    ax.set(
        xscale="log",
        xlabel="latency from due time (ms)",
        ylabel="fraction of queries",
        title="Latency CDF (open loop; dashed: SLO)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    p = stem.with_name(stem.name + "-latency-cdf.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # Throughput vs p99 over the server search.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, srv in result.get("servers", {}).items():
        for variant, res in srv.get("variants", {}).items():
            pts = sorted(
                (r["metrics"].get("throughput_per_s") or 0, r["metrics"].get("p99_ms") or float("nan"))
                for r in res.get("server", {}).get("runs", [])
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{kind} {variant.split('-', 1)[1]}")
    ax.axhline(slo, color="grey", ls="--", lw=1)
    ax.set(
        yscale="log",
        xlabel="achieved throughput (queries/s, Poisson arrivals)",
        ylabel="p99 (ms)",
        title=f"Server scenario: throughput vs p99 (dashed: {slo:g} ms bound)",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    p = stem.with_name(stem.name + "-throughput-p99.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    # Pareto: accuracy vs single-stream p90, marker area = model size, colour = backend.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    table = [r for r in rows(result) if r["accuracy"] is not None and r["ss_p90_ms"] is not None]
    colours = {}
    for r in table:
        c = colours.setdefault(r["backend"], f"C{len(colours)}")
        ax.scatter(
            r["ss_p90_ms"],
            r["accuracy"],
            s=20 + 12 * (r["file_mb"] or 1),
            color=c,
            alpha=0.7,
            marker="o" if r["server"] == "edge" else "s",
            label=f"{r['backend']} ({r['server']})",
        )
        ax.annotate(
            f"{r['variant'].split('-')[1]} {r['file_mb']} MB",
            (r["ss_p90_ms"], r["accuracy"]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = []
    for r in sorted(table, key=lambda r: (r["ss_p90_ms"], -r["accuracy"])):
        if not front or r["accuracy"] > front[-1]["accuracy"]:
            front.append(r)
    if len(front) > 1:
        ax.plot(
            [r["ss_p90_ms"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front"
        )
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set(
        xlabel="single-stream p90 latency (ms)",
        ylabel="top-1 accuracy (through the server)",
        title="Accuracy vs latency vs size (marker area ~ MB)",
    )
    ax.grid(alpha=0.3)
    p = stem.with_name(stem.name + "-pareto.png")
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


COLUMNS = [
    ("variant", "variant"),
    ("file_mb", "MB"),
    ("offline_top1", "offline top-1"),
    ("accuracy", "top-1 via server"),
    ("under_load_accuracy", "top-1 under load"),
    ("ss_p50_ms", "single-stream p50 ms"),
    ("ss_p90_ms", "single-stream p90 ms"),
    ("offline_ips", "offline img/s"),
    ("server_max_qps", "max qps @ p99 bound"),
    ("server_p99_ms", "p99 ms there"),
    ("streams", "streams @ FPS, <1% misses"),
    ("streams_share", "streams x FPS / offline"),
]


def markdown(result: dict) -> str:
    s = result["settings"]
    verdict = "complete" if result["complete"] else "INCOMPLETE: " + "; ".join(result["incomplete_reasons"])
    lines = [
        "# Real-time benchmark: edge server vs Triton",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; status: {verdict}",
        f"- machine: {result['machine'].get('cpu')}, {result['machine'].get('cores')} cores; load average "
        f"before {result['load_average_1_5_15']['before']}, after {result['load_average_1_5_15']['after']} "
        "(client, servers and other jobs share the cores)",
        f"- settings: {s['images']} imagenet-val images ({s['input']}), {s['seconds']} s measured per run "
        "after "
        f"{s['warmup_s']} s warm-up (excluded), p99 bound {s['slo_ms']} ms, streams at {s['fps']} FPS with "
        "deadline = frame interval; open loop, latency from the due time",
        "",
        "| server | " + " | ".join(h for _, h in COLUMNS) + " |",
        "| --- | " + " | ".join("---:" if k != "variant" else "---" for k, _ in COLUMNS) + " |",
    ]
    for r in rows(result):
        lines.append(f"| {r['server']} | " + " | ".join(_fmt(r[k], 3) for k, _ in COLUMNS) + " |")
    lines += ["", "## Scenario verdicts", ""]
    for kind, srv in result.get("servers", {}).items():
        for variant, res in srv.get("variants", {}).items():
            for sc in ("accuracy", "single_stream", "offline"):
                if sc in res:
                    why = "; ".join(res[sc]["reasons"])
                    lines.append(
                        f"- {kind} / {variant} / {sc}: **{res[sc]['result']}**" + (f" ({why})" if why else "")
                    )
            for sc in ("server", "streams"):
                for run in res.get(sc, {}).get("runs", []):
                    m = run["metrics"]
                    what = f"{m.get('target_qps')} qps" if sc == "server" else f"{m.get('streams')} streams"
                    why = "; ".join(run["reasons"])
                    lines.append(
                        f"- {kind} / {variant} / {sc} @ {what}: p99 {m.get('p99_ms')} ms, miss rate "
                        f"{m.get('deadline_miss_rate')}: **{run['result']}**" + (f" ({why})" if why else "")
                    )
    lines += ["", "## Locust runs (`locust -f loadtest/realtime.py`, headless)", ""]
    for kind, srv in result.get("servers", {}).items():
        lc = srv.get("locust")
        if not lc:
            continue
        if "error" in lc:
            lines.append(f"- {kind}: failed: {lc['error']}")
            continue
        offline = result.get("offline_accuracy", {}).get(lc.get("model"))
        delta = (
            f" ({100 * (lc['accuracy'] - offline):+.2f} points vs offline {offline})"
            if offline is not None and lc.get("accuracy") is not None
            else ""
        )
        lines.append(
            f"- {kind}: {lc['users']} streams x {lc['fps_per_stream']} FPS, {lc['queries']} frames, "
            f"p50 {lc['p50_ms']} ms, p99 {lc['p99_ms']} ms, {lc['throughput_per_s']}/s, deadline misses "
            f"{lc['deadline_misses']} ({lc['deadline_miss_rate']}), accuracy under load {lc['accuracy']}"
            f"{delta}, load-generator send lag p99 {lc['send_lag_p99_ms']} ms, complete: {lc['complete']}"
        )
    lines += generator_lines(result.get("generator"))
    return "\n".join(lines) + "\n"


def generator_summary(gen: dict, mode: str) -> str:
    g = gen["by_input"][mode]
    if not g.get("max_frames_per_s"):
        return f"{mode}: no trial held, down to {g['trials'][-1]['streams']} streams"
    ratio = f"{g['vs_server_max']}x" if g.get("vs_server_max") is not None else "n/a"
    return (
        f"{mode}: {g['max_frames_per_s']} frames/s held ({g['max_streams']} streams) = **{ratio}** the "
        f"best server max of this run ({gen['server_max_qps']} qps)"
    )


def generator_lines(gen: dict | None) -> list[str]:
    """The load generator's own capacity, measured against the null server (aim: >= 5x the server)."""
    if not gen:
        return []
    workers = gen["workers"] or "one process, no"
    lines = [
        "",
        "## Load-generator capacity (Locust against an empty server)",
        "",
        f"The same `locust -f loadtest/realtime.py` ({workers} workers) against "
        "`serving/bench/null_server.py`, which answers zero logits without computing: "
        f"{gen['seconds_per_trial']} s per trial, streams "
        "doubled until a trial fails, then the gap halved. A trial holds when every frame was sent and "
        "< 1% missed the frame-interval deadline. Servers and generator share the same cores here.",
        "",
    ]
    if "error" in gen:
        lines.append(f"- failed: {gen['error']}")
    for mode in gen.get("by_input", {}):
        lines.append(f"- {generator_summary(gen, mode)} (aim >= 5x)")
    lines += [
        "",
        "| input | streams | offered /s | answered /s | p50 ms | p99 ms | send lag p99 ms | miss rate "
        "| held |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode, g in gen.get("by_input", {}).items():
        for tr in g["trials"]:
            lines.append(
                f"| {mode} | {tr['streams']} | {tr['offered_per_s']} | "
                f"{_fmt(tr.get('throughput_per_s'), 1)} | "
                f"{_fmt(tr.get('p50_ms'), 1)} | {_fmt(tr.get('p99_ms'), 1)} | "
                f"{_fmt(tr.get('send_lag_p99_ms'), 1)} | {_fmt(tr.get('deadline_miss_rate'), 4)} | "
                f"{'yes' if tr['held'] else 'no' + (': ' + tr['error'] if tr.get('error') else '')} |"
            )
    return lines


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _html(result: dict, md: str, pngs: list[Path]) -> str:
    by_server: dict[str, list[dict]] = {}
    for r in rows(result):
        by_server.setdefault(r["server"], []).append(r)
    cols = []
    for kind, rs in by_server.items():
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(r[k], 3))}</td>" for k, _ in COLUMNS) + "</tr>"
            for r in rs
        )
        head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
        lc = result["servers"][kind].get("locust") or {}
        lc_line = (
            f"Locust: {lc.get('users')} streams, p50 {lc.get('p50_ms')} ms, p99 {lc.get('p99_ms')} ms, "
            f"misses {lc.get('deadline_misses')}, accuracy {lc.get('accuracy')}"
            if lc and "error" not in lc
            else f"Locust: {lc.get('error', 'not run')}"
        )
        errs = "".join(f"<li>{html.escape(e)}</li>" for e in result["servers"][kind].get("errors", []))
        cols.append(
            f"<div class='col'><h2>{html.escape(kind)}</h2><table><tr>{head}</tr>{body}</table>"
            f"<p>{html.escape(lc_line)}</p><ul class='err'>{errs}</ul></div>"
        )
    gen = result.get("generator")
    if gen and gen.get("by_input"):
        items = "".join(
            f"<li>{html.escape(generator_summary(gen, m).replace('**', ''))}</li>" for m in gen["by_input"]
        )
        cols.append(f"<div class='col'><h2>load generator (vs an empty server)</h2><ul>{items}</ul></div>")
    imgs = "".join(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{_b64(p)}'>" for p in pngs)
    status = "complete" if result["complete"] else "INCOMPLETE: " + "; ".join(result["incomplete_reasons"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rtq real-time benchmark</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .cols{{display:flex;gap:1.5em;flex-wrap:wrap}}
.col{{flex:1;min-width:30em}} table{{border-collapse:collapse;font-size:.85em}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:right}} img{{max-width:48%;margin:.3em}}
.err{{color:#a00}} .status{{font-weight:bold}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}}</style>
</head><body><h1>rtq real-time benchmark: edge server vs Triton</h1>
<p class="status">{html.escape(status)}</p><p>{html.escape(result["date"])} &middot;
<code>{html.escape(result["command"])}</code></p>
<div class="cols">{"".join(cols)}</div><div>{imgs}</div>
<details><summary>Full Markdown summary</summary><pre>{html.escape(md)}</pre></details>
<details><summary>Summary JSON</summary>
<pre>{html.escape(json.dumps(result, indent=1)[:200000])}</pre></details>
</body></html>
"""


def write_report(result: dict, out_dir: Path, stem_name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    md_path = stem.with_suffix(".md")
    md_path.write_text(md)
    pngs = _plots(result, stem)
    html_path = stem.with_suffix(".html")
    html_path.write_text(_html(result, md, pngs))
    return [json_path, md_path, *pngs, html_path]
