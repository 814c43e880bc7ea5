"""The quotas' meter for the engine calls a tenant causes besides its request's own
(apps/core/usage.py; registered in QuotasConfig.ready): RAG embeddings and reranking,
safety classifier calls.

- A call not admitted yet (ingestion, retrieval) reserves its estimate first, like a
  request: refused, it raises UsageRefused (the quota's 429) and the engine is not asked.
  Once over, the reservation is settled with the tokens the engine reported.
- An admitted call (a classifier call on an admitted request) is charged what it used,
  even past the limit: refusing it now would not give the tokens back.

A call made for a /v1 caller uses the quotas loaded with its key (leases and batches, as
requests do); one made for a tenant without a key (a document's ingestion, in the worker)
charges the tenant's own quotas, looked up and settled in PostgreSQL directly.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from apps.core.errors import ApiError
from apps.core.usage import UsageCall, UsageRefused
from apps.quotas.errors import quota_exceeded_error
from apps.quotas.services import quota_charge, quota_reserve, quota_settle
from apps.quotas.stage import quota_stage_reserve, quota_stage_settle
from apps.quotas.state import QuotaExceeded, ReservationTicket

_reserve = database_sync_to_async(quota_reserve, thread_sensitive=False)
_settle = database_sync_to_async(quota_settle, thread_sensitive=False)
_charge = database_sync_to_async(quota_charge, thread_sensitive=False)


def _loaded_quotas(call: UsageCall) -> list | None:
    """The caller's quotas as loaded with its key; None: not known (look them up)."""
    quotas = call.payer.attachments.get("quotas")
    return None if quotas is None else list(quotas)


class QuotaMeter:
    async def hold(self, call: UsageCall) -> ReservationTicket | None:
        payer, quotas = call.payer, _loaded_quotas(call)
        if quotas == []:
            return None
        try:
            if quotas is None:
                return await _reserve(
                    tenant_id=payer.tenant_id, api_key_id=payer.api_key_id, tokens=call.estimate
                )
            assert payer.api_key_id is not None  # quotas are loaded with a key
            return await quota_stage_reserve(
                tenant_id=payer.tenant_id,
                api_key_id=payer.api_key_id,
                tokens=call.estimate,
                quotas=quotas,
            )
        except QuotaExceeded as exc:
            raise UsageRefused(quota_exceeded_error(exc)) from None
        except ApiError as err:  # quota_stage_reserve's 429
            raise UsageRefused(err) from None

    async def settle(self, call: UsageCall, held: Any) -> None:
        payer = call.payer
        if call.admitted:
            quotas = _loaded_quotas(call)
            if call.tokens and quotas != []:
                await _charge(
                    tenant_id=payer.tenant_id,
                    api_key_id=payer.api_key_id,
                    tokens=call.tokens,
                    quotas=quotas,
                )
            return
        if not isinstance(held, ReservationTicket):
            return
        if _loaded_quotas(call) is None:
            await _settle(ticket=held, actual_tokens=call.tokens, with_states=False)
        else:
            quota_stage_settle(held, actual_tokens=call.tokens)


quota_meter = QuotaMeter()
