"""`rtq sensitivity`: measure, then write JSON + Markdown + a plot, and optionally allocate bits."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path

from serving.errors import RtqError
from serving.quantize.sensitivity import Sensitivity, by_component, hypotheses, measure

COLORS = {"stem": "#444444", "fused_expand": "#8c564b", "pw_expand": "#1f77b4", "depthwise": "#2ca02c",
          "se": "#9467bd", "project": "#ff7f0e", "head": "#d62728", "classifier": "#000000"}  # fmt: skip


def fp32_export(model: str, weights: str | None, workdir: Path) -> tuple[Path, object]:
    from serving.export.onnx_export import export_onnx
    from serving.models.zoo import create_model

    loaded = create_model(model, weights=weights)
    return export_onnx(loaded, workdir / "fp32.onnx"), loaded


def plot(results: list[Sensitivity], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.kind, r.bits) for r in results})
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (kind, bits) in zip(axes[:, 0], panels, strict=True):
        rs = [r for r in results if r.kind == kind and r.bits == bits]
        for comp in COLORS:
            pts = [r for r in rs if r.component == comp]
            if pts:
                ax.scatter(
                    [r.depth for r in pts],
                    [max(r.kl, 1e-6) for r in pts],
                    s=18,
                    color=COLORS[comp],
                    label=comp,
                )
        ax.set_yscale("log")
        ax.set_ylabel(f"KL, {kind} {bits}-bit")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(ncol=4, fontsize=8, loc="upper left")
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("layer depth (0 = stem, 1 = classifier)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict) -> str:
    lines = [
        f"# Layer sensitivity: {payload['model']}",
        "",
        f"- command: `{payload['command']}`",
        f"- date: {payload['date']}; machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores",
        f"- {payload['images']} images of `{payload['calibration_folder']}`; each layer alone quantized "
        "(weights: per-channel symmetric round-to-nearest; activations: per-tensor min/max), the rest "
        "FP32; agreement = top-1 equal to FP32, KL = mean KL(FP32 || quantized)",
        "",
        "## By component (medians over the component's layers)",
        "",
        "| component | kind | bits | layers | agreement | KL | worst layer |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for g in payload["by_component"]:
        lines.append(
            f"| {g['component']} | {g['kind']} | {g['bits']} | {g['layers']} | "
            f"{100 * g['median_agreement']:.1f}% | {g['median_kl']:.4f} | {g['worst_layer']} |"
        )
    lines += [
        "",
        "## Hypotheses (4-bit weights, median KL)",
        "",
        "| hypothesis | median KL | compared with | verdict |",
        "| --- | ---: | ---: | --- |",
    ]
    for h in payload["hypotheses"]:
        lines.append(f"| {h['hypothesis']} | {h['median_kl']} | {h['compared_with']} | {h['verdict']} |")
    lines += [
        "",
        "## Per layer",
        "",
        "| layer | component | params | kind | bits | agreement | KL |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in payload["layers"]:
        lines.append(
            f"| {r['layer']} | {r['component']} | {r['params']} | {r['kind']} | {r['bits']} | "
            f"{100 * r['agreement']:.1f}% | {r['kl']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_sensitivity(
    model: str,
    weights: str | None,
    out_dir: Path,
    images: int,
    weight_bits: tuple[int, ...],
    act_bits: tuple[int, ...],
    command: str,
    data_root: Path | None = None,
    progress: bool = True,
) -> dict:
    import onnx

    from serving.quantize.calibration import calibration_inputs
    from serving.repository.build import machine

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, loaded = fp32_export(model, weights, Path(tmp))
        fp32 = onnx.load(str(onnx_path))
    x = calibration_inputs("imagenet-calib", loaded.spec.preprocessing, images, data_root, progress)
    results = measure(fp32, x, weight_bits, act_bits, progress)
    now = dt.datetime.now(dt.UTC)
    payload = {
        "benchmark": "sensitivity", "model": model, "trained": loaded.trained, "command": command,
        "date": now.isoformat(timespec="seconds"), "machine": machine(), "images": len(x),
        "calibration_folder": "imagenet-calib",
        "by_component": by_component(results), "hypotheses": hypotheses(results),
        "layers": [r.to_dict() for r in results],
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sensitivity-{model}-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(payload))
    plot(results, stem.with_suffix(".png"), f"{model}: each layer alone quantized ({len(x)} calib images)")
    print(f"wrote {stem}.json, .md and .png")
    return payload


def load_results(path: Path) -> tuple[dict, list[Sensitivity]]:
    try:
        payload = json.loads(path.read_text())
        return payload, [Sensitivity(**r) for r in payload["layers"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RtqError(f"{path} is not a sensitivity result written by `rtq sensitivity`: {exc}") from None


def allocate_plans(
    model: str,
    weights: str | None,
    results: list[Sensitivity],
    ratios: list[float],
    widths: tuple[int, ...],
    plan_dir: Path,
    method: str = "adaround",
    symmetric: bool = True,
) -> list[Path]:
    """One mixed plan per target compression ratio, from measured sensitivity."""
    import numpy as np
    import onnx

    from serving.export.onnx_export import INPUT_NAME
    from serving.quantize.graph import layers_of
    from serving.quantize.int8_onnxruntime import quantize_int8
    from serving.quantize.mixed import allocate, mixed_plan, qdq_overhead
    from serving.quantize.plan import save_plan

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, _ = fp32_export(model, weights, Path(tmp))
        graph = onnx.load(str(onnx_path))
        layers = layers_of(graph)
        fp32_bytes = onnx_path.stat().st_size
        image_shape = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
        # The size model is exact only with the real QDQ overhead; sizes do not depend on the
        # calibration values, so a few constant images suffice.
        int8_path = Path(tmp) / "int8.onnx"
        calib = np.full((4, *image_shape), 0.5, np.float32)
        quantize_int8(onnx_path, int8_path, calib, INPUT_NAME)
        overhead = qdq_overhead(int8_path.stat().st_size, layers)
    out = []
    for ratio in ratios:
        alloc = allocate(layers, results, fp32_bytes, ratio, widths, overhead_bytes=overhead)
        counts = {b: sum(1 for v in alloc.bits.values() if v == b) for b in sorted(set(alloc.bits.values()))}
        name = f"mixed{ratio:g}x".replace(".", "p")
        plan = mixed_plan(
            name, alloc, method, symmetric=symmetric,
            description=f"{model}: knapsack over measured KL for a file >= {ratio:g}x smaller than FP32 "
            f"(estimated {alloc.estimated_bytes} bytes); layers per width {counts}",
        )  # fmt: skip
        path = save_plan(plan, plan_dir / f"{model}-{name}.yaml")
        print(
            f"{path}: widths {counts}, estimated {fp32_bytes / alloc.estimated_bytes:.2f}x smaller, "
            f"predicted KL {alloc.predicted_kl}"
        )
        out.append(path)
    return out
