"""CORS for the Channels consumers (/v1), which Django's middleware never sees.

django-cors-headers' own CorsMiddleware decides, exactly as for the Django views under
/api: the wrapper hands it a bare HttpRequest made from the ASGI scope and copies the
headers it sets onto the consumer's response. A preflight `OPTIONS` is answered here,
before the consumer (so without a key). Requests without an `Origin` header (every
non-browser client) pass straight through.
"""

from __future__ import annotations

from typing import Any

from corsheaders.middleware import CorsMiddleware
from django.http import HttpRequest, HttpResponse

_middleware = CorsMiddleware(lambda request: HttpResponse())


def _request(scope: dict) -> HttpRequest:
    request = HttpRequest()
    request.method = scope["method"]
    request.path = request.path_info = scope["path"]
    for name, value in scope["headers"]:
        key = name.decode("latin-1").upper().replace("-", "_")
        request.META[f"HTTP_{key}"] = value.decode("latin-1")
    return request


def _cors_headers(request: HttpRequest) -> list[tuple[bytes, bytes]]:
    response = HttpResponse()
    _middleware.add_response_headers(request, response)
    return [
        (name.lower().encode(), value.encode())
        for name, value in response.headers.items()
        if name.lower().startswith("access-control-") or name.lower() == "vary"
    ]


def _has_origin(scope: dict) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


def cors(app: Any) -> Any:
    """The ASGI app `app` with CORS headers and preflight answers."""

    async def with_cors(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _has_origin(scope):
            return await app(scope, receive, send)
        request = _request(scope)
        if _middleware.check_preflight(request) is not None:
            headers = _cors_headers(request)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return None
        extra = _cors_headers(request)

        async def send_with_cors(message: dict) -> None:
            if message["type"] == "http.response.start" and extra:
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return await app(scope, receive, send_with_cors)

    return with_cors
