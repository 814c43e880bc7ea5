from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "apps.tools"
    verbose_name = "Sandboxed tools"

    def ready(self) -> None:
        from apps.tenants.auth import attach_to_principal
        from apps.tools.services import tools_allowed_for

        # The allow-list travels with the cached key, like the quotas (AUTH_CACHE_SECONDS).
        attach_to_principal("tools", lambda key: tools_allowed_for(tenant_id=key.tenant_id))
