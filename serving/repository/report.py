"""The repository's variant table as a committed result: JSON for machines, Markdown for people."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from serving.repository.build import machine, tool_versions
from serving.repository.table import markdown_table

_KEYS = (
    "variant",
    "model",
    "trained",
    "precision",
    "backend",
    "execution_precision",
    "weight_bits",
    "file_bytes",
    "compression_vs_fp32",
    "top1",
    "top5",
    "top1_ci95",
    "top1_fp32",
    "agreement_fp32",
    "eval_images",
    "calibration",
    "quantization",
    "build_command",
    "built_at",
)


def write_variants_report(manifests: list[dict], out_dir: Path, command: str) -> Path:
    now = dt.datetime.now(dt.UTC)
    payload = {
        "report": "variants",
        "command": command,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "tool_versions": tool_versions(),
        "variants": [{k: m.get(k) for k in _KEYS} for m in manifests],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"variants-{now.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [
        "# Model repository: accuracy and size per variant",
        "",
        f"- command: `{command}` (variants built by `{manifests[0].get('build_command')}`)",
        f"- date: {payload['date']}; machine: {payload['machine']['cpu']}, "
        f"{payload['machine']['cores']} cores",
        "- top-1 and FP32 top-1 are on the same images; FP32 = PyTorch eager of the same weights;"
        " agree = share of images where the variant's top-1 equals FP32's",
        "",
        markdown_table(manifests),
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.json and {stem}.md")
    return stem
