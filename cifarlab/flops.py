"""Training cost in floating-point operations, counted by torch's FlopCounterMode on one
forward and backward pass (the figure the presets' FLOP budgets are checked against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab.config import RunConfig
from cifarlab.optim import make_optimizer
from models import build_model


def training_flops_per_image(config: RunConfig, device: torch.device | None = None) -> float:
    """FLOPs of one training step (forward, loss, backward, optimizer step) per image, counted
    by torch's FlopCounterMode on a batch of the config's size: convolutions and matrix
    products, Muon's Newton-Schulz iterations among them; elementwise work is not counted.
    Leaves torch's global random state as it found it."""
    from torch.utils.flop_counter import FlopCounterMode

    device = device or torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(config.model.name, **config.model.options).to(device)
        optimizer = make_optimizer(model, config.train)
        batch = config.train.batch_size
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return counter.get_total_flops() / batch


def training_flops(config: RunConfig, per_image: float | None = None) -> float:
    """A run's training FLOPs: per image (`training_flops_per_image`, unless given) x the
    images of an epoch (full batches of the training split) x its epochs."""
    per_image = training_flops_per_image(config) if per_image is None else per_image
    images = max(config.data.train_size // config.train.batch_size, 1) * config.train.batch_size
    return per_image * images * config.train.epochs
