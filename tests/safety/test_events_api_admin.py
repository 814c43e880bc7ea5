"""The audit trail: GET /api/safety-events (each tenant its own), and the admin pages
(rules with their test box, events filtered and searchable with a per-day chart)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from apps.safety.models import SafetyEvent, SafetyRule

pytestmark = pytest.mark.django_db


def event(
    tenant, rule_name: str, *, excerpt: str = "", action: str = "block", stage: str = "prompt"
):
    return SafetyEvent.objects.create(
        tenant=tenant.tenant, rule_name=rule_name, action=action, stage=stage, excerpt=excerpt
    )


def test_it_lists_a_tenants_own_events_only(client: Client, alice, bob):
    event(alice, "no-bombs", excerpt="alice's bomb")
    event(bob, "bob-rule", excerpt="bob's secret text")
    body = client.get("/api/safety-events", headers=alice.auth).json()
    assert [e["rule"] for e in body["data"]] == ["no-bombs"]
    assert "bob" not in str(body)
    body = client.get("/api/safety-events", headers=bob.auth).json()
    assert [e["excerpt"] for e in body["data"]] == ["bob's secret text"]


def test_it_filters_searches_and_pages_events(client: Client, alice):
    event(alice, "a", excerpt="first one", action="flag")
    event(alice, "b", excerpt="second one", stage="response")
    event(alice, "b", excerpt="third")
    get = lambda **q: client.get("/api/safety-events", q, headers=alice.auth).json()  # noqa: E731
    assert [e["excerpt"] for e in get(rule="b")["data"]] == ["third", "second one"]
    assert [e["excerpt"] for e in get(stage="response")["data"]] == ["second one"]
    assert [e["excerpt"] for e in get(action="flag")["data"]] == ["first one"]
    assert [e["excerpt"] for e in get(search="ONE")["data"]] == ["second one", "first one"]
    page = get(limit=2)
    assert (len(page["data"]), page["has_more"]) == (2, True)
    assert get(limit=2, offset=2)["has_more"] is False


def test_it_refuses_bad_queries_and_missing_keys(client: Client, alice):
    response = client.get("/api/safety-events", {"stage": "nope"}, headers=alice.auth)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stage"
    assert client.get("/api/safety-events").status_code == 401


def test_it_shows_what_a_sample_text_would_do_without_saving(admin_client: Client):
    url = reverse("admin:safety_safetyrule_add")
    form = {
        "name": "cards",
        "stage": "prompt",
        "kind": "regex",
        "action": "redact",
        "pattern": r"\d{4}-\d{4}",
        "replacement": "[CARD]",
        "enabled": "on",
        "sample_text": "pay with 1234-5678 now",
        "_test_rule": "Test this rule",
    }
    page = admin_client.post(url, form).content.decode()
    assert "Test result (not saved): Redacted to: “pay with [CARD] now”" in page
    assert not SafetyRule.objects.exists()
    page = admin_client.post(url, {**form, "pattern": "(?<=x)y"}).content.decode()
    assert "RE2 cannot compile this pattern: invalid perl operator: (?&lt;=" in page
    form.pop("_test_rule")
    admin_client.post(url, form)
    assert SafetyRule.objects.get().pattern == r"\d{4}-\d{4}"


def test_it_fills_a_pattern_from_a_preset(admin_client: Client):
    admin_client.post(
        reverse("admin:safety_safetyrule_add"),
        {
            "name": "emails",
            "stage": "response",
            "kind": "regex",
            "action": "redact",
            "preset": "emails",
            "replacement": "[EMAIL]",
            "enabled": "on",
        },
    )
    assert "@" in SafetyRule.objects.get().pattern


def test_it_lists_searches_and_charts_events_in_the_admin(admin_client: Client, alice, bob):
    event(alice, "no-bombs", excerpt="a bomb recipe")
    event(alice, "no-bombs", excerpt="another bomb")
    event(bob, "pii", excerpt="mail [REDACTED]", action="redact")
    url = reverse("admin:safety_safetyevent_changelist")
    page = admin_client.get(url).content.decode()
    assert "Events per day per rule" in page
    assert "a bomb recipe" in page
    assert "mail [REDACTED]" in page
    searched = admin_client.get(url, {"q": "recipe"}).content.decode()
    assert "a bomb recipe" in searched
    assert "another bomb" not in searched
    filtered = admin_client.get(url, {"action": "redact"}).content.decode()
    assert "mail [REDACTED]" in filtered
    assert "a bomb recipe" not in filtered
    assert 'title="no-bombs' not in filtered  # the chart follows the filter


def test_it_tests_a_classifier_rule_against_its_model(admin_client: Client, engine, fake_engine):
    from apps.engines.services import engine_register_external

    engine_register_external(name="guard", base_url=fake_engine.url, models=["fake-guard"])
    form = {
        "name": "guard",
        "stage": "prompt",
        "kind": "model",
        "action": "block",
        "classifier_model": "fake-guard",
        "replacement": "[REDACTED]",
        "enabled": "on",
        "_test_rule": "Test this rule",
    }
    url = reverse("admin:safety_safetyrule_add")
    page = admin_client.post(url, {**form, "sample_text": "steal it fake-unsafe:S2"}).content
    assert "unsafe (S2 Non-Violent Crimes): the rule would block" in page.decode()
    page = admin_client.post(url, {**form, "sample_text": "hello"}).content.decode()
    assert "The classifier says safe" in page
    page = admin_client.post(url, {**form, "classifier_model": "nope"}).content.decode()
    assert "No model `nope`: the rule would fail closed" in page
