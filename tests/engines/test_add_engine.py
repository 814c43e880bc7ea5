from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.engines.discovery import BATCHING_SERVER_SLOTS
from apps.engines.models import Engine, EngineVariant, ServedModel
from tests.conftest import free_port
from tests.fake_engine import FakeEngineProcess

pytestmark = pytest.mark.django_db

# Nothing listens there: asking a llama.cpp engine's /props is refused at once.
URL = f"http://127.0.0.1:{free_port()}"
OTHER_URL = f"http://127.0.0.1:{free_port()}"


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
    run("two", "--base-url", OTHER_URL, "--model", "a")

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


# --- managed engines (--command) -----------------------------------------------------

TEMPLATE = "{llama_server} -m {model_path} --port {port} -c {ctx_size} -np {slots} {extra_args}"


@pytest.fixture
def models_dir(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    (settings.MODELS_DIR / "gemma").mkdir(parents=True)
    for name in ("gemma/small.gguf", "gemma/large.gguf"):
        (settings.MODELS_DIR / name).write_bytes(b"GGUF")
    return settings.MODELS_DIR


def managed_variants(engine_name: str) -> set[tuple[str, int | None, str, str]]:
    variants = EngineVariant.objects.filter(engine__name=engine_name)
    return set(variants.values_list("model__name", "ctx_size", "model_path", "extra_args"))


def test_it_registers_a_managed_engine(models_dir) -> None:
    out = run(
        "gemma", "--command", TEMPLATE, "--model", "gemma-3", "--ctx-size", "4096",
        "--model-path", "gemma/small.gguf", "--extra-args", "--temp 0", "--idle-ttl", "300",
        "--slots", "2", "--replicas", "2",
    )  # fmt: skip

    engine = Engine.objects.get()
    assert (engine.kind, engine.command_template, engine.base_url) == ("managed", TEMPLATE, "")
    assert (engine.slots, engine.replicas, engine.idle_ttl_seconds) == (2, 2, 300)
    assert managed_variants("gemma") == {("gemma-3", 4096, "gemma/small.gguf", "--temp 0")}
    assert "managed" in out
    assert TEMPLATE in out
    assert "gemma-3 (ctx_size=4096, model_path=gemma/small.gguf, extra_args=--temp 0)" in out


def test_it_adds_a_variant_per_run(models_dir) -> None:
    base = ["gemma", "--command", TEMPLATE, "--model", "gemma-3"]
    run(*base, "--ctx-size", "4096", "--model-path", "gemma/small.gguf", "--idle-ttl", "60")
    run(*base, "--ctx-size", "8192", "--model-path", "gemma/small.gguf")
    run(*base, "--ctx-size", "8192", "--model-path", "gemma/large.gguf")
    run(*base, "--ctx-size", "8192", "--model-path", "gemma/large.gguf", "--extra-args=-fa")

    assert managed_variants("gemma") == {
        ("gemma-3", 4096, "gemma/small.gguf", ""),
        ("gemma-3", 8192, "gemma/small.gguf", ""),
        ("gemma-3", 8192, "gemma/large.gguf", "-fa"),
    }
    assert Engine.objects.get().idle_ttl_seconds == 60  # kept when not given again


def test_it_needs_exactly_one_of_base_url_and_command() -> None:
    with pytest.raises(CommandError, match="not allowed with argument"):
        run("x", "--base-url", URL, "--command", "srv --port {port}", "--model", "a")
    with pytest.raises(CommandError, match="one of the arguments --base-url --command"):
        run("x", "--model", "a")
    assert not Engine.objects.exists()


def test_it_refuses_managed_options_for_an_external_engine() -> None:
    with pytest.raises(CommandError, match="--model-path, --idle-ttl only apply to managed"):
        run("x", "--base-url", URL, "--model", "a", "--model-path", "a.gguf", "--idle-ttl", "5")
    assert not Engine.objects.exists()


def test_it_registers_external_replicas_and_slots() -> None:
    run("vl", "--base-url", URL, "--base-url", "http://10.0.0.2:8000/", "--model", "a",
        "--slots", "8")  # fmt: skip

    engine = Engine.objects.get()
    assert engine.base_urls == [URL, "http://10.0.0.2:8000"]
    assert (engine.replica_count, engine.slots) == (2, 8)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("srv --port {port} --model {model}", r"Unknown placeholder \{model\}"),
        ("srv -m {model_path}", r"must pass the port with \{port\}"),
        ("srv --port {port} 'unbalanced", "cannot be parsed"),
        ("srv --port {port} {0}", r"Unknown placeholder \{0\}"),
    ],
)
def test_it_refuses_a_bad_command_template(template: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("x", "--command", template, "--model", "a")
    assert not Engine.objects.exists()


@pytest.mark.parametrize(
    "model_path", ["../x.gguf", "/etc/passwd", "gemma/../../x.gguf", "gemma/small.bin"]
)
def test_it_refuses_a_model_path_outside_the_models_dir(models_dir, model_path: str) -> None:
    with pytest.raises(CommandError, match="model_path: Model path"):
        run("x", "--command", TEMPLATE, "--model", "a", "--ctx-size", "8",
            "--model-path", model_path)  # fmt: skip
    assert not Engine.objects.exists()
    assert not ServedModel.objects.exists()


def test_it_requires_what_the_command_uses(models_dir) -> None:
    with pytest.raises(CommandError, match=r"model_path: The engine's command uses \{model_path\}"):
        run("x", "--command", TEMPLATE, "--model", "a", "--ctx-size", "8")
    with pytest.raises(CommandError, match=r"ctx_size: The engine's command uses \{ctx_size\}"):
        run("x", "--command", TEMPLATE, "--model", "a", "--model-path", "gemma/small.gguf")
    assert not Engine.objects.exists()


def test_it_switches_an_engine_between_external_and_managed(models_dir) -> None:
    run("e", "--base-url", URL, "--model", "a")
    run("e", "--command", "srv --port {port}", "--model", "a")
    engine = Engine.objects.get()
    assert (engine.kind, engine.base_url) == ("managed", "")

    run("e", "--base-url", URL, "--model", "a")
    engine.refresh_from_db()
    assert (engine.kind, engine.base_url, engine.command_template) == ("external", URL, "")


# --- --system-prompt -----------------------------------------------------------------


def system_prompts(engine_name: str) -> dict[tuple[str, int | None], str]:
    variants = EngineVariant.objects.filter(engine__name=engine_name)
    return {
        (m, c): p for m, c, p in variants.values_list("model__name", "ctx_size", "system_prompt")
    }


def test_it_sets_the_system_prompt_of_the_variants_it_registers() -> None:
    out = run("local", "--base-url", URL, "--model", "a", "--model", "b",
              "--system-prompt", "Be terse.")  # fmt: skip
    run("local", "--base-url", URL, "--model", "c")

    assert system_prompts("local") == {("a", None): "Be terse.", ("b", None): "Be terse.",
                                       ("c", None): ""}  # fmt: skip
    assert "a (ctx_size unknown, system_prompt='Be terse.')" in out


def test_it_keeps_a_system_prompt_unless_given_and_clears_it_with_empty_text() -> None:
    run("local", "--base-url", URL, "--model", "a", "--system-prompt", "Be terse.")
    run("local", "--base-url", URL, "--model", "a")
    assert system_prompts("local") == {("a", None): "Be terse."}

    run("local", "--base-url", URL, "--model", "a", "--system-prompt", "")

    assert system_prompts("local") == {("a", None): ""}


def test_it_sets_the_system_prompt_of_the_managed_variant_it_updates(models_dir) -> None:
    base = [
        "gemma",
        "--command",
        TEMPLATE,
        "--model",
        "gemma-3",
        "--model-path",
        "gemma/small.gguf",
    ]
    run(*base, "--ctx-size", "4096", "--system-prompt", "Small context: be brief.")
    run(*base, "--ctx-size", "8192")
    run(*base, "--ctx-size", "8192", "--system-prompt", "You may elaborate.")

    assert system_prompts("gemma") == {
        ("gemma-3", 4096): "Small context: be brief.",
        ("gemma-3", 8192): "You may elaborate.",
    }


# --- slots of an external engine -------------------------------------------------------


def test_it_reads_a_llamacpp_engines_slots_from_its_props(fake_engine) -> None:
    out = run("local", "--base-url", fake_engine.url, "--model", "a")

    assert Engine.objects.get().slots == 4  # the fake engine's total_slots
    assert "--slots 4: total_slots from the engine's /props" in out
    assert "slots=4" in out


def test_it_takes_the_fewest_slots_of_the_replicas(fake_engine) -> None:
    with FakeEngineProcess().start("--slots", "2") as smaller:
        out = run("local", "--base-url", fake_engine.url, "--base-url", smaller.url, "--model", "a")

    assert Engine.objects.get().slots == 2
    assert "--slots 2: total_slots from the engine's /props" in out


def test_it_says_when_a_llamacpp_engine_cannot_be_asked() -> None:
    out = run("local", "--base-url", URL, "--model", "a")

    assert Engine.objects.get().slots == 1
    assert f"--slots 1: could not read total_slots from {URL}/props" in out
    assert out.splitlines()[0].endswith("; pass --slots N")


@pytest.mark.parametrize("flavor", ["vllm", "openai"])
def test_it_lets_batching_servers_take_many_requests(flavor: str) -> None:
    out = run("vl", "--base-url", URL, "--flavor", flavor, "--model", "a")

    assert Engine.objects.get().slots == BATCHING_SERVER_SLOTS
    assert f"--slots {BATCHING_SERVER_SLOTS}: default for {flavor}, which batches" in out


def test_it_keeps_an_existing_engines_slots(fake_engine) -> None:
    run("local", "--base-url", fake_engine.url, "--model", "a", "--slots", "3")
    out = run("local", "--base-url", fake_engine.url, "--model", "b")

    assert Engine.objects.get().slots == 3
    assert "--slots" not in out
