"""Tenant model rules that hold however the data is changed (admin, shell, services)."""

from __future__ import annotations

import pytest

from apps.engines.models import ServedModel
from apps.tenants.models import Tenant
from apps.tenants.services import tenant_create

pytestmark = pytest.mark.django_db


def test_it_lets_a_new_tenant_use_every_model() -> None:
    assert not tenant_create(slug="acme").restrict_models


def test_it_restricts_a_tenant_once_models_are_added_to_its_list() -> None:
    acme, other = tenant_create(slug="acme"), tenant_create(slug="other")
    model = ServedModel.objects.create(name="m")

    acme.allowed_models.add(model)
    model.tenants.add(other)  # from the model's side too

    assert acme.restrict_models
    assert list(Tenant.objects.filter(restrict_models=True)) == [acme, other]


def test_it_stays_restricted_when_its_models_are_removed() -> None:
    acme = tenant_create(slug="acme")
    model = ServedModel.objects.create(name="m")
    acme.allowed_models.add(model)

    acme.allowed_models.clear()
    model.delete()

    acme.refresh_from_db()
    assert acme.restrict_models
