from django.urls import path

from apps.cache.apis import CacheStatsApi

app_name = "cache"

urlpatterns = [
    path("cache/stats", CacheStatsApi.as_view(), name="stats"),
]
