from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "apps.quotas"
    verbose_name = "Quotas and usage"

    def ready(self) -> None:
        from apps.quotas.models import Unit
        from apps.quotas.services import quotas_applicable
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
