"""add_safety_rule / list_safety_rules / remove_safety_rule."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.safety.models import SafetyRule

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_it_adds_a_global_block_rule_by_default():
    assert "Added block rule r1 (prompt) for every tenant" in run(
        "add_safety_rule", "r1", "--stage", "prompt", "--regex", "bomb"
    )
    rule = SafetyRule.objects.get(name="r1")
    assert (rule.tenant, rule.action, rule.kind) == (None, "block", "regex")


def test_it_replaces_a_rule_of_the_same_name(alice):
    run("add_safety_rule", "r1", "--stage", "prompt", "--regex", "bomb")
    out = run(
        "add_safety_rule",
        "r1",
        "--stage",
        "response",
        "--regex",
        "gun",
        "--action",
        "flag",
        "--tenant",
        "alice",
    )
    assert "Replaced flag rule r1 (response) for tenant alice" in out
    rule = SafetyRule.objects.get()
    assert (rule.pattern, rule.stage, rule.tenant_id) == ("gun", "response", alice.tenant.pk)


def test_it_refuses_a_pattern_re2_cannot_compile_with_re2s_message():
    with pytest.raises(
        CommandError, match=r"RE2 cannot compile this pattern: invalid perl operator: \(\?<"
    ):
        run("add_safety_rule", "bad", "--stage", "prompt", "--regex", "(?<=a)b")
    with pytest.raises(CommandError, match="missing \\)"):
        run("add_safety_rule", "bad", "--stage", "prompt", "--regex", "(unclosed")
    with pytest.raises(CommandError, match="matches empty text"):
        run("add_safety_rule", "bad", "--stage", "prompt", "--regex", "a*")
    assert not SafetyRule.objects.exists()


def test_it_checks_model_rules():
    run(
        "add_safety_rule",
        "guard",
        "--stage",
        "prompt",
        "--model",
        "llama-guard",
        "--categories",
        "S1,s2",
    )
    assert SafetyRule.objects.get().category_codes == ("S1", "S2")
    with pytest.raises(CommandError, match="Unknown categories: S99"):
        run("add_safety_rule", "g2", "--stage", "prompt", "--model", "m", "--categories", "S99")
    with pytest.raises(CommandError, match="can block or flag, not redact"):
        run("add_safety_rule", "g3", "--stage", "prompt", "--model", "m", "--action", "redact")


def test_it_refuses_an_unknown_tenant_or_key(alice):
    with pytest.raises(CommandError, match="No tenant 'nobody'"):
        run("add_safety_rule", "r", "--stage", "prompt", "--regex", "x", "--tenant", "nobody")
    with pytest.raises(CommandError, match="no API key named 'nope'"):
        run(
            "add_safety_rule",
            "r",
            "--stage",
            "prompt",
            "--regex",
            "x",
            "--tenant",
            "alice",
            "--api-key-name",
            "nope",
        )


def test_it_lists_and_removes_rules(alice):
    assert run("list_safety_rules").strip() == "No safety rules."
    run(
        "add_safety_rule",
        "pii",
        "--stage",
        "response",
        "--preset",
        "emails",
        "--action",
        "redact",
        "--tenant",
        "alice",
    )
    run("add_safety_rule", "guard", "--stage", "prompt", "--model", "lg")
    listed = run("list_safety_rules").splitlines()
    assert listed[0].startswith("guard\tprompt\tblock\tglobal\tmodel lg any category fail-closed")
    assert listed[1].startswith("pii\tresponse\tredact\talice\tregex ")
    assert run("remove_safety_rule", "pii").strip() == "Removed safety rule pii."
    with pytest.raises(CommandError, match="No safety rule named 'pii'"):
        run("remove_safety_rule", "pii")
