"""Small GGUF files written with the `gguf` package's own writer, for scanner tests."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    context_length: int = 4096,
    layers: int = 4,
    heads: int = 8,
    kv_heads: int = 2,
    embedding: int = 256,
    file_type: gguf.LlamaFileType = gguf.LlamaFileType.MOSTLY_Q8_0,
) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(path.stem)
    writer.add_context_length(context_length)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_embedding_length(embedding)
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((32, embedding), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(embedding, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncate(path: Path, *, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path
