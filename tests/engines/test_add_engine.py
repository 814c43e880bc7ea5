from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.engines.models import Engine, EngineVariant, ServedModel

pytestmark = pytest.mark.django_db

URL = "http://127.0.0.1:8080"


def run(*args: str) -> str:
    out = StringIO()
    call_command("add_engine", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def served(engine_name: str) -> set[tuple[str, int | None]]:
    variants = EngineVariant.objects.filter(engine__name=engine_name)
    return set(variants.values_list("model__name", "ctx_size"))


def test_it_registers_an_external_engine() -> None:
    out = run("local", "--base-url", URL, "--model", "qwen3-8b", "--ctx-size", "8192")

    engine = Engine.objects.get()
    assert (engine.name, engine.kind, engine.flavor) == ("local", "external", "llamacpp")
    assert engine.base_url == URL
    assert served("local") == {("qwen3-8b", 8192)}
    assert "local" in out
    assert URL in out
    assert "qwen3-8b (ctx_size=8192)" in out


def test_it_registers_several_models_at_once() -> None:
    run("vl", "--base-url", "https://gpu.example.com/", "--flavor", "vllm", "--model", "a")
    run("vl", "--base-url", "https://gpu.example.com/", "--model", "b", "--model", "c")

    engine = Engine.objects.get()
    assert engine.base_url == "https://gpu.example.com"
    assert served("vl") == {("a", None), ("b", None), ("c", None)}


def test_it_adds_models_to_an_existing_engine() -> None:
    run("local", "--base-url", URL, "--model", "a")
    out = run("local", "--base-url", URL, "--model", "b")

    assert served("local") == {("a", None), ("b", None)}
    assert "a (ctx_size unknown)" in out
    assert "b (ctx_size unknown)" in out


def test_it_is_idempotent_for_an_existing_model() -> None:
    run("local", "--base-url", URL, "--model", "a", "--model", "a")
    run("local", "--base-url", URL, "--model", "a")

    assert EngineVariant.objects.count() == 1
    assert ServedModel.objects.count() == 1


def test_it_shares_a_model_between_engines() -> None:
    run("one", "--base-url", URL, "--model", "a")
    run("two", "--base-url", "http://10.0.0.2:8000", "--model", "a")

    assert ServedModel.objects.get().variants.count() == 2


def test_it_keeps_the_flavor_when_adding_models() -> None:
    run("vl", "--base-url", URL, "--flavor", "vllm", "--model", "a")
    run("vl", "--base-url", URL, "--model", "b")

    assert Engine.objects.get().flavor == "vllm"


def test_it_changes_the_flavor_when_asked() -> None:
    run("vl", "--base-url", URL, "--flavor", "vllm", "--model", "a")
    run("vl", "--base-url", URL, "--flavor", "openai", "--model", "a")

    assert Engine.objects.get().flavor == "openai"


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com", "127.0.0.1:8080", "http://", "example.com", "http://host:8080/v1"],
)
def test_it_refuses_a_bad_base_url(url: str) -> None:
    with pytest.raises(CommandError, match="--base-url"):
        run("local", "--base-url", url, "--model", "a")

    assert not Engine.objects.exists()
    assert not ServedModel.objects.exists()


@pytest.mark.parametrize("ctx_size", ["0", "-1"])
def test_it_refuses_a_non_positive_ctx_size(ctx_size: str) -> None:
    with pytest.raises(CommandError, match="--ctx-size must be a positive"):
        run("local", "--base-url", URL, "--model", "a", "--ctx-size", ctx_size)

    assert not Engine.objects.exists()


def test_it_requires_a_model() -> None:
    with pytest.raises(CommandError, match="at least one --model"):
        run("local", "--base-url", URL)

    assert not Engine.objects.exists()


def test_it_requires_a_base_url() -> None:
    with pytest.raises(CommandError, match="--base-url"):
        run("local", "--model", "a")

    assert not Engine.objects.exists()


def test_it_refuses_an_invalid_engine_name() -> None:
    with pytest.raises(CommandError, match="Cannot register engine 'not a slug'"):
        run("not a slug", "--base-url", URL, "--model", "a")

    assert not Engine.objects.exists()
    assert not ServedModel.objects.exists()


def test_it_refuses_an_unknown_flavor() -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        run("local", "--base-url", URL, "--model", "a", "--flavor", "tgi")

    assert not Engine.objects.exists()
