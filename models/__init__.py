"""Architectures by name. `build_model("fast", widths=(32, 64, 64))` -> nn.Module.

Every model maps normalised images (N, 3, 32, 32) float to logits (N, 10). A model that needs the
training data to initialise (the fast net's whitening layer) has `init_from_data(images)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from models import fast, seed
from models.fast import FastNet
from models.options import Check, OptionError
from models.seed import SeedBaseline, SeedDeep, SeedWide

MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed-baseline": SeedBaseline,
    "seed-deep": SeedDeep,
    "seed-wide": SeedWide,
    "fast": FastNet,
}


# How each architecture's options are checked (declared next to the nets).
OPTION_CHECKS: dict[str, dict[str, Check]] = {
    "seed-baseline": seed.OPTION_CHECKS,
    "seed-deep": seed.OPTION_CHECKS,
    "seed-wide": seed.OPTION_CHECKS,
    "fast": fast.OPTION_CHECKS,
}


def model_names() -> list[str]:
    """The registered architecture names."""
    return sorted(MODELS)


def model_options(name: str) -> list[str]:
    """The option names of a registered architecture (its constructor's keyword arguments)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    return [p for p in inspect.signature(MODELS[name]).parameters if p != "self"]


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError if `options` would not build model `name`: unknown option names (listing
    the valid ones) or bad values, each named like `model.options.kernel_size: must be odd, got 4`.
    """
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model.options.{unknown[0]}: model {name!r} has no option {', '.join(unknown)}; "
            f"its options: {', '.join(allowed)}"
        )
    problems = []
    for option, value in options.items():
        try:
            OPTION_CHECKS[name][option](value)
        except OptionError as exc:
            problems.append(f"model.options.{option}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))


def build_model(name: str, **options: Any) -> nn.Module:
    """Build a registered architecture; unknown names and options, and bad option values, are
    errors naming the option (and the valid ones)."""
    check_options(name, options)
    return MODELS[name](**options)
