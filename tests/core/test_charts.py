"""The admin's shared charts: series in, SVG (or an HTML table of bars) out."""

from __future__ import annotations

import re

import pytest

from apps.core.charts import (
    Column,
    Frame,
    Series,
    bar_chart,
    bar_table,
    compact,
    line_chart,
    nice_ceiling,
)

FRAME = Frame(width=400, height=200, left=40, right=10, top=10, bottom=30)


def bars(*series: Series, labels: list[str] | None = None, **kwargs):
    labels = labels or [f"h{i}" for i in range(len(series[0].values))]
    return bar_chart(
        id="c", css="chart", title="Requests", frame=FRAME, labels=labels, series=list(series),
        empty_text="Nothing yet.", **kwargs,
    )  # fmt: skip


def titles(html: str) -> list[str]:
    return re.findall(r"<title>([^<]*)</title>", html)


@pytest.mark.parametrize(
    ("value", "ceiling"), [(0, 1), (1, 1), (3, 5), (12, 20), (48_000, 50_000), (51_000, 100_000)]
)
def test_it_rounds_the_scale_up_to_1_2_or_5(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == ceiling


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0"), (950, "950"), (1500, "1.5k"), (200_000, "200k"), (3e6, "3M")]
)
def test_it_writes_short_axis_labels(n: float, text: str) -> None:
    assert compact(n) == text


def test_it_renders_a_bar_per_value_with_the_value_in_its_title() -> None:
    html = bars(Series("requests", "bar", [5, 0, 1234])).html()

    assert html.startswith('<svg class="chart" id="c" ')
    assert 'aria-label="Requests"' in html
    assert html.count('<rect class="bar"') == 3
    assert titles(html) == ["h0: 5 requests", "h1: 0 requests", "h2: 1,234 requests"]
    assert [t for t in re.findall(r'text-anchor="end">([^<]*)<', html)] == [
        "0", "500", "1k", "1.5k", "2k",
    ]  # fmt: skip
    assert "Nothing yet." not in html


def test_it_stacks_series_from_the_baseline_within_the_plot() -> None:
    chart = bars(Series("prompt", "p", [300, 0, 100]), Series("completion", "c", [100, 0, 300]))

    first, empty, last = chart.bars
    prompt, completion = first.segments
    assert prompt.y + prompt.height == FRAME.baseline
    assert completion.y + completion.height == prompt.y
    assert [s.height for s in empty.segments] == [0, 0]
    assert min(s.y for bar in chart.bars for s in bar.segments) >= FRAME.top
    assert first.segments[1].y == last.segments[1].y  # same total, same height
    assert first.title == "h0: 300 prompt + 100 completion"
    assert [label.text for label in chart.y_labels] == ["0", "100", "200", "300", "400"]


def test_it_renders_the_empty_state_for_a_series_of_zeros() -> None:
    chart = bars(Series("requests", "bar", [0] * 30), labels=[f"Nov {d}" for d in range(1, 31)])

    assert chart.empty
    html = chart.html()
    assert html.endswith('</svg><p class="help">Nothing yet.</p>')
    assert html.count("<rect ") == 30  # the empty slots still show where the days are
    assert chart.x_labels[-1].text == "Nov 30"  # the latest day is always labelled
    assert len(chart.x_labels) <= 6


def test_it_escapes_labels_titles_and_names() -> None:
    html = bars(
        Series("<b>x</b>", 'bar" onclick="x', [1]),
        labels=["<script>"],
        titles=["a & <i>b</i>"],
        legend=True,
    ).html()

    assert "<script>" not in html
    assert "<b>" not in html
    assert "<i>" not in html
    assert 'onclick="x' not in html
    assert "<title>a &amp; &lt;i&gt;b&lt;/i&gt;</title>" in html
    assert ">&lt;script&gt;</text>" in html
    assert '<span class="swatch bar&quot; onclick=&quot;x"></span>&lt;b&gt;x&lt;/b&gt;' in html


def test_it_draws_a_line_per_series_with_a_legend() -> None:
    chart = line_chart(
        id="latency", css="chart", title="Latency", frame=FRAME, labels=["a", "b"],
        series=[Series("p50", "p50", [100, 200]), Series("p95", "p95", [300, 400])],
        empty_text="Nothing yet.",
    )  # fmt: skip

    html = chart.html()
    assert [line.name for line in chart.lines] == ["p50", "p95"]
    assert html.count("<polyline ") == 2
    assert titles(html) == ["p50", "p95"]
    assert '<p class="legend"><span class="swatch p50"></span>p50' in html
    # p95's first point: mid-slot of the first of two slots, 300 of a 0-400 scale high.
    assert chart.lines[1].points.split()[0] == "127.5,50.0"


def test_it_renders_small_multiples_as_a_table_of_bars() -> None:
    html = bar_table(
        css="per-rule", corner="rule", color="red", height=36,
        columns=[Column("01/12", "2026-12-01"), Column("02/12", "2026-12-02")],
        rows=[Series("no-<bombs>", "", [2, 0]), Series("pii", "", [1, 1])],
    )  # fmt: skip

    assert html.startswith('<table class="per-rule"')
    assert '<th>rule</th><th title="2026-12-01">01/12</th>' in html
    assert 'title="no-&lt;bombs&gt; 2026-12-01: 2"' in html
    assert "height:36px;background:red" in html  # the peak fills the cell
    assert "height:18px;background:red" in html  # half the peak, half the height
    assert re.findall(r"<td>(\d+)</td></tr>", html) == ["2", "2"]  # the rows' totals
    assert bar_table(css="x", corner="rule", color="red", columns=[], rows=[]) == ""
