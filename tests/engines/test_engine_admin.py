"""The engine admin: managed engines' instances (state, process, load, errors, log) on
the list and change pages, start/stop/restart written for the owner to carry out, each
variant's system prompt, and each engine's prompt-cache hit rate."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.engines.models import Engine, EngineInstance, EngineVariant
from apps.engines.services import engine_register_external, engine_register_managed
from apps.request_logs.models import RequestLog

pytestmark = pytest.mark.django_db

TEMPLATE = "srv --port {port} -c {ctx_size}"


@pytest.fixture
def managed() -> Engine:
    engine = engine_register_managed(
        name="gemma", command_template=TEMPLATE, models=["gemma-3"], ctx_size=4096, replicas=2
    )
    variant = engine.variants.get()
    now = timezone.now()
    EngineInstance.objects.create(
        engine=engine, replica=0, state="running", variant=variant, pid=4242, port=18080,
        base_url="http://127.0.0.1:18080", started_at=now - timedelta(minutes=5),
        in_flight=2, remote_in_flight=1, queued=5, owner_pid=777, owner_host="gw1",
        heartbeat_at=now, log_tail="srv: model loaded\nsrv: listening <ok>",
        last_error="Engine gemma#0 exited unexpectedly with code -9.",
    )  # fmt: skip
    return engine


def change_url(engine: Engine) -> str:
    return reverse("admin:engines_engine_change", args=[engine.pk])


def action_url(engine: Engine, action: str) -> str:
    return reverse("admin:engines_engine_instance_action", args=[engine.pk, action])


def test_it_shows_each_instance_on_the_change_page(admin_client, managed) -> None:
    page = admin_client.get(change_url(managed)).content.decode()

    assert 'id="engine-instances"' in page
    assert 'data-replica="0"' in page
    assert 'data-replica="1"' in page
    assert "gemma-3 ctx=4096" in page
    assert "4242" in page
    assert "18080" in page
    assert "5 min" in page  # uptime
    assert "pid 777 on gw1" in page
    assert "<td>3</td>" in page
    assert "<td>5</td>" in page
    assert "exited unexpectedly with code -9" in page
    assert "srv: listening &lt;ok&gt;" in page  # the log, escaped


def test_it_does_not_believe_a_state_without_a_heartbeat(admin_client, managed) -> None:
    EngineInstance.objects.update(heartbeat_at=timezone.now() - timedelta(minutes=1))

    page = admin_client.get(change_url(managed)).content.decode()

    assert 'class="state-stopped"' in page
    assert "4242" not in page
    assert "exited unexpectedly" in page  # the last error stays visible


def test_it_lists_instances_on_the_engine_list(admin_client, managed) -> None:
    engine_register_external(name="ext", base_url="http://10.0.0.9:8000", models=["m"])

    page = admin_client.get(reverse("admin:engines_engine_changelist")).content.decode()

    assert "#0 running gemma-3 ctx=4096 · #1 stopped" in page
    assert TEMPLATE in page
    assert "http://10.0.0.9:8000" in page


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_it_asks_the_owner_to_act_on_one_replica(admin_client, managed, action: str) -> None:
    response = admin_client.post(action_url(managed, action), {"replica": "1"})

    assert response.status_code == 302
    assert response.url == change_url(managed)
    actions = dict(EngineInstance.objects.values_list("replica", "requested_action"))
    assert actions == {0: "", 1: action}


def test_it_asks_for_every_replica_without_one(admin_client, managed) -> None:
    admin_client.post(action_url(managed, "restart"))

    assert set(EngineInstance.objects.values_list("requested_action", flat=True)) == {"restart"}


def test_it_refuses_get_and_unknown_actions(admin_client, managed) -> None:
    assert admin_client.get(action_url(managed, "start")).status_code == 405
    admin_client.post(action_url(managed, "explode"), {"replica": "0"})
    assert not EngineInstance.objects.exclude(requested_action="").exists()


def test_it_runs_list_actions_on_managed_engines_only(admin_client, managed) -> None:
    external = engine_register_external(name="ext", base_url="http://10.0.0.9:8000", models=["m"])

    response = admin_client.post(
        reverse("admin:engines_engine_changelist"),
        {"action": "stop_engines", "_selected_action": [managed.pk, external.pk]},
        follow=True,
    )

    assert set(EngineInstance.objects.values_list("requested_action", flat=True)) == {"stop"}
    assert not EngineInstance.objects.filter(engine=external).exists()
    page = response.content.decode()
    assert "Asked to stop gemma" in page
    assert "1 external engine(s) skipped" in page


def test_it_validates_the_command_template_in_the_form(admin_client) -> None:
    response = admin_client.post(
        reverse("admin:engines_engine_add"),
        {
            "name": "bad", "kind": "managed", "flavor": "llamacpp", "slots": 1,
            "timeout_seconds": 600, "replicas": 1, "startup_timeout_seconds": 120,
            "stop_grace_seconds": 10, "command_template": "srv --port {port} {gpu}",
            "variants-TOTAL_FORMS": 0, "variants-INITIAL_FORMS": 0,
        },
    )  # fmt: skip

    assert response.status_code == 200
    assert "Unknown placeholder {gpu}" in response.content.decode()
    assert not Engine.objects.exists()


def test_it_shows_no_instance_panel_for_external_engines(admin_client) -> None:
    engine = engine_register_external(name="ext", base_url="http://10.0.0.9:8000", models=["m"])

    assert 'id="engine-instances"' not in admin_client.get(change_url(engine)).content.decode()


# --- per-variant system prompts ------------------------------------------------------


def engine_form(engine: Engine, variant: EngineVariant, **variant_fields: object) -> dict:
    """The change form of an external engine with one variant, as the browser posts it."""
    fields = {
        "name": engine.name, "kind": engine.kind, "flavor": engine.flavor,
        "slots": engine.slots, "timeout_seconds": engine.timeout_seconds,
        "upstream_api_key": "", "base_url": engine.base_url, "extra_base_urls": "",
        "command_template": "", "replicas": 1, "idle_ttl_seconds": "",
        "startup_timeout_seconds": 120, "stop_grace_seconds": 10,
        "variants-TOTAL_FORMS": 1, "variants-INITIAL_FORMS": 1,
        "variants-MIN_NUM_FORMS": 0, "variants-MAX_NUM_FORMS": 1000,
        "variants-0-id": variant.pk, "variants-0-engine": engine.pk,
        "variants-0-model": variant.model_id, "variants-0-ctx_size": variant.ctx_size or "",
        "variants-0-model_path": "", "variants-0-extra_args": "",
        "variants-0-system_prompt": variant.system_prompt,
    }  # fmt: skip
    return fields | {f"variants-0-{name}": value for name, value in variant_fields.items()}


def test_it_edits_a_variants_system_prompt_on_the_engine_page(admin_client) -> None:
    engine = engine_register_external(
        name="ext", base_url="http://10.0.0.9:8000", models=["m"], ctx_size=2048
    )
    variant = engine.variants.get()
    assert (
        'name="variants-0-system_prompt"' in admin_client.get(change_url(engine)).content.decode()
    )

    response = admin_client.post(
        change_url(engine), engine_form(engine, variant, system_prompt="Answer in French.")
    )

    assert response.status_code == 302, response.context["errors"]
    variant.refresh_from_db()
    assert variant.system_prompt == "Answer in French."
    model_page = reverse("admin:engines_servedmodel_change", args=[variant.model_id])
    assert "Answer in French." in admin_client.get(model_page).content.decode()


# --- prompt-cache hit rates ----------------------------------------------------------


def request_log(tenant, engine: str, prompt: int, cached: int, **fields: object) -> None:
    RequestLog.objects.create(
        tenant=tenant, engine=engine, endpoint=fields.pop("endpoint", "chat.completions"),
        status_code=200, prompt_tokens=prompt, cached_tokens=cached, latency_ms=1.0, **fields,
    )  # fmt: skip


@pytest.fixture
def cache_logs(alice):
    """Engine `ext`: 150 of 500 prompt tokens cached in the last 24 h, 600 of 1,000 in all."""
    engine = engine_register_external(name="ext", base_url="http://10.0.0.9:8000", models=["m"])
    engine_register_external(name="idle", base_url="http://10.0.0.8:8000", models=["n"])
    tenant = alice.tenant
    request_log(tenant, "ext", 200, 50)
    request_log(tenant, "ext", 300, 100, endpoint="completions")
    request_log(tenant, "ext", 500, 450, created_at=timezone.now() - timedelta(days=3))
    # Not counted: cached tokens unknown (estimated usage), no prompt cache (embeddings).
    request_log(tenant, "ext", 1000, 0, usage_estimated=True)
    request_log(tenant, "ext", 1000, 0, endpoint="embeddings")
    request_log(tenant, "other", 100, 100)
    return engine


def test_it_lists_each_engines_prompt_cache_hit_rate(admin_client, cache_logs) -> None:
    page = admin_client.get(reverse("admin:engines_engine_changelist")).content.decode()

    assert '<td class="field-cache_hits">30.0 % / 60.0 %</td>' in page
    assert '<td class="field-cache_hits">- / -</td>' in page  # `idle` served nothing
    assert "Prompt cache hits (24 h / all time)" in page  # the column heading


def test_it_shows_the_prompt_cache_hit_rate_on_the_change_page(admin_client, cache_logs) -> None:
    page = admin_client.get(change_url(cache_logs)).content.decode()

    panel = page[page.index('id="engine-cache"') :]
    assert '<td>last 24 h</td><td class="cache-rate">30.0 %</td><td>150 / 500</td>' in panel
    assert '<td>all time</td><td class="cache-rate">60.0 %</td><td>600 / 1,000</td>' in panel


def test_it_shows_how_the_scheduler_sees_the_engine(admin_client, managed) -> None:
    """With one worker the admin reads this process's scheduler: a request holding the
    only slot of one replica shows up at once."""
    import asyncio

    from apps.engines.scheduler import SlotRequest, scheduler

    async def occupy():
        return await scheduler.acquire(
            SlotRequest(managed.name, replicas=2, slots=1, tenant="alice", max_queue=10, max_wait=1)
        )

    before = scheduler.stats(managed.name)
    placement = asyncio.run(occupy())
    try:
        page = admin_client.get(change_url(managed)).content.decode()
    finally:
        scheduler.release(placement)

    assert 'id="engine-scheduling"' in page
    assert "<th>in flight / capacity</th><td>1 / 2</td>" in page
    granted = f"{before['granted'] + 1} ({before['granted_after_wait']})"
    assert f"<th>granted (after waiting)</th><td>{granted}</td>" in page
