from django.urls import path, re_path

from apps.proxy.consumers import (
    ChatCompletionsConsumer,
    CompletionsConsumer,
    EmbeddingsConsumer,
    ModelDetailConsumer,
    ModelsConsumer,
    NotFoundConsumer,
)
from apps.proxy.health import HealthConsumer
from apps.proxy.moderations import ModerationsConsumer
from apps.proxy.rerank import RerankConsumer

http_routes = [
    path("v1/chat/completions", ChatCompletionsConsumer.as_asgi()),
    path("v1/completions", CompletionsConsumer.as_asgi()),
    path("v1/embeddings", EmbeddingsConsumer.as_asgi()),
    path("v1/rerank", RerankConsumer.as_asgi()),
    path("v1/moderations", ModerationsConsumer.as_asgi()),
    path("v1/models", ModelsConsumer.as_asgi()),
    re_path(r"^v1/models/(?P<model_id>.+)$", ModelDetailConsumer.as_asgi()),
    path("health", HealthConsumer.as_asgi()),
    # `/v1` itself too, and every path under it, with or without a trailing slash.
    re_path(r"^v1(?:/|$)", NotFoundConsumer.as_asgi()),
]
