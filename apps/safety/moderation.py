"""OpenAI's moderation result for texts, from a key's prompt-stage rules.

`flagged` is true when any rule would act on the text (block, redact or flag). Llama Guard
categories map onto OpenAI's where one fits (below); every result also names the rules
that matched (`rules`), and carries the S-codes as extra categories.
"""

from __future__ import annotations

from typing import Any

from apps.core.usage import Payer
from apps.safety.checks import matching
from apps.safety.classifier import CATEGORY_NAMES, classify_rules
from apps.safety.models import Stage
from apps.safety.rules import rule_cache

OPENAI_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
LLAMA_GUARD_TO_OPENAI = {
    "S1": ("violence",),
    "S2": ("illicit",),
    "S3": ("sexual", "illicit"),
    "S4": ("sexual/minors",),
    "S5": ("harassment",),
    "S9": ("illicit/violent",),
    "S10": ("hate",),
    "S11": ("self-harm",),
    "S12": ("sexual",),
    "S14": ("illicit",),
}


async def moderate(*, payer: Payer, texts: list[str]) -> list[dict[str, Any]]:
    """The key's prompt rules on each text; its classifier calls are charged to `payer`."""
    assert payer.api_key_id is not None
    rules = (await rule_cache.get()).for_key(
        tenant_id=payer.tenant_id, key_id=payer.api_key_id, stage=Stage.PROMPT
    )
    return [await _result(rules, text, payer) for text in texts]


async def _result(rules: Any, text: str, payer: Payer) -> dict[str, Any]:
    hits = [{"name": r.name, "action": r.action, "categories": []} for r in matching(rules, text)]
    codes: list[str] = []
    if rules.model and text:
        findings = await classify_rules(
            rules.model, conversation=[("User", text)], tool_command=None, payer=payer
        )
        for finding in findings:
            hits.append(
                {
                    "name": finding.rule.name,
                    "action": finding.action,
                    "categories": list(finding.categories),
                }
            )
            codes += finding.categories
    true = {name for code in codes for name in LLAMA_GUARD_TO_OPENAI.get(code, ())}
    true |= set(codes)
    keys = [*OPENAI_CATEGORIES, *CATEGORY_NAMES]
    return {
        "flagged": bool(hits),
        "categories": {key: key in true for key in keys},
        "category_scores": {key: 1.0 if key in true else 0.0 for key in keys},
        "category_applied_input_types": {key: ["text"] if key in true else [] for key in keys},
        "rules": hits,
    }
