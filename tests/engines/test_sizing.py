"""Sizing: prompt tokens through a real (fake) llama-server, the heuristic, variant choice."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from functools import partial

import pytest

from apps.engines.client import close_engine_session
from apps.engines.manager import engine_manager
from apps.engines.registry import EngineRoute, ModelRoute, VariantRoute
from apps.engines.sizing import (
    ASSISTANT_PRIMING_TOKENS,
    TEMPLATE_TOKENS,
    ContextTooLarge,
    choose_variant,
    completion_budget,
    fitting_variants,
    heuristic_prompt_tokens,
    prompt_token_bound,
    prompt_tokens,
    split_prompts,
)
from apps.engines.stage import size_and_choose
from apps.engines.tokens import heuristic_message_tokens

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}]}
count_prompt = partial(prompt_tokens, model="m")


def route(url: str, flavor: str = "llamacpp", key: str = "") -> VariantRoute:
    """A variant on an external engine at `url` (sizing asks the engine of a variant)."""
    engine = EngineRoute(
        name="e", flavor=flavor, base_url=url, upstream_api_key=key, timeout_seconds=5
    )
    return VariantRoute(engine=engine, ctx_size=4096)


def variant(ctx: int | None, name: str = "e") -> VariantRoute:
    engine = EngineRoute(name, "llamacpp", "http://127.0.0.1:9", "", 5)
    return VariantRoute(engine=engine, ctx_size=ctx)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


@pytest.fixture(autouse=True)
async def _fresh_session() -> AsyncIterator[None]:
    """The shared aiohttp session belongs to one event loop; each test has its own."""
    yield
    await close_engine_session()


# --- prompt_tokens -----------------------------------------------------------------------


async def test_it_counts_a_chat_through_apply_template_and_tokenize_plus_bos(fake_engine):
    fake_engine.reset()
    tokens, method = await count_prompt(route(fake_engine.url), CHAT, "chat.completions")
    # Rendered "<|user|>\nHello there\n<|assistant|>\n": 4 words, one token each, + BOS.
    assert (tokens, method) == (5, "tokenize")
    calls = [(r["path"], r["body"]) for r in fake_engine.requests()]
    assert calls == [
        ("/apply-template", {"messages": CHAT["messages"]}),
        ("/tokenize", {"content": "<|user|>\nHello there\n<|assistant|>\n", "add_special": False}),
    ]


async def test_it_sends_tools_to_the_template_and_the_engine_key(fake_engine):
    fake_engine.reset()
    tools = [{"type": "function", "function": {"name": "f"}}]
    payload = {**CHAT, "tools": tools, "temperature": 0.2}
    await count_prompt(route(fake_engine.url, key="sekrit"), payload, "chat.completions")
    first = fake_engine.requests()[0]
    assert first["body"] == {"messages": CHAT["messages"], "tools": tools}
    assert first["headers"]["Authorization"] == "Bearer sekrit"


async def test_it_counts_a_completion_prompt_plus_bos(fake_engine):
    payload = {"model": "m", "prompt": "one two three"}
    assert await count_prompt(route(fake_engine.url), payload, "completions") == (4, "tokenize")


async def test_it_sizes_a_batch_by_its_largest_prompt(fake_engine):
    payload = {"model": "m", "prompt": ["a b", "c d e f", "g"]}
    assert await count_prompt(route(fake_engine.url), payload, "completions") == (5, "tokenize")


async def test_it_counts_token_ids_without_asking_and_without_bos(fake_engine):
    fake_engine.reset()
    payload = {"model": "m", "prompt": [[1, 2, 3], [4]]}
    assert await count_prompt(route(fake_engine.url), payload, "completions") == (3, "tokenize")
    assert fake_engine.requests() == []


async def test_it_falls_back_to_the_heuristic_when_the_engine_is_down():
    tokens, method = await count_prompt(route(closed_port_url()), CHAT, "chat.completions")
    assert method == "heuristic"
    assert tokens == heuristic_message_tokens(CHAT["messages"][0]) + ASSISTANT_PRIMING_TOKENS


@pytest.mark.django_db(transaction=True)
async def test_it_does_not_start_a_managed_engine_to_count():
    """A managed engine that runs no variant of the model is not started just to size a
    request: the heuristic counts."""
    engine = EngineRoute("m", "llamacpp", "", "", 5, id=1, managed=True)
    try:
        result = await count_prompt(
            VariantRoute(engine, 4096, id=1, model_variant_ids=(1, 2)), CHAT, "chat.completions"
        )
    finally:
        await engine_manager.shutdown()
    assert result[1] == "heuristic"
    assert engine_manager.launches == 0


async def test_it_counts_with_vllms_tokenize_naming_the_model(fake_engine):
    """vLLM renders the chat itself; its count already holds the template and BOS."""
    fake_engine.reset()
    vllm = route(fake_engine.url, "vllm")

    chat = await count_prompt(vllm, CHAT, "chat.completions")
    completion = await count_prompt(vllm, {"prompt": "a b c"}, "completions")

    # "<|user|> Hello there <|assistant|>": 4 words + BOS; "a b c" + BOS.
    assert (chat, completion) == ((5, "tokenize"), (4, "tokenize"))
    bodies = [r["body"] for r in fake_engine.requests() if r["path"] == "/tokenize"]
    assert bodies[0] == {**CHAT, "add_generation_prompt": True}
    assert bodies[1] == {"model": "m", "prompt": "a b c", "add_special_tokens": False}


async def test_it_uses_the_heuristic_for_other_flavors_and_for_embeddings(fake_engine):
    fake_engine.reset()
    _, method = await count_prompt(route(fake_engine.url, "openai"), CHAT, "chat.completions")
    assert method == "heuristic"
    payload = {"model": "m", "input": ["abcd", "abcdefgh"]}
    assert await count_prompt(route(fake_engine.url), payload, "embeddings") == (3, "heuristic")
    assert fake_engine.requests() == []


async def test_it_falls_back_when_the_engine_answers_with_an_error(fake_engine):
    # As an old llama-server without /apply-template would: 404.
    engine = route(fake_engine.url + "/old")
    tokens, method = await count_prompt(engine, CHAT, "chat.completions")
    assert (tokens, method) == (heuristic_prompt_tokens(CHAT, "chat.completions"), "heuristic")


def test_it_estimates_tools_into_a_chat_heuristic():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    plain = heuristic_prompt_tokens(CHAT, "chat.completions")
    assert heuristic_prompt_tokens({**CHAT, "tools": tools}, "chat.completions") > plain


def test_it_splits_prompts_like_llama_server():
    assert split_prompts("a") == [["a"]]
    assert split_prompts(["a", "b"]) == [["a"], ["b"]]
    assert split_prompts([1, 2, "x"]) == [[1, 2, "x"]]
    assert split_prompts([[1, 2], [3]]) == [[1, 2], [3]]
    assert split_prompts(None) == []


# --- choose_variant ----------------------------------------------------------------------


def test_it_chooses_the_smallest_context_that_fits():
    variants = [variant(8192), variant(2048), variant(4096)]
    assert choose_variant(variants, 3000).ctx_size == 4096
    assert choose_variant(variants, 4096).ctx_size == 4096  # an exact fit fits
    assert choose_variant(variants, 1).ctx_size == 2048


def test_it_prefers_a_sized_fit_over_an_unknown_size():
    variants = [variant(None), variant(4096)]
    assert choose_variant(variants, 1000).ctx_size == 4096
    assert fitting_variants(variants, 1000) == [variants[1], variants[0]]


def test_it_takes_an_unknown_size_when_no_sized_variant_fits():
    variants = [variant(2048), variant(None, "big")]
    chosen = choose_variant(variants, 100_000)
    assert chosen.ctx_size is None
    assert chosen.engine.name == "big"


def test_it_keeps_the_given_order_between_equal_sizes():
    first, second = variant(4096, "a"), variant(4096, "b")
    assert choose_variant([first, second], 10) is first


def test_it_refuses_a_request_larger_than_every_context():
    variants = [variant(2048), variant(8192), variant(4096), variant(4096)]
    with pytest.raises(ContextTooLarge) as caught:
        choose_variant(variants, 9000, prompt_tokens=8488, model="m")
    assert str(caught.value) == (
        "This request needs 9000 tokens (8488 prompt + 512 max_tokens) but the largest "
        "context of model `m` is 8192 tokens (variants: 2048, 4096, 8192)."
    )
    assert caught.value.code == "context_length_exceeded"
    assert (caught.value.needed, caught.value.sizes) == (9000, [2048, 4096, 8192])


def test_it_words_the_refusal_without_the_optional_details():
    with pytest.raises(ContextTooLarge, match=r"needs 10 tokens but the largest context is 8"):
        choose_variant([variant(8)], 10)


def test_it_rejects_a_model_without_variants():
    with pytest.raises(ValueError, match="without variants"):
        choose_variant([], 10)


def test_it_reads_the_completion_budget():
    assert completion_budget({"max_completion_tokens": 7, "max_tokens": 9}, 512) == 7
    assert completion_budget({"max_tokens": 9}, 512) == 9
    assert completion_budget({}, 512) == 512
    assert completion_budget({"max_tokens": True, "max_completion_tokens": None}, 512) == 512


# --- the upper bound that spares the engine the counting ---------------------------------


def test_it_bounds_a_prompt_by_its_bytes_and_the_templates_share() -> None:
    chat = {"messages": [{"role": "user", "content": "héllo"}]}  # 6 UTF-8 bytes
    assert prompt_token_bound(chat, "chat.completions") == TEMPLATE_TOKENS + 6 + 16
    batch = {"prompt": ["abc", [1, 2, "de"]], "input": ["abc", [1, 2, "de"]]}
    assert prompt_token_bound(batch, "completions") == 4 + 1  # the largest of the batch
    assert prompt_token_bound(batch, "embeddings") == (3 + 1) + (4 + 1)  # all of them
    image = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}}]
    assert (
        prompt_token_bound({"messages": [{"role": "user", "content": image}]}, "chat.completions")
        is None
    )
    tools = {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert prompt_token_bound(tools, "chat.completions") is None


def model_on(url: str, *ctx_sizes: int) -> ModelRoute:
    engine = EngineRoute("e", "llamacpp", url, "", 5)
    variants = tuple(VariantRoute(engine, ctx, id=i) for i, ctx in enumerate(ctx_sizes, 1))
    return ModelRoute(id=1, name="m", created=0, variants=variants)


async def test_it_picks_the_smallest_variant_without_counting_a_short_prompt(fake_engine):
    fake_engine.reset()
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}

    tokens, variant = await size_and_choose(
        payload, route=model_on(fake_engine.url, 1024, 4096), endpoint="chat.completions"
    )  # fmt: skip

    assert (tokens, variant.ctx_size) == (0, 1024)
    assert fake_engine.requests() == []


async def test_it_counts_a_prompt_whose_bound_does_not_fit_the_smallest(fake_engine):
    """600 bytes could be 600 tokens (too many for 512 - 16); the engine counts 100."""
    fake_engine.reset()
    payload = {"messages": [{"role": "user", "content": " ".join(["abcde"] * 100)}]}

    tokens, variant = await size_and_choose(
        {**payload, "max_tokens": 16}, route=model_on(fake_engine.url, 512, 4096),
        endpoint="chat.completions",
    )  # fmt: skip

    assert variant.ctx_size == 512
    assert tokens < 512
    assert "/tokenize" in [r["path"] for r in fake_engine.requests()]


@pytest.mark.parametrize("flavor", ["llamacpp", "vllm"])
async def test_it_counts_each_session_message_with_the_engines_tokenizer(fake_engine, flavor):
    from apps.engines.tokens import MESSAGE_OVERHEAD_TOKENS, count_message_tokens

    messages = [{"role": "user", "content": "one two three"}, {"role": "user", "content": "x"}]

    counted = await count_message_tokens(route(fake_engine.url, flavor), messages, model="m")

    assert counted.exact
    assert counted.counts == [3 + MESSAGE_OVERHEAD_TOKENS, 1 + MESSAGE_OVERHEAD_TOKENS]


# --- a session's stored history, kept out of the payload (ctx.history) -------------------

STORED = [
    {"role": "user", "content": 'earlier "question" é'},
    {"role": "assistant", "content": "an answer", "tool_calls": [{"id": "c", "type": "function",
     "function": {"name": "f", "arguments": "{}"}}]},
]  # fmt: skip


def stored_history(messages: list[dict], *, tokens: int = 0, media: bool = False):
    import json

    from apps.core.context import SessionHistory

    # As PostgreSQL writes jsonb out: ", " and ": " separators, non-ASCII as is.
    text = ",".join(json.dumps(m, ensure_ascii=False) for m in messages).encode()
    return SessionHistory(json=text, messages=len(messages), tokens=tokens, media=media)


def test_it_bounds_a_history_by_its_bytes_above_the_bound_of_its_messages() -> None:
    history = stored_history(STORED)
    spliced = {"messages": [*STORED, *CHAT["messages"]]}

    bound = prompt_token_bound(CHAT, "chat.completions", history)

    assert bound == prompt_token_bound(CHAT, "chat.completions") + len(history.json) + 2 * 16
    assert bound >= prompt_token_bound(spliced, "chat.completions")


def test_it_does_not_bound_a_history_with_images() -> None:
    history = stored_history(STORED, media=True)

    assert prompt_token_bound(CHAT, "chat.completions", history) is None


def test_it_estimates_a_history_by_its_stored_counts() -> None:
    history = stored_history(STORED, tokens=120)

    assert heuristic_prompt_tokens(CHAT, "chat.completions", history) == (
        heuristic_prompt_tokens(CHAT, "chat.completions") + 120
    )


async def test_it_counts_the_history_where_the_engine_gets_it(fake_engine):
    fake_engine.reset()
    system = {"role": "system", "content": "rules"}
    payload = {"model": "m", "messages": [system, *CHAT["messages"]]}

    await count_prompt(route(fake_engine.url), payload, "chat.completions",
                       history=stored_history(STORED))  # fmt: skip

    [template] = [r for r in fake_engine.requests() if r["path"] == "/apply-template"]
    assert template["body"]["messages"] == [system, *STORED, *CHAT["messages"]]
