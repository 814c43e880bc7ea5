"""Geometry of the server-rendered usage chart."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from apps.quotas.charts import compact, nice_ceiling, usage_chart
from apps.quotas.selectors import DayUsage


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


def days(*totals: tuple[int, int]) -> list[DayUsage]:
    first = date(2026, 11, 1)
    return [DayUsage(first + timedelta(days=i), p, c) for i, (p, c) in enumerate(totals)]


def test_it_stacks_completion_on_prompt_within_the_plot() -> None:
    chart = usage_chart(days((300, 100), (0, 0), (100, 300)))

    first, empty, last = chart.bars
    assert first.prompt_y + first.prompt_height == chart.bottom
    assert first.completion_y + first.completion_height == first.prompt_y
    assert empty.prompt_height == empty.completion_height == 0
    assert min(bar.completion_y for bar in chart.bars) >= chart.top
    assert first.completion_y == last.completion_y  # same total, same height
    assert [tick.label for tick in chart.y_ticks] == ["0", "100", "200", "300", "400"]
    assert not chart.empty


def test_it_draws_an_empty_chart_with_a_unit_scale() -> None:
    chart = usage_chart(days(*[(0, 0)] * 30))

    assert chart.empty
    assert len(chart.bars) == 30
    assert chart.x_labels[-1].label == "Nov 30"
    assert len(chart.x_labels) <= 6
