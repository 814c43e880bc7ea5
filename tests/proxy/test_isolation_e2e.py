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
