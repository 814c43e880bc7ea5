"""API key rotation: new secret shown once, the old one kept for a grace period."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from io import StringIO

import httpx
import openai
import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.urls import reverse

from apps.core.errors import ApiError
from apps.tenants import auth
from apps.tenants.models import ApiKey, RotatedKey
from apps.tenants.services import api_key_revoke, api_key_rotate, hash_key

RAW_KEY = re.compile(r"sk-[a-z0-9]{12}_[A-Za-z0-9_-]+")


@pytest.fixture(autouse=True)
def empty_cache():
    auth._cache.clear()
    yield
    auth._cache.clear()


def bearer(raw_key: str) -> bytes:
    return f"Bearer {raw_key}".encode()


def rotate(*args: str) -> list[str]:
    out = StringIO()
    call_command("rotate_api_key", *args, stdout=out, stderr=StringIO())
    return out.getvalue().splitlines()


# --- the command ----------------------------------------------------------------------


@pytest.mark.django_db
def test_it_rotates_a_key_and_prints_the_new_one_last(alice):
    lines = rotate("alice", "--name", "default", "--grace", "2h")

    new_key = lines[-1]
    assert RAW_KEY.fullmatch(new_key)
    assert new_key != alice.raw_key
    key = ApiKey.objects.get()  # the same key row: its quotas, budgets and usage stay
    assert key.pk == alice.api_key.pk
    assert key.key_hash == hash_key(new_key)
    old = RotatedKey.objects.get()
    assert old.key_hash == hash_key(alice.raw_key)
    assert timedelta(minutes=119) < old.grace_ends_at - old.rotated_at <= timedelta(hours=2)
    assert "old key works until" in lines[1]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nobody", "--name", "default"], "No tenant with slug 'nobody'"),
        (["alice", "--name", "missing"], "has no key named 'missing'"),
        (["alice", "--name", "default", "--grace", "soon"], "Invalid grace period 'soon'"),
        (["alice", "--name", "default", "--grace=-1h"], "Invalid grace period '-1h'"),
        (["alice", "--name", "default", "--grace", "400d"], "longer than a year"),
    ],
)
def test_it_refuses_bad_input_and_changes_nothing(alice, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        rotate(*args)

    assert ApiKey.objects.get().key_hash == hash_key(alice.raw_key)
    assert not RotatedKey.objects.exists()


@pytest.mark.django_db
def test_it_refuses_to_rotate_a_revoked_key(alice):
    api_key_revoke(api_key=alice.api_key)

    with pytest.raises(CommandError, match="is revoked"):
        rotate("alice", "--name", "default")
    assert not RotatedKey.objects.exists()


# --- authentication across the cache's bound ---------------------------------------


@pytest.mark.django_db(transaction=True)
@override_settings(AUTH_CACHE_SECONDS=0.2)
async def test_it_keeps_the_old_key_working_past_the_cache_bound_during_grace(alice):
    rotated = await sync_to_async(api_key_rotate)(api_key=alice.api_key, grace=timedelta(seconds=5))
    await asyncio.sleep(0.3)  # any cached entry is stale: both keys are looked up again

    old = await auth.authenticate(bearer(alice.raw_key))
    new = await auth.authenticate(bearer(rotated.raw_key))
    assert old.key_id == new.key_id == alice.api_key.pk
    assert old.grace_ends_at is not None
    assert new.grace_ends_at is None


@pytest.mark.django_db(transaction=True)
@override_settings(AUTH_CACHE_SECONDS=60)
async def test_it_refuses_the_old_key_at_the_grace_end_even_when_cached(alice):
    rotated = await sync_to_async(api_key_rotate)(
        api_key=alice.api_key, grace=timedelta(milliseconds=400)
    )
    await auth.authenticate(bearer(alice.raw_key))  # cached, with its grace end
    await asyncio.sleep(0.5)

    with pytest.raises(ApiError) as caught:
        await auth.authenticate(bearer(alice.raw_key))
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    assert "was rotated on" in caught.value.message
    assert "use the new key" in caught.value.message
    assert (await auth.authenticate(bearer(rotated.raw_key))).key_id == alice.api_key.pk


@pytest.mark.django_db(transaction=True)
@override_settings(AUTH_CACHE_SECONDS=0.3)
async def test_it_lets_a_cached_old_key_work_at_most_the_cache_bound_after_a_zero_grace(alice):
    await auth.authenticate(bearer(alice.raw_key))  # cached before the rotation
    await sync_to_async(api_key_rotate)(api_key=alice.api_key, grace=timedelta(0))

    assert (await auth.authenticate(bearer(alice.raw_key))).key_id == alice.api_key.pk
    await asyncio.sleep(0.4)
    with pytest.raises(ApiError, match="was rotated on"):
        await auth.authenticate(bearer(alice.raw_key))


@pytest.mark.django_db(transaction=True)
async def test_it_refuses_the_old_key_once_the_key_is_revoked(alice):
    await sync_to_async(api_key_rotate)(api_key=alice.api_key, grace=timedelta(hours=1))
    await sync_to_async(api_key_revoke)(api_key=alice.api_key)

    with pytest.raises(ApiError, match="revoked"):
        await auth.authenticate(bearer(alice.raw_key))


# --- end to end: /v1 and the tenant API ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_answers_401_naming_the_rotation_on_v1_and_api(engine, gateway, alice):
    rotated = api_key_rotate(api_key=alice.api_key, grace=timedelta(0))
    messages = [{"role": "user", "content": "hi"}]
    old = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)
    new = openai.OpenAI(base_url=gateway.base_url, api_key=rotated.raw_key, max_retries=0)

    assert new.chat.completions.create(model="fake-model", messages=messages).choices
    with pytest.raises(openai.AuthenticationError) as caught:
        old.chat.completions.create(model="fake-model", messages=messages)
    assert caught.value.code == "invalid_api_key"
    assert "rotated" in caught.value.message
    usage = httpx.get(f"{gateway.url}/api/usage", headers=alice.auth, timeout=10)
    assert usage.status_code == 401
    assert "rotated" in usage.json()["error"]["message"]
    new_auth = {"Authorization": f"Bearer {rotated.raw_key}"}
    assert httpx.get(f"{gateway.url}/api/usage", headers=new_auth, timeout=10).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_it_keeps_the_old_key_working_end_to_end_during_grace(engine, gateway, alice):
    api_key_rotate(api_key=alice.api_key, grace=timedelta(hours=1))
    old = openai.OpenAI(base_url=gateway.base_url, api_key=alice.raw_key, max_retries=0)

    reply = old.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content


# --- the admin --------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_rotates_from_the_admin_and_shows_both_keys_with_their_state(
    admin_client: Client, alice
):
    changelist = reverse("admin:tenants_apikey_changelist")
    selection = {"action": "rotate", "_selected_action": [alice.api_key.pk]}

    form = admin_client.post(changelist, selection)
    assert form.status_code == 200
    assert b"Rotate keys" in form.content
    assert not RotatedKey.objects.exists()  # nothing happens before the grace is confirmed
    bad = admin_client.post(changelist, {**selection, "grace": "whenever"})
    assert b"Invalid grace period" in bad.content
    assert not RotatedKey.objects.exists()

    done = admin_client.post(changelist, {**selection, "grace": "1h"}, follow=True)
    new_key = RAW_KEY.search(done.content.decode())[0]
    assert ApiKey.objects.get().key_hash == hash_key(new_key)
    page = admin_client.get(reverse("admin:tenants_apikey_change", args=[alice.api_key.pk]))
    old_prefix = alice.raw_key[3:15]
    assert f"sk-{old_prefix}_" in page.content.decode()
    assert b"in grace until" in page.content
    assert f"sk-{ApiKey.objects.get().prefix}_" in page.content.decode()

    RotatedKey.objects.update(grace_ends_at=RotatedKey.objects.get().rotated_at)
    listing = admin_client.get(reverse("admin:tenants_rotatedkey_changelist"))
    assert b"rotated out" in listing.content
