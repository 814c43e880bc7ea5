"""What a .gguf file says about itself (read with the `gguf` package), and what follows
for memory: KV-cache bytes per token and the largest context that fits a budget.

The KV cache of one token holds, for each layer, a key and a value vector per KV head:
layers x kv_heads x (key_length + value_length) elements, 2 bytes each in f16 (llama.cpp's
default `--cache-type-k/v`), 34 bytes per 32 in q8_0 and 18 per 32 in q4_0. Models with
sliding-window layers (Gemma 3) need less in practice; the figure here counts every layer
as global, so it is an upper bound, and `scan_models --test-context` measures the truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf

# What the weights need besides themselves: llama.cpp's compute buffers and the runtime.
# Measured with Gemma 3 270M: ~150 MB at 4k context; kept generous for larger models.
OVERHEAD_BYTES = 256 * 1024 * 1024
CONTEXT_STEP = 256  # contexts are reported in whole multiples of this many tokens
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")


class GgufError(ValueError):
    """A file that is not a readable GGUF model (truncated, corrupt, missing metadata)."""


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    name: str
    parameters: int
    context_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int  # head size of keys
    value_length: int
    quantization: str
    size_bytes: int

    def kv_bytes_per_token(self, cache_type: str = "f16") -> int:
        elements = self.block_count * self.head_count_kv * (self.key_length + self.value_length)
        if cache_type == "f16":
            return elements * 2
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[cache_type.upper()]]
        return -(-elements * type_size // block)  # rounded up

    def max_context(self, *, memory_bytes: int, cache_type: str = "f16") -> int:
        """The largest context (a multiple of CONTEXT_STEP, at most the trained length)
        whose KV cache fits beside the weights in `memory_bytes`; 0 if none does."""
        room = memory_bytes - self.size_bytes - OVERHEAD_BYTES
        if room <= 0:
            return 0
        tokens = min(room // self.kv_bytes_per_token(cache_type), self.context_length)
        return tokens if tokens == self.context_length else tokens // CONTEXT_STEP * CONTEXT_STEP


def read_gguf(path: Path) -> GgufInfo:
    """The model's metadata, or GgufError naming what is wrong with the file."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails with IndexError/ValueError on bad bytes
        message = f"{path.name} is not a readable GGUF file (truncated or corrupt: {exc})"
        raise GgufError(message) from None
    fields = {key: field.contents() for key, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if not arch:
        raise GgufError(f"{path.name} has no general.architecture; is it a model?")

    def number(key: str, default: int | None = None) -> int:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise GgufError(f"{path.name} lacks {arch}.{key}")
        return int(value[0] if isinstance(value, list) else value)  # some store per layer

    heads = number("attention.head_count")
    head_size = number("attention.key_length", number("embedding_length") // heads)
    return GgufInfo(
        architecture=arch,
        name=str(fields.get("general.name") or path.stem),
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        context_length=number("context_length"),
        block_count=number("block_count"),
        head_count=heads,
        head_count_kv=number("attention.head_count_kv", heads),
        key_length=head_size,
        value_length=number("attention.value_length", head_size),
        quantization=_quantization(fields.get("general.file_type"), reader),
        size_bytes=path.stat().st_size,
    )


def _quantization(file_type: object, reader: gguf.GGUFReader) -> str:
    """llama.cpp's name for the file type (Q4_K_M), else the commonest weight type."""
    if file_type is not None:
        try:
            return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    kinds = [t.tensor_type.name for t in reader.tensors if len(t.shape) > 1]
    return max(set(kinds), key=kinds.count) if kinds else "unknown"
