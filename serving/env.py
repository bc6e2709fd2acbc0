"""The service's settings from the environment: a bad value stops it, naming the setting."""

from __future__ import annotations

import os
from typing import Any


def text(name: str, default: str) -> str:
    """`$name`, or `default` when it is unset or blank."""
    return os.environ.get(name, "").strip() or default


def number(
    name: str, default: float, minimum: float, maximum: float | None = None, kind: type = float
) -> Any:
    """`$name` as `kind` (int or float) within [minimum, maximum], else `default`."""
    raw = text(name, "")
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        what = "whole number" if kind is int else "number"
        raise ValueError(f"{name}={raw!r} is not a {what}") from None
    if value < minimum or (maximum is not None and value > maximum):
        top = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name}={raw!r} must be at least {minimum}{top}")
    return value


def flag(name: str, default: bool) -> bool:
    """`$name` as true/false (or 1/0)."""
    raw = text(name, "true" if default else "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ValueError(f"{name}={raw!r}: expected true or false")
    return raw in ("true", "1")
