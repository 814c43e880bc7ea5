from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import psutil
from django.core.management.base import BaseCommand, CommandError

from apps.engines.context_probe import context_ladder, probe_context
from apps.engines.gguf_info import GgufInfo
from apps.engines.launch import models_dir
from apps.engines.model_files import model_file_record_probe, model_file_scan
from apps.engines.models import ModelFile

GIB = 1024**3


def memory_budget(memory_gb: float | None) -> int:
    if memory_gb is None:
        return psutil.virtual_memory().available  # RAM: what this host can give right now
    if memory_gb <= 0:
        raise CommandError(f"--memory-gb must be a positive number, got {memory_gb:g}.")
    return int(memory_gb * GIB)


def gguf_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CommandError(f"{directory} is not a directory.")
    return sorted(p for p in directory.rglob("*.gguf") if p.is_file())


class Command(BaseCommand):
    help = (
        "Read every .gguf in the models directory: architecture, parameters, trained context, "
        "layers, KV heads, head size, quantization, KV-cache bytes per token and the largest "
        "context that fits a memory budget; store the results per file (admin: Model files)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("directory", nargs="?", help="Default: MODELS_DIR.")
        parser.add_argument(
            "--memory-gb",
            type=float,
            help="Memory budget (e.g. a GPU's VRAM) in GiB; default: this host's available RAM.",
        )
        parser.add_argument(
            "--test-context",
            action="store_true",
            help="Confirm by starting the real llama-server at -c 512, 1024, ... until it fails "
            "or reaches the trained length; resumes after the last size already confirmed.",
        )
        parser.add_argument(
            "--timeout", type=float, default=120.0, help="Seconds each llama-server start may take."
        )

    def handle(self, *args: Any, directory: str | None, **options: Any) -> None:
        budget = memory_budget(options["memory_gb"])
        files = gguf_files(Path(directory) if directory else models_dir())
        if not files:
            self.stdout.write("No .gguf files found.")
            return
        self.stdout.write(f"Memory budget: {budget / GIB:.2f} GiB")
        for path in files:
            record, info = model_file_scan(path=path, memory_bytes=budget)
            if info is None:
                self.stderr.write(f"{record.path}: {record.error}")
                continue
            self.describe(record, info)
            if options["test_context"]:
                self.test_context(record, path, options["timeout"])

    def describe(self, record: ModelFile, info: GgufInfo) -> None:
        self.stdout.write(
            f"{record.path}: {info.architecture} {info.name!r}, "
            f"{info.parameters / 1e6:.0f}M parameters, {info.quantization}, "
            f"trained context {info.context_length}, {info.block_count} layers, "
            f"{info.head_count_kv} KV heads of size {info.key_length}\n"
            f"  KV cache: {record.kv_bytes_per_token} bytes/token (f16), "
            f"{record.kv_bytes_per_token_q8_0} (q8_0); largest context in budget: "
            f"{record.max_context_f16} (f16), {record.max_context_q8_0} (q8_0)"
        )

    def test_context(self, record: ModelFile, path: Path, timeout: float) -> None:
        if record.context_test_done:
            self.stdout.write(f"  tested before: {self.tested(record)}")
            return
        for ctx in context_ladder(trained=record.context_length, after=record.tested_context):
            result = probe_context(model_file=path, ctx=ctx, timeout=timeout)
            model_file_record_probe(record=record, result=result)
            verdict = "ok" if result.ok else f"failed: {result.detail}"
            self.stdout.write(f"  -c {ctx}: {verdict} ({result.seconds:.1f} s)")
            if not result.ok:
                break
        self.stdout.write(f"  tested: {self.tested(record)}")

    @staticmethod
    def tested(record: ModelFile) -> str:
        largest = f"largest context that started: {record.tested_context or 'none'}"
        if record.failed_context:
            return f"{largest}; failed at {record.failed_context}"
        return f"{largest} (the trained length)"
