"""Key authentication: constant-time hash check and the short in-process cache."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from apps.core.errors import ApiError
from apps.tenants import auth
from apps.tenants.services import api_key_create, api_key_revoke, hash_key

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def empty_cache():
    auth._cache.clear()
    yield
    auth._cache.clear()


def bearer(raw_key: str) -> bytes:
    return f"Bearer {raw_key}".encode()


def test_it_stores_only_a_hash_of_the_key(alice):
    alice.api_key.refresh_from_db()
    assert alice.raw_key.startswith(f"sk-{alice.api_key.prefix}_")
    assert alice.api_key.key_hash == hash_key(alice.raw_key)
    assert alice.raw_key not in str(alice.api_key.__dict__)


async def test_it_authenticates_a_good_key(alice):
    principal = await auth.authenticate(bearer(alice.raw_key))
    assert (principal.tenant_slug, principal.key_id) == ("alice", alice.api_key.pk)
    assert principal.allowed_model_ids is None


@override_settings(AUTH_CACHE_SECONDS=60)
async def test_it_trusts_the_cache_within_its_bound(alice):
    from channels.db import database_sync_to_async as sync_to_async

    await auth.authenticate(bearer(alice.raw_key))
    await sync_to_async(api_key_revoke)(api_key=alice.api_key)
    assert (await auth.authenticate(bearer(alice.raw_key))).key_id == alice.api_key.pk


@override_settings(AUTH_CACHE_SECONDS=0)
async def test_it_sees_a_revocation_once_the_cache_expires(alice):
    from channels.db import database_sync_to_async as sync_to_async

    await auth.authenticate(bearer(alice.raw_key))
    await sync_to_async(api_key_revoke)(api_key=alice.api_key)
    with pytest.raises(ApiError) as caught:
        await auth.authenticate(bearer(alice.raw_key))
    assert caught.value.status == 401


@override_settings(AUTH_CACHE_SECONDS=60)
async def test_it_checks_expiry_on_every_request_even_when_cached(alice):
    from channels.db import database_sync_to_async as sync_to_async

    created = await sync_to_async(api_key_create)(
        tenant=alice.tenant, name="short", expires_at=timezone.now() + timedelta(milliseconds=300)
    )
    await auth.authenticate(bearer(created.raw_key))
    import asyncio

    await asyncio.sleep(0.4)
    with pytest.raises(ApiError) as caught:
        await auth.authenticate(bearer(created.raw_key))
    assert "expired" in caught.value.message


async def test_it_rejects_a_key_with_a_known_prefix_but_wrong_secret(alice):
    forged = alice.raw_key.rsplit("_", 1)[0] + "_forged-secret"
    with pytest.raises(ApiError) as caught:
        await auth.authenticate(bearer(forged))
    assert caught.value.status == 401


async def test_it_allows_no_model_once_a_restricted_tenants_last_model_is_gone(alice, bob):
    from channels.db import database_sync_to_async as sync_to_async

    from apps.engines.models import ServedModel

    def restrict_then_delete() -> int:
        model = ServedModel.objects.create(name="only-one")
        alice.tenant.allowed_models.set([model])
        model.delete()
        return ServedModel.objects.create(name="another").pk

    another = await sync_to_async(restrict_then_delete)()
    principal = await auth.authenticate(bearer(alice.raw_key))
    assert principal.allowed_model_ids == frozenset()
    assert not principal.may_use(another)
    # Never restricted: every model.
    assert (await auth.authenticate(bearer(bob.raw_key))).may_use(another)
