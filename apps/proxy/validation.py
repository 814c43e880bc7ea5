"""Request-body checks for /v1 endpoints: clear 400s for what an engine would choke on.

Only the fields the gateway relies on are checked; every other field passes through.
"""

from __future__ import annotations

from typing import Any

import orjson

from apps.core.errors import invalid_request


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise invalid_request("The request body is empty; send a JSON object.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise invalid_request("The request body must be a JSON object.")
    return payload


def _require_model(payload: dict[str, Any]) -> None:
    model = payload.get("model")
    if model is None:
        raise invalid_request("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise invalid_request("`model` must be a non-empty string.", param="model")


def _check_optional(payload: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> None:
    value = payload.get(name)
    # bool is an int subclass; reject True/False where a number is expected.
    bad_bool = isinstance(value, bool) and bool not in kinds
    if value is not None and (bad_bool or not isinstance(value, kinds)):
        raise invalid_request(f"`{name}` must be {what}.", param=name)


def _check_sampling(payload: dict[str, Any]) -> None:
    _check_optional(payload, "stream", (bool,), "a boolean")
    _check_optional(payload, "stream_options", (dict,), "an object")
    _check_optional(payload, "temperature", (int, float), "a number")
    _check_optional(payload, "top_p", (int, float), "a number")
    _check_optional(payload, "n", (int,), "an integer")
    for name in ("max_tokens", "max_completion_tokens"):
        _check_optional(payload, name, (int,), "an integer")
        if isinstance(payload.get(name), int) and payload[name] < 1:
            raise invalid_request(f"`{name}` must be at least 1.", param=name)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise invalid_request("`messages` must be a non-empty array.", param="messages")
    for index, message in enumerate(messages):
        param = f"messages.[{index}]"
        if not isinstance(message, dict):
            raise invalid_request(f"`{param}` must be an object.", param=param)
        if not isinstance(message.get("role"), str):
            raise invalid_request(f"`{param}.role` must be a string.", param=f"{param}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(
                f"`{param}.content` must be a string or an array of content parts.",
                param=f"{param}.content",
            )


def _is_prompt(value: Any) -> bool:
    """A string, or an array of strings, or tokens (ints), or arrays of tokens."""
    if isinstance(value, str):
        return True
    if not isinstance(value, list) or not value:
        return False
    return all(
        (isinstance(item, str | int) and not isinstance(item, bool))
        or (isinstance(item, list) and all(isinstance(t, int) for t in item))
        for item in value
    )


def validate_chat(payload: dict[str, Any]) -> None:
    _require_model(payload)
    _check_messages(payload.get("messages"))
    _check_sampling(payload)


def validate_completion(payload: dict[str, Any]) -> None:
    _require_model(payload)
    if not _is_prompt(payload.get("prompt")):
        raise invalid_request(
            "`prompt` must be a string, an array of strings or an array of tokens.", param="prompt"
        )
    _check_sampling(payload)


def validate_embedding(payload: dict[str, Any]) -> None:
    _require_model(payload)
    if not _is_prompt(payload.get("input")):
        raise invalid_request(
            "`input` must be a string, an array of strings or an array of tokens.", param="input"
        )
    _check_optional(payload, "dimensions", (int,), "an integer")
