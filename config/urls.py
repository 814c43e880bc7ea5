from django.contrib import admin
from django.urls import include, path

from apps.proxy.ops import health_detailed_view, metrics_view

admin.site.site_header = "LLM gateway"
admin.site.site_title = "LLM gateway admin"
# "View site": nothing is served at / yet; the health report is a real page to land on.
admin.site.site_url = "/health"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("apps.quotas.urls")),
    # Before sessions': its /api/sessions/{id}/rag would be read as a session id there.
    path("api/", include("apps.rag.urls")),
    path("api/", include("apps.sessions.urls")),
    path("api/", include("apps.safety.urls")),
    path("api/", include("apps.cache.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("health/detailed", health_detailed_view, name="health-detailed"),
    path("v1/", include("apps.rag.v1_urls")),
    path("rag/", include("apps.rag.page_urls")),
    path("api/", include("apps.tools.urls")),
]
