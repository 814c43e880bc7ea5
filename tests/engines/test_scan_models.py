"""scan_models: GGUF metadata, KV-cache sizing, context tests with the real llama-server."""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from apps.engines.gguf_info import OVERHEAD_BYTES, GgufError, read_gguf
from apps.engines.models import EngineVariant, ModelFile
from tests.engines.gguf_files import truncate, write_gguf
from tests.engines.test_real_llama import INSTALLED_MODELS_DIR, MODEL_FILE, require_real_llama

pytestmark = pytest.mark.django_db

GIB = 1024**3


def scan(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("scan_models", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture
def models_dir(settings, tmp_path: Path) -> Path:
    settings.MODELS_DIR = tmp_path / "models"
    settings.MODELS_DIR.mkdir()
    return settings.MODELS_DIR


@pytest.fixture
def real_models_dir(settings) -> Path:
    require_real_llama()
    settings.MODELS_DIR = INSTALLED_MODELS_DIR
    return INSTALLED_MODELS_DIR


# --- reading files -------------------------------------------------------------------


def test_it_reads_the_real_gemma_3_270m_metadata():
    require_real_llama()
    info = read_gguf(INSTALLED_MODELS_DIR / MODEL_FILE)

    assert (info.architecture, info.name, info.quantization) == ("gemma3", "Gemma 3 270m", "Q4_K_M")
    assert (info.parameters, info.context_length, info.block_count) == (268_098_176, 32768, 18)
    assert (info.head_count, info.head_count_kv, info.key_length) == (4, 1, 256)
    # 18 layers x 1 KV head x (256 key + 256 value) elements, 2 bytes each in f16
    assert info.kv_bytes_per_token("f16") == 18 * 1 * 512 * 2
    assert info.kv_bytes_per_token("q8_0") == 18 * 512 * 34 // 32


def test_it_reads_a_written_file_and_sizes_its_context(tmp_path: Path):
    info = read_gguf(write_gguf(tmp_path / "m.gguf", layers=4, heads=8, kv_heads=2, embedding=256))

    assert (info.architecture, info.block_count, info.head_count_kv) == ("llama", 4, 2)
    assert info.key_length == 256 // 8  # no key_length key: embedding / heads
    assert info.parameters == 32 * 256 + 256
    assert info.quantization == "Q8_0"
    per_token = 4 * 2 * (32 + 32) * 2
    assert info.kv_bytes_per_token() == per_token
    budget = info.size_bytes + OVERHEAD_BYTES + 1000 * per_token
    assert info.max_context(memory_bytes=budget) == 768  # 1000 tokens, in steps of 256
    assert info.max_context(memory_bytes=budget * 100) == 4096  # capped at the trained length
    assert info.max_context(memory_bytes=OVERHEAD_BYTES) == 0
    assert info.max_context(memory_bytes=budget, cache_type="q8_0") > 768


@pytest.mark.parametrize("keep", [10, 400, 2000, -100])
def test_it_names_a_truncated_file(tmp_path: Path, keep: int):
    path = write_gguf(tmp_path / "cut.gguf")
    truncate(path, keep=keep if keep > 0 else path.stat().st_size + keep)

    with pytest.raises(GgufError, match=r"cut.gguf is not a readable GGUF file \(truncated"):
        read_gguf(path)


# --- the command -----------------------------------------------------------------------


def test_it_scans_a_directory_and_stores_each_file(models_dir: Path):
    write_gguf(models_dir / "small.gguf", context_length=2048)
    (models_dir / "sub").mkdir()
    write_gguf(
        models_dir / "sub" / "big.gguf",
        layers=32,
        heads=32,
        kv_heads=8,
        embedding=4096,
        context_length=32768,
    )
    truncate(write_gguf(models_dir / "broken.gguf"), keep=500)

    out, err = scan("--memory-gb", "1")

    assert "Memory budget: 1.00 GiB" in out
    assert "small.gguf: llama" in out
    assert "sub/big.gguf: llama" in out
    assert "broken.gguf: broken.gguf is not a readable GGUF file (truncated" in err
    small = ModelFile.objects.get(path="small.gguf")
    assert (small.context_length, small.block_count, small.quantization) == (2048, 4, "Q8_0")
    assert small.memory_budget_bytes == GIB
    assert small.max_context_f16 == 2048
    big = ModelFile.objects.get(path="sub/big.gguf")
    assert big.kv_bytes_per_token == 32 * 8 * (128 + 128) * 2  # 131072 bytes a token
    assert big.max_context_f16 == (GIB - big.size_bytes - OVERHEAD_BYTES) // 131072 // 256 * 256
    assert big.max_context_q8_0 > big.max_context_f16
    broken = ModelFile.objects.get(path="broken.gguf")
    assert "truncated" in broken.error
    assert broken.context_length is None


def test_it_updates_rather_than_duplicates_on_a_rescan(models_dir: Path):
    write_gguf(models_dir / "m.gguf", context_length=2048)
    scan("--memory-gb", "1")
    write_gguf(models_dir / "m.gguf", context_length=8192)
    scan("--memory-gb", "2")

    record = ModelFile.objects.get()
    assert (record.context_length, record.memory_budget_bytes) == (8192, 2 * GIB)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory-gb", "0"], "--memory-gb must be a positive number"),
        (["--memory-gb=-2"], "--memory-gb must be a positive number"),
        (["/nonexistent/models"], "/nonexistent/models is not a directory"),
    ],
)
def test_it_refuses_bad_input_and_stores_nothing(models_dir: Path, args, message):
    write_gguf(models_dir / "m.gguf")

    with pytest.raises(CommandError, match=re.escape(message)):
        scan(*args)
    assert not ModelFile.objects.exists()


def test_it_defaults_the_budget_to_the_available_ram(models_dir: Path):
    import psutil

    write_gguf(models_dir / "m.gguf")
    scan()

    budget = ModelFile.objects.get().memory_budget_bytes
    assert abs(budget - psutil.virtual_memory().available) < 0.1 * psutil.virtual_memory().total


# --- context tests with the real llama-server ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_resumes_a_context_test_with_the_real_llama_server(real_models_dir: Path):
    scan("--memory-gb", "4")
    ModelFile.objects.update(tested_context=8192, context_tests=[{"ctx": 8192, "ok": True}])

    out, _ = scan("--memory-gb", "4", "--test-context")

    assert "-c 512" not in out
    assert "-c 8192" not in out
    assert "-c 16384: ok" in out
    assert "-c 32768: ok" in out
    record = ModelFile.objects.get(path=MODEL_FILE)
    assert (record.tested_context, record.failed_context) == (32768, None)
    assert [t["ctx"] for t in record.context_tests] == [8192, 16384, 32768]
    again, _ = scan("--memory-gb", "4", "--test-context")
    assert "tested before: largest context that started: 32768" in again
    assert "-c " not in again


@pytest.mark.django_db(transaction=True)
def test_it_records_where_the_real_llama_server_fails(models_dir: Path):
    require_real_llama()
    write_gguf(models_dir / "empty.gguf")  # valid metadata, but no weights llama.cpp can use

    out, _ = scan("--memory-gb", "1", "--test-context", "--timeout", "60")

    assert "-c 512: failed: llama-server exited with code" in out
    record = ModelFile.objects.get()
    assert (record.tested_context, record.failed_context) == (None, 512)
    assert "log:" in record.context_tests[0]["detail"]


# --- add_engine takes the context from a scan ------------------------------------------

TEMPLATE = "{llama_server} -m {model_path} --port {port} -c {ctx_total}"


def add_engine(*args: str) -> str:
    out = StringIO()
    call_command("add_engine", "local", "--command", TEMPLATE, *args, stdout=out)
    return out.getvalue()


def test_it_gives_add_engine_the_scanned_context(models_dir: Path):
    write_gguf(models_dir / "m.gguf", context_length=2048)
    scan("--memory-gb", "1")

    add_engine("--model", "m", "--model-path", "m.gguf", "--ctx-size", "scan")
    assert EngineVariant.objects.get().ctx_size == 2048

    ModelFile.objects.update(tested_context=1024, failed_context=2048)
    add_engine("--model", "m2", "--model-path", "m.gguf", "--ctx-size", "scan")
    assert EngineVariant.objects.get(model__name="m2").ctx_size == 1024  # what really started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-path", "new.gguf"], "new.gguf has not been scanned; run manage.py scan_models"),
        (["--model-path", "cut.gguf"], "cut.gguf has not been scanned"),
        ([], "--ctx-size scan needs --model-path"),
    ],
)
def test_it_refuses_a_scan_context_it_does_not_have(models_dir: Path, args, message):
    truncate(write_gguf(models_dir / "cut.gguf"), keep=100)
    write_gguf(models_dir / "new.gguf")
    scan("--memory-gb", "1")
    ModelFile.objects.filter(path="new.gguf").delete()

    with pytest.raises(CommandError, match=re.escape(message)):
        add_engine("--model", "m", "--ctx-size", "scan", *args)
    assert not EngineVariant.objects.exists()


def test_it_refuses_a_bad_ctx_size_word(models_dir: Path):
    with pytest.raises(CommandError, match='must be a number of tokens or "scan"'):
        add_engine("--model", "m", "--model-path", "m.gguf", "--ctx-size", "auto")


# --- the admin -------------------------------------------------------------------------------


def test_it_shows_scanned_files_in_the_admin(admin_client: Client, models_dir: Path):
    write_gguf(models_dir / "m.gguf")
    truncate(write_gguf(models_dir / "cut.gguf"), keep=100)
    scan("--memory-gb", "1")
    ModelFile.objects.filter(path="m.gguf").update(
        tested_context=2048, failed_context=4096, context_tests=[{"ctx": 2048, "ok": True}]
    )

    listing = admin_client.get(reverse("admin:engines_modelfile_changelist")).content.decode()
    assert "m.gguf" in listing
    assert "started at 2048, failed at 4096" in listing
    assert "unreadable: cut.gguf is not a readable GGUF file" in listing
    record = ModelFile.objects.get(path="m.gguf")
    page = admin_client.get(reverse("admin:engines_modelfile_change", args=[record.pk]))
    assert page.status_code == 200
    assert "1024" in page.content.decode()
