"""Cost budgets and model prices: exact money arithmetic, commands, admin."""

from __future__ import annotations

import re
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from apps.engines.models import ServedModel
from apps.quotas.costs import COST_SCALE, actual_cost, max_cost, money, scaled, token_prices
from apps.quotas.models import Budget, ModelPrice, Quota
from apps.quotas.services import (
    budget_set,
    price_set,
    quota_reserve,
    quota_set,
    quota_settle,
    quotas_applicable,
)
from apps.request_logs.models import RequestLog

pytestmark = pytest.mark.django_db


@pytest.fixture
def model() -> ServedModel:
    return ServedModel.objects.create(name="gpt-like")


def run(*args: str) -> list[str]:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue().splitlines()


# --- money ---------------------------------------------------------------------------


def test_it_prices_tokens_exactly_in_decimal(model):
    price = price_set(
        model=model,
        input_price=Decimal("0.50"),
        output_price=Decimal("1.50"),
        cached_input_price=Decimal("0.05"),
    )
    prices = token_prices(price)

    cost = actual_cost(prices, prompt_tokens=1000, cached_tokens=400, completion_tokens=333)
    # 600 x 0.50/1M + 400 x 0.05/1M + 333 x 1.50/1M
    assert money(cost) == Decimal("0.0003") + Decimal("0.00002") + Decimal("0.0004995")
    assert money(max_cost(prices, prompt_tokens=1000, completion_tokens=333)) == Decimal(
        "0.0009995"
    )
    # a million requests of one token each add up exactly, as integers
    one = actual_cost(prices, prompt_tokens=1, cached_tokens=0, completion_tokens=0)
    assert money(one * 10**6) == Decimal("0.5")
    assert scaled(Decimal("2.50")) == 25 * COST_SCALE // 10


def test_it_defaults_the_cached_price_to_the_input_price(model):
    prices = token_prices(price_set(model=model, input_price=Decimal(2), output_price=Decimal(3)))

    assert prices.cached_input == prices.input


# --- set_price -------------------------------------------------------------------------


def test_it_sets_and_updates_a_price(model):
    lines = run(
        "set_price", "gpt-like", "--input", "0.50", "--output", "1.50", "--cached-input", "0.05"
    )
    run("set_price", "gpt-like", "--input", "0.60", "--output", "1.50")

    price = ModelPrice.objects.get()
    assert (price.input_per_million, price.output_per_million) == (Decimal("0.6"), Decimal("1.5"))
    assert price.cached_input_per_million is None
    assert lines[0].endswith("input 0.50, output 1.50, cached input 0.05.")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--input", "1", "--output", "1"], "No served model named 'nope'"),
        (["gpt-like", "--input=-0.5", "--output", "1"], "--input must be 0 or more"),
        (["gpt-like", "--input", "abc", "--output", "1"], "--input must be a decimal number"),
        (["gpt-like", "--input", "1", "--output", "NaN"], "--output must be 0 or more"),
        (["gpt-like", "--input", "1", "--output", "1", "--cached-input=-1"], "--cached-input must"),
        (["gpt-like", "--input", "0.0000001", "--output", "1"], "more than 6 decimals"),
    ],
)
def test_it_refuses_a_bad_price_and_changes_nothing(model, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run("set_price", *args)
    assert not ModelPrice.objects.exists()


# --- set_budget ------------------------------------------------------------------------


def test_it_sets_replaces_and_removes_budgets(alice):
    lines = run("set_budget", "alice", "--amount", "2.50", "--period", "day")
    run("set_budget", "alice", "--amount", "3", "--period", "day")
    run("set_budget", "alice", "--amount", "1", "--period", "month", "--api-key-name", "default")

    assert lines[0] == "Set the day budget of tenant alice to 2.50."
    assert "tenant (day): 2.5, 0 spent, 0 reserved, 2.5 left" in lines[1]
    budgets = {(b.period, b.api_key_id): money(b.limit_tokens) for b in Budget.objects.all()}
    assert budgets == {("day", None): Decimal(3), ("month", alice.api_key.pk): Decimal(1)}
    run("set_budget", "alice", "--amount", "0", "--period", "day")
    assert Budget.objects.count() == 1


def test_it_keeps_budgets_and_token_quotas_apart(alice):
    quota_set(tenant=alice.tenant, tokens=1000, period="day")
    budget_set(tenant=alice.tenant, amount=Decimal(5), period="day")

    assert Quota.objects.count() == 2
    tokens = quotas_applicable(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk)
    assert [q[2] for q in tokens] == [1000]
    run("set_quota", "alice", "--tokens", "0", "--period", "day")
    assert list(Quota.objects.values_list("unit", flat=True)) == ["cost"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--amount", "1", "--period", "day"], "No tenant with slug 'nobody'"),
        (
            ["alice", "--amount", "1", "--period", "day", "--api-key-name", "x"],
            "no API key named 'x'",
        ),
        (["alice", "--amount=-1", "--period", "day"], "--amount must be 0 or more"),
        (["alice", "--amount", "lots", "--period", "day"], "--amount must be a decimal number"),
        (["alice", "--amount", "1e9", "--period", "day"], "between 0 and 1,000,000"),
        (["alice", "--amount", "0.0000000000001", "--period", "day"], "more than 12 decimals"),
    ],
)
def test_it_refuses_a_bad_budget_and_changes_nothing(alice, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run("set_budget", *args)
    assert not Budget.objects.exists()


def test_it_refuses_a_budget_period_it_does_not_know(alice):
    with pytest.raises(CommandError, match="invalid choice: 'hour'"):
        run("set_budget", "alice", "--amount", "1", "--period", "hour")


@pytest.mark.django_db(transaction=True)
def test_it_reserves_and_settles_budgets_with_the_quota_machinery(alice):
    budget = budget_set(tenant=alice.tenant, amount=Decimal("0.01"), period="total")
    budgets = quotas_applicable(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, unit="cost")
    ticket = quota_reserve(
        tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, tokens=scaled(Decimal("0.008")),
        quotas=budgets,
    )  # fmt: skip
    from apps.quotas.services import QuotaExceeded

    with pytest.raises(QuotaExceeded):
        quota_reserve(
            tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk,
            tokens=scaled(Decimal("0.003")), quotas=budgets,
        )  # fmt: skip
    (state,) = quota_settle(ticket=ticket, actual_tokens=scaled(Decimal("0.001")))
    assert (money(state.used), state.reserved, state.quota_id) == (Decimal("0.001"), 0, budget.pk)


# --- admin ---------------------------------------------------------------------------------


def test_it_shows_and_edits_budgets_and_prices_in_the_admin(admin_client: Client, alice, model):
    budget_set(tenant=alice.tenant, amount=Decimal("2.5"), period="day")
    changelist = admin_client.get(reverse("admin:quotas_budget_changelist")).content.decode()
    assert "2.5" in changelist
    assert "alice" in changelist
    quotas = admin_client.get(reverse("admin:quotas_quota_changelist"))
    assert quotas.context["cl"].result_count == 0  # budgets are not listed as token quotas

    added = admin_client.post(
        reverse("admin:quotas_budget_add"),
        {"tenant": alice.tenant.pk, "period": "month", "amount": "7.25"},
    )
    assert added.status_code == 302
    assert money(Budget.objects.get(period="month").limit_tokens) == Decimal("7.25")
    again = admin_client.post(
        reverse("admin:quotas_budget_add"),
        {"tenant": alice.tenant.pk, "period": "month", "amount": "1"},
    )
    assert "already has a quota for this period" in again.content.decode()
    negative = admin_client.post(
        reverse("admin:quotas_budget_add"),
        {"tenant": alice.tenant.pk, "period": "total", "amount": "-1"},
    )
    assert negative.status_code == 200
    assert not Budget.objects.filter(period="total").exists()

    price = admin_client.post(
        reverse("admin:quotas_modelprice_add"),
        {"model": model.pk, "input_per_million": "-1", "output_per_million": "1"},
    )
    assert price.status_code == 200
    assert not ModelPrice.objects.exists()


def test_it_shows_spend_per_day_key_and_model_on_the_usage_page(admin_client: Client, alice, bob):
    budget_set(tenant=alice.tenant, amount=Decimal("2.5"), period="day")
    for owner, cost in ((alice, "0.25"), (alice, "0.5"), (bob, "9")):
        RequestLog.objects.create(
            tenant=owner.tenant, api_key=owner.api_key, endpoint="chat.completions",
            model="gpt-like", status_code=200, latency_ms=1, cost=Decimal(cost),
        )  # fmt: skip

    page = admin_client.get(reverse("admin:quotas_usage_tenant", args=[alice.tenant.pk]))
    html = page.content.decode()
    assert 'id="spend-chart"' in html
    assert ": 0.75</title>" in html
    assert re.search(
        r"<td>default</td><td>gpt-like</td>\s*<td class=\"num\">2</td><td class=\"num\">0.75</td>",
        html,
    )
    assert 'id="spend-total">0.75<' in html
    assert "9" not in html.split('id="usage-spend"')[1].split("</table>")[0]
    assert "2.5" in html.split('id="usage-budgets"')[1]


@pytest.mark.django_db(transaction=True)
async def test_it_loads_prices_once_for_concurrent_requests(settings, monkeypatch, model):
    import asyncio

    from channels.db import database_sync_to_async as sync_to_async

    from apps.quotas import costs

    await sync_to_async(price_set)(model=model, input_price=Decimal(1), output_price=Decimal(2))
    settings.REGISTRY_CACHE_SECONDS = 60
    monkeypatch.setattr(costs, "_loaded_at", float("-inf"))
    loads = []
    real = costs._load_async

    async def counted() -> dict:
        loads.append(1)
        return await real()

    monkeypatch.setattr(costs, "_load_async", counted)
    found = await asyncio.gather(*[costs.prices_of("gpt-like") for _ in range(20)])

    assert len(loads) == 1
    assert {p.output for p in found} == {2 * 10**6}
    assert await costs.prices_of("unpriced") is None


@pytest.mark.django_db(transaction=True)
def test_it_reserves_in_the_remaining_budgets_when_one_was_deleted_meanwhile(alice):
    from apps.quotas.models import QuotaWindow

    quota_set(tenant=alice.tenant, tokens=10, period="day")  # a token quota: never touched
    kept = budget_set(tenant=alice.tenant, amount=Decimal(1), period="month")
    gone = budget_set(tenant=alice.tenant, amount=Decimal(1), period="day")
    budgets = quotas_applicable(tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk, unit="cost")
    gone.delete()  # after the lookup (cached with the key), before the reservation

    ticket = quota_reserve(
        tenant_id=alice.tenant.pk, api_key_id=alice.api_key.pk,
        tokens=scaled(Decimal("0.5")), quotas=budgets,
    )  # fmt: skip

    assert [state.quota_id for state in ticket.states] == [kept.pk]
    assert list(QuotaWindow.objects.values_list("quota_id", "reserved_tokens")) == [
        (kept.pk, scaled(Decimal("0.5")))
    ]
