from django.urls import path, re_path

from apps.sessions.apis import SessionDetailApi, SessionListApi, SystemPromptApi

app_name = "chat_sessions"

urlpatterns = [
    path("sessions", SessionListApi.as_view(), name="session-list"),
    # Any non-empty rest of the path, newlines and slashes included: a malformed id gets a
    # 400 naming the rule instead of an HTML 404.
    re_path(
        r"^sessions/(?P<session_id>(?s:.+))$", SessionDetailApi.as_view(), name="session-detail"
    ),
    path("system-prompt", SystemPromptApi.as_view(), name="system-prompt"),
]
