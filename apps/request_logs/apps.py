from django.apps import AppConfig


class RequestLogsConfig(AppConfig):
    name = "apps.request_logs"
    label = "request_logs"
    verbose_name = "Request logs"
