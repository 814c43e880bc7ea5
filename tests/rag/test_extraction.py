from __future__ import annotations

import pytest

from apps.rag import extraction
from apps.rag.chunking import chunk_sections
from apps.rag.extraction import (
    DOCX,
    HTML,
    MARKDOWN,
    PDF,
    TEXT,
    ExtractionError,
    detect_type,
    extract,
)
from tests.rag.files import HTML_PAGE, PNG, docx_bytes, pdf_bytes, zip_bomb_docx


def test_it_tells_types_by_content_not_by_name():
    assert detect_type(pdf_bytes(["hello"]), "notes.txt") == PDF
    assert detect_type(docx_bytes(["hello"]), "x.bin") == DOCX
    assert detect_type(HTML_PAGE, "page.txt") == HTML
    assert detect_type(b"# Title\n\ntext", "readme.md") == MARKDOWN
    assert detect_type(b"plain words", "notes.txt") == TEXT


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"", "empty.txt", "The file is empty."),
        (PNG, "image.pdf", "Unsupported file type (image/png)"),
        (b"\x00\x01\x02binary\x00", "data.txt", "Unsupported file type (binary data)"),
    ],
)
def test_it_refuses_empty_and_unsupported_files(data, name, message):
    with pytest.raises(ExtractionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        detect_type(data, name)


def test_it_keeps_pdf_page_numbers():
    sections = extract(
        pdf_bytes(["The first page talks about otters.", "The second page is about beavers."]), PDF
    )
    assert [s.page for s in sections] == [1, 2]
    assert "otters" in sections[0].text
    assert "beavers" in sections[1].text


def test_it_fails_a_corrupt_pdf_with_the_parsers_message():
    corrupt = pdf_bytes(["hello"])[:200] + b"garbage" * 20
    with pytest.raises(
        ExtractionError, match=r"The PDF could not be read|No text could be extracted"
    ):
        extract(corrupt, PDF)


def test_it_reads_docx_paragraphs():
    (section,) = extract(docx_bytes(["Alpha paragraph.", "Beta paragraph."]), DOCX)
    assert section.text == "Alpha paragraph.\n\nBeta paragraph."


def test_it_refuses_a_docx_zip_bomb_without_inflating_it():
    with pytest.raises(ExtractionError, match="zip bomb"):
        extract(zip_bomb_docx(), DOCX)


def test_it_keeps_the_main_content_of_html_not_navigation():
    (section,) = extract(HTML_PAGE, HTML)
    assert "hold hands while they sleep" in section.text
    assert "navigation menu" not in section.text
    assert "Copyright footer" not in section.text


def test_it_reads_latin1_text():
    (section,) = extract("café crème".encode("latin-1"), TEXT)
    assert section.text == "café crème"


def test_it_chunks_with_overlap_and_offsets():
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    sections = [extraction.Section(text)]
    pieces = chunk_sections(sections, content_type=TEXT, chunk_tokens=50, overlap_tokens=10)
    assert len(pieces) > 10
    assert all(len(p.text) <= 200 for p in pieces)
    assert all(text[p.char_start : p.char_end] == p.text for p in pieces)
    assert pieces[1].char_start < pieces[0].char_end  # overlap
    assert all(p.text.endswith(".") for p in pieces[:-1])  # cut at sentence boundaries


def test_it_chunks_pdf_pages_separately():
    sections = [
        extraction.Section("page one " * 10, page=1),
        extraction.Section("page two " * 10, page=2),
    ]
    pieces = chunk_sections(sections, content_type=PDF, chunk_tokens=400, overlap_tokens=0)
    assert [(p.page, p.text.split()[1]) for p in pieces] == [(1, "one"), (2, "two")]
