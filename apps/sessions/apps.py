from django.apps import AppConfig


class ChatSessionsConfig(AppConfig):
    name = "apps.sessions"
    # Django's own session framework already owns the `sessions` label.
    label = "chat_sessions"
    verbose_name = "Chat sessions"
