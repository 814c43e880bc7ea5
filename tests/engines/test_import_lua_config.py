"""import_lua_config: an LLM-GW *.cfg.lua run in a sandboxed Lua, mapped onto engines."""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.core.management import CommandError, call_command

from apps.engines.models import Engine, EngineVariant, ServedModel
from tests.engines.test_real_llama import INSTALLED_MODELS_DIR, chat, real_llama  # noqa: F401

pytestmark = pytest.mark.django_db

CONFIG = Path(__file__).parent / "lua" / "gateway.cfg.lua"
TEMPLATE = (
    "{llama_server} -m {model_path} --host {host} --port {port} -c {ctx_total} -np {slots} "
    "{extra_args}"
)


def run(path: Path, *args: str) -> list[str]:
    out = StringIO()
    call_command("import_lua_config", str(path), *args, stdout=out)
    return out.getvalue().splitlines()


def snapshot() -> tuple:
    return (
        sorted(Engine.objects.values_list("name", "slots", "idle_ttl_seconds")),
        sorted(ServedModel.objects.values_list("name", flat=True)),
        sorted(
            EngineVariant.objects.values_list(
                "engine__name", "model__name", "ctx_size", "model_path", "extra_args"
            )
        ),
    )


def lua_file(tmp_path: Path, source: str, name: str = "bad.cfg.lua") -> Path:
    path = tmp_path / name
    path.write_text(source)
    return path


# --- the mapping -----------------------------------------------------------------------


def test_it_imports_models_and_context_variants():
    lines = run(CONFIG)

    main, aux = Engine.objects.order_by("name")
    assert (main.name, aux.name) == ("lua-127-0-0-1-7778", "lua-127-0-0-1-7779")
    assert main.kind == "managed"
    assert main.command_template == TEMPLATE
    assert (main.slots, main.idle_ttl_seconds, main.startup_timeout_seconds) == (1, 120, 90.0)
    assert aux.idle_ttl_seconds == 10  # the model's own engine_idle_timeout
    variants = {
        (v.model.name, v.ctx_size): v for v in EngineVariant.objects.select_related("model")
    }
    assert sorted(variants) == [
        ("arctic-embed", 8192),
        ("gemma-3-270m", 4096),
        ("gemma-3-270m", 8192),
        ("gemma-3-270m", 32768),
        ("qwen3-30b-instruct", 20480),
        ("qwen3-30b-instruct", 40960),
        ("qwen3-30b-instruct-precise", 20480),
        ("qwen3-30b-instruct-precise", 40960),
    ]
    big = variants[("gemma-3-270m", 32768)]
    assert big.model_path == "gemma-3-270m-q4_k_m.gguf"
    assert big.extra_args == "--no-webui --no-warmup --jinja -ctk q8_0 -ctv q8_0"  # no -c/--port/-m
    windows = variants[("qwen3-30b-instruct-precise", 40960)]  # C:\Qwen\... → its file name
    assert windows.model_path == "Qwen3-30B-A3B-Instruct-Q3_K_XL.gguf"
    assert windows.extra_args.endswith("--temp 0.2")
    assert windows.engine == main
    assert variants[("arctic-embed", 8192)].engine == aux
    assert variants[("arctic-embed", 8192)].extra_args == "--embedding -ub 4096"
    assert "add variant gemma-3-270m ctx=32768 (gemma-3-270m-q4_k_m.gguf)" in "\n".join(lines)
    assert any(
        line.startswith("note: binary /opt/llama/bin/llama-server not used") for line in lines
    )


def test_it_prints_a_dry_run_and_writes_nothing():
    lines = run(CONFIG, "--dry-run")

    assert lines[0].startswith("would create engine lua-127-0-0-1-7778 (managed, slots=1")
    assert sum(line.startswith("would add variant") for line in lines) == 8
    assert lines[-1] == "Dry run: nothing was written."
    assert snapshot() == ([], [], [])


def test_it_updates_rather_than_duplicates_on_a_reimport(tmp_path: Path):
    run(CONFIG)
    before = snapshot()

    assert run(CONFIG)[0] == "No changes."
    assert snapshot() == before
    changed = CONFIG.read_text().replace("{ 4096, 8192 }", "{ 4096, 16384 }")
    changed = changed.replace('"-ub", "4096"', '"-ub", "2048"')
    lines = run(lua_file(tmp_path, changed, "gateway.cfg.lua"), "--dry-run")
    assert (
        "would remove variant gemma-3-270m ctx=8192 (gemma-3-270m-q4_k_m.gguf) from "
        "lua-127-0-0-1-7778" in lines
    )
    assert any(line.startswith("would add variant gemma-3-270m ctx=16384") for line in lines)
    assert (
        "would update variant arctic-embed ctx=8192 (snowflake-arctic-embed-l-v2.0-f16.gguf)"
        ": extra_args → '--embedding -ub 2048'" in lines
    )
    assert snapshot() == before  # still a dry run

    run(lua_file(tmp_path, changed, "gateway.cfg.lua"))
    assert EngineVariant.objects.count() == 8
    assert set(
        EngineVariant.objects.filter(model__name="gemma-3-270m").values_list("ctx_size", flat=True)
    ) == {4096, 16384, 32768}


def test_it_builds_a_launch_command_llama_server_accepts(settings, tmp_path: Path):
    from apps.engines.launch import LaunchSpec, render_command

    settings.MODELS_DIR = tmp_path
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF")
    run(CONFIG)
    variant = EngineVariant.objects.get(model__name="gemma-3-270m", ctx_size=32768)

    argv = render_command(LaunchSpec(
        command_template=variant.engine.command_template, port=9999, slots=1,
        ctx_size=variant.ctx_size, model_path=variant.model_path, extra_args=variant.extra_args,
    ))  # fmt: skip
    assert argv[1:] == [
        "-m", str(tmp_path / "gemma-3-270m-q4_k_m.gguf"), "--host", "127.0.0.1",
        "--port", "9999", "-c", "32768", "-np", "1",
        "--no-webui", "--no-warmup", "--jinja", "-ctk", "q8_0", "-ctv", "q8_0",
    ]  # fmt: skip


@pytest.mark.django_db(transaction=True)
async def test_it_runs_an_imported_variant_on_the_real_llama_server(real_llama, manager, tmp_path):  # noqa: F811
    config = lua_file(tmp_path, CONFIG.read_text().replace("{ 4096, 8192 }", "{ 1024 }"))
    await sync_to_async(run)(config)
    variant = await EngineVariant.objects.select_related("engine").aget(
        model__name="gemma-3-270m", ctx_size=1024
    )

    async with manager.acquire(engine_id=variant.engine_id, variant_id=variant.pk) as lease:
        answer = await chat(lease.base_url)
    assert answer["choices"][0]["message"]["content"]


# --- bad files: clear errors, nothing written --------------------------------------------

MINIMAL = """
server = { listen_v4 = "127.0.0.1:7777" }
models = { { engine = presets.engines.llamacpp, name = "m", connect = "http://127.0.0.1:8080",
             variants = { { binary = "llama-server", context = 4096, args = ARGS } } } }
"""


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "server = {\n  listen_v4 = \n}\n",
            "Syntax error: bad.cfg.lua:3: unexpected symbol near '}'",
        ),
        ("server = {}\nmodels = {}\nerror('no models yet')", "bad.cfg.lua:3: no models yet"),
        (
            "x = 1\nwhile true do end",
            "bad.cfg.lua:2: the configuration ran more than 50000000 instructions",
        ),
        (
            "while true do pcall(function() while true do end end) end",
            "instructions (an endless loop?)",
        ),
        (
            "while true do xpcall(function() while true do end end, function() while true do end end) end",
            "instructions (an endless loop?)",
        ),
        (
            "setmetatable({}, {__gc = function() while true do end end})",
            "__gc metamethods are not allowed",
        ),
        ("local s = 'x'\nwhile true do s = s .. s end", "used more than 64 MiB of memory"),
        (
            "os.execute('touch /tmp/lua-escape')",
            "bad.cfg.lua:1: 'os' is not available in a sandboxed",
        ),
        ("io.open('/tmp/lua-escape', 'w')", "bad.cfg.lua:1: 'io' is not available"),
        ("require('os')", "bad.cfg.lua:1: 'require' is not available"),
        ("load(string.dump(function() end))", "bad.cfg.lua:1: 'load' is not available"),
        ("local f = string.dump(print)", "attempt to call a nil value (field 'dump')"),
        ("x = python.eval('1')", "'python' is not available"),
        (
            MINIMAL.replace("ARGS", '{"-m", "m.gguf"}').replace("context = 4096", "context = -1"),
            "models[1] (m).variants[1].context: must be a positive whole number of tokens",
        ),
        (
            MINIMAL.replace("ARGS", '{"-c", "4096"}'),
            "m variant 1: args must name the model file with -m",
        ),
        (MINIMAL.replace("ARGS", '{"-m", "../../etc/passwd.gguf"}'), "must not contain '..'"),
        (MINIMAL.replace("ARGS", '{"-m", "m.bin"}'), "must name a .gguf file"),
        (
            MINIMAL.replace("llamacpp,", "vllm,").replace("ARGS", "{}"),
            "models[1] (m).engine: must be a non-empty string",
        ),
        (
            MINIMAL.replace("ARGS", '{"-m", "m.gguf"}').replace("http://127", "ftp://127"),
            "connect must be an http(s) URL",
        ),
        ("server = {}", "The file must define `models`"),
    ],
)
def test_it_refuses_a_bad_file_and_writes_nothing(tmp_path: Path, source: str, message: str):
    with pytest.raises(CommandError, match=re.escape(message)):
        run(lua_file(tmp_path, source))
    assert snapshot() == ([], [], [])
    assert not Path("/tmp/lua-escape").exists()


def test_it_refuses_a_missing_file(tmp_path: Path):
    with pytest.raises(CommandError, match="Cannot read"):
        run(tmp_path / "missing.cfg.lua")


def test_it_refuses_variants_of_one_port_with_different_slot_counts(tmp_path: Path):
    two = MINIMAL.replace(
        'variants = { { binary = "llama-server", context = 4096, args = ARGS } }',
        'variants = { { binary = "b", context = 1024, args = {"-np", "1", "-m", "m.gguf"} },'
        ' { binary = "b", context = 2048, args = {"-np", "2", "-m", "m.gguf"} } }',
    )
    with pytest.raises(CommandError, match=re.escape("ask for different -np ([1, 2])")):
        run(lua_file(tmp_path, two))
    assert snapshot() == ([], [], [])
