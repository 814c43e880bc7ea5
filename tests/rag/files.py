"""Real files of every supported type, made by the tests."""

from __future__ import annotations

import io
import zipfile


def pdf_bytes(pages: list[str]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def docx_bytes(paragraphs: list[str]) -> bytes:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bomb_docx() -> bytes:
    """A .docx-shaped zip whose document part inflates to 300 MB of zeros."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as part:
            block = b"\0" * (1024 * 1024)
            for _ in range(300):
                part.write(block)
    return out.getvalue()


HTML_PAGE = b"""<!DOCTYPE html><html><head><title>Otters</title></head><body>
<nav><a href="/">Home</a> <a href="/shop">Shop navigation menu</a></nav>
<article><h1>Sea otters</h1>
<p>Sea otters hold hands while they sleep so that they do not drift apart. They live in the
northern Pacific Ocean and eat sea urchins, crabs and clams, using stones as tools.</p>
<p>An adult sea otter eats about a quarter of its body weight every day to stay warm in
cold water, because it has no blubber, only the densest fur of any animal.</p>
</article><footer>Copyright footer text</footer></body></html>"""

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
