from django.apps import AppConfig


class ResponseCacheConfig(AppConfig):
    name = "apps.cache"
    label = "response_cache"
    verbose_name = "Response cache"
