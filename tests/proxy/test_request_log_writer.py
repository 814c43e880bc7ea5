"""The request-log writer stores each value as it was given, in one statement per batch."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from apps.request_logs.models import RequestLog
from apps.request_logs.writer import _write, log_row

pytestmark = pytest.mark.django_db


def _row(alice, **changes: object) -> tuple:
    values: dict[str, object] = {
        "created_at": dt.datetime(2026, 12, 4, 13, 5, 36, 123456, tzinfo=dt.UTC),
        "tenant_id": alice.tenant.id,
        "api_key_id": None,
        "endpoint": "chat.completions",
        "model": "fake-model",
        "engine": "fake",
        "stream": True,
        "status_code": 200,
        "error_code": "",
        "prompt_tokens": 12,
        "cached_tokens": 3,
        "completion_tokens": 40,
        "ttft_ms": None,
        "latency_ms": 12.625,
        "client_disconnected": False,
        "usage_estimated": True,
        "safety_action": "flag",
        "cache_status": "miss",
        "cache_saved_tokens": 0,
        "cost": None,
    }
    return log_row(**{**values, **changes})


def test_it_stores_every_value_exactly(alice, django_assert_num_queries):
    rows = [
        _row(alice),
        _row(
            alice,
            api_key_id=alice.api_key.id,
            cost=Decimal("0.000001234567"),
            ttft_ms=0.5,
            model='tab\tquote"\\ü',
        ),
    ]
    with django_assert_num_queries(2):  # the rows, and the keys' last use
        _write(rows)
    stored = list(RequestLog.objects.order_by("id"))
    assert [log.cost for log in stored] == [None, Decimal("0.000001234567")]
    assert [log.ttft_ms for log in stored] == [None, 0.5]
    assert stored[1].api_key_id == alice.api_key.id
    assert stored[1].model == 'tab\tquote"\\ü'
    first = stored[0]
    assert first.created_at == dt.datetime(2026, 12, 4, 13, 5, 36, 123456, tzinfo=dt.UTC)
    assert (first.api_key_id, first.stream, first.usage_estimated) == (None, True, True)
    assert (first.prompt_tokens, first.cached_tokens, first.completion_tokens) == (12, 3, 40)
    assert (first.latency_ms, first.safety_action, first.cache_status) == (12.625, "flag", "miss")


def test_it_refuses_a_value_it_cannot_store(alice):
    with pytest.raises(TypeError, match="not JSON serializable"):
        _write([_row(alice, cost=object())])
    assert not RequestLog.objects.exists()
