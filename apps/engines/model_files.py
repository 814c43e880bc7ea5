"""Writes for ModelFile: scan a .gguf into it, record context tests (scan_models)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from django.utils import timezone

from apps.engines.context_probe import ProbeResult
from apps.engines.gguf_info import GgufError, GgufInfo, read_gguf
from apps.engines.launch import models_dir
from apps.engines.models import ModelFile


def stored_path(path: Path) -> str:
    """Relative to MODELS_DIR (what a variant's model_path names), else absolute."""
    resolved = path.resolve()
    root = models_dir()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(resolved)


def model_file_scan(*, path: Path, memory_bytes: int) -> tuple[ModelFile, GgufInfo | None]:
    """Read the file and store what it says (or why it cannot be read). Context tests of
    an unchanged file are kept; a changed file (size or mtime) starts them over."""
    stat = path.stat()
    modified = dt.datetime.fromtimestamp(stat.st_mtime, tz=dt.UTC)
    record = ModelFile.objects.filter(path=stored_path(path)).first() or ModelFile(
        path=stored_path(path)
    )
    if record.pk and (record.size_bytes, record.modified_at) != (stat.st_size, modified):
        record.tested_context = record.failed_context = None
        record.context_tests = []
    record.size_bytes, record.modified_at, record.scanned_at = (
        stat.st_size,
        modified,
        timezone.now(),
    )
    try:
        info = read_gguf(path)
    except GgufError as exc:
        record.error = str(exc)
        record.save()
        return record, None
    _fill(record, info, memory_bytes)
    record.save()
    return record, info


def _fill(record: ModelFile, info: GgufInfo, memory_bytes: int) -> None:
    record.error = ""
    record.architecture, record.name = info.architecture, info.name
    record.parameters, record.context_length = info.parameters, info.context_length
    record.block_count, record.head_count = info.block_count, info.head_count
    record.head_count_kv, record.head_size = info.head_count_kv, info.key_length
    record.value_length, record.quantization = info.value_length, info.quantization
    record.kv_bytes_per_token = info.kv_bytes_per_token("f16")
    record.kv_bytes_per_token_q8_0 = info.kv_bytes_per_token("q8_0")
    record.memory_budget_bytes = memory_bytes
    record.max_context_f16 = info.max_context(memory_bytes=memory_bytes, cache_type="f16")
    record.max_context_q8_0 = info.max_context(memory_bytes=memory_bytes, cache_type="q8_0")


def model_file_record_probe(*, record: ModelFile, result: ProbeResult) -> None:
    """Saved after every launch, so an interrupted test resumes after the last one."""
    record.context_tests = [*record.context_tests, result.__dict__]
    if result.ok:
        record.tested_context = max(result.ctx, record.tested_context or 0)
    else:
        record.failed_context = result.ctx
    record.save(update_fields=["context_tests", "tested_context", "failed_context"])


def context_for_variant(*, model_path: str) -> int:
    """The context size scan_models found for a model file: the largest a real
    llama-server started with if tested, else the largest fitting the scan's budget."""
    record = ModelFile.objects.filter(path=model_path, error="").first()
    if record is None:
        raise GgufError(f"{model_path} has not been scanned; run manage.py scan_models first.")
    if record.context_test_done and not record.tested_context:
        raise GgufError(f"llama-server did not start {model_path} even at {record.failed_context}.")
    ctx = record.tested_context if record.context_test_done else record.max_context_f16
    if not ctx:
        raise GgufError(f"{model_path} fits no context in the scanned memory budget.")
    return ctx
