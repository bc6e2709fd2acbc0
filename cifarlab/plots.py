"""PNG plots (matplotlib, no display): a run's learning curves and confusion matrix, and a
sweep's accuracy per point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: these machines have no display
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: Sequence, path: Path) -> Path:
    """Train/validation loss and accuracy per epoch, side by side."""
    plt = pyplot()
    epochs = [h.epoch for h in history]
    sizes = sorted({getattr(h, "val_images", 0) for h in history} - {0})
    val = (
        f"validation ({sizes[0]:,} images per epoch, {sizes[-1]:,} at the end)"
        if len(sizes) > 1
        else "validation"
    )
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h.val_loss for h in history], "o-", label=val)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [100 * h.train_accuracy for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h.val_accuracy for h in history], "o-", label=val)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    title: str = "Confusion matrix (test)",
) -> Path:
    """Row-normalised confusion matrix with counts in the cells."""
    plt = pyplot()
    totals = confusion.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in ticks:
        for j in ticks:
            share = confusion[i, j] / totals[i, 0]
            ax.text(
                j,
                i,
                str(confusion[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(rows: Sequence[Mapping[str, Any]], grid_keys: Sequence[str], path: Path) -> Path:
    """Validation and test accuracy against the varied parameter, with error bars (sd)."""
    plt = pyplot()
    done = [r for r in rows if r["val_acc_mean"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(done) + 2), 4.5))
    single = len(grid_keys) == 1
    xs_raw = [r[grid_keys[0]] if single else r["point"] for r in done]
    numeric = single and all(_is_number(x) for x in xs_raw)
    if numeric:  # draw lines left to right, whatever order the grid listed the values in
        order = sorted(range(len(done)), key=lambda i: float(xs_raw[i]))
        done, xs_raw = [done[i] for i in order], [xs_raw[i] for i in order]
    xs = [float(x) for x in xs_raw] if numeric else list(range(len(done)))
    for metric, colour, label in (
        ("val", "tab:blue", "validation"),
        ("test", "tab:orange", "test"),
    ):
        ys = [100 * r[f"{metric}_acc_mean"] for r in done if r[f"{metric}_acc_mean"] is not None]
        es = [
            100 * (r[f"{metric}_acc_std"] or 0) for r in done if r[f"{metric}_acc_mean"] is not None
        ]
        if len(ys) == len(xs):
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                fmt="o-" if numeric else "o",
                capsize=4,
                color=colour,
                label=f"{label} (mean ± sd over seeds)",
            )
    reported = [(x, r["report_test_acc"]) for x, r in zip(xs, done) if r["report_test_acc"]]
    if reported:
        ax.scatter(
            *zip(*reported), marker="*", s=160, color="black", label="report (test)", zorder=5
        )
    if numeric:
        if min(xs) > 0 and max(xs) / min(xs) >= 50:
            ax.set_xscale("log")
    else:
        ax.set_xticks(xs, [str(x) for x in xs_raw], rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(grid_keys[0] if single else "point")
    ax.set_ylabel("accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _is_number(x: Any) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False
