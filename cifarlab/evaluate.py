"""Evaluation: logits with optional flip / translate test-time augmentation, loss, accuracy,
per-class accuracy and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.tensors import autocast, normalize


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits for a normalised batch (N, 3, 32, 32), averaged over the TTA views: none (1
    forward pass), flip (2) or flip_translate (6). Plain tensor ops, so the ONNX export can bake
    them into the graph."""
    logits = model(x)
    if tta == "none":
        return logits
    logits = 0.5 * (logits + model(x.flip(-1)))
    if tta == "flip":
        return logits
    # flip_translate: add the views shifted by one pixel up-left and down-right, each mirrored too.
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]]
    shifted_logits = sum(0.5 * (model(s) + model(s.flip(-1))) for s in shifted) / len(shifted)
    return 0.5 * logits + 0.5 * shifted_logits


def eval_batch_size(device: torch.device) -> int:
    """Images per forward pass when evaluating: 256 on a CPU, where larger batches fall out of
    the caches (benchmarks/eval_batch.py, results/eval-batch-cpu.json), 1024 on a GPU."""
    return 1024 if device.type == "cuda" else 256


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int | None = None,
    tta: str = "none",
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Float logits (N, 10) on the CPU for uint8 images (N, 3, 32, 32)."""
    batch_size = batch_size or eval_batch_size(device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], device, channels_last)
        with autocast(device, amp_dtype):
            out.append(tta_logits(model, x, tta).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 10)


@dataclass
class EvalResult:
    """Metrics of one evaluated set; accuracies are fractions in [0, 1]."""

    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # int64 (classes, classes): rows true class, columns predicted
    predictions: np.ndarray = field(repr=False)  # int64 (N,)
    logits: np.ndarray | None = field(default=None, repr=False)  # float32 (N, C), ONNX files'


def score(logits: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> EvalResult:
    """Loss, accuracy, per-class accuracy and confusion matrix from logits and labels."""
    labels = labels.long().cpu()
    loss = F.cross_entropy(logits, labels).item() if len(labels) else float("nan")
    pred = logits.argmax(dim=1)
    counts = torch.bincount(labels * num_classes + pred, minlength=num_classes**2)
    confusion = counts.reshape(num_classes, num_classes).numpy()
    totals = confusion.sum(axis=1)
    per_class = [
        float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
        for i in range(num_classes)
    ]
    accuracy = float((pred == labels).float().mean()) if len(labels) else float("nan")
    return EvalResult(loss, accuracy, per_class, confusion, pred.numpy())


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    tta: str = "none",
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> EvalResult:
    """Evaluate a model on uint8 images with their labels."""
    logits = predict_logits(
        model,
        images,
        device=device,
        batch_size=batch_size,
        tta=tta,
        channels_last=channels_last,
        amp_dtype=amp_dtype,
    )
    return score(logits, labels)
