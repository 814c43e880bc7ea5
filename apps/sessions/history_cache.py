"""The session histories this process sent last, so a session's open reads only what is new.

Most requests of a session come to the process that served its previous turn, which then
holds nearly all of the history. The open (migration 0008) is told what is held (`known`:
the session, its `history_version`, the last position held) and returns only the later
messages while the version is unchanged; any edit or delete of stored messages changes the
version, and the open then returns the kept history whole. The round trip is never skipped:
another process may have recorded turns, and only the database knows the version.

Entries are keyed by (tenant, external id, cap): the tenant and id are what the request
names (the session's pk comes with the answer, and the open checks it), and the cap (the
model's largest context) decides which suffix is kept. What is held is trimmed by the
cap's rule (0006) after every answer, so it is always what a full open would return.
Bounded by total bytes, least recently used first out (SESSION_HISTORY_CACHE_MB).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings

from apps.sessions.prompts import StoredHistory

Key = tuple[int, str, int | None]  # (tenant pk, external id, cap)

# Per entry besides its text: the key, five tuples of ints, the dataclass itself.
ENTRY_OVERHEAD_BYTES = 400
UNIT_BYTES = 5 * 8


@dataclass(frozen=True, slots=True)
class HeldHistory:
    """A session's kept history as the open returns it (0007's shape), with what it
    covers: the session's version and last position (-1: no messages) when it was read,
    and per unit its stored count (NULL as 0, the cap's rule) and media flag."""

    session_pk: int
    version: int
    upto: int
    json: bytes = b""
    offsets: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    messages: tuple[int, ...] = ()
    counted: tuple[int, ...] = ()
    media: tuple[bool, ...] = ()

    @property
    def size(self) -> int:
        return len(self.json) + UNIT_BYTES * len(self.offsets) + ENTRY_OVERHEAD_BYTES

    def known(self) -> dict[str, int]:
        return {"session": self.session_pk, "version": self.version, "upto": self.upto}

    def stored(self) -> StoredHistory:
        return StoredHistory(
            json=self.json,
            unit_offsets=self.offsets,
            unit_tokens=self.tokens,
            unit_messages=self.messages,
            media=any(self.media),
        )

    def without(self, dropped: int) -> HeldHistory:
        """Without its `dropped` oldest units."""
        if dropped <= 0:
            return self
        if dropped >= len(self.offsets):
            return replace(self, json=b"", offsets=(), tokens=(), messages=(), counted=(),
                           media=())  # fmt: skip
        cut = self.offsets[dropped]
        return replace(
            self,
            json=self.json[cut:],
            offsets=tuple(o - cut for o in self.offsets[dropped:]),
            tokens=self.tokens[dropped:],
            messages=self.messages[dropped:],
            counted=self.counted[dropped:],
            media=self.media[dropped:],
        )

    def capped(self, cap: int | None) -> HeldHistory:
        """What a full open with `cap` keeps (0006): from the oldest unit whose suffix of
        stored counts fits the cap; nothing if none does."""
        if not cap:
            return self
        total = sum(self.counted)
        dropped = 0
        while total > cap and dropped < len(self.counted):
            total -= self.counted[dropped]
            dropped += 1
        return self.without(dropped)

    def extended(self, new: HeldHistory, *, continues: bool) -> HeldHistory:
        """This history followed by the open's delta `new` (its version and last
        position). If the delta starts inside this history's last unit (`continues`: an
        assistant or tool message first), that part joins the last unit; if there is no
        last unit, the cap cut it, and so the part goes too (its suffix only grew)."""
        if continues and not self.offsets:
            new = new.without(1)
            continues = False
        if not new.offsets:
            return replace(self, version=new.version, upto=new.upto)
        shift = len(self.json) + 1 if self.json else 0
        offsets = [o + shift for o in new.offsets]
        tokens, messages, counted, media = (list(new.tokens), list(new.messages),
                                            list(new.counted), list(new.media))  # fmt: skip
        kept = slice(None)
        if continues:
            del offsets[0]
            kept = slice(0, -1)
            tokens[0] += self.tokens[-1]
            messages[0] += self.messages[-1]
            counted[0] += self.counted[-1]
            media[0] = media[0] or self.media[-1]
        return HeldHistory(
            session_pk=new.session_pk,
            version=new.version,
            upto=new.upto,
            json=self.json + b"," + new.json if self.json else new.json,
            offsets=self.offsets + tuple(offsets),
            tokens=self.tokens[kept] + tuple(tokens),
            messages=self.messages[kept] + tuple(messages),
            counted=self.counted[kept] + tuple(counted),
            media=self.media[kept] + tuple(media),
        )


def answer_of(row: Any) -> HeldHistory:
    """The history part of an open row (migration 0008): a delta or the kept history."""
    text = row[5]
    return HeldHistory(
        session_pk=row[1],
        version=row[13],
        upto=row[14],
        json=text.encode() if isinstance(text, str) else bytes(text),
        offsets=tuple(row[6]),
        tokens=tuple(row[7]),
        messages=tuple(row[8]),
        counted=tuple(row[9]),
        media=tuple(row[10]),
    )


def history_after(held: HeldHistory | None, row: Any, *, cap: int | None) -> HeldHistory:
    """The kept history once the open answered `row` to an item that sent `held`."""
    answer = answer_of(row)
    delta, continues = row[11], row[12]
    if held is None or not delta:
        return answer.capped(cap)
    return held.extended(answer, continues=continues).capped(cap)


@dataclass(frozen=True, slots=True)
class OpenRequest:
    key: Key
    held: HeldHistory | None
    item: dict[str, Any]


class HistoryCache:
    """LRU by total bytes; safe to share between threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, HeldHistory] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> HeldHistory | None:
        with self._lock:
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
            return held

    def put(self, key: Key, held: HeldHistory) -> None:
        with self._lock:
            old = self._entries.get(key)
            if old is not None and _older(held, old):
                return  # a concurrent request of the session stored a later state
            if old is not None:
                self.bytes -= old.size
                del self._entries[key]
            if held.size > self.max_bytes:
                return
            self._entries[key] = held
            self.bytes += held.size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def request(self, item: dict[str, Any]) -> OpenRequest:
        """`item` (store.open_item) telling the open what this process holds of it."""
        key: Key = (item["tenant"], item["external_id"], item.get("cap"))
        held = self.get(key) if self.max_bytes > 0 else None
        if held is not None and held.upto >= 0:
            item = {**item, "known": held.known()}
        else:
            held = None
        return OpenRequest(key=key, held=held, item=item)

    def opened(self, request: OpenRequest, row: Any) -> StoredHistory:
        """The session's kept history from the open's answer; held for next time."""
        held = history_after(request.held, row, cap=request.key[2])
        if self.max_bytes > 0:
            self.put(request.key, held)
        return held.stored()


def _older(new: HeldHistory, old: HeldHistory) -> bool:
    return new.session_pk == old.session_pk and new.version == old.version and new.upto < old.upto


_cache: HistoryCache | None = None


def history_cache() -> HistoryCache:
    """This process's cache, sized by SESSION_HISTORY_CACHE_MB on first use."""
    global _cache
    if _cache is None:
        _cache = HistoryCache(max(0, settings.SESSION_HISTORY_CACHE_MB) * 1024 * 1024)
    return _cache
