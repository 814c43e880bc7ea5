"""langchain-openai's ChatOpenAI and OpenAIEmbeddings, unchanged, against a real gateway
process in front of the fake engine: invoke, stream, tools, structured output, embeddings.

The fake engine answers what a model would write (its `reply` knob, sent as an extra body
field the gateway passes through): a `<tool_call>` tag, or JSON for a schema.
"""

from __future__ import annotations

import json
import operator
from functools import reduce

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

from tests.conftest import FAKE_MODEL, request_logs, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny in {city}"


class Weather(BaseModel):
    """A weather report."""

    city: str = Field(description="The city")
    celsius: int


def chat(gateway, alice, *, reply: str | None = None, **options) -> ChatOpenAI:
    extra = {"extra_body": {"fake": {"reply": reply, "chunks": 3}}} if reply else {}
    return ChatOpenAI(
        model=FAKE_MODEL,
        base_url=gateway.base_url,
        api_key=alice.raw_key,
        max_retries=0,
        **extra,
        **options,
    )


def tool_call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_it_invokes(engine, gateway, alice):
    answer = chat(gateway, alice).invoke([SystemMessage("Be brief."), HumanMessage("Hi there")])

    assert isinstance(answer, AIMessage)
    assert answer.content == "w0 w1 w2 w3 w4 "
    assert answer.usage_metadata["output_tokens"] == 5
    assert answer.response_metadata["model_name"] == FAKE_MODEL
    log = wait_until(lambda: request_logs(tenant=alice.tenant))[0]
    assert (log.model, log.status_code) == (FAKE_MODEL, 200)


def test_it_streams(engine, gateway, alice):
    chunks = list(chat(gateway, alice, stream_usage=True).stream("Hi there"))

    text = "".join(c.content for c in chunks)
    assert text == "w0 w1 w2 w3 w4 "
    assert len([c for c in chunks if c.content]) == 5
    usage = reduce(operator.add, chunks).usage_metadata
    assert usage["output_tokens"] == 5
    assert usage["input_tokens"] > 0


async def test_it_streams_asynchronously(engine, gateway, alice):
    text = "".join([c.content async for c in chat(gateway, alice).astream("Hi")])

    assert text == "w0 w1 w2 w3 w4 "


def test_it_binds_tools_and_gets_tool_calls(engine, gateway, alice, fake_engine):
    reply = tool_call_text("get_weather", {"city": "Paris"})
    model = chat(gateway, alice, reply=reply).bind_tools([get_weather])

    answer = model.invoke("Weather in Paris?")
    streamed = reduce(operator.add, model.stream("Weather in Paris?"))

    for message in (answer, streamed):
        assert [(c["name"], c["args"]) for c in message.tool_calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        assert message.content in ("", None) or "<tool_call>" not in message.content
    bodies = [r["body"] for r in fake_engine.requests() if r["path"] == "/v1/chat/completions"]
    assert [t["function"]["name"] for t in bodies[-1]["tools"]] == ["get_weather"]


def test_it_sends_tool_results_back(engine, gateway, alice):
    model = chat(gateway, alice).bind_tools([get_weather])
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage(get_weather.invoke(call["args"]), tool_call_id="call_1"),
    ]

    assert model.invoke(history).content == "w0 w1 w2 w3 w4 "


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_it_returns_structured_output(engine, gateway, alice, fake_engine, method):
    report = {"city": "Paris", "celsius": 21}
    reply = (
        tool_call_text("Weather", report) if method == "function_calling" else json.dumps(report)
    )
    model = chat(gateway, alice, reply=reply).with_structured_output(Weather, method=method)

    assert model.invoke("Weather in Paris as JSON?") == Weather(city="Paris", celsius=21)
    sent = fake_engine.requests()[-1]["body"]
    if method == "json_schema":  # reaches llama.cpp as its grammar-constrained json_schema
        assert sent["json_schema"]["properties"].keys() == {"city", "celsius"}
    if method == "function_calling":
        assert sent["tool_choice"]["function"]["name"] == "Weather"


def test_it_embeds_documents_and_queries(engine, gateway, alice):
    embeddings = OpenAIEmbeddings(
        model=FAKE_MODEL,
        base_url=gateway.base_url,
        api_key=alice.raw_key,
        max_retries=0,
        # Not an OpenAI model: send text, not tiktoken ids (langchain's own advice for
        # OpenAI-compatible servers; tiktoken would also download its tables).
        check_embedding_ctx_length=False,
    )

    documents = embeddings.embed_documents(["first document", "second one", "first document"])
    query = embeddings.embed_query("first document")

    assert len(documents) == 3
    assert len(documents[0]) > 1
    assert documents[0] == documents[2] == query
    assert documents[1] != documents[0]


def test_it_refuses_a_bad_key_as_langchain_expects(engine, gateway, alice):
    import openai

    model = ChatOpenAI(model=FAKE_MODEL, base_url=gateway.base_url, api_key="sk-bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        model.invoke("Hi")
