"""Classifier (model) rules, Llama Guard style.

The conversation (or a tool command) is rendered in Llama Guard 3's prompt and sent as
one user message to the rule's model, any chat model of the gateway, as any engine call
of the tenant's (apps/engines/calls.py: the engine registry, so managed engines start on
demand, and a scheduler slot, shared fairly with the requests), charged to the tenant's
token quota (apps/core/usage.py). The answer's first line is `safe` or
`unsafe`; an unsafe answer's second line lists the violated categories. On llama.cpp
engines a grammar holds the model to exactly that shape (small general models, such as
Gemma 3 270M, then always answer parseably).

Llama Guard 3 categories (MLCommons hazard taxonomy):
S1 Violent Crimes, S2 Non-Violent Crimes, S3 Sex-Related Crimes, S4 Child Sexual
Exploitation, S5 Defamation, S6 Specialized Advice, S7 Privacy, S8 Intellectual Property,
S9 Indiscriminate Weapons, S10 Hate, S11 Suicide & Self-Harm, S12 Sexual Content,
S13 Elections, S14 Code Interpreter Abuse.

A classifier that is unknown, down, slow (SAFETY_CLASSIFIER_TIMEOUT_SECONDS) or answers
something else follows its rule's fail_open; either way an event says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from django.conf import settings

from apps.core.context import (
    NO_HISTORY,
    RequestContext,
    SessionHistory,
    StreamStop,
    messages_with_history,
)
from apps.core.usage import SAFETY_CLASSIFIER, Payer, UsageCall, metered
from apps.engines.calls import EngineError, ModelNotServed, engine_post
from apps.engines.registry import ModelRoute, VariantRoute, load_snapshot, registry
from apps.engines.scheduler import SchedulerBusy
from apps.engines.tokens import heuristic_tokens, message_text
from apps.safety.checks import Finding, content_filter_error
from apps.safety.models import Action, Stage
from apps.safety.rules import Rule

logger = logging.getLogger(__name__)

CATEGORY_NAMES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
_CATEGORY_LINES = "\n".join(f"{code}: {name}." for code, name in CATEGORY_NAMES.items())
# llama.cpp's GBNF: `safe`, or `unsafe` and a line of categories.
VERDICT_GRAMMAR = 'root ::= "safe" | "unsafe\\n" cat ("," cat)*\ncat ::= "S" ([1-9] | "1" [0-4])'
_CODES = re.compile(r"\bS(1[0-4]|[1-9])\b")
EXCERPT_CHARS = 200

Turn = tuple[str, str]  # ("User" | "Agent", text)


class ClassifierFailed(Exception):
    """No usable verdict (model unknown, engine down, timeout, unparseable answer)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    unsafe: bool
    categories: tuple[str, ...] = ()


def conversation_of(payload: dict[str, Any], history: SessionHistory = NO_HISTORY) -> list[Turn]:
    """A chat's messages (system prompts count as the user's), a session's stored history
    among them where the engine gets it, or a completion's prompt."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        messages = messages_with_history(messages, history)
        return [
            ("Agent" if m.get("role") == "assistant" else "User", message_text(m))
            for m in messages
            if isinstance(m, dict) and message_text(m)
        ]
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        prompt = "\n".join(p for p in prompt if isinstance(p, str))
    return [("User", prompt)] if isinstance(prompt, str) and prompt else []


def guard_prompt(turns: Iterable[Turn], *, assess: str) -> str:
    """Llama Guard 3's task prompt, assessing the last `assess` ("User"/"Agent") turn."""
    conversation = "\n\n".join(f"{role}: {text}" for role, text in turns)
    return (
        f"Task: Check if there is unsafe content in '{assess}' messages in conversations "
        "according our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{_CATEGORY_LINES}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {assess} message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
    )


def parse_verdict(text: str) -> Verdict:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].lower() if lines else ""
    if first.startswith("unsafe"):
        codes = _CODES.findall(" ".join([first[6:], *lines[1:]]).upper())
        return Verdict(unsafe=True, categories=tuple(dict.fromkeys(f"S{c}" for c in codes)))
    if first.startswith("safe"):
        return Verdict(unsafe=False)
    raise ClassifierFailed(f"unexpected answer {text[:60]!r}")


def request_body(model: str, prompt: str, *, flavor: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 16,
        "stream": False,
    }
    if flavor == "llamacpp":
        body["grammar"] = VERDICT_GRAMMAR
    return body


async def classify(model: str, prompt: str, *, payer: Payer, slot_held_on: str = "") -> Verdict:
    """One verdict from the model (ClassifierFailed when there is none in time).
    `slot_held_on`: the engine serving the answer being checked (engines/calls.py)."""
    try:
        async with asyncio.timeout(settings.SAFETY_CLASSIFIER_TIMEOUT_SECONDS):
            return parse_verdict(await _ask(model, prompt, payer=payer, slot_held_on=slot_held_on))
    except TimeoutError:
        raise ClassifierFailed(
            f"no answer within {settings.SAFETY_CLASSIFIER_TIMEOUT_SECONDS:g} s"
        ) from None
    except ModelNotServed:
        raise ClassifierFailed(f"no model `{model}`") from None
    except EngineError as exc:
        if exc.status:
            raise ClassifierFailed(f"engine answered HTTP {exc.status}") from None
        if isinstance(exc.__cause__, SchedulerBusy):
            raise ClassifierFailed(f"engine busy ({exc.__cause__.reason})") from None
        cause = type(exc.__cause__ or exc).__name__
        raise ClassifierFailed(f"engine unreachable ({cause})") from None


def _first_variant(route: ModelRoute) -> VariantRoute:
    return route.variants[0]


async def _ask(model: str, prompt: str, *, payer: Payer, slot_held_on: str = "") -> str:
    """The classifier's answer, like any engine call of the tenant's: in a scheduler slot
    (waking or starting a managed engine, on the replica the scheduler picks), charged to
    the payer's quota with the tokens the engine reports. Charged even past the quota's
    limit: the request it checks was admitted already."""
    route = (await registry.get()).find(model)
    if route is None or not route.variants:
        raise ModelNotServed(f"no model `{model}`", transient=False)
    body = request_body(route.name, prompt, flavor=_first_variant(route).engine.flavor)
    call = UsageCall(
        payer=payer, kind=SAFETY_CLASSIFIER, model=route.name, estimate=heuristic_tokens(prompt)
    )
    async with metered(call, admitted=True):
        answer = await engine_post(
            model=route.name,
            path="/v1/chat/completions",
            body=body,
            tenant=payer.tenant_slug,
            weight=payer.weight,
            pick=_first_variant,
            call=call,
            slot_held_on=slot_held_on,
        )
        text = answer_text(answer)
        call.took(answer.get("usage"), completion_estimate=heuristic_tokens(text))
    return text


def answer_text(answer: Any) -> str:
    try:
        return answer["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise ClassifierFailed("the engine's answer is not a chat completion") from None


async def classify_rules(
    rules: Iterable[Rule],
    *,
    conversation: list[Turn] | None,
    tool_command: str | None,
    payer: Payer,
    slot_held_on: str = "",
) -> list[Finding]:
    """Findings of the model rules: one classifier call per distinct model, concurrently.
    `slot_held_on`: the engine serving the answer being checked, while it holds its slot
    there (a response's checks)."""
    rules = list(rules)
    if tool_command is not None:
        turns = [("Agent", f"Run this tool command: {tool_command}")]
        assess = "Agent"
    else:
        turns = conversation or []
        assess = turns[-1][0] if turns else "User"
    if not turns:
        return []
    prompt = guard_prompt(turns, assess=assess)
    models = sorted({rule.classifier_model for rule in rules})
    results = await asyncio.gather(
        *(classify(m, prompt, payer=payer, slot_held_on=slot_held_on) for m in models),
        return_exceptions=True,
    )
    verdicts = dict(zip(models, results, strict=True))
    excerpt = turns[-1][1][-EXCERPT_CHARS:]
    return [
        finding
        for rule in rules
        if (finding := rule_finding(rule, verdicts[rule.classifier_model], excerpt)) is not None
    ]


def rule_finding(rule: Rule, verdict: Verdict | BaseException, excerpt: str) -> Finding | None:
    if isinstance(verdict, ClassifierFailed):
        return failure_finding(rule, str(verdict))
    if isinstance(verdict, BaseException):
        logger.error("classifier %s failed", rule.classifier_model, exc_info=verdict)
        return failure_finding(rule, f"{type(verdict).__name__}: {verdict}")
    if not verdict.unsafe:
        return None
    if rule.categories and not rule.categories.intersection(verdict.categories):
        return None
    return Finding(rule=rule, action=rule.action, excerpt=excerpt, categories=verdict.categories)


def failure_finding(rule: Rule, reason: str) -> Finding:
    """What a rule does without a verdict: its fail_open says (and the log says it)."""
    outcome = "let through (fail-open)" if rule.fails_open else "treated as unsafe (fail-closed)"
    logger.warning(
        "classifier %s for rule %s: %s; %s", rule.classifier_model, rule.name, reason, outcome
    )
    action = Action.FLAG if rule.fails_open else rule.action
    return Finding(rule=rule, action=action, detail=f"classifier failed: {reason}; {outcome}")


# --- whole answers and streams ------------------------------------------------------


class StreamClassifier:
    """Model rules over a streamed answer: every SAFETY_STREAM_MODEL_EVERY_TOKENS tokens
    the conversation plus the answer so far is classified, concurrently with the stream;
    an unsafe verdict stops the stream at the next chunk. While a check runs, at most
    that many more tokens are released before the window waits for its verdict (so
    between two verdicts at most 2N tokens reach the client). The tail after the last
    check is classified once the engine is done; a block found then cannot be unsent,
    so it is recorded and the session keeps the refusal instead of the answer."""

    def __init__(self, ctx: RequestContext, state: Any, rules: Any) -> None:
        self.ctx, self.state, self.rules = ctx, state, rules
        self.every = max(1, settings.SAFETY_STREAM_MODEL_EVERY_TOKENS)
        self.conversation = conversation_of(ctx.payload, ctx.history)
        self.text: list[str] = []
        self.tokens = 0
        self.checked_at = 0  # tokens when the running (or last) check started
        self.task: asyncio.Task | None = None
        self.stopped = False
        ctx.before_finish.insert(0, self.final_check)  # before the session stores the reply

    def add(self, index: int, text: str) -> None:
        if index != 0:
            return  # the first choice is what sessions keep and clients show
        self.text.append(text)
        self.tokens += 1
        if self.tokens - self.checked_at >= self.every and (self.task is None or self.task.done()):
            self._start()

    def must_hold(self) -> bool:
        running = self.task is not None and not self.task.done()
        return running and self.tokens - self.checked_at >= self.every

    def _start(self) -> None:
        self.checked_at = self.tokens
        turns = [*self.conversation, ("Agent", "".join(self.text))]
        self.task = asyncio.ensure_future(
            classify_rules(
                self.rules.model,
                conversation=turns,
                tool_command=None,
                payer=self.state.payer,
                slot_held_on=self.ctx.engine,
            )
        )

    def raise_if_unsafe(self, stop_chunks: Any) -> None:
        if self.task is None or not self.task.done() or self.stopped:
            return
        findings = self.task.result()
        self.task = None
        blocked = self._record(findings, Stage.RESPONSE)
        if blocked is not None:
            self.stopped = True
            raise StreamStop(content_filter_error(blocked.rule.name), stop_chunks())

    def _record(self, findings: list[Finding], stage: str) -> Finding | None:
        for finding in findings:
            self.state.record(stage, finding)
        return next((f for f in findings if f.action == Action.BLOCK), None)

    async def final_check(self) -> None:
        if self.stopped or not self.text:
            return
        if self.task is not None:
            findings = await self.task
            if self._record(findings, Stage.RESPONSE) is not None:
                return self._refuse()
        if self.tokens > self.checked_at:
            turns = [*self.conversation, ("Agent", "".join(self.text))]
            findings = await classify_rules(
                self.rules.model,
                conversation=turns,
                tool_command=None,
                payer=self.state.payer,
                slot_held_on=self.ctx.engine,
            )
            if self._record(findings, Stage.RESPONSE) is not None:
                return self._refuse()
        return None

    def _refuse(self) -> None:
        self.ctx.reply = {"role": "assistant", "content": ""}


def try_classifier(*, rule: Rule, text: str) -> str:
    """For the admin's test box (a sync view): the verdict on `text` as a user message."""
    route = load_snapshot().find(rule.classifier_model)
    if route is None or not route.variants:
        return f"No model `{rule.classifier_model}`: the rule would fail {'open' if rule.fails_open else 'closed'}."
    variant = route.variants[0]
    body = request_body(
        route.name, guard_prompt([("User", text)], assess="User"), flavor=variant.engine.flavor
    )
    base_url = variant.engine.base_urls[0] if variant.engine.base_urls else variant.engine.base_url
    try:
        raw = httpx.post(
            f"{base_url}/v1/chat/completions",
            json=body,
            timeout=settings.SAFETY_CLASSIFIER_TIMEOUT_SECONDS,
        ).content
        verdict = parse_verdict(answer_text(orjson.loads(raw)))
    except (httpx.HTTPError, orjson.JSONDecodeError, ClassifierFailed) as exc:
        return f"The classifier failed ({exc}): the rule would fail {'open' if rule.fails_open else 'closed'}."
    if not verdict.unsafe:
        return "The classifier says safe: the text would pass."
    names = (
        ", ".join(f"{c} {CATEGORY_NAMES.get(c, '')}" for c in verdict.categories) or "no category"
    )
    hit = not rule.categories or rule.categories.intersection(verdict.categories)
    return f"The classifier says unsafe ({names}): the rule would {rule.action if hit else 'let it pass'}."
