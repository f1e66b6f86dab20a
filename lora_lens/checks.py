"""Argument checks shared across rooms: each raises a :class:`~lora_lens.errors.ConfigError` naming the bad value.

Example:
    >>> check_positive("n", 3)
    >>> check_fraction("min_confidence", 0.5, 0.1)
    0.5
"""

from __future__ import annotations

from lora_lens.errors import ConfigError

__all__ = ["check_fraction", "check_positive"]


def check_positive(name: str, value) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a positive integer (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def check_fraction(name: str, value, example: float) -> float:
    """``value`` as a float in ``[0, 1)``; raise :class:`ConfigError` (suggesting ``example``) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1), e.g. {example}")
    return float(value)
