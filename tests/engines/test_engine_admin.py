"""The engine admin: managed engines' instances (state, process, load, errors, log) on
the list and change pages, and start/stop/restart written for the owner to carry out."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.engines.models import Engine, EngineInstance
from apps.engines.services import engine_register_external, engine_register_managed

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
        in_flight=2, remote_in_flight=1, queued=3, owner_pid=777, owner_host="gw1",
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
    assert 'data-replica="0"' in page and 'data-replica="1"' in page  # #1 never ran
    assert "gemma-3 ctx=4096" in page
    assert "4242" in page and "18080" in page
    assert "5 min" in page  # uptime
    assert "pid 777 on gw1" in page
    assert "<td>3</td>" in page and "<td>3</td>" in page  # in flight (2 + 1), queued 3
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
    assert TEMPLATE in page and "http://10.0.0.9:8000" in page


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_it_asks_the_owner_to_act_on_one_replica(admin_client, managed, action: str) -> None:
    response = admin_client.post(action_url(managed, action), {"replica": "1"})

    assert response.status_code == 302 and response.url == change_url(managed)
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
    assert "Asked to stop gemma" in page and "1 external engine(s) skipped" in page


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
