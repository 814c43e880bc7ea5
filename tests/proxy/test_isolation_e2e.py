"""One tenant's key never lists or reaches another tenant's models or request logs."""

from __future__ import annotations

import httpx
import openai
import pytest

from apps.engines.models import ServedModel
from tests.conftest import FAKE_MODEL, request_logs, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def split_models(engine, alice, bob):
    alice.tenant.allowed_models.set([ServedModel.objects.get(name=FAKE_MODEL)])
    bob.tenant.allowed_models.set([ServedModel.objects.get(name="other-model")])


def client_for(gateway, tenant_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=tenant_key.raw_key, max_retries=0)


def test_it_lists_only_each_tenants_own_models(split_models, gateway, alice, bob, charlie):
    assert [m.id for m in client_for(gateway, alice).models.list()] == [FAKE_MODEL]
    assert [m.id for m in client_for(gateway, bob).models.list()] == ["other-model"]
    # A tenant nobody restricted may use every model.
    assert sorted(m.id for m in client_for(gateway, charlie).models.list()) == [
        FAKE_MODEL,
        "other-model",
    ]


def test_it_never_reaches_another_tenants_model(split_models, gateway, alice, bob):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, alice).chat.completions.create(model="other-model", messages=messages)
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, alice).models.retrieve("other-model")
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, bob).embeddings.create(model=FAKE_MODEL, input="x")
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, bob).completions.create(model=FAKE_MODEL, prompt="x")


def test_it_attributes_request_logs_to_the_calling_tenant_only(split_models, gateway, alice, bob):
    messages = [{"role": "user", "content": "hi"}]
    client_for(gateway, alice).chat.completions.create(model=FAKE_MODEL, messages=messages)
    client_for(gateway, bob).chat.completions.create(model="other-model", messages=messages)
    client_for(gateway, bob).chat.completions.create(model="other-model", messages=messages)
    wait_until(lambda: len(request_logs()) == 3)
    assert [log.model for log in request_logs(tenant=alice.tenant)] == [FAKE_MODEL]
    assert {log.api_key_id for log in request_logs(tenant=bob.tenant)} == {bob.api_key.pk}


def test_it_never_exposes_request_logs_on_v1(split_models, gateway, alice):
    for path in ("/v1/request_logs", "/v1/logs", "/v1/usage"):
        response = httpx.get(gateway.url + path, headers=alice.auth)
        assert response.status_code == 404


RERANK = {"query": "red fruit", "documents": ["apple", "car"]}


def rerank(gateway, tenant_key, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/rerank",
        headers=tenant_key.auth,
        json={"model": model, **RERANK},
        timeout=10,
    )


def test_it_never_reranks_with_another_tenants_model(split_models, gateway, alice, bob):
    refused = rerank(gateway, bob, FAKE_MODEL)
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert rerank(gateway, alice, FAKE_MODEL).status_code == 200
    wait_until(lambda: len(request_logs(endpoint="rerank")) == 2)
    [bobs] = request_logs(tenant=bob.tenant)
    assert (bobs.endpoint, bobs.status_code, bobs.error_code) == ("rerank", 404, "model_not_found")
    assert bobs.api_key_id == bob.api_key.pk
    [alices] = request_logs(tenant=alice.tenant)
    assert (alices.endpoint, alices.model, alices.status_code) == ("rerank", FAKE_MODEL, 200)


def test_it_never_streams_another_tenants_model(split_models, gateway, alice, bob, fake_engine):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(gateway, bob).chat.completions.create(
            model=FAKE_MODEL, messages=messages, stream=True
        )
    assert caught.value.code == "model_not_found"
    assert [r for r in fake_engine.requests() if r["path"] != "/health"] == []
    stream = client_for(gateway, alice).chat.completions.create(
        model=FAKE_MODEL, messages=messages, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_it_leaves_a_restricted_tenant_no_model_once_its_last_one_is_deleted(
    engine, gateway, alice, charlie
):
    alice.tenant.allowed_models.set([ServedModel.objects.get(name="other-model")])
    ServedModel.objects.get(name="other-model").delete()
    alice_client = client_for(gateway, alice)
    assert list(alice_client.models.list()) == []  # not every model
    with pytest.raises(openai.NotFoundError):
        alice_client.chat.completions.create(
            model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    # A tenant nobody restricted still may use every model.
    assert [m.id for m in client_for(gateway, charlie).models.list()] == [FAKE_MODEL]
