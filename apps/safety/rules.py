"""The enabled rules as an in-process snapshot, for the /v1 hot path.

Re-read from the database at most every SAFETY_RULES_CACHE_SECONDS, by one coroutine at a
time (the others keep the previous snapshot meanwhile); patterns are compiled once per
process (patterns.compiled caches them), so a reload recompiles only what changed. What
a request needs (its tenant's and key's rules of one stage, with one RE2 set over their
patterns) is worked out once per snapshot and kept, so the per-request cost is a lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import re2
from channels.db import database_sync_to_async
from django.conf import settings

from apps.safety.models import Action, Kind, SafetyRule
from apps.safety.patterns import (
    BadPattern,
    compiled,
    max_match_length,
    pattern_set,
    with_flags,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    name: str
    tenant_id: int | None
    api_key_id: int | None
    stage: str
    kind: str
    action: str
    regex: re2._Regexp | None = None
    source: str = ""  # the pattern with its inline flags
    replacement: str = ""
    classifier_model: str = ""
    categories: frozenset[str] = frozenset()
    fails_open: bool = False
    max_length: int | None = None  # of a match, when bounded (patterns.max_match_length)


@dataclass(slots=True)
class StageRules:
    """The rules one key is under at one stage."""

    regex: tuple[Rule, ...] = ()
    model: tuple[Rule, ...] = ()
    matcher: re2.Set | None = None  # one pass over the text says which regex rules match

    def __bool__(self) -> bool:
        return bool(self.regex or self.model)

    def holdback(self, limit: int) -> int:
        """Characters a stream must hold back so no match of these rules has its first
        character sent before its last arrives: the longest match less one, at most
        `limit` (also when a pattern's length is unbounded or unknown)."""
        lengths = [rule.max_length for rule in self.regex]
        if not lengths:
            return 0
        if None in lengths:
            return limit
        return min(limit, max(0, max(lengths) - 1))  # type: ignore[type-var]


NO_RULES = StageRules()


@dataclass
class Snapshot:
    rules: tuple[Rule, ...] = ()
    _by_scope: dict[tuple[int, int, str], StageRules] = field(default_factory=dict)

    def for_key(self, *, tenant_id: int, key_id: int, stage: str) -> StageRules:
        scope = (tenant_id, key_id, stage)
        found = self._by_scope.get(scope)
        if found is None:
            found = self._by_scope[scope] = self._select(tenant_id, key_id, stage)
        return found

    def _select(self, tenant_id: int, key_id: int, stage: str) -> StageRules:
        mine = [
            rule
            for rule in self.rules
            if rule.stage == stage
            and rule.tenant_id in (None, tenant_id)
            and rule.api_key_id in (None, key_id)
        ]
        if not mine:
            return NO_RULES
        # Blocks first: once one blocks, redacting or flagging the rest is moot.
        order = {Action.BLOCK: 0, Action.REDACT: 1, Action.FLAG: 2}
        mine.sort(key=lambda rule: (order[rule.action], rule.name))
        regex = tuple(rule for rule in mine if rule.kind == Kind.REGEX)
        model = tuple(rule for rule in mine if rule.kind == Kind.MODEL)
        matcher = pattern_set([rule.source for rule in regex]) if regex else None
        return StageRules(regex=regex, model=model, matcher=matcher)


def rule_view(row: SafetyRule) -> Rule | None:
    """The row as the snapshot holds it (None if its pattern does not compile)."""
    regex = None
    if row.kind == Kind.REGEX:
        try:
            regex = compiled(row.pattern, row.flags)
        except BadPattern as exc:  # only rows written around the model's validation
            logger.error("safety rule %s skipped: RE2 cannot compile it: %s", row.name, exc)
            return None
    return Rule(
        id=row.pk,
        name=row.name,
        tenant_id=row.tenant_id,
        api_key_id=row.api_key_id,
        stage=row.stage,
        kind=row.kind,
        action=row.action,
        regex=regex,
        source=with_flags(row.pattern, row.flags),
        replacement=row.replacement,
        classifier_model=row.classifier_model,
        categories=frozenset(row.category_codes),
        fails_open=row.fails_open,
        max_length=max_match_length(row.pattern, row.flags) if regex is not None else None,
    )


def load_snapshot() -> Snapshot:
    rows = SafetyRule.objects.filter(enabled=True).order_by("pk")
    return Snapshot(rules=tuple(rule for rule in map(rule_view, rows) if rule is not None))


_load_async = database_sync_to_async(load_snapshot, thread_sensitive=False)


class RuleCache:
    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self) -> Snapshot:
        if self._snapshot is not None and not self._stale():
            return self._snapshot
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        async with self._lock:
            if self._snapshot is None or self._stale():
                self._snapshot = await _load_async()
                self._loaded_at = time.monotonic()
        return self._snapshot

    def _stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= settings.SAFETY_RULES_CACHE_SECONDS

    def clear(self) -> None:
        self._snapshot = None


rule_cache = RuleCache()
