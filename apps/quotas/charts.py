"""Geometry for the server-rendered SVG usage chart (no JavaScript, no external assets).

Python computes every coordinate; the template only writes them out, auto-escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal

from apps.core.charts import compact, nice_ceiling
from apps.quotas.selectors import DayUsage

WIDTH = 760
HEIGHT = 260
MARGIN_LEFT = 56
MARGIN_RIGHT = 12
MARGIN_TOP = 12
MARGIN_BOTTOM = 28
Y_TICKS = 4


@dataclass(frozen=True)
class DayBar:
    label: str  # the hover title
    date_label: str
    x: float
    width: float
    prompt_y: float
    prompt_height: float
    completion_y: float
    completion_height: float


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class XLabel:
    x: float
    label: str


@dataclass(frozen=True)
class UsageChart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    bars: list[DayBar]
    y_ticks: list[Tick]
    x_labels: list[XLabel]
    empty: bool


def usage_chart(days: list[DayUsage]) -> UsageChart:
    """Stacked bars per day: prompt tokens at the bottom, completion tokens on top."""
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    peak = max((day.total_tokens for day in days), default=0)
    scale_max = nice_ceiling(peak / Y_TICKS) * Y_TICKS if peak else float(Y_TICKS)
    plot_height = bottom - top
    slot = (right - left) / max(1, len(days))

    def y_of(tokens: float) -> float:
        return round(bottom - tokens / scale_max * plot_height, 2)

    bars = []
    for i, day in enumerate(days):
        prompt_top = y_of(day.prompt_tokens)
        total_top = y_of(day.total_tokens)
        bars.append(
            DayBar(
                label=(
                    f"{day.day.isoformat()}: {day.prompt_tokens:,} prompt + "
                    f"{day.completion_tokens:,} completion tokens"
                ),
                date_label=f"{day.day:%b} {day.day.day}",
                x=round(left + i * slot + slot * 0.15, 2),
                width=round(slot * 0.7, 2),
                prompt_y=prompt_top,
                prompt_height=round(bottom - prompt_top, 2),
                completion_y=total_top,
                completion_height=round(prompt_top - total_top, 2),
            )
        )
    ticks = [
        Tick(y=y_of(scale_max * i / Y_TICKS), label=compact(scale_max * i / Y_TICKS))
        for i in range(Y_TICKS + 1)
    ]
    # About six date labels, whatever the number of days.
    every = max(1, math.ceil(len(days) / 6))
    x_labels = [
        XLabel(x=round(bar.x + bar.width / 2, 2), label=bar.date_label)
        for i, bar in enumerate(bars)
        if (len(bars) - 1 - i) % every == 0
    ]
    return UsageChart(
        width=WIDTH,
        height=HEIGHT,
        left=left,
        right=right,
        top=top,
        bottom=bottom,
        bars=bars,
        y_ticks=ticks,
        x_labels=x_labels,
        empty=peak == 0,
    )


def spend_chart(days: list[tuple[date, Decimal]]) -> UsageChart:
    """Bars of money spent per day (the usage chart's geometry, one segment per bar)."""
    micro = [DayUsage(day, 0, int(cost * 10**6)) for day, cost in days]
    chart = usage_chart(micro)
    peak = max((d.completion_tokens for d in micro), default=0)
    scale_max = nice_ceiling(peak / Y_TICKS) * Y_TICKS if peak else float(Y_TICKS)
    ticks = [
        replace(tick, label=f"{scale_max * i / Y_TICKS / 10**6:g}")
        for i, tick in enumerate(chart.y_ticks)
    ]
    bars = [
        replace(bar, label=f"{day.isoformat()}: {cost:f}")
        for bar, (day, cost) in zip(chart.bars, days, strict=True)
    ]
    return replace(chart, bars=bars, y_ticks=ticks)
