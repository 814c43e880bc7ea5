"""The engine calls a tenant causes besides its own request's: metered and recorded.

RAG ingestion and retrieval embed (and rerank), safety rules ask a classifier model: each
is an engine call on the tenant's behalf that must count against its token quota and show
where operators look at usage, like a chat completion. The stages that make those calls
(rag, safety) and the ones that count them (quotas, the request log, metrics) never import
each other: the counting side registers here at app start, the calling side wraps each
call in `metered()`.

    call = UsageCall(payer=payer, kind=EMBEDDINGS_INGESTION, model=..., estimate=...)
    async with metered(call, admitted=False):   # UsageRefused: the quota has no room
        answer = await engine_post(...)
        call.took(answer.get("usage"))

A meter (quotas) holds the call's estimate before it runs when the call is not admitted
yet (ingestion, retrieval), and is told the real tokens after (the engine's `usage`, the
estimate when it reports none); an admitted call (a classifier call on a request that was
admitted) is charged whatever the quota says. Recorders (request log, metrics) see every
call once it is over, refused ones included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from apps.core.errors import ApiError

if TYPE_CHECKING:  # types only: the kernel imports no app at run time
    from apps.tenants.auth import Principal

logger = logging.getLogger(__name__)

# What the request log's endpoint column and the metrics' endpoint label say.
EMBEDDINGS_INGESTION = "embeddings (ingestion)"
EMBEDDINGS_RETRIEVAL = "embeddings (retrieval)"
RERANK_RETRIEVAL = "rerank (retrieval)"
SAFETY_CLASSIFIER = "safety classifier"


@dataclass(frozen=True, slots=True)
class Payer:
    """Whose call it is: the tenant charged (and, through a key, that key's quotas too);
    `attachments` are the caller's principal's (e.g. its quotas, loaded with the key)."""

    tenant_id: int
    tenant_slug: str
    api_key_id: int | None = None
    weight: int = 1  # the tenant's share of engine slots
    attachments: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, principal: Principal) -> Payer:
        return cls(
            tenant_id=principal.tenant_id,
            tenant_slug=principal.tenant_slug,
            api_key_id=principal.key_id,
            weight=principal.tenant_weight,
            attachments=principal.attachments,
        )


class UsageRefused(Exception):
    """The payer's quota cannot cover the call: `error` is the OpenAI-shaped 429 for an
    API caller, `str()` one line for a document's error."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class UsageCall:
    payer: Payer
    kind: str
    model: str
    estimate: int = 0  # tokens held before the call (what it may cost)
    engine: str = ""  # set by the engine call once the model is resolved
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # the engine reported no usage: `estimate` was charged
    done: bool = False  # the engine answered (a failed call is charged nothing)
    admitted: bool = False  # charged whatever the quota says (set by metered())
    status: int = 0
    error_code: str = ""
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def took(self, usage: Any, *, completion_estimate: int = 0) -> None:
        """The engine's `usage` (OpenAI's shape), or the estimate when it sent none."""
        self.done = True
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = max(0, usage["prompt_tokens"])
            completion = usage.get("completion_tokens")
            self.completion_tokens = max(0, completion) if isinstance(completion, int) else 0
            return
        self.prompt_tokens, self.completion_tokens = self.estimate, completion_estimate
        self.estimated = True

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens if self.done else 0

    @property
    def latency_ms(self) -> float:
        return ((self.ended or time.perf_counter()) - self.started) * 1000


class UsageMeter(Protocol):
    """Counts calls against quotas (apps/quotas registers one)."""

    async def hold(self, call: UsageCall) -> Any:
        """Reserve `call.estimate` (raise UsageRefused); what `settle` is given back."""
        ...

    async def settle(self, call: UsageCall, held: Any) -> None:
        """Charge `call.tokens`: against what `hold` gave (None: it held nothing), or, for
        an admitted call, whatever the quota says."""
        ...


Recorder = Callable[[UsageCall], None]
Drain = Callable[[], Awaitable[None]]
_meters: dict[str, UsageMeter] = {}
_recorders: dict[str, Recorder] = {}
_drains: dict[str, Drain] = {}
_settling: set[asyncio.Task] = set()


def meter_register(name: str, meter: UsageMeter) -> None:
    _meters[name] = meter


def recorder_register(name: str, recorder: Recorder, *, drain: Drain | None = None) -> None:
    """`recorder(call)` for every call once it is over (in memory: no database work on the
    call's path); `drain()` writes what it buffered (a worker that stops awaits it)."""
    _recorders[name] = recorder
    if drain is not None:
        _drains[name] = drain


@asynccontextmanager
async def metered(
    call: UsageCall, *, admitted: bool, wait: bool = False
) -> AsyncIterator[UsageCall]:
    """Hold the estimate (not `admitted`: UsageRefused, recorded as a 429, if it does not
    fit), run the block, then charge what it `took`. The charge runs in the background
    unless `wait` (ingestion: the next batch must see it) and is not lost if the caller
    is cancelled."""
    held: dict[str, Any] = {}
    call.admitted = admitted
    if not admitted:
        try:
            for name, meter in _meters.items():
                held[name] = await meter.hold(call)
        except UsageRefused as refused:
            await _settle_all(call, held)  # what earlier meters held goes back
            call.status, call.error_code = refused.error.status, refused.error.code or ""
            _record(call)
            raise
    try:
        yield call
        call.status = call.status or 200
    except BaseException as exc:
        call.status = call.status or (exc.status if isinstance(exc, ApiError) else 502)
        call.error_code = call.error_code or _code_of(exc)
        raise
    finally:
        call.ended = time.perf_counter()
        settling = asyncio.ensure_future(_settle_all(call, held))
        _settling.add(settling)
        settling.add_done_callback(_settling.discard)
        _record(call)
        if wait:
            await asyncio.shield(settling)


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return exc.code or ""
    if isinstance(exc, asyncio.CancelledError | TimeoutError):
        return "timeout" if isinstance(exc, TimeoutError) else "cancelled"
    return "engine_error"


async def _settle_all(call: UsageCall, held: dict[str, Any]) -> None:
    for name, meter in _meters.items():
        try:
            await meter.settle(call, held.get(name))
        except Exception:
            logger.exception("could not charge %s tokens of a %s call", call.tokens, call.kind)


def _record(call: UsageCall) -> None:
    for name, recorder in _recorders.items():
        try:
            recorder(call)
        except Exception:
            logger.exception("usage recorder %s failed", name)


async def usage_drain() -> None:
    """Wait for the charges in flight and write what the recorders buffered (a process
    that makes such calls awaits this before it stops)."""
    while _settling:
        await asyncio.gather(*list(_settling), return_exceptions=True)
    for drain in list(_drains.values()):
        await drain()
