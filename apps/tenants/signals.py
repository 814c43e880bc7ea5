"""Picking allowed models restricts a tenant to them, however the models are added."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import m2m_changed
from django.dispatch import receiver

from apps.tenants.models import Tenant


@receiver(m2m_changed, sender=Tenant.allowed_models.through)
def restrict_on_allowed_models_added(
    sender: type, instance: Any, action: str, reverse: bool, pk_set: set[int] | None, **kwargs: Any
) -> None:
    # Only additions turn the restriction on: removing models (or a deleted model's
    # cascade) keeps the tenant restricted, to fewer models or none.
    if action != "post_add" or not pk_set:
        return
    if reverse:  # served_model.tenants.add(...): pk_set holds tenants
        Tenant.objects.filter(pk__in=pk_set, restrict_models=False).update(restrict_models=True)
        return
    if not instance.restrict_models:
        instance.restrict_models = True
        Tenant.objects.filter(pk=instance.pk).update(restrict_models=True)
