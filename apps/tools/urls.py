from django.urls import path

from apps.tools.apis import ToolRunListApi

app_name = "tools"

urlpatterns = [path("tool-runs", ToolRunListApi.as_view(), name="tool-run-list")]
