from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def tokens(value: int | None) -> str:
    """1234567 -> "1,234,567" (contrib.humanize is not installed, and its intcomma is
    locale-dependent)."""
    if value is None:
        return "-"
    return f"{value:,}"
