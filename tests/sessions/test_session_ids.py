"""Which session a request names: header first, then metadata.session_id."""

from __future__ import annotations

import pytest

from apps.sessions.services import SESSION_ID_RE, InvalidSessionId, session_id_from_request


def test_it_reads_the_header():
    assert session_id_from_request(header="chat-1", payload={}) == "chat-1"


def test_it_reads_metadata_session_id():
    payload = {"metadata": {"session_id": "user@example.com:42"}}
    assert session_id_from_request(header=None, payload=payload) == "user@example.com:42"


def test_it_prefers_the_header_over_the_body():
    payload = {"metadata": {"session_id": "from-body"}}
    assert session_id_from_request(header="from-header", payload=payload) == "from-header"


@pytest.mark.parametrize(
    "payload",
    [{}, {"metadata": None}, {"metadata": "text"}, {"metadata": []}, {"metadata": {}},
     {"metadata": {"session_id": None}}, {"metadata": {"other": "x"}}],
)  # fmt: skip
def test_it_returns_none_when_no_session_is_named(payload):
    assert session_id_from_request(header=None, payload=payload) is None


def test_it_accepts_every_allowed_character_up_to_128():
    value = "AZaz09._:@-" + "x" * 117
    assert len(value) == 128
    assert session_id_from_request(header=value, payload={}) == value


@pytest.mark.parametrize(
    "value", ["", "   ", "x" * 129, "has space", "slash/y", "new\nline", "trailing\n", "é", "a;b"]
)
def test_it_rejects_a_malformed_header(value):
    with pytest.raises(InvalidSessionId) as caught:
        session_id_from_request(header=value, payload={"metadata": {"session_id": "ok"}})
    assert caught.value.param == "X-Session-Id"
    assert "1-128 characters" in str(caught.value)


@pytest.mark.parametrize("value", [42, 1.5, True, ["a"], {"a": 1}, "", "bad id", "ok\n"])
def test_it_rejects_a_malformed_metadata_session_id(value):
    with pytest.raises(InvalidSessionId) as caught:
        session_id_from_request(header=None, payload={"metadata": {"session_id": value}})
    assert caught.value.param == "metadata.session_id"


def test_it_is_a_value_error_and_keeps_long_values_out_of_the_message():
    with pytest.raises(ValueError, match="use 1-128 characters") as caught:
        session_id_from_request(header="y" * 5000, payload={})
    assert len(str(caught.value)) < 200


def test_it_exports_the_documented_pattern():
    assert SESSION_ID_RE.pattern == r"^[A-Za-z0-9._:@-]{1,128}$"
