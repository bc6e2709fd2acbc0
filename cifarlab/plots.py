"""PNG plots of a run: learning curves and the confusion matrix (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    val = (f"validation ({sizes[0]:,} images per epoch, {sizes[-1]:,} at the end)"
           if len(sizes) > 1 else "validation")
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


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path,
                   title: str = "Confusion matrix (test)") -> Path:
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
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
