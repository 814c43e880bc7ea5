"""The document pages in a real headless Chromium (Playwright) against a real serve with
its ingestion worker: log in, drop a .md and a .pdf, watch them reach `ready`, search,
delete; another tenant's user sees none of it."""

from __future__ import annotations

import base64

import pytest

from apps.rag.models import Chunk, Document
from tests.rag.conftest import corpus_for
from tests.rag.files import pdf_bytes

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "a-long-test-password"
MARKDOWN = "# Otters\n\nSea otters hold hands while they sleep so they do not drift apart.\n"

DROP = """([files]) => {
  const transfer = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], f.name, { type: f.type }));
  }
  const zone = document.getElementById("dropzone");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
}"""


def member(tenant, username: str, role: str):
    from django.contrib.auth.models import User

    from apps.tenants.models import TenantMembership

    user = User.objects.create_user(username=username, password=PASSWORD)
    TenantMembership.objects.create(user=user, tenant=tenant, role=role)
    return user


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls
    # are still plain synchronous ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def wait_ready(row, name: str) -> None:
    """Wait for the page to show the document `ready`; if it never does, say what the
    database and the job queue hold (a page that stopped polling, or a worker that did
    not run the job)."""
    from django.db import connection
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        row.locator("td.status", has_text="ready").wait_for(timeout=90_000)
    except PlaywrightTimeout:
        documents = list(Document.objects.values_list("name", "status", "error"))
        with connection.cursor() as cursor:
            cursor.execute("SELECT task_name, status, count(*) FROM procrastinate_jobs "
                           "GROUP BY 1, 2 ORDER BY 1, 2")  # fmt: skip
            jobs = cursor.fetchall()
        raise AssertionError(f"{name} not shown ready; documents {documents}; jobs {jobs}"
                             ) from None  # fmt: skip


def log_in(browser, base: str, username: str):
    page = browser.new_page()
    page.goto(f"{base}/rag/")
    assert "/rag/login/" in page.url  # not logged in: sent to the login page
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/rag/")
    return page


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_an_editor_uploads_watches_searches_and_deletes(
    rag_engine, rag_gateway, browser, alice, bob
):
    base = rag_gateway.url
    corpus = corpus_for(alice.tenant, name="Handbook")
    member(alice.tenant, "ann", "editor")
    member(bob.tenant, "bert", "editor")
    page = log_in(browser, base, "ann")
    page.click("text=Handbook")
    # Dropped before corpus.js ran, the files would find no listener (a loaded host is
    # slow to serve the script): wait for the corpus page's load event.
    page.wait_for_url(f"**/rag/{corpus.public_id}/", wait_until="load")
    page.evaluate(
        DROP,
        [
            [
                {"name": "otters.md", "type": "text/markdown", "b64": b64(MARKDOWN.encode())},
                {
                    "name": "herons.pdf",
                    "type": "application/pdf",
                    "b64": b64(pdf_bytes(["Herons spear fish in shallow water."])),
                },
            ]
        ],
    )
    for name in ("otters.md", "herons.pdf"):
        row = page.locator("#documents tr", has_text=name)
        wait_ready(row, name)
        assert row.locator("progress").get_attribute("value") == "100"
    assert page.locator("#uploads li", has_text="uploaded").count() == 2

    page.fill("#q", "herons spear fish")
    page.click("form[role=search] button")
    first = page.locator("#results li").first
    assert "herons.pdf" in first.inner_text()
    assert "page 1" in first.inner_text()
    assert "Herons spear fish" in first.locator("blockquote").inner_text()

    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#documents tr", has_text="otters.md").locator("button", has_text="Delete").click()
    page.locator("#documents tr", has_text="otters.md").wait_for(state="detached")
    assert list(Document.objects.values_list("name", flat=True)) == ["herons.pdf"]
    assert not Chunk.objects.filter(document__name="otters.md").exists()

    other = log_in(browser, base, "bert")
    assert "Handbook" not in other.content()
    response = other.goto(f"{base}/rag/{corpus.public_id}/")
    assert response.status == 404
    assert other.goto(f"{base}/rag/{corpus.public_id}/documents.json").status == 404


def test_a_refused_upload_shows_its_error(rag_engine, rag_gateway, browser, alice):
    corpus = corpus_for(alice.tenant, name="Handbook")
    member(alice.tenant, "ann", "editor")
    page = log_in(browser, rag_gateway.url, "ann")
    page.goto(f"{rag_gateway.url}/rag/{corpus.public_id}/")
    page.evaluate(
        DROP,
        [
            [
                {
                    "name": "photo.png",
                    "type": "image/png",
                    "b64": b64(b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                }
            ]
        ],
    )
    page.locator("#uploads [role=alert]", has_text="Unsupported file type").wait_for(timeout=10_000)
    assert not Document.objects.exists()


def test_a_viewer_can_search_but_not_upload(rag_engine, rag_gateway, browser, alice):
    corpus = corpus_for(alice.tenant, name="Handbook")
    member(alice.tenant, "vic", "viewer")
    page = log_in(browser, rag_gateway.url, "vic")
    page.goto(f"{rag_gateway.url}/rag/{corpus.public_id}/")
    assert page.locator("#dropzone").count() == 0
    assert page.locator("#q").count() == 1
