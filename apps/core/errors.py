"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """An error the client sees as an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def invalid_request(message: str, *, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def engine_unreachable(engine: str, detail: str) -> ApiError:
    return ApiError(
        502,
        f"Engine `{engine}` is unreachable: {detail}",
        type="api_error",
        code="engine_unreachable",
    )


def engine_timeout(engine: str, seconds: float) -> ApiError:
    return ApiError(
        504,
        f"Engine `{engine}` did not answer within {seconds:g} s.",
        type="api_error",
        code="engine_timeout",
    )


def upstream_error_body(status: int, raw: bytes) -> bytes:
    """Keep an engine's OpenAI-shaped error body; wrap anything else in that shape."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    error_type = "api_error" if status >= 500 else "invalid_request_error"
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        if {"message", "type", "param", "code"} <= error.keys():
            return raw  # already OpenAI-shaped: byte for byte as the engine sent it
        # llama.cpp omits `param`; keep everything it sent and add what OpenAI clients expect.
        error.setdefault("message", f"Engine returned HTTP {status}")
        error.setdefault("type", error_type)
        error.setdefault("param", None)
        error.setdefault("code", None)
        return orjson.dumps(parsed)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"]  # vLLM/FastAPI style {"error": "..."} or {"detail": ...}
    elif isinstance(parsed, dict) and "detail" in parsed:
        message = str(parsed["detail"])
    else:
        message = raw.decode("utf-8", "replace").strip() or f"Engine returned HTTP {status}"
    return ApiError(status, message, type=error_type, code=str(status)).body()
