"""Chunks of a document's text, by tokens with overlap, on semantic boundaries.

semantic-text-splitter cuts at the largest unit that fits (sections and paragraphs, then
sentences, then words; Markdown-aware for .md). It measures in characters here, with a
per-document characters-per-token ratio: counted once on a sample of the document by the
embedding engine's own tokenizer when it has `/tokenize` (llama.cpp, vLLM), else the
HEURISTIC_CHARS_PER_TOKEN rule of thumb (~4 for English). One tokenizer call per document,
instead of one per measurement the splitter makes (hundreds per chunk), keeps ingestion
fast; chunk token counts are that ratio's estimate.

PDF pages are chunked one by one, so every chunk has exactly one page number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semantic_text_splitter import MarkdownSplitter, TextSplitter

from apps.rag.extraction import MARKDOWN, Section

HEURISTIC_CHARS_PER_TOKEN = 4.0
SECTION_SEPARATOR = "\n\n"


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    char_start: int  # in the document's text: its sections joined by SECTION_SEPARATOR
    char_end: int
    page: int | None
    token_count: int


def chunk_sections(
    sections: list[Section],
    *,
    content_type: str,
    chunk_tokens: int,
    overlap_tokens: int,
    chars_per_token: float = HEURISTIC_CHARS_PER_TOKEN,
) -> list[Piece]:
    capacity = max(16, int(chunk_tokens * chars_per_token))
    overlap = min(int(overlap_tokens * chars_per_token), capacity // 2)
    kind = MarkdownSplitter if content_type == MARKDOWN else TextSplitter
    splitter = kind(capacity, overlap=overlap)
    pieces: list[Piece] = []
    offset = 0
    for section in sections:
        for start, text in splitter.chunk_indices(section.text):
            pieces.append(
                Piece(
                    text=text,
                    char_start=offset + start,
                    char_end=offset + start + len(text),
                    page=section.page,
                    token_count=max(1, math.ceil(len(text) / chars_per_token)),
                )
            )
        offset += len(section.text) + len(SECTION_SEPARATOR)
    return pieces
