"""Which session a /v1 request belongs to: `X-Session-Id`, else `metadata.session_id`."""

from __future__ import annotations

import re
from typing import Any

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
SESSION_ID_RULE = "1-128 characters from A-Z, a-z, 0-9 and . _ : @ -"
HEADER_PARAM = "X-Session-Id"
METADATA_PARAM = "metadata.session_id"


class InvalidSessionId(ValueError):
    """A session id that is present but malformed; `param` names where it came from."""

    def __init__(self, value: object, *, param: str) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        super().__init__(f"Invalid session id {shown} in {param}: use {SESSION_ID_RULE}.")
        self.param = param


def session_id_validate(value: object, *, param: str) -> str:
    # fullmatch, not match: `$` alone would accept a trailing newline.
    if not isinstance(value, str) or not SESSION_ID_RE.fullmatch(value):
        raise InvalidSessionId(value, param=param)
    return value


def session_id_from_request(*, header: str | None, payload: dict[str, Any]) -> str | None:
    """The request's session id; the header wins over the body. None when neither is given.

    A `null` metadata.session_id counts as not given (SDKs send unset optionals as null);
    a metadata that is not an object is not ours to judge, so it is ignored.
    """
    if header is not None:
        return session_id_validate(header, param=HEADER_PARAM)
    metadata = payload.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("session_id") is None:
        return None
    return session_id_validate(metadata["session_id"], param=METADATA_PARAM)
