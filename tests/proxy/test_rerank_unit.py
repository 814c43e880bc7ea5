"""/v1/rerank without the gateway: validation, the engine payload, response normalisation."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from apps.core.context import RequestContext
from apps.core.errors import ApiError
from apps.proxy.rerank import (
    RERANK,
    UPSTREAM_PATH,
    MalformedRerankResponse,
    engine_payload,
    normalize_rerank_response,
    rerank_prepare,
    rerank_prompt_estimate,
    validate_rerank,
)

DOCS = ["a panda is a bear", "hi", "the panda eats bamboo"]
VALID = {"model": "rr", "query": "panda bear", "documents": DOCS}


def jina(*scores: float, **extra: Any) -> dict[str, Any]:
    results = [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]
    return {"model": "engine-name", "object": "list", "results": results, **extra}


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"top_n": 1, "return_documents": True},
        {"documents": [{"text": "x"}, "y"]},
        {"documents": [""]},
        {"top_n": None, "return_documents": None},
    ],
)
def test_it_accepts_valid_requests(extra):
    payload = {**VALID, **extra}
    sent = copy.deepcopy(payload)

    assert validate_rerank(payload) is None  # no ApiError
    assert payload == sent  # and the request reaches the engine as sent


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"model": None}, "model"),
        ({"model": " "}, "model"),
        ({"model": 3}, "model"),
        ({"query": ""}, "query"),
        ({"query": None}, "query"),
        ({"query": ["q"]}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": "doc"}, "documents"),
        ({"documents": None}, "documents"),
        ({"documents": ["ok", 5]}, "documents.[1]"),
        ({"documents": [{"title": "no text"}]}, "documents.[0]"),
        ({"top_n": 0}, "top_n"),
        ({"top_n": -1}, "top_n"),
        ({"top_n": 1.5}, "top_n"),
        ({"top_n": True}, "top_n"),
        ({"return_documents": "yes"}, "return_documents"),
    ],
)
def test_it_rejects_bad_fields_with_their_param(extra, param):
    with pytest.raises(ApiError) as caught:
        validate_rerank({**VALID, **extra})
    assert (caught.value.status, caught.value.param) == (400, param)


def test_it_sends_documents_to_the_engine_as_strings():
    payload = {**VALID, "documents": [{"text": "x", "id": 7}, "y"]}
    assert engine_payload(payload) is True
    assert payload["documents"] == ["x", "y"]
    assert engine_payload(payload) is False


# --- normalisation -----------------------------------------------------------------------


def test_it_sorts_best_first_and_keeps_usage():
    usage = {"prompt_tokens": 12, "total_tokens": 12}
    out = normalize_rerank_response(jina(0.1, 0.9, 0.5, usage=usage), None, DOCS, False)
    assert out == {
        "object": "list",
        "model": "engine-name",
        "results": [
            {"index": 1, "relevance_score": 0.9},
            {"index": 2, "relevance_score": 0.5},
            {"index": 0, "relevance_score": 0.1},
        ],
        "usage": usage,
    }


def test_it_cuts_to_top_n_and_attaches_the_clients_documents():
    documents = [{"text": "a panda is a bear", "id": 1}, "hi", "the panda eats bamboo"]
    out = normalize_rerank_response(jina(0.1, 0.9, 0.5), 2, documents, True, model="rr")
    assert out["model"] == "rr"
    assert out["results"] == [
        {"index": 1, "relevance_score": 0.9, "document": {"text": "hi"}},
        {"index": 2, "relevance_score": 0.5, "document": {"text": "the panda eats bamboo"}},
    ]


def test_it_breaks_ties_by_document_order():
    out = normalize_rerank_response(jina(0.5, 0.7, 0.5), None, DOCS, False)
    assert [r["index"] for r in out["results"]] == [1, 0, 2]


def test_it_reads_the_tei_list_shape():
    raw = [{"index": 2, "score": 3}, {"index": 0, "score": 1.5}]
    out = normalize_rerank_response(raw, None, DOCS, False, model="rr", query="panda bear")
    assert out["results"] == [
        {"index": 2, "relevance_score": 3.0},
        {"index": 0, "relevance_score": 1.5},
    ]
    # No usage from the engine: query + document per pair, 4 characters a token.
    assert out["usage"] == {"prompt_tokens": 3 * 3 + 5 + 1 + 6, "total_tokens": 21}
    assert rerank_prompt_estimate("panda bear", DOCS) == 21


def test_it_completes_a_partial_usage():
    out = normalize_rerank_response(jina(0.1, usage={"total_tokens": 9}), None, DOCS, False)
    assert out["usage"] == {"prompt_tokens": 9, "total_tokens": 9}


@pytest.mark.parametrize(
    "raw",
    [
        {"error": "boom"},
        "text",
        None,
        {"results": [7]},
        {"results": [{"index": 3, "relevance_score": 0.1}]},
        {"results": [{"index": -1, "relevance_score": 0.1}]},
        {"results": [{"index": "0", "relevance_score": 0.1}]},
        {"results": [{"index": 0}]},
        {"results": [{"index": 0, "relevance_score": "high"}]},
    ],
)
def test_it_refuses_answers_that_are_not_rerank_results(raw):
    with pytest.raises(MalformedRerankResponse):
        normalize_rerank_response(raw, None, DOCS, False)


def test_it_normalises_what_a_llama_server_answers(fake_engine):
    body = {**VALID, "documents": list(DOCS)}
    response = httpx.post(fake_engine.url + UPSTREAM_PATH, json=body, timeout=10)
    out = normalize_rerank_response(response.json(), 2, DOCS, True)
    assert [r["index"] for r in out["results"]] == [0, 2]
    assert out["results"][0] == {"index": 0, "relevance_score": 1.0, "document": {"text": DOCS[0]}}
    assert out["usage"]["prompt_tokens"] > 0


# --- pipeline stage ----------------------------------------------------------------------


async def test_it_prepares_the_engine_request_and_rewrites_the_answer():
    payload = {**VALID, "documents": [{"text": "x"}, "y"], "top_n": 1, "return_documents": True}
    original = copy.deepcopy(payload["documents"])
    ctx = RequestContext(endpoint=RERANK.endpoint, payload=payload, model="rr")
    await rerank_prepare(ctx)
    assert payload["documents"] == ["x", "y"]
    assert ctx.payload_changed
    assert ctx.prompt_estimate == rerank_prompt_estimate(VALID["query"], ["x", "y"])
    (normalizer,) = ctx.response_filters
    out = normalizer.whole(ctx, jina(0.2, 0.8))
    assert out["results"] == [{"index": 1, "relevance_score": 0.8, "document": {"text": "y"}}]
    assert out["model"] == "rr"
    assert normalizer.client_documents == original
    assert normalizer.stream(ctx) is None
    assert RERANK.upstream_path == "/v1/rerank"
