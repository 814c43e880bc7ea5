"""Server-rendered charts for the admin pages: series in, markup out.

No JavaScript and no external assets: Python computes every coordinate and writes the SVG
(or, for small multiples, an HTML table), escaping every label and title; the page's
stylesheet colours the marks by their CSS class. The kernel knows nothing of the data: the
apps pass their values, labels and hover titles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

Y_TICKS = 4  # gridlines above the baseline
X_LABELS = 6  # about this many labels along the x axis, whatever the number of slots
X_LABEL_DROP = 18  # from the baseline down to the x labels' baseline
BAR_SHARE = 0.7  # of its slot a bar fills, centred


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


@dataclass(frozen=True)
class Frame:
    """The SVG's size and the plot's margins inside it, in pixels."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    label_gap: int = 6  # between the y axis and its (right-aligned) labels

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def baseline(self) -> int:
        return self.height - self.bottom


@dataclass(frozen=True)
class Series:
    """One value per slot; `css` is the class of its bars or line (the page colours it)."""

    name: str
    css: str
    values: Sequence[float]


@dataclass(frozen=True)
class Segment:
    css: str
    y: float
    height: float


@dataclass(frozen=True)
class Bar:
    """One slot's bar: its series stacked bottom-up, one hover title for the whole bar."""

    x: float
    width: float
    title: str
    segments: tuple[Segment, ...]


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
    css: str  # the <svg>'s class
    title: str  # its accessible name
    frame: Frame
    series: tuple[Series, ...]
    bars: tuple[Bar, ...]
    lines: tuple[Line, ...]
    grid: tuple[float, ...]
    y_labels: tuple[Label, ...]
    x_labels: tuple[Label, ...]
    empty: bool
    empty_text: str
    legend: bool

    def html(self) -> SafeString:
        """The chart as markup, for `{{ chart.html }}` in a template."""
        return render(self)


@dataclass(frozen=True)
class _Axes:
    scale: float
    slot: float
    grid: tuple[float, ...]
    y_labels: tuple[Label, ...]
    x_labels: tuple[Label, ...]


def _axes(frame: Frame, labels: Sequence[str], peak: float, ticks: Callable[[float], str]) -> _Axes:
    # The scale rounds up so that each gridline sits on a round number.
    scale = nice_ceiling(peak / Y_TICKS) * Y_TICKS if peak else float(Y_TICKS)
    slot = (frame.plot_right - frame.left) / max(1, len(labels))
    values = [scale * i / Y_TICKS for i in range(Y_TICKS + 1)]
    grid = tuple(_y(frame, scale, value) for value in values)
    x = frame.left - frame.label_gap
    y_labels = tuple(Label(x=x, y=y, text=ticks(v)) for y, v in zip(grid, values, strict=True))
    # Counted from the right so that the latest slot is always labelled.
    every = max(1, math.ceil(len(labels) / X_LABELS))
    x_labels = tuple(
        Label(x=round(frame.left + (i + 0.5) * slot, 2), y=frame.baseline + X_LABEL_DROP, text=text)
        for i, text in enumerate(labels)
        if (len(labels) - 1 - i) % every == 0
    )
    return _Axes(scale=scale, slot=slot, grid=grid, y_labels=y_labels, x_labels=x_labels)


def _y(frame: Frame, scale: float, value: float) -> float:
    return round(frame.baseline - value / scale * (frame.baseline - frame.top), 2)


def default_titles(labels: Sequence[str], series: Sequence[Series]) -> list[str]:
    """Hover titles such as "14:00: 5 requests" or, stacked, "Nov 3: 10 prompt + 20 completion"."""
    return [
        f"{label}: " + " + ".join(f"{s.values[i]:,.0f} {s.name}" for s in series)
        for i, label in enumerate(labels)
    ]


def bar_chart(
    *,
    id: str,
    css: str,
    title: str,
    frame: Frame,
    labels: Sequence[str],
    series: Sequence[Series],
    titles: Sequence[str] | None = None,
    ticks: Callable[[float], str] = compact,
    empty_text: str,
    legend: bool = False,
) -> Chart:
    """One bar per label; several series stack, the first at the bottom. `titles` are the
    bars' hover texts (default: the label and each series' value and name)."""
    peak = max((sum(s.values[i] for s in series) for i in range(len(labels))), default=0)
    axes = _axes(frame, labels, peak, ticks)
    titles = default_titles(labels, series) if titles is None else titles
    bars = []
    for i, bar_title in enumerate(titles):
        segments, below = [], 0.0
        for s in series:
            top, bottom = _y(frame, axes.scale, below + s.values[i]), _y(frame, axes.scale, below)
            segments.append(Segment(css=s.css, y=top, height=round(bottom - top, 2)))
            below += s.values[i]
        x = round(frame.left + (i + (1 - BAR_SHARE) / 2) * axes.slot, 2)
        width = round(axes.slot * BAR_SHARE, 2)
        bars.append(Bar(x=x, width=width, title=bar_title, segments=tuple(segments)))
    return Chart(
        id=id, css=css, title=title, frame=frame, series=tuple(series), bars=tuple(bars),
        lines=(), grid=axes.grid, y_labels=axes.y_labels, x_labels=axes.x_labels,
        empty=peak == 0, empty_text=empty_text, legend=legend,
    )  # fmt: skip


def line_chart(
    *,
    id: str,
    css: str,
    title: str,
    frame: Frame,
    labels: Sequence[str],
    series: Sequence[Series],
    ticks: Callable[[float], str] = compact,
    empty_text: str,
    legend: bool = True,
) -> Chart:
    """One line per series, a point per label at the middle of its slot."""
    peak = max((v for s in series for v in s.values), default=0)
    axes = _axes(frame, labels, peak, ticks)

    def points(values: Sequence[float]) -> str:
        return " ".join(
            f"{round(frame.left + (i + 0.5) * axes.slot, 2)},{_y(frame, axes.scale, v)}"
            for i, v in enumerate(values)
        )

    lines = tuple(Line(css=s.css, name=s.name, points=points(s.values)) for s in series)
    return Chart(
        id=id, css=css, title=title, frame=frame, series=tuple(series), bars=(), lines=lines,
        grid=axes.grid, y_labels=axes.y_labels, x_labels=axes.x_labels,
        empty=peak == 0, empty_text=empty_text, legend=legend,
    )  # fmt: skip


def render(chart: Chart) -> SafeString:
    """The <svg>, then its legend (a swatch per series) and its empty state, if any."""
    f = chart.frame
    parts = [
        format_html(
            '<svg class="{}" id="{}" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" '
            'viewBox="0 0 {} {}" role="img" aria-label="{}">',
            chart.css, chart.id, f.width, f.height, f.width, f.height, chart.title,
        ),
        format_html_join(
            "", '<line class="grid" x1="{}" x2="{}" y1="{}" y2="{}"/>',
            ((f.left, f.plot_right, y, y) for y in chart.grid),
        ),
        format_html_join(
            "", '<text class="axis" x="{}" y="{}" dy="4" text-anchor="end">{}</text>',
            ((label.x, label.y, label.text) for label in chart.y_labels),
        ),
        format_html_join(
            "", '<text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>',
            ((label.x, label.y, label.text) for label in chart.x_labels),
        ),
        *(_bar(bar) for bar in chart.bars),
        format_html_join(
            "", '<polyline class="{}" points="{}"><title>{}</title></polyline>',
            ((line.css, line.points, line.name) for line in chart.lines),
        ),
        mark_safe("</svg>"),
    ]  # fmt: skip
    if chart.legend:
        swatches = format_html_join(
            "", '<span class="swatch {}"></span>{}', ((s.css, s.name) for s in chart.series)
        )
        parts.append(format_html('<p class="legend">{}</p>', swatches))
    if chart.empty:
        parts.append(format_html('<p class="help">{}</p>', chart.empty_text))
    return mark_safe("".join(parts))  # every part above is escaped by format_html


def _bar(bar: Bar) -> SafeString:
    # The title sits on the group so that hovering any segment shows the whole bar's values.
    rects = format_html_join(
        "", '<rect class="{}" x="{}" y="{}" width="{}" height="{}"/>',
        ((s.css, bar.x, s.y, bar.width, s.height) for s in bar.segments),
    )  # fmt: skip
    return format_html("<g><title>{}</title>{}</g>", bar.title, rects)


@dataclass(frozen=True)
class Column:
    label: str  # the header
    title: str  # the header's hover text, also in each cell's title ("2026-12-03")


def bar_table(
    *,
    css: str,
    corner: str,
    columns: Sequence[Column],
    rows: Sequence[Series],
    color: str,
    height: int = 36,
) -> SafeString:
    """Small multiples as an HTML table: a row per series, a cell per column holding a bar
    (all scaled to the table's peak) and its value, and the row's total. No rows: ""."""
    if not rows:
        return mark_safe("")
    peak = max((v for row in rows for v in row.values), default=0)
    head = format_html_join("", '<th title="{}">{}</th>', ((c.title, c.label) for c in columns))
    body = format_html_join(
        "", '<tr><th scope="row">{}</th>{}<td>{}</td></tr>',
        ((row.name, _cells(row, columns, peak, color, height), f"{sum(row.values):,}")
         for row in rows),
    )  # fmt: skip
    return format_html(
        '<table class="{}" style="margin-bottom:1.5em"><thead><tr><th>{}</th>{}<th>total</th>'
        "</tr></thead><tbody>{}</tbody></table>",
        css, corner, head, body,
    )  # fmt: skip


def _cells(
    row: Series, columns: Sequence[Column], peak: float, color: str, height: int
) -> SafeString:
    return format_html_join(
        "",
        '<td title="{} {}: {}" style="vertical-align:bottom;height:{}px;padding:2px">'
        '<div style="height:{}px;background:{};width:14px"></div><small>{}</small></td>',
        (
            (row.name, column.title, f"{value:,}", height + 8,
             round(height * value / peak) if peak else 0, color, f"{value:,}" if value else "")
            for column, value in zip(columns, row.values, strict=True)
        ),
    )  # fmt: skip
