from django.urls import path

from apps.quotas.apis import UsageApi

app_name = "quotas"

urlpatterns = [
    path("usage", UsageApi.as_view(), name="usage"),
]
