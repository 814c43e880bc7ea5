from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "apps.tools"
    verbose_name = "Sandboxed tools"
