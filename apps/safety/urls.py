from django.urls import path

from apps.safety.apis import SafetyEventListApi

app_name = "safety"

urlpatterns = [
    path("safety-events", SafetyEventListApi.as_view(), name="event-list"),
]
