"""Grace periods written the way operators type them: `90s`, `30m`, `24h`, `7d`, `0`."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_DURATION = re.compile(r"(\d+)([smhd])")
MAX_GRACE = timedelta(days=365)


def parse_grace(text: str) -> timedelta:
    """A timedelta, or ValueError with a message fit for the operator."""
    text = text.strip().lower()
    if text == "0":
        return timedelta(0)
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"Invalid grace period {text!r}: use a number and a unit, e.g. 90s, 30m, 24h, 7d."
        )
    grace = timedelta(**{_UNITS[match[2]]: int(match[1])})
    if grace > MAX_GRACE:
        raise ValueError(f"Grace period {text!r} is longer than a year.")
    return grace
