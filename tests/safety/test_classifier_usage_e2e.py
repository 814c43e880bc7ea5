"""Safety classifier calls are engine calls of the tenant's: they take a scheduler slot on
the classifier's engine (queued behind running requests like any other), are charged to
the tenant's token quota with the tokens the engine reports, even past the limit (the
request was admitted), and show in the request log and /metrics as "safety classifier"."""

from __future__ import annotations

import threading

import httpx
import pytest
from django.core.management import call_command
from prometheus_client.parser import text_string_to_metric_families

from apps.quotas.selectors import quota_states
from apps.quotas.services import quota_set
from apps.safety.models import SafetyEvent
from tests.conftest import request_logs, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT, GUARD = "solo-chat", "solo-guard"  # the fake engine answers like Llama Guard: "guard"
KIND = "safety classifier"


@pytest.fixture
def solo(db, fake_engine):
    """One engine with a single slot serving a chat model and the classifier."""
    from apps.engines.services import engine_register_external

    fake_engine.reset()
    engine_register_external(
        name="solo", base_url=fake_engine.url, models=[CHAT, GUARD], ctx_size=4096, slots=1
    )
    call_command("add_safety_rule", "solo-rule", "--stage", "prompt", "--model", GUARD)


def moderate(gateway, key, text: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/moderations", json={"input": text}, headers=key.auth, timeout=30
    )


def used(tenant) -> int:
    return sum(state.used for state in quota_states(tenant_id=tenant.pk))


def classifier_logs(tenant) -> list:
    return request_logs(tenant=tenant, endpoint=KIND)


def scrape(gateway) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics").text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_it_charges_the_classifier_and_logs_it(solo, gateway, alice, bob, fake_engine):
    quota_set(tenant=alice.tenant, tokens=100_000, period="day")
    quota_set(tenant=bob.tenant, tokens=100_000, period="day")
    before = scrape(gateway)
    response = moderate(gateway, alice, "is this fine")
    assert response.status_code == 200, response.text
    (log,) = wait_until(lambda: classifier_logs(alice.tenant))
    assert (log.model, log.engine, log.status_code, log.api_key_id) == (
        GUARD,
        "solo",
        200,
        alice.api_key.pk,
    )
    assert not log.usage_estimated
    assert (log.prompt_tokens > 0, log.completion_tokens > 0) == (True, True)
    # The quota is charged exactly what the engine reported for the call.
    wait_until(lambda: used(alice.tenant) == log.total_tokens)
    assert used(bob.tenant) == 0
    assert not classifier_logs(bob.tenant)
    after = scrape(gateway)
    labels = {"endpoint": KIND, "tenant": "alice", "model": GUARD, "status": "200"}
    assert (
        sample(after, "gateway_requests_total", **labels)
        - sample(before, "gateway_requests_total", **labels)
        == 1
    )
    tokens = {"tenant": "alice", "model": GUARD, "kind": "prompt"}
    assert (
        sample(after, "gateway_tokens_total", **tokens)
        - sample(before, "gateway_tokens_total", **tokens)
        == log.prompt_tokens
    )


def test_a_tenant_out_of_tokens_is_still_charged_for_an_admitted_request(solo, gateway, alice):
    quota_set(tenant=alice.tenant, tokens=5, period="day")
    text = "a question of many words " * 4
    assert moderate(gateway, alice, text).status_code == 200
    (log,) = wait_until(lambda: classifier_logs(alice.tenant))
    assert log.total_tokens > 5
    # Charged past the limit: the engine did the work for a request already admitted.
    wait_until(lambda: used(alice.tenant) == log.total_tokens)
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
        headers=alice.auth,
    )
    assert response.json()["error"]["code"] == "insufficient_quota"


def test_a_classifier_call_queues_for_the_engines_slot(solo, gateway, alice, bob, fake_engine):
    """Bob's slow answer holds the engine's only slot: Alice's classifier call waits for
    it in the gateway's scheduler (the queued gauge shows it), not at the engine."""
    slow = threading.Thread(
        target=httpx.post,
        args=(f"{gateway.base_url}/chat/completions",),
        kwargs={
            "json": {
                "model": CHAT,
                "messages": [{"role": "user", "content": "take your time"}],
                "fake": {"delay": 2},
            },
            "headers": bob.auth,
            "timeout": 30,
        },
    )
    slow.start()

    def chat_running() -> bool:
        return any(r["body"].get("model") == CHAT for r in fake_engine.requests())

    wait_until(chat_running)
    answer: list[httpx.Response] = []
    checking = threading.Thread(target=lambda: answer.append(moderate(gateway, alice, "hello")))
    checking.start()
    wait_until(lambda: sample(scrape(gateway), "gateway_engine_queued", engine="solo") == 1)
    slow.join()
    checking.join()
    assert answer[0].status_code == 200
    assert answer[0].json()["results"][0]["flagged"] is False  # a verdict, not a failure
    records = fake_engine.requests()
    chat = next(r for r in records if r["body"].get("model") == CHAT)
    alices = [r for r in records if r["body"].get("model") == GUARD and "hello" in str(r["body"])]
    assert len(alices) == 1
    # It reached the engine only once Bob's answer was done with the slot.
    assert alices[0]["started_at"] >= chat["finished_at"]
    assert sample(scrape(gateway), "gateway_engine_queued", engine="solo") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_answers_check_on_its_own_one_slot_engine_does_not_wait_for_itself(
    solo, gateway, alice, stream
):
    """The answer holds the engine's only slot until it is sent; its response check on
    that engine runs within it instead of queueing behind it (which would time out)."""
    call_command("add_safety_rule", "solo-answer", "--stage", "response", "--model", GUARD)
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        headers=alice.auth,
        timeout=30,
    )
    assert response.status_code == 200
    assert "content_filter" not in response.text
    logs = wait_until(
        lambda: len(classifier_logs(alice.tenant)) >= 2 and classifier_logs(alice.tenant)
    )
    assert {log.status_code for log in logs} == {200}  # the prompt's check and the answer's
    assert not SafetyEvent.objects.filter(detail__contains="classifier failed").exists()
