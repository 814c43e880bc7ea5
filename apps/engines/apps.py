from django.apps import AppConfig


class EnginesConfig(AppConfig):
    name = "apps.engines"
    verbose_name = "Engines and models"
