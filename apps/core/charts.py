"""Helpers for server-rendered SVG charts (the admin's usage and dashboard charts)."""

from __future__ import annotations

import math


def compact(n: float) -> str:
    """1234 -> 1.2k, 3_000_000 -> 3M: axis labels stay short."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{n:g}"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 x 10^n that is >= value, so gridlines fall on round numbers."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return 10.0 * magnitude  # pragma: no cover - the loop always returns
