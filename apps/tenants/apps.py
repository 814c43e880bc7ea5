from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "apps.tenants"
    verbose_name = "Tenants and API keys"

    def ready(self) -> None:
        from apps.tenants import signals  # noqa: F401  (connects the receivers)
