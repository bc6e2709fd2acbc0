"""Architectures by name. `build_model("fast", widths=(32, 64, 64))` -> nn.Module.

Every model maps normalised images (N, 3, 32, 32) float to logits (N, 10). A model that needs the
training data to initialise (the fast net's whitening layer) has `init_from_data(images)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from models.fast import FastNet
from models.seed import SeedBaseline, SeedDeep, SeedWide

MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed-baseline": SeedBaseline,
    "seed-deep": SeedDeep,
    "seed-wide": SeedWide,
    "fast": FastNet,
}


def model_names() -> list[str]:
    """The registered architecture names."""
    return sorted(MODELS)


def build_model(name: str, **options: Any) -> nn.Module:
    """Build a registered architecture; unknown names and options are errors naming the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    factory = MODELS[name]
    allowed = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option {', '.join(unknown)}; its options: {', '.join(allowed)}"
        )
    return factory(**options)
