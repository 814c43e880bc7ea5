"""Regex checks of text: pure functions over a StageRules (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from apps.core.errors import ApiError
from apps.safety.models import EXCERPT_CHARS, Action
from apps.safety.rules import Rule, StageRules


@dataclass(frozen=True, slots=True)
class Finding:
    """What one rule found (or, for a classifier that could not answer, decided)."""

    rule: Rule
    action: str
    excerpt: str = ""
    categories: tuple[str, ...] = ()
    detail: str = ""


@dataclass(slots=True)
class Verdict:
    text: str  # the text after redaction
    blocked: Finding | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(f.action == Action.REDACT for f in self.findings)


def excerpt(text: str, start: int, end: int) -> str:
    """The match with a little context, bounded (what the audit trail keeps)."""
    context = max(0, (EXCERPT_CHARS - (end - start)) // 2)
    return text[max(0, start - context) : end + context][:EXCERPT_CHARS]


def matching(rules: StageRules, text: str) -> list[Rule]:
    """The regex rules that match somewhere in `text`, in the rules' order (blocks first)."""
    if rules.matcher is None or not text:
        return []
    hits = rules.matcher.Match(text)
    return [rules.regex[i] for i in sorted(hits)] if hits else []


def regex_check(rules: StageRules, text: str, *, hits: list[Rule] | None = None) -> Verdict:
    """Apply the matching rules: the first block stops; redactions rewrite the text in
    turn; flags are noted."""
    verdict = Verdict(text=text)
    for rule in matching(rules, text) if hits is None else hits:
        assert rule.regex is not None
        found = rule.regex.search(verdict.text)
        if found is None:  # an earlier redaction removed it
            continue
        start, end = found.span()
        if rule.action == Action.REDACT:
            # The audit trail shows the redacted text: it must not keep what was removed.
            verdict.text = redact_all(rule, verdict.text)
            end = start + len(rule.replacement)
        finding = Finding(rule=rule, action=rule.action, excerpt=excerpt(verdict.text, start, end))
        verdict.findings.append(finding)
        if rule.action == Action.BLOCK:
            verdict.blocked = finding
            return verdict
    return verdict


def redact_all(rule: Rule, text: str) -> str:
    assert rule.regex is not None
    return rule.regex.sub(lambda _found: rule.replacement, text)


def content_filter_error(rule_name: str) -> ApiError:
    """The error event that ends a stopped stream. Status 200: the stream so far stays the
    answer (stored, billed); see apps/proxy/engine_call.py."""
    return ApiError(
        200, f"The answer was stopped by the safety rule `{rule_name}`.", code="content_filter"
    )
