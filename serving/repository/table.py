"""The variant table people read after a build: size, bits and accuracy beside FP32."""

from __future__ import annotations

from rich.table import Table

COLUMNS = [
    ("variant", "left"), ("backend", "left"), ("precision", "left"), ("runs in", "left"),
    ("bits/w", "right"), ("MB", "right"), ("x FP32", "right"), ("eval set", "left"),
    ("n", "right"), ("top-1", "right"), ("FP32", "right"), ("Δ pts", "right"), ("agree", "right"),
]  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def runs_in(m: dict) -> str:
    """What the runtime computes in; OpenVINO also says what its convolutions really run in."""
    convs = (m.get("runtime") or {}).get("conv_precisions")
    base = m.get("execution_precision", "-")
    return f"{base}, convs {'/'.join(f'{k}x{v}' for k, v in convs.items())}" if convs else base


def rows(manifests: list[dict]) -> list[list[str]]:
    """One row per variant and eval set; untrained models say so in their name."""
    out = []
    for m in manifests:
        for s in list(m["top1"]) or [None]:
            top1 = m["top1"].get(s) if s else None
            fp32 = m["top1_fp32"].get(s) if s else None
            delta = "-" if top1 is None else f"{100 * (top1 - fp32):+.1f}"
            name = m["variant"] + ("" if m.get("trained", True) else " (untrained)")
            n = m.get("eval_images", {}).get(s, "-") if s else "-"
            out.append([
                name, m["backend"], m["precision"], runs_in(m),
                f"{m['weight_bits']:.2f}", f"{m['file_bytes'] / 1e6:.1f}",
                f"{m['compression_vs_fp32']:.2f}", s or "-", str(n), _pct(top1), _pct(fp32), delta,
                _pct(m["agreement_fp32"].get(s) if s else None),
            ])  # fmt: skip
    return out


def variant_table(manifests: list[dict], title: str = "model repository") -> Table:
    table = Table(title=title, title_justify="left")
    for col, just in COLUMNS:
        table.add_column(col, justify=just)
    for r in rows(manifests):
        table.add_row(*r)
    return table


def markdown_table(manifests: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "| " + " | ".join("---:" if j == "right" else "---" for _, j in COLUMNS) + " |"
    body = ["| " + " | ".join(r) + " |" for r in rows(manifests)]
    return "\n".join([head, rule, *body]) + "\n"
