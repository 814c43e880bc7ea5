"""Money for cost budgets: prices per model, what a request may cost and what it cost.

Amounts are integers of COST_SCALE (10^-12) currency units: a price has at most 6
decimals per million tokens, so one token costs a whole number of them and every sum is
exact (no floats; Decimal only at the edges). The largest budget is MAX_BUDGET units,
far inside PostgreSQL's bigint.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import Decimal

from channels.db import database_sync_to_async
from django.conf import settings

from apps.quotas.models import ModelPrice

COST_SCALE = 10**12
_PER_TOKEN = COST_SCALE // 10**6  # scaled units per token, per unit of price per million
MAX_BUDGET = Decimal(1_000_000)
PRICE_PLACES = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """A model's prices, in scaled units per token."""

    input: int
    output: int
    cached_input: int


def scaled(amount: Decimal) -> int:
    """Currency units as scaled integer units (exact for up to 12 decimals)."""
    return int(amount * COST_SCALE)


def money(units: int) -> Decimal:
    """Scaled units as currency, exact."""
    return Decimal(units) / COST_SCALE


def token_prices(price: ModelPrice) -> TokenPrices:
    cached = price.cached_input_per_million
    return TokenPrices(
        input=int(price.input_per_million * _PER_TOKEN),
        output=int(price.output_per_million * _PER_TOKEN),
        cached_input=int((cached if cached is not None else price.input_per_million) * _PER_TOKEN),
    )


def max_cost(prices: TokenPrices, *, prompt_tokens: int, completion_tokens: int) -> int:
    """The most a request can cost: every prompt token at the dearer input price (cached
    or not: the engine decides), every completion token it may get."""
    per_prompt = max(prices.input, prices.cached_input)
    return max(0, prompt_tokens) * per_prompt + max(0, completion_tokens) * prices.output


def actual_cost(
    prices: TokenPrices, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int
) -> int:
    cached = min(max(0, cached_tokens), max(0, prompt_tokens))
    return (
        (prompt_tokens - cached) * prices.input
        + cached * prices.cached_input
        + max(0, completion_tokens) * prices.output
    )


# --- the /v1 path's snapshot of every price (a small table), refreshed like the registry


_snapshot: dict[str, TokenPrices] = {}
_loaded_at = float("-inf")
_loading: asyncio.Future | None = None  # one reload at a time, shared by every request


def _load() -> dict[str, TokenPrices]:
    return {p.model.name: token_prices(p) for p in ModelPrice.objects.select_related("model")}


_load_async = database_sync_to_async(_load, thread_sensitive=False)


async def prices_of(model: str) -> TokenPrices | None:
    """The model's prices (None: the model is free), at most REGISTRY_CACHE_SECONDS old."""
    global _snapshot, _loaded_at, _loading
    if time.monotonic() - _loaded_at >= settings.REGISTRY_CACHE_SECONDS:
        if _loading is None or _loading.done():
            _loading = asyncio.ensure_future(_load_async())
        loading = _loading
        snapshot = await asyncio.shield(loading)
        if loading is _loading:
            _snapshot, _loaded_at = snapshot, time.monotonic()
        return snapshot.get(model)
    return _snapshot.get(model)
