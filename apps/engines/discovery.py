"""What an external engine can tell about itself when it is registered.

`slots` is what the gateway lets through to one replica at once: too low serializes an
engine that could serve many requests together (1 slot: one request at a time), so it is
read from the engine when the operator does not give it.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from apps.engines.models import Engine

# vLLM (and servers like it) batch requests continuously; vLLM's default --max-num-seqs is
# 256, so that many in flight keeps it busy without the gateway queueing in front of it.
BATCHING_SERVER_SLOTS = 256
# llama-server's -np when it cannot be asked (older builds' default: one slot).
LLAMACPP_FALLBACK_SLOTS = 1
PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class SlotsFound:
    slots: int
    source: str  # how it was found, shown to the operator


def slots_discover(*, flavor: str, base_urls: list[str]) -> SlotsFound:
    """llama.cpp: the smallest `total_slots` its replicas' `/props` report (a replica that
    cannot be asked counts as one slot); other flavors: a high bound, since they batch."""
    if flavor != Engine.Flavor.LLAMACPP:
        return SlotsFound(BATCHING_SERVER_SLOTS, f"default for {flavor}, which batches requests")
    found = [_total_slots(url) for url in base_urls]
    failures = [reason for reason in found if isinstance(reason, str)]
    if failures:
        return SlotsFound(LLAMACPP_FALLBACK_SLOTS, f"{failures[0]}; pass --slots N")
    counts = [count for count in found if isinstance(count, int)]
    return SlotsFound(min(counts), "total_slots from the engine's /props")


def _total_slots(base_url: str) -> int | str:
    """The replica's slot count, or why it could not be read."""
    url = f"{base_url}/props"
    try:
        response = httpx.get(url, timeout=PROBE_TIMEOUT_SECONDS)
        response.raise_for_status()
        count = response.json().get("total_slots")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return f"could not read total_slots from {url} ({type(exc).__name__}: {exc})"
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"{url} reports no usable total_slots ({count!r})"
    return count
