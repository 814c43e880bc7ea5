"""Geometry of the dashboard's SVG charts: one value per hour, as bars (one series) or
lines (several); Python computes every coordinate, the template writes them out."""

from __future__ import annotations

from dataclasses import dataclass

from apps.core.charts import compact, nice_ceiling

WIDTH, HEIGHT = 520, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 24
Y_TICKS = 4


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    title: str


@dataclass(frozen=True)
class Line:
    css: str
    name: str
    points: str  # "x,y x,y ..." for <polyline>


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    width: int
    height: int
    bars: list[Bar]
    lines: list[Line]
    y_labels: list[Label]
    x_labels: list[Label]
    grid: list[float]
    left: int
    right: int
    empty: bool


def hour_chart(
    *, id: str, title: str, labels: list[str], series: list[tuple[str, str, list[float]]]
) -> Chart:
    """`series`: (name, css class, one value per label); one series is drawn as bars."""
    peak = max((v for _, _, values in series for v in values), default=0)
    scale = nice_ceiling(peak / Y_TICKS) * Y_TICKS if peak else float(Y_TICKS)
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    slot = (right - LEFT) / max(1, len(labels))

    def y_of(value: float) -> float:
        return round(bottom - value / scale * (bottom - TOP), 2)

    bars, lines = [], []
    if len(series) == 1:
        name, _, values = series[0]
        for i, value in enumerate(values):
            y = y_of(value)
            x = round(LEFT + i * slot + slot * 0.15, 2)
            title = f"{labels[i]}: {value:,.0f} {name}"
            bars.append(
                Bar(x=x, y=y, width=round(slot * 0.7, 2), height=round(bottom - y, 2), title=title)
            )
    else:
        for name, css, values in series:
            points = " ".join(
                f"{round(LEFT + (i + 0.5) * slot, 2)},{y_of(v)}" for i, v in enumerate(values)
            )
            lines.append(Line(css=css, name=name, points=points))
    grid = [y_of(scale * i / Y_TICKS) for i in range(Y_TICKS + 1)]
    y_labels = [
        Label(x=LEFT - 4, y=y + 4, text=compact(scale * i / Y_TICKS)) for i, y in enumerate(grid)
    ]
    every = max(1, len(labels) // 6)
    x_labels = [
        Label(x=round(LEFT + (i + 0.5) * slot, 2), y=HEIGHT - 6, text=label)
        for i, label in enumerate(labels)
        if (len(labels) - 1 - i) % every == 0
    ]
    return Chart(
        id=id, title=title, width=WIDTH, height=HEIGHT, bars=bars, lines=lines,
        y_labels=y_labels, x_labels=x_labels, grid=grid, left=LEFT, right=right,
        empty=peak == 0,
    )  # fmt: skip
