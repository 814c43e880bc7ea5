"""ASGI entry point: /v1 and /health go to Channels consumers, the rest to Django."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from apps.proxy.lifespan import LifespanApp  # noqa: E402
from apps.proxy.routing import http_routes  # noqa: E402
from apps.rag.v1_urls import V1_PREFIXES  # noqa: E402

# OpenAI's files and vector stores are Django views (apps/rag), ahead of the /v1 consumers.
django_v1_routes = [re_path(rf"^{prefix[1:]}(?:/|$)", django_asgi_app) for prefix in V1_PREFIXES]

application = ProtocolTypeRouter(
    {
        "http": URLRouter([*django_v1_routes, *http_routes, re_path(r"", django_asgi_app)]),
        "lifespan": LifespanApp(),
    }
)
