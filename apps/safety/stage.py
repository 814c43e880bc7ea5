"""Pipeline stages of the safety app.

`safety_prompt` runs after the session stage (so the whole conversation the engine will
see is checked, history included) and before sizing: it blocks (400 `content_filter`) or
redacts the messages in place — the very message objects the session stage keeps as the
new turn, so the redacted text is what gets stored. It then hooks the later stages:
a response filter (whole answers, and a sliding window over streams) and the tenant's
tool-command checker (`ctx.tool_checks`, called by the tool loop).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.core.usage import Payer
from apps.safety.checks import Finding, matching, regex_check
from apps.safety.classifier import classify_rules, conversation_of
from apps.safety.events import EventScope, event_of, event_writer
from apps.safety.models import Action, Stage
from apps.safety.response import SafetyResponseFilter
from apps.safety.rules import Snapshot, StageRules, rule_cache
from apps.safety.tools import ToolChecker

EXTRAS_KEY = "safety"


@dataclass(slots=True)
class SafetyState:
    """What the stage keeps for the request's later steps (ctx.extras["safety"])."""

    snapshot: Snapshot
    scope: EventScope
    payer: Payer  # whom the classifier calls are charged to
    actions: list[str] = field(default_factory=list)  # for the request log
    # A whole answer's classifier findings per choice index (whole_precheck).
    whole_verdicts: dict[int, list[Finding]] = field(default_factory=dict)

    def rules(self, stage: str, ctx: RequestContext) -> StageRules:
        assert ctx.principal is not None
        return self.snapshot.for_key(
            tenant_id=ctx.principal.tenant_id, key_id=ctx.principal.key_id, stage=stage
        )

    def record(self, stage: str, finding: Finding) -> None:
        self.actions.append(finding.action)
        event_writer.add(event_of(scope=self.scope, stage=stage, finding=finding))


def blocked_error(rule_name: str, *, param: str | None) -> ApiError:
    # Only the rule's name: never the matched text (which may be another rule's secret).
    return ApiError(
        400,
        f"This request was blocked by the safety rule `{rule_name}`.",
        code="content_filter",
        param=param,
    )


def state_of(ctx: RequestContext) -> SafetyState | None:
    return ctx.extras.get(EXTRAS_KEY)


_STRENGTH = {Action.FLAG: 1, Action.REDACT: 2, Action.BLOCK: 3}


def safety_action(ctx: RequestContext) -> str:
    """The strongest action safety took on this request, for its request log ("" if none)."""
    state = ctx.extras.get(EXTRAS_KEY)
    if state is None or not state.actions:
        return ""
    return max(state.actions, key=lambda action: _STRENGTH.get(action, 0))


async def safety_prompt(ctx: RequestContext) -> None:
    assert ctx.principal is not None
    snapshot = await rule_cache.get()
    if not snapshot.rules or not any(
        snapshot.for_key(
            tenant_id=ctx.principal.tenant_id, key_id=ctx.principal.key_id, stage=stage
        )
        for stage in Stage.values
    ):
        return  # no rule for this key: no cost beyond the (memoised) lookups
    state = SafetyState(
        snapshot=snapshot,
        scope=EventScope(
            tenant_id=ctx.principal.tenant_id,
            api_key_id=ctx.principal.key_id,
            session_id=ctx.session_id or "",
            request_id=uuid.uuid4().hex,
        ),
        payer=Payer.of(ctx.principal),
    )
    ctx.extras[EXTRAS_KEY] = state
    prompt_rules = state.rules(Stage.PROMPT, ctx)
    if prompt_rules:
        await prompt_check(ctx, state, prompt_rules)
    attach_later_stages(ctx, state)


def attach_later_stages(ctx: RequestContext, state: SafetyState) -> None:
    response_rules = state.rules(Stage.RESPONSE, ctx)
    tool_rules = state.rules(Stage.TOOL, ctx)
    check_tool_calls = bool(tool_rules) and settings.SAFETY_CHECK_TOOL_CALLS
    if response_rules or check_tool_calls:
        ctx.response_filters.append(
            SafetyResponseFilter(
                state=state,
                rules=response_rules,
                tool_rules=tool_rules if check_tool_calls else None,
            )
        )
    if tool_rules:
        ctx.tool_checks.append(ToolChecker(state=state, rules=tool_rules))


# --- the prompt ---------------------------------------------------------------------


class TextSlot:
    """One piece of prompt text, and where to write it back if it is redacted."""

    __slots__ = ("container", "key")

    def __init__(self, container: dict | list, key: str | int) -> None:
        self.container, self.key = container, key

    @property
    def text(self) -> str:
        return self.container[self.key]  # type: ignore[index]

    def set(self, text: str) -> None:
        self.container[self.key] = text  # type: ignore[index]


def prompt_slots(payload: dict[str, Any]) -> Iterator[TextSlot]:
    """Every text of the prompt: chat messages' contents (strings or text parts), or a
    completion's prompt (a string or a list of strings)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                yield from _content_slots(message)
        return
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        yield TextSlot(payload, "prompt")
    elif isinstance(prompt, list):
        for index, item in enumerate(prompt):
            if isinstance(item, str):
                yield TextSlot(prompt, index)


def _content_slots(message: dict[str, Any]) -> Iterator[TextSlot]:
    content = message.get("content")
    if isinstance(content, str):
        yield TextSlot(message, "content")
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield TextSlot(part, "text")


def prompt_param(ctx: RequestContext) -> str:
    return "messages" if "messages" in ctx.payload else "prompt"


async def prompt_check(ctx: RequestContext, state: SafetyState, rules: StageRules) -> None:
    # The prompt rules see the request's own text only, not a session's stored history
    # (ctx.history, kept out of the payload): that was checked when it was new. The
    # classifier judges the whole conversation, history included.
    slots = list(prompt_slots(ctx.payload))
    if rules.regex:
        prompt_regex(ctx, state, rules, slots)
    if rules.model:
        findings = await classify_rules(
            rules.model,
            conversation=conversation_of(ctx.payload, ctx.history),
            tool_command=None,
            payer=state.payer,
        )
        settle_model_findings(state, Stage.PROMPT, findings, param=prompt_param(ctx))


async def whole_precheck(ctx: RequestContext, resp: Any) -> None:
    """Before a whole answer goes through the (synchronous) response filters: classify
    each choice with the response-stage model rules, for the filter to act on. `resp`
    is the engine's response (its body is read once and kept by aiohttp)."""
    state = state_of(ctx)
    if state is None or ctx.stream or resp.status >= 400:
        return
    rules = state.rules(Stage.RESPONSE, ctx)
    if not rules.model:
        return
    try:
        body = orjson.loads(await resp.read())
        choices = [c for c in body["choices"] if isinstance(c, dict)]
    except (ValueError, KeyError, TypeError):
        return  # not an answer: the response filters report it
    conversation = conversation_of(ctx.payload, ctx.history)
    for choice in choices:
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if not isinstance(text, str) or not text:
            continue
        turns = [*conversation, ("Agent", text)]
        findings = await classify_rules(
            rules.model,
            conversation=turns,
            tool_command=None,
            payer=state.payer,
            slot_held_on=ctx.engine,  # the answer's slot is held until it is sent
        )
        for finding in findings:
            state.record(Stage.RESPONSE, finding)
        state.whole_verdicts[choice.get("index", 0)] = findings


def prompt_regex(
    ctx: RequestContext, state: SafetyState, rules: StageRules, slots: list[TextSlot]
) -> None:
    # One pass over all the text first: most prompts match nothing, and then that is all.
    if not matching(rules, "\n".join(slot.text for slot in slots)):
        return
    for slot in slots:
        verdict = regex_check(rules, slot.text)
        for finding in verdict.findings:
            state.record(Stage.PROMPT, finding)
        if verdict.blocked is not None:
            raise blocked_error(verdict.blocked.rule.name, param=prompt_param(ctx))
        if verdict.changed:
            slot.set(verdict.text)
            ctx.payload_changed = True


def settle_model_findings(
    state: SafetyState, stage: str, findings: list[Finding], *, param: str | None
) -> None:
    """Record what the classifiers said; raise for the first block."""
    for finding in findings:
        state.record(stage, finding)
    for finding in findings:
        if finding.action == Action.BLOCK:
            raise blocked_error(finding.rule.name, param=param)
