"""The web_search tool: an operator's SearxNG instance, through its JSON API
(`GET <TOOLS_SEARXNG_URL>?q=...&format=json`), reduced to titles, URLs and snippets."""

from __future__ import annotations

from typing import Any

import aiohttp
from django.conf import settings

SEARCH_TIMEOUT = aiohttp.ClientTimeout(total=10)
SNIPPET_CHARS = 500


class SearchFailed(Exception):
    pass


async def web_search(*, query: str) -> list[dict[str, str]]:
    params = {"q": query, "format": "json"}
    try:
        async with (
            aiohttp.ClientSession(timeout=SEARCH_TIMEOUT) as session,
            session.get(settings.TOOLS_SEARXNG_URL, params=params) as resp,
        ):
            if resp.status != 200:
                raise SearchFailed(f"the search service answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise SearchFailed(f"the search service failed: {type(exc).__name__}") from None
    return _results(body)


def _results(body: Any) -> list[dict[str, str]]:
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise SearchFailed("the search service sent no results list")
    out = []
    for item in results[: settings.TOOLS_SEARCH_RESULTS]:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            out.append(
                {
                    "title": str(item.get("title") or ""),
                    "url": item["url"],
                    "snippet": str(item.get("content") or "")[:SNIPPET_CHARS],
                }
            )
    return out
