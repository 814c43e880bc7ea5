"""What the gateway's batched request logs record, through a real gateway process."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from tests.conftest import FAKE_MODEL, request_logs, wait_until
from tests.tenants.test_rate_limits_e2e import wait_for_fresh_window

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]}


def post_chat(gateway, tenant_key, body: dict | bytes = CHAT) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={**tenant_key.auth, "Content-Type": "application/json"},
        json=None if content is not None else body,
        content=content,
        timeout=10,
    )


def test_it_records_when_a_key_was_last_used(engine, openai_client, alice, bob):
    before = timezone.now()
    openai_client.chat.completions.create(**CHAT)

    def last_used():
        alice.api_key.refresh_from_db()
        return alice.api_key.last_used_at

    used_at = wait_until(last_used)
    assert before - timedelta(seconds=1) <= used_at <= timezone.now()
    bob.api_key.refresh_from_db()
    assert bob.api_key.last_used_at is None  # only the keys that were used


def test_it_logs_requests_refused_for_an_inactive_tenant(engine, gateway, alice):
    alice.tenant.active = False
    alice.tenant.save()
    assert post_chat(gateway, alice).status_code == 403
    [log] = wait_until(lambda: request_logs(tenant=alice.tenant))
    assert (log.api_key_id, log.endpoint) == (alice.api_key.pk, "chat.completions")
    assert (log.status_code, log.error_code) == (403, "tenant_inactive")
    assert log.engine == ""  # refused before any engine was chosen


def test_it_logs_requests_refused_by_a_rate_limit(engine, gateway, alice):
    alice.api_key.requests_per_minute = 1
    alice.api_key.save()
    wait_for_fresh_window(alice.api_key.pk)
    assert post_chat(gateway, alice).status_code == 200
    assert post_chat(gateway, alice).status_code == 429
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.status_code, log.error_code) for log in logs] == [
        (200, ""),
        (429, "rate_limit_exceeded"),
    ]
    assert {log.api_key_id for log in logs} == {alice.api_key.pk}


def test_it_logs_requests_refused_as_malformed(engine, gateway, alice, fake_engine):
    assert post_chat(gateway, alice, b"{not json").status_code == 400
    assert post_chat(gateway, alice, {**CHAT, "max_tokens": "9"}).status_code == 400
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 2 and request_logs())
    assert [(log.status_code, log.error_code) for log in logs] == [
        (400, "invalid_request_error"),
        (400, "invalid_request_error"),
    ]


def test_it_does_not_log_requests_with_a_bad_key(engine, gateway, alice):
    unknown = {"Authorization": "Bearer sk-" + "a" * 12 + "_no-such-secret"}
    response = httpx.post(f"{gateway.base_url}/chat/completions", headers=unknown, json=CHAT)
    assert response.status_code == 401
    assert post_chat(gateway, alice).status_code == 200  # flushed in the same batch or after
    wait_until(lambda: request_logs())
    assert [log.status_code for log in request_logs()] == [200]
