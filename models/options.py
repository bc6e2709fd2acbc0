"""Checks of model options, so a bad value fails when a config is made rather than mid-training.

Each architecture module declares `OPTION_CHECKS`: its constructors' option names, each mapped to
a check. A check takes the value and raises OptionError with a message that reads after the
field's name ("must be odd, got 4"); `models.check_options` puts the name in front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

Check = Callable[[Any], None]


class OptionError(ValueError):
    """One option's value is not usable; the message completes 'model.options.<name>: '."""


def _integer(value: Any) -> int:
    # bool is an int subclass, but `kernel_size=True` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise OptionError(f"must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def positive(value: Any) -> None:
    """A width, channel count, hidden size or stride: an integer >= 1."""
    if _integer(value) < 1:
        raise OptionError(f"must be a positive integer, got {value}")


def between(low: int, high: int) -> Check:
    """An integer in [low, high]."""

    def check(value: Any) -> None:
        if not low <= _integer(value) <= high:
            raise OptionError(f"must be between {low} and {high}, got {value}")

    return check


def odd_kernel(value: Any) -> None:
    """A conv kernel padded by kernel_size // 2: only odd sizes keep the image size."""
    if _integer(value) < 1:
        raise OptionError(f"must be at least 1, got {value}")
    if value % 2 == 0:
        raise OptionError(
            f"must be odd, got {value} (the convs pad by kernel_size // 2, so an "
            "even kernel changes the output size)"
        )


def widths(min_len: int, max_len: int) -> Check:
    """A list or tuple of min_len..max_len positive integers (channels per block)."""
    count = str(min_len) if min_len == max_len else f"{min_len} to {max_len}"

    def check(value: Any) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise OptionError(f"must be a list of {count} positive integers, got {value!r}")
        if not min_len <= len(value) <= max_len:
            raise OptionError(f"must have {count} entries, got {len(value)}: {list(value)!r}")
        for i, width in enumerate(value):
            try:
                positive(width)
            except OptionError as exc:
                raise OptionError(f"entry {i} {exc}") from None

    return check


def num_classes(value: Any) -> None:
    """The head's size: CIFAR-10 has 10 classes, and evaluation counts exactly 10."""
    if _integer(value) != 10:
        raise OptionError(f"must be 10 (CIFAR-10 has 10 classes), got {value}")
