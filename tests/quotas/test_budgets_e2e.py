"""Cost budgets through real gateway processes: reserve the most a request can cost,
settle to its real cost, refuse with 429 naming the budget, exact across processes."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import openai
import pytest

from apps.engines.models import ServedModel
from apps.engines.sizing import prompt_token_bound
from apps.quotas.costs import COST_SCALE, money
from apps.quotas.models import Budget, QuotaWindow, Reservation
from apps.quotas.services import budget_set, price_set
from tests.conftest import FAKE_MODEL, request_logs, start_gateway, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
BOUND = prompt_token_bound(CHAT, "chat.completions")  # the prompt as reserved (82 tokens)
PER_TOKEN = Decimal("0.001")  # 1000 per million, input and output alike
# The fake engine reports 1 prompt + 5 completion tokens.
COST = 6 * PER_TOKEN
MAX_COST = (BOUND + 5) * PER_TOKEN
# When the bound does not fit, the engine counts the prompt: 4 tokens (see test_quotas_e2e).
COUNTED_COST = (4 + 5) * PER_TOKEN


@pytest.fixture
def priced(engine):
    model = ServedModel.objects.get(name=FAKE_MODEL)
    return price_set(model=model, input_price=Decimal(1000), output_price=Decimal(1000))


def window(tenant) -> QuotaWindow:
    return QuotaWindow.objects.get(quota__in=Budget.objects.filter(tenant=tenant))


def spent(tenant) -> Decimal:
    return money(window(tenant).used_tokens)


def post(gateway, owner, body=CHAT) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=owner.auth)


def test_it_charges_the_real_cost_and_logs_it(priced, gateway, alice):
    budget_set(tenant=alice.tenant, amount=Decimal("2.50"), period="day")

    assert post(gateway, alice).status_code == 200
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    assert spent(alice.tenant) == COST == Decimal("0.006")
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert log.cost == COST


def test_it_refuses_with_insufficient_quota_naming_the_budget(priced, gateway, alice):
    budget_set(tenant=alice.tenant, amount=COST + COUNTED_COST - PER_TOKEN, period="month")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    client.chat.completions.create(**CHAT)
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    error = caught.value.body
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"].startswith("Cost budget exceeded for tenant alice (month): 0.014")
    assert "resets at" in error["message"]
    assert spent(alice.tenant) == COST  # the refused request cost nothing


def test_it_applies_a_key_budget_beside_the_tenant_budget(priced, gateway, alice):
    from apps.tenants.services import api_key_create

    other = api_key_create(tenant=alice.tenant, name="other")
    budget_set(tenant=alice.tenant, amount=Decimal(1), period="total")
    key_budget = COST + COUNTED_COST - PER_TOKEN  # one request fits, not two
    budget_set(tenant=alice.tenant, amount=key_budget, period="day", api_key=alice.api_key)

    assert post(gateway, alice).status_code == 200
    response = post(gateway, alice)
    assert response.status_code == 429
    assert "key default of tenant alice (day)" in response.json()["error"]["message"]
    assert (
        httpx.post(
            f"{gateway.base_url}/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {other.raw_key}"},
        ).status_code
        == 200
    )


def test_it_lets_unpriced_models_through_a_spent_budget(engine, gateway, alice):
    budget_set(tenant=alice.tenant, amount=Decimal("0.000001"), period="day")

    assert post(gateway, alice).status_code == 200
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert log.cost is None


def test_it_leaks_nothing_when_the_client_disconnects(priced, gateway, alice):
    budget_set(tenant=alice.tenant, amount=Decimal(10), period="day")
    body = {**CHAT, "stream": True, "max_tokens": 300, "fake": {"chunks": 300, "chunk_delay": 0.02}}
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body, headers=alice.auth
    ) as r:
        for line in r.iter_lines():
            if '"w3 "' in line:
                break  # leave mid-stream
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0, timeout=10)
    assert not Reservation.objects.exists()
    # charged the prompt and what was generated, not the reservation
    assert 5 * PER_TOKEN <= spent(alice.tenant) < 301 * PER_TOKEN


def test_it_releases_the_budget_when_the_engine_fails(priced, gateway, alice):
    budget_set(tenant=alice.tenant, amount=Decimal(10), period="day")

    response = post(gateway, alice, {**CHAT, "fake": {"error_status": 500}})
    assert response.status_code == 500
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    assert spent(alice.tenant) == 0


def test_it_never_exceeds_a_nearly_spent_budget_under_concurrency_on_two_processes(
    priced, alice, tmp_path
):
    from django.db import connection

    # Each request then costs exactly what it reserves (1 prompt + BOUND + 4 completion
    # tokens at one price), so settling frees nothing and how many fit does not depend on
    # timing: 16, after which too little is left even for the engine's exact count.
    exact = {**CHAT, "fake": {"chunks": BOUND + 4}}
    already = Decimal("0.9")  # spent before the burst
    limit = already + 16 * MAX_COST + COUNTED_COST - Decimal("0.000001")
    budget_set(tenant=alice.tenant, amount=limit, period="day")
    Budget.objects.get()  # one budget
    gateways = [start_gateway(connection.settings_dict, tmp_path / f"gw{i}.log") for i in range(2)]
    try:
        # nearly spent: charge `already` through the budget's own window first
        assert post(gateways[0], alice, {**CHAT, "max_tokens": 899, "fake": {"chunks": 900 - 1}}
                    ).status_code == 200  # fmt: skip
        wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
        assert spent(alice.tenant) == already

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*[
                    client.post(f"{gateways[i % 2].base_url}/chat/completions", json=exact,
                                headers=alice.auth)
                    for i in range(50)
                ]))  # fmt: skip

        responses = asyncio.run(burst())
    finally:
        for gateway in gateways:
            gateway.stop()
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 16
    assert statuses.count(429) == 34
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {
        "insufficient_quota"
    }
    assert spent(alice.tenant) == already + 16 * MAX_COST <= limit
    assert window(alice.tenant).used_tokens == int((already + 16 * MAX_COST) * COST_SCALE)


def test_it_reports_spend_and_budgets_in_the_api(priced, gateway, alice, bob):
    budget_set(tenant=alice.tenant, amount=Decimal("2.5"), period="day")
    budget_set(tenant=bob.tenant, amount=Decimal("7"), period="month")
    assert post(gateway, alice).status_code == 200
    assert post(gateway, bob).status_code == 200
    wait_until(lambda: window(alice.tenant).reserved_tokens == 0)
    wait_until(lambda: request_logs(tenant=alice.tenant) and request_logs(tenant=bob.tenant))

    usage = httpx.get(f"{gateway.url}/api/usage", headers=alice.auth, timeout=10).json()

    (budget,) = usage["budgets"]
    assert (budget["scope"], budget["period"], budget["amount"]) == ("tenant", "day", "2.5")
    assert (budget["spent"], budget["reserved"], budget["remaining"]) == ("0.006", "0", "2.494")
    (day,) = usage["spend_by_day"]
    assert (day["api_key"], day["model"], day["requests"], day["cost"]) == (
        "default",
        FAKE_MODEL,
        1,
        "0.006",
    )
    assert usage["quotas"] == []  # budgets are not token quotas
    # bob's budget and spend never show in alice's usage, nor alice's in bob's
    theirs = httpx.get(f"{gateway.url}/api/usage", headers=bob.auth, timeout=10).json()
    assert [b["amount"] for b in theirs["budgets"]] == ["7"]
    assert [d["api_key"] for d in theirs["spend_by_day"]] == ["default"]
    assert theirs["tenant"] == "bob"


def test_it_charges_exactly_through_leases_when_the_budget_is_large(priced, gateway, alice):
    from apps.quotas.leases import LEASE_MIN_REQUESTS

    budget = Decimal(1000)  # room for far more than LEASE_MIN_REQUESTS requests: leased
    assert budget > LEASE_MIN_REQUESTS * MAX_COST * 100
    budget_set(tenant=alice.tenant, amount=budget, period="month")

    for _ in range(8):
        assert post(gateway, alice).status_code == 200
    # the lease charges at its renewals and when it ends
    wait_until(lambda: spent(alice.tenant) == 8 * COST, timeout=15)
    logs = wait_until(lambda: len(request_logs(tenant=alice.tenant)) == 8 and request_logs(
        tenant=alice.tenant))  # fmt: skip
    assert sum(log.cost for log in logs) == 8 * COST
