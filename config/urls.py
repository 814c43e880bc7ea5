from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "LLM gateway"
admin.site.site_title = "LLM gateway admin"
# "View site": nothing is served at / yet; the health report is a real page to land on.
admin.site.site_url = "/health"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("apps.quotas.urls")),
    path("api/", include("apps.sessions.urls")),
]
