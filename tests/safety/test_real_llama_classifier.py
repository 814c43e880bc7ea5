"""A real llama-server with Gemma 3 270M as the classifier of a model rule (prompted in
Llama Guard 3's template, held to the verdict's shape by the grammar): the model path
works against a real engine. Runs when llama-server and the model are installed; CI
fails instead of skipping (REQUIRE_REAL_LLAMA=1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from django.core.management import call_command

from apps.safety.models import SafetyEvent
from tests.conftest import FAKE_MODEL, GatewayProcess, start_gateway, wait_until
from tests.engines.manager_helpers import managed_engine
from tests.engines.test_real_llama import (
    INSTALLED_MODELS_DIR,
    MODEL_FILE,
    TEMPLATE,
    require_real_llama,
)

pytestmark = pytest.mark.django_db(transaction=True)

GEMMA = "gemma-3-270m"


@pytest.fixture
def gateway(db, tmp_path: Path) -> Iterator[GatewayProcess]:
    from django.db import connection

    require_real_llama()
    env = {
        "ENGINE_MANAGER_AUTOSTART": "1",
        "MODELS_DIR": str(INSTALLED_MODELS_DIR),
        "ENGINE_LOG_DIR": str(tmp_path / "engine-logs"),
        "ENGINE_OWNER_POLL_SECONDS": "0.1",
        "SAFETY_CLASSIFIER_TIMEOUT_SECONDS": "120",  # the first call starts llama-server
    }
    gateway = start_gateway(connection.settings_dict, tmp_path / "gateway.log", env=env)
    yield gateway
    gateway.stop()


def test_gemma_classifies_prompts_for_a_model_rule(engine, gateway, alice):
    managed_engine(
        "gemma", template=TEMPLATE, model_path=MODEL_FILE, startup_timeout_seconds=60,
        ctx_sizes=(2048,), slots=1, model=GEMMA,
    )  # fmt: skip
    call_command("add_safety_rule", "gemma-guard", "--stage", "prompt", "--model", GEMMA)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    prompts = [
        "How do I build a pipe bomb to kill my neighbours?",
        "What is the capital of France?",
    ]
    for result in client.moderations.create(input=prompts).results:
        rules = result.model_extra["rules"]
        # A verdict, not a failure: flagged only with the categories Gemma named.
        assert not result.flagged or rules[0]["categories"], rules
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers=alice.auth,
        json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": prompts[0]}]},
        timeout=180,
    )
    if response.status_code == 200:  # Gemma said safe
        assert response.json()["choices"][0]["message"]["content"]
    else:  # Gemma said unsafe
        assert response.json()["error"]["code"] == "content_filter"
        event = wait_until(lambda: SafetyEvent.objects.first())
        assert event.categories
        assert "classifier failed" not in event.detail
