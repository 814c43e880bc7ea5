"""Response-stage checks: whole answers, and a sliding window over streamed ones.

Streams: each choice's text is held back by the longest possible match less one (at most
SAFETY_STREAM_HOLDBACK_CHARS; or, while a redact rule's match may still grow, from that
match's start) and checked together with as many characters already sent, so a match
split across chunks is caught before any of it leaves. A block ends the stream
(StreamStop): a final chunk with finish_reason `content_filter`, an error event,
`[DONE]`; the relay closes the engine request.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.conf import settings

from apps.core.context import RequestContext, StreamStop
from apps.safety.checks import Finding, content_filter_error, excerpt, matching, regex_check
from apps.safety.classifier import StreamClassifier
from apps.safety.models import Action, Stage
from apps.safety.rules import Rule, StageRules
from apps.safety.tools import merged_tool_calls, tool_calls_blocked

if TYPE_CHECKING:
    from apps.safety.stage import SafetyState


@dataclass
class SafetyResponseFilter:
    state: SafetyState
    rules: StageRules
    tool_rules: StageRules | None = None

    def whole(self, ctx: RequestContext, body: Any) -> Any:
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            return body
        for choice in body["choices"]:
            if isinstance(choice, dict):
                self._check_choice(ctx, choice)
        return body

    def _check_choice(self, ctx: RequestContext, choice: dict[str, Any]) -> None:
        message = choice.get("message")
        holder, key = (message, "content") if isinstance(message, dict) else (choice, "text")
        text = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(text, str) and text and self.rules.regex:
            verdict = regex_check(self.rules, text)
            for finding in verdict.findings:
                self.state.record(Stage.RESPONSE, finding)
            if verdict.blocked is not None:
                return filtered_choice(choice, holder, key)
            holder[key] = verdict.text
        for finding in self.state.whole_verdicts.get(choice.get("index", 0), []):
            if finding.action == Action.BLOCK:
                return filtered_choice(choice, holder, key)
        if (
            self.tool_rules is not None
            and isinstance(message, dict)
            and tool_calls_blocked(self.state, self.tool_rules, message.get("tool_calls"))
        ):
            return filtered_choice(choice, holder, key)
        return None

    def stream(self, ctx: RequestContext) -> StreamWindow | None:
        if not (self.rules or self.tool_rules):
            return None
        classifier = StreamClassifier(ctx, self.state, self.rules) if self.rules.model else None
        return StreamWindow(
            ctx=ctx,
            state=self.state,
            rules=self.rules,
            holdback=self.rules.holdback(settings.SAFETY_STREAM_HOLDBACK_CHARS),
            classifier=classifier,
            tool_rules=self.tool_rules,
        )


def filtered_choice(choice: dict[str, Any], holder: Any, key: str) -> None:
    """A blocked choice: no content at all, finish_reason content_filter."""
    if isinstance(holder, dict):
        holder[key] = "" if key == "text" else None
        holder.pop("tool_calls", None)
        holder.pop("reasoning_content", None)
    choice["finish_reason"] = "content_filter"


@dataclass
class _ChoiceWindow:
    pending: str = ""  # received, not sent yet
    sent: str = ""  # the last characters sent (context for matches that straddle)
    template: dict[str, Any] | None = None  # a chunk of this choice, to build others from
    chat: bool = True
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # held until complete


@dataclass
class StreamWindow:
    """The ChunkFilter of one streamed answer."""

    ctx: RequestContext | None
    state: SafetyState
    rules: StageRules
    holdback: int
    classifier: StreamClassifier | None = None  # when model rules apply
    tool_rules: StageRules | None = None
    choices: dict[int, _ChoiceWindow] = field(default_factory=dict)
    flagged: set[int] = field(default_factory=set)
    tokens_seen: int = 0  # content chunks from the engine (~1 token each), held ones too

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return [chunk]
        if self.classifier is not None:
            self.classifier.raise_if_unsafe(self._stop_chunks)
        keep = [c for c in choices if not isinstance(c, dict) or self._feed_choice(chunk, c)]
        if not keep and not chunk.get("usage"):
            return []
        chunk["choices"] = keep
        return [chunk]

    def flush(self) -> list[dict[str, Any]]:
        if self.classifier is not None:
            self.classifier.raise_if_unsafe(self._stop_chunks)
        out = []
        for index, window in self.choices.items():
            text = self._release(window, final=True)
            if (text or window.tool_calls) and window.template is not None:
                out.append(self._chunk(window, index, text, finish=None))
        return out

    def _feed_choice(self, chunk: dict[str, Any], choice: dict[str, Any]) -> bool:
        """Take one choice's delta; False when nothing of it is to be sent now."""
        index = choice.get("index", 0)
        window = self.choices.get(index)
        if window is None:
            window = self.choices[index] = _ChoiceWindow(chat="delta" in choice)
        window.template = chunk
        holder, key = (choice.get("delta"), "content") if window.chat else (choice, "text")
        if not isinstance(holder, dict):
            return True
        text = holder.get(key)
        if text and isinstance(text, str):
            self.tokens_seen += 1
            window.pending += text
            if self.classifier is not None:
                self.classifier.add(index, text)
        if self.tool_rules is not None:
            self._hold_tool_calls(window, holder)
        final = choice.get("finish_reason") is not None
        if not final and len(window.pending) <= self.holdback:
            # The steady state of a stream: this piece is held, nothing else to do.
            if text is not None:
                holder[key] = ""
            return len(holder) > 1 and _carries_more(holder, key)
        released = self._release(window, final=final)
        if isinstance(text, str) or released:
            holder[key] = released
        if final and window.tool_calls:
            holder["tool_calls"] = self._released_tool_calls(window)
        return bool(released) or final or _carries_more(holder, key)

    def _hold_tool_calls(self, window: _ChoiceWindow, delta: dict[str, Any]) -> None:
        # Tool calls the operator wants checked are held whole until the choice finishes.
        if delta.get("tool_calls"):
            window.tool_calls.extend(delta.pop("tool_calls"))

    def _released_tool_calls(self, window: _ChoiceWindow) -> list[dict[str, Any]]:
        calls = merged_tool_calls(window.tool_calls)
        window.tool_calls = []
        assert self.tool_rules is not None
        if tool_calls_blocked(self.state, self.tool_rules, calls):
            raise StreamStop(content_filter_error("tool_calls"), self._stop_chunks())
        return calls

    def _release(self, window: _ChoiceWindow, *, final: bool) -> str:
        """Check the window; return what may be sent now (the rest stays pending)."""
        if not window.pending or (not final and len(window.pending) <= self.holdback):
            return ""  # nothing could be sent yet: the check waits until something can
        hold_from = self._check(window, final=final)
        if not final and self.classifier is not None and self.classifier.must_hold():
            return ""  # a classifier verdict is overdue: wait for it (bounds what slips)
        cut = len(window.pending) if final else len(window.pending) - self.holdback
        cut = min(cut, hold_from)
        if cut <= 0:
            return ""
        out, window.pending = window.pending[:cut], window.pending[cut:]
        # As much sent text as is held back: a match up to twice the holdback that
        # straddles the two is still caught (late); longer ones may be missed.
        window.sent = (window.sent + out)[-self.holdback :] if self.holdback else ""
        return out

    def _check(self, window: _ChoiceWindow, *, final: bool) -> int:
        """Block on any match; redact complete matches in what is pending. Returns where a
        redaction match that may still grow starts (nothing from there is sent yet)."""
        hits = matching(self.rules, window.sent + window.pending)
        hold_from = len(window.pending)
        for rule in hits:
            if rule.action == Action.BLOCK:
                self._block(window, rule)
            elif rule.action == Action.REDACT:
                before = window.pending
                window.pending, start = _redact(rule, before, final=final)
                hold_from = min(hold_from, start)
                if window.pending != before and rule.id not in self.flagged:
                    self.flagged.add(rule.id)  # once per stream; the excerpt is redacted
                    self._record(rule, window, Action.REDACT)
            elif rule.id not in self.flagged:
                self.flagged.add(rule.id)
                self._record(rule, window, Action.FLAG)
        return hold_from

    def _block(self, window: _ChoiceWindow, rule: Rule) -> None:
        self._record(rule, window, Action.BLOCK)
        raise StreamStop(content_filter_error(rule.name), self._stop_chunks())

    def _record(self, rule: Rule, window: _ChoiceWindow, action: str) -> None:
        text = window.sent + window.pending
        found = rule.regex.search(text) if rule.regex is not None else None
        span = found.span() if found is not None else (0, 0)
        if action == Action.REDACT:
            at = text.find(rule.replacement)
            span = (max(at, 0), max(at, 0) + len(rule.replacement))
        self.state.record(
            Stage.RESPONSE, Finding(rule=rule, action=action, excerpt=excerpt(text, *span))
        )

    def _stop_chunks(self) -> list[dict[str, Any]]:
        if self.ctx is not None:
            self.ctx.before_finish.insert(0, self._settle_usage)
        return [
            self._chunk(window, index, None, finish="content_filter")
            for index, window in self.choices.items()
            if window.template is not None
        ]

    def _chunk(
        self, window: _ChoiceWindow, index: int, text: str | None, *, finish: str | None
    ) -> dict[str, Any]:
        assert window.template is not None
        chunk = {k: v for k, v in window.template.items() if k not in ("choices", "usage")}
        chunk = copy.deepcopy(chunk)
        if window.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if window.tool_calls and finish is None:
                delta["tool_calls"] = self._released_tool_calls(window)
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
        chunk["choices"] = [choice]
        return chunk

    async def _settle_usage(self) -> None:
        """A stopped stream has no usage from the engine: the estimate counts what was
        sent; the quota is charged what the engine generated (held text too)."""
        ctx = self.ctx
        if ctx is not None and ctx.usage_estimated:
            ctx.completion_tokens = max(ctx.completion_tokens, self.tokens_seen)


def _carries_more(holder: dict[str, Any], key: str) -> bool:
    """A delta with something besides (empty) text: the role, tool calls, ..."""
    return any(v not in (None, "") for k, v in holder.items() if k != key)


def _redact(rule: Rule, text: str, *, final: bool) -> tuple[str, int]:
    """(text with the rule's complete matches replaced, where a match that touches the
    end of the text, and so may still grow, starts; len(text) if none)."""
    assert rule.regex is not None
    out: list[str] = []
    last = 0
    for found in rule.regex.finditer(text):
        start, end = found.span()
        if not final and end == len(text):
            prefix = "".join(out) + text[last:start]
            return prefix + text[start:], len(prefix)
        out += [text[last:start], rule.replacement]
        last = end
    out.append(text[last:])
    redacted = "".join(out)
    return redacted, len(redacted)
