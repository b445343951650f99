"""Plots of QAT runs: one run's loss and val top-1 per epoch, and an ablation grid's runs side by side."""

from __future__ import annotations

import os
from pathlib import Path

_MARKERS = {8: "o", 6: "D", 4: "s", 3: "v", 2: "^"}  # weight bits of the epoch's phase


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list[dict], fp32_top1: float, title: str, path: Path) -> None:
    """Distillation loss and val top-1 per epoch, markers by the phase's weight bits, FP32 dashed."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["loss"] for h in history], color="tab:blue", lw=1)
    last_step = [h for h in history if "val_top1_last_step" in h]  # --ema-decay: the unaveraged student
    ax_acc.plot(epochs, [100 * h["val_top1"] for h in history], color="tab:blue", lw=1,
                label="averaged (exported)" if last_step else None)  # fmt: skip
    for h in history:
        m = _MARKERS.get(h["weight_bits"], "o")
        ax_loss.plot(h["epoch"], h["loss"], m, color="tab:blue")
        ax_acc.plot(h["epoch"], 100 * h["val_top1"], m, color="tab:blue")
    if last_step:
        ax_acc.plot([h["epoch"] for h in last_step], [100 * h["val_top1_last_step"] for h in last_step],
                    "x--", color="tab:grey", lw=0.8, label="last step (not averaged)")  # fmt: skip
    ax_acc.axhline(100 * fp32_top1, color="black", ls="--", lw=0.8, label=f"FP32 {100 * fp32_top1:.2f}%")
    for h, prev in zip(history[1:], history[:-1], strict=False):
        if (h["weight_bits"], h["act_bits"]) != (prev["weight_bits"], prev["act_bits"]):
            for ax in (ax_loss, ax_acc):
                ax.axvline(h["epoch"] - 0.5, color="grey", lw=0.6, ls=":")
    phases = " -> ".join(dict.fromkeys(f"W{h['weight_bits']}A{h['act_bits']}" for h in history))
    ax_loss.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, what in ((ax_loss, "training loss"), (ax_acc, "val top-1 (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(what)
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(f"{title}: {phases} (dotted: phase changes)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_ablation(rows: list[dict], title: str, path: Path) -> None:
    """One panel per precision: val top-1 per epoch of each trained method, PTQ and FP32 as lines."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    last = max((e["epoch"] for r in rows for e in r.get("history") or []), default=1)
    fig, axes = plt.subplots(1, len(precisions), figsize=(4.2 * len(precisions), 3.8), squeeze=False)
    for ax, precision in zip(axes[0], precisions, strict=True):
        mine = [r for r in rows if r["precision"] == precision]
        fp32 = 100 * mine[0]["top1_fp32"]
        ax.axhline(fp32, color="black", ls="--", lw=0.8, label=f"FP32 {fp32:.2f}")
        trained = [100 * e["val_top1"] for r in mine for e in r.get("history") or []]
        # Untrained 4-bit activations sit tens of points down: the axis follows the trained curves.
        floor = min(trained) - 1 if trained else None
        for r in mine:
            if not r.get("history"):
                top1 = 100 * r["top1"]
                below = floor is not None and top1 < floor
                label = f"{r['method']} {top1:.2f}" + (" (below the axis)" if below else "")
                ax.axhline(top1, color="grey", ls=":", lw=1, label=label)
                continue
            if r.get("same_as"):
                continue  # the same run as the cell it names: drawn once
            h = r["history"]
            (line,) = ax.plot([e["epoch"] for e in h], [100 * e["val_top1"] for e in h], lw=1,
                              label=f"{r['method']} {100 * r['top1']:.2f}")  # fmt: skip
            for e in h:
                ax.plot(
                    e["epoch"],
                    100 * e["val_top1"],
                    _MARKERS.get(e["weight_bits"], "o"),
                    color=line.get_color(),
                )
        if floor is None:  # PTQ only: around it and FP32
            floor = min(100 * r["top1"] for r in mine) - 1
        ax.set_ylim(floor, max([fp32, *trained]) + 1)
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(precision)
        ax.set_xlabel("epoch (marker: weight bits, o 8, s 4, ^ 2)")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
