"""What training reports: the metrics of each epoch (what epoch hooks receive) and the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class EpochMetrics:
    """What the epoch hook receives; accuracies are fractions, seconds exclude evaluation."""

    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float
    images_per_second: float
    train_seconds: float  # cumulative training time so far
    val_images: int = 0  # how many validation images val_* are measured on (0: not recorded)
    val_seconds: float = 0.0  # how long that validation took (0: not recorded)

    def val_subset_note(self, val_size: int) -> str:
        """' (2000 images)' when this epoch was validated on fewer than all `val_size`."""
        return f" ({self.val_images} images)" if 0 < self.val_images < val_size else ""


EpochHook = Callable[[EpochMetrics, nn.Module], None]


@dataclass
class TrainResult:
    """The trained model (final weights, eval mode) and how it got there."""

    model: nn.Module
    history: list[EpochMetrics]
    train_seconds: float
    device: str
    epochs_completed: int
    stopped_early: bool
    resumed_from_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
