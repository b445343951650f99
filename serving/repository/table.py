"""The variant table people read after a build: size, bits and accuracy beside FP32."""

from __future__ import annotations

from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def variant_table(manifests: list[dict], title: str = "model repository") -> Table:
    table = Table(title=title, title_justify="left")
    for col, just in [
        ("variant", "left"),
        ("backend", "left"),
        ("precision", "left"),
        ("runs in", "left"),
        ("bits/w", "right"),
        ("MB", "right"),
        ("x FP32", "right"),
        ("eval set", "left"),
        ("top-1", "right"),
        ("FP32", "right"),
        ("Δ pts", "right"),
        ("agree", "right"),
    ]:
        table.add_column(col, justify=just)
    for m in manifests:
        sets = list(m["top1"]) or [None]
        for s in sets:
            top1 = m["top1"].get(s) if s else None
            fp32 = m["top1_fp32"].get(s) if s else None
            delta = "-" if top1 is None else f"{100 * (top1 - fp32):+.1f}"
            name = m["variant"] + ("" if m.get("trained", True) else " (untrained)")
            table.add_row(
                name,
                m["backend"],
                m["precision"],
                m.get("execution_precision", "-"),
                f"{m['weight_bits']:.2f}",
                f"{m['file_bytes'] / 1e6:.1f}",
                f"{m['compression_vs_fp32']:.2f}",
                s or "-",
                _pct(top1),
                _pct(fp32),
                delta,
                _pct(m["agreement_fp32"].get(s) if s else None),
            )
    return table
