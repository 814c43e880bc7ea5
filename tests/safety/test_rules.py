"""Which rules a request is under: global, its tenant's, its key's; blocks first."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from apps.safety.checks import regex_check
from apps.safety.models import SafetyRule
from apps.safety.rules import Snapshot, load_snapshot, rule_view


def rule(name: str, *, tenant_id=None, api_key_id=None, action="block", stage="prompt"):
    row = SafetyRule(
        pk=len(name), name=name, pattern=name, stage=stage, action=action,
        tenant_id=tenant_id, api_key_id=api_key_id,
    )  # fmt: skip
    return rule_view(row)


def test_it_selects_global_tenant_and_key_rules_only():
    snapshot = Snapshot(
        rules=(
            rule("everyone"),
            rule("tenant1", tenant_id=1),
            rule("key11", tenant_id=1, api_key_id=11),
            rule("key12", tenant_id=1, api_key_id=12),
            rule("tenant2", tenant_id=2),
            rule("answers", stage="response"),
        )
    )
    names = [r.name for r in snapshot.for_key(tenant_id=1, key_id=11, stage="prompt").regex]
    assert names == ["everyone", "key11", "tenant1"]
    names = [r.name for r in snapshot.for_key(tenant_id=2, key_id=21, stage="prompt").regex]
    assert names == ["everyone", "tenant2"]
    assert not snapshot.for_key(tenant_id=3, key_id=31, stage="tool")


def test_it_blocks_before_it_redacts_and_keeps_secrets_out_of_excerpts():
    snapshot = Snapshot(rules=(rule("hush", action="redact"), rule("stop")))
    rules = snapshot.for_key(tenant_id=1, key_id=1, stage="prompt")
    verdict = regex_check(rules, "hush now")
    assert (verdict.blocked, verdict.text) == (None, "[REDACTED] now")
    assert "hush" not in verdict.findings[0].excerpt
    assert regex_check(rules, "hush, stop").blocked.rule.name == "stop"


@pytest.mark.django_db
def test_it_refuses_a_key_of_another_tenant(alice, bob):
    row = SafetyRule(
        name="r", pattern="x", stage="prompt", tenant=alice.tenant, api_key=bob.api_key
    )
    with pytest.raises(ValidationError, match="key of the rule's tenant"):
        row.full_clean()


@pytest.mark.django_db
def test_it_loads_enabled_rules_only():
    SafetyRule.objects.create(name="on", pattern="x", stage="prompt")
    SafetyRule.objects.create(name="off", pattern="y", stage="prompt", enabled=False)
    assert [r.name for r in load_snapshot().rules] == ["on"]
