"""`rtq bench lowbit`: every precision plan of a model, built and evaluated in one run.

Writes the ablation table (method, bits, file size, top-1 beside FP32 and INT8 on the same
images) and a Pareto plot of file size against top-1 into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.settings import PROJECT_ROOT, default_results_dir

_VNNI = {True: "yes", False: "no (u8 x s8 kernels saturate: compare the exact column)", None: "unknown"}


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="zoo model (see `rtq models`)")
    sp.add_argument("--plans", nargs="+", required=True, help="precision plan YAML files")
    sp.add_argument("--weights", default=None, help="local checkpoint (default: the zoo's)")
    sp.add_argument("--eval", default="imagenet-val", help="labelled folder (default: %(default)s)")
    sp.add_argument("--eval-images", type=int, default=None, help="first N images only")
    sp.add_argument(
        "--calibration-images", type=int, default=300, help="imagenet-calib images (default: 300)"
    )
    sp.add_argument("--out", default=str(default_results_dir()), help="results folder (default: %(default)s)")


def _pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"fp32": "s", "int8": "D", "rtn": "x", "rtn-bc": "^", "adaround": "o", "adaround-oc": "P"}
    for r in rows:
        family = "mixed" if r["mixed"] else "uniform"
        # The exact column: the kernel column moves with the CPU (saturating u8 x s8 without VNNI).
        top1 = r.get("top1_exact", r["top1"])
        ax.scatter(
            r["file_bytes"] / 1e6,
            100 * top1,
            marker=markers.get(r["method"], "o"),
            s=60,
            color="#d62728" if family == "mixed" else "#1f77b4",
        )
        ax.annotate(
            r["variant"],
            (r["file_bytes"] / 1e6, 100 * top1),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("file size, MB (log)")
    ax.set_ylabel("top-1, % (exact: Q/DQ computed in float)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.text(
        0.01,
        0.01,
        "markers: square fp32, diamond int8, x rtn, triangle rtn+bias corr., "
        "circle adaround, plus adaround-oc; red = mixed precision",
        transform=ax.transAxes,
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace, command: str) -> int:
    from serving.bench.accuracy import score, topk
    from serving.data.datasets import open_labelled
    from serving.data.loader import load_uint8
    from serving.errors import RtqError
    from serving.models.preprocessing import normalize
    from serving.models.zoo import class_wnids
    from serving.quantize.calibration import calibration_inputs
    from serving.quantize.int8_onnxruntime import quantize_int8
    from serving.quantize.lowbit_export import build_lowbit
    from serving.quantize.plan import load_plan
    from serving.quantize.sensitivity_report import fp32_export
    from serving.repository.build import machine, tool_versions
    from serving.repository.weight_stats import onnx_weight_stats
    from serving.runtimes import open_runner
    from serving.runtimes.onnxruntime_runner import resolve_int8_kernels

    plans = [load_plan(p) for p in args.plans]
    if len({p.name for p in plans}) != len(plans):
        raise RtqError("two plans share a name; plan names label the results")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32_path, loaded = fp32_export(args.model, args.weights, work)
        pp = loaded.spec.preprocessing
        calib = calibration_inputs(
            "imagenet-calib", pp, args.calibration_images, args.data_root, not args.quiet
        )
        images, labels = open_labelled(args.eval, args.data_root).for_classes(
            class_wnids(loaded.spec.classes)
        )
        images = images.head(args.eval_images)
        labels = labels[: len(images)]
        x = normalize(load_uint8(images, pp, not args.quiet), pp)

        def evaluate(path: Path) -> np.ndarray:
            with open_runner("onnxruntime", path, "int8") as r:
                return np.concatenate([topk(r.infer(x[i : i + 64]), 5) for i in range(0, len(x), 64)])

        def evaluate_exact(path: Path) -> np.ndarray:
            """The same graph with every Q/DQ computed in float: the integers' accuracy as exact
            INT8 arithmetic gives it, whatever this CPU's INT8 kernels do."""
            import onnx

            from serving.quantize.packing import load_unpacked
            from serving.runtimes.onnxruntime_runner import exact_session

            model = load_unpacked(path) or onnx.load(str(path))
            sess = exact_session(model.SerializeToString())
            name = sess.get_inputs()[0].name
            return np.concatenate([topk(sess.run(None, {name: x[i : i + 64]})[0], 5)
                                   for i in range(0, len(x), 64)])  # fmt: skip

        ref5 = evaluate(fp32_path)
        int8_path = quantize_int8(fp32_path, work / "int8.onnx", calib)
        candidates = [
            ("fp32", "fp32", False, fp32_path, 0.0, {}),
            ("int8", "int8", False, int8_path, 0.0, {}),
        ]
        for plan in plans:
            t0 = time.perf_counter()
            dst = work / f"{plan.name}.onnx"
            info = build_lowbit(
                fp32_path,
                plan,
                calib,
                dst,
                log=lambda m: None if args.quiet else print(m),
                cache_dir=PROJECT_ROOT / ".cache" / "lowbit",
            )
            bits = set(info["layer_bits"].values())
            candidates.append((plan.name, plan.method, len(bits) > 1, dst, time.perf_counter() - t0, info))
        fp32_bytes = fp32_path.stat().st_size
        for name, method, mixed, path, seconds, info in candidates:
            acc = score(images.name, evaluate(path), ref5, labels)
            exact = acc if name == "fp32" else score(images.name, evaluate_exact(path), ref5, labels)
            rows.append({
                "variant": name, "method": method, "mixed": mixed,
                "layer_bits": {str(b): sum(1 for v in info.get("layer_bits", {}).values() if v == b)
                               for b in sorted(set(info.get("layer_bits", {}).values()))},
                "weight_bits": round(onnx_weight_stats(path).bits_per_weight, 3),
                "file_bytes": path.stat().st_size,
                "compression_vs_fp32": round(fp32_bytes / path.stat().st_size, 2),
                "top1": acc.top1, "top1_fp32": acc.top1_fp32,
                "delta_pts": round(100 * (acc.top1 - acc.top1_fp32), 2),
                "top1_exact": exact.top1, "delta_exact_pts": round(100 * (exact.top1 - acc.top1_fp32), 2),
                "agreement_fp32": acc.agreement_fp32, "top1_ci95": acc.top1_ci95, "n": acc.n,
                "build_seconds": round(seconds, 1),
            })  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": "lowbit-ablation", "model": args.model, "trained": loaded.trained, "command": command,
        "date": now.isoformat(timespec="seconds"), "machine": machine(), "tool_versions": tool_versions(),
        "ort_int8_kernels": resolve_int8_kernels(),
        "eval_set": images.name, "calibration": {"folder": "imagenet-calib", "images": len(calib)},
        "fp32_reference": "FP32 ONNX on ONNX Runtime (same predictions as PyTorch; see variants report)",
        "rows": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lowbit-{args.model}-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [
        f"# Below 8 bits: {args.model} on {images.name} ({len(x)} images)", "",
        f"- command: `{command}`", f"- date: {payload['date']}; machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores",
        f"- calibration and rounding on {len(calib)} imagenet-calib images; activations 8-bit per-tensor; "
        "weights per-channel; sizes are the packed ONNX files",
        f"- top-1: ONNX Runtime's INT8 kernels on this CPU ({payload['ort_int8_kernels']}); exact: the "
        "same graph with Q/DQ computed in float (what exact INT8 arithmetic gives). INT8 dot products "
        f"with VNNI on this CPU: {_VNNI[payload['machine'].get('int8_vnni')]}",
        "", "| variant | method | mixed | layers per width | bits/w | MB | x FP32 | top-1 | FP32 | Δ pts | "
        "top-1 exact | Δ exact | agree | build s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in rows:
        md.append(
            f"| {r['variant']} | {r['method']} | {'yes' if r['mixed'] else 'no'} | "
            f"{r['layer_bits'] or '-'} | "
            f"{r['weight_bits']:.2f} | {r['file_bytes'] / 1e6:.2f} | {r['compression_vs_fp32']:.2f} | "
            f"{100 * r['top1']:.1f} | {100 * r['top1_fp32']:.1f} | {r['delta_pts']:+.1f} | "
            f"{100 * r['top1_exact']:.1f} | {r['delta_exact_pts']:+.1f} | "
            f"{100 * r['agreement_fp32']:.1f} | {r['build_seconds']:.0f} |"
        )
    md += ["", f"![Pareto: file size vs top-1]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    _pareto_plot(rows, stem.with_suffix(".png"), f"{args.model}: file size vs top-1 ({images.name})")
    print("\n".join(md))
    print(f"wrote {stem}.json, .md and .png")
    return 0
