"""Training checkpoints: written atomically, loaded with torch's safe loader, and resumed only
by a run whose config has the same identity."""

from __future__ import annotations

import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import RunConfig, identity_exclude


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely (it holds more than tensors and plain values)."""


def load(path: Path, device: torch.device) -> dict[str, Any]:
    """Load a checkpoint with torch's safe loader: tensors, containers and plain Python values
    only, so a planted checkpoint cannot run code. Everything `train` saves is of those kinds."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects the safe loader refuses (not a checkpoint this code wrote, or "
            f"tampered with); delete it to start over. {exc}"
        ) from None


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write a checkpoint so that a reader (or a run killed mid-write) never sees half of it."""
    # A name of this process's own: two writers never share (or truncate) one temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous checkpoint


def identity(config: RunConfig) -> dict[str, Any]:
    """The parts of the config a checkpoint must agree with to be resumed."""
    return config.model_dump(
        mode="json", include={"data", "model", "train"}, exclude=identity_exclude(config)
    )
