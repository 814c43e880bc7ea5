from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "apps.quotas"
    verbose_name = "Quotas and usage"

    def ready(self) -> None:
        from apps.core.usage import meter_register
        from apps.quotas.models import Unit
        from apps.quotas.services import quotas_applicable
        from apps.quotas.usage import quota_meter
        from apps.tenants.auth import attach_to_principal

        attach_to_principal(
            "quotas",
            lambda key: tuple(quotas_applicable(tenant_id=key.tenant_id, api_key_id=key.pk)),
        )
        attach_to_principal(
            "budgets",
            lambda key: tuple(
                quotas_applicable(tenant_id=key.tenant_id, api_key_id=key.pk, unit=Unit.COST)
            ),
        )
        # The engine calls RAG and safety make for a tenant count against its quotas.
        meter_register("quotas", quota_meter)
