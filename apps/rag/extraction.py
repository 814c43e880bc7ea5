"""Text out of an uploaded file: the type is told by the content (magic bytes), not by the
name alone, and only the types below are accepted.

    PDF   pypdf, one section per page (page numbers kept)
    DOCX  python-docx, after checking the zip's declared sizes (zip bombs)
    HTML  trafilatura: the main content, not navigation, headers or footers
    text  .txt / .md: UTF-8 (or Latin-1 if not UTF-8), no NUL bytes
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import filetype

PDF, DOCX, HTML, MARKDOWN, TEXT = (
    "application/pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "text/html",
    "text/markdown",
    "text/plain",
)
SUPPORTED = "PDF, DOCX, HTML, Markdown or plain text"
# A .docx whose parts inflate beyond this (or 200x their packed size) is refused unread.
DOCX_MAX_UNPACKED_BYTES = 200 * 1024 * 1024
DOCX_MAX_RATIO = 200


class ExtractionError(Exception):
    """The file cannot be read: its message is shown to the user as is."""


@dataclass(frozen=True, slots=True)
class Section:
    text: str
    page: int | None = None  # 1-based, PDFs only


def detect_type(data: bytes, filename: str) -> str:
    """The content type by content; the extension only tells Markdown from plain text and
    HTML from text. Anything else raises ExtractionError."""
    if not data:
        raise ExtractionError("The file is empty.")
    kind = filetype.guess(data)
    if kind is not None:
        if kind.mime == "application/pdf":
            return PDF
        if kind.mime == DOCX or (kind.mime == "application/zip" and _is_docx(data)):
            return DOCX
        raise ExtractionError(f"Unsupported file type ({kind.mime}); upload {SUPPORTED}.")
    if b"\x00" in data[:8192]:
        raise ExtractionError(f"Unsupported file type (binary data); upload {SUPPORTED}.")
    head = data[:2048].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or filename.lower().endswith(
        (".html", ".htm")
    ):
        return HTML
    if filename.lower().endswith((".md", ".markdown")):
        return MARKDOWN
    return TEXT


def _is_docx(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return "word/document.xml" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def extract(data: bytes, content_type: str) -> list[Section]:
    """The file's text as sections (pages of a PDF, else one); ExtractionError if none."""
    extractor = {PDF: _pdf, DOCX: _docx, HTML: _html}.get(content_type, _text)
    sections = [s for s in extractor(data) if s.text.strip()]
    if not sections:
        raise ExtractionError("No text could be extracted from this file.")
    return sections


def _pdf(data: bytes) -> list[Section]:
    import pypdf
    from pypdf.errors import PyPdfError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise ExtractionError("The PDF is encrypted.")
        return [
            Section(page.extract_text() or "", page=n) for n, page in enumerate(reader.pages, 1)
        ]
    except ExtractionError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ExtractionError(f"The PDF could not be read: {exc}") from None


def _docx(data: bytes) -> list[Section]:
    import docx

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
        if unpacked > DOCX_MAX_UNPACKED_BYTES or unpacked > DOCX_MAX_RATIO * max(1, len(data)):
            raise ExtractionError("The DOCX file inflates too much when unpacked (a zip bomb?).")
        document = docx.Document(io.BytesIO(data))
    except ExtractionError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ExtractionError(f"The DOCX file could not be read: {exc}") from None
    paragraphs = [p.text for p in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            paragraphs.append(" | ".join(cell.text for cell in row.cells))
    return [Section("\n\n".join(paragraphs))]


def _html(data: bytes) -> list[Section]:
    import trafilatura

    text = trafilatura.extract(
        _decode(data), include_comments=False, include_tables=True, favor_recall=True
    )
    return [Section(text or "")]


def _text(data: bytes) -> list[Section]:
    return [Section(_decode(data))]


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")
