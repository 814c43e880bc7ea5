"""The corpus admin's charts in a real headless Chromium against a real serve: a
superuser logs in, opens the corpora and one corpus, and sees the bars drawn."""

from __future__ import annotations

import pytest

from apps.rag.models import CorpusDay, Document
from apps.rag.usage import today
from tests.proxy.test_admin_dashboard_browser import PASSWORD, browser  # noqa: F401 (fixture)
from tests.rag.conftest import corpus_for, upload

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_superuser_sees_the_corpus_charts(rag_engine, gateway, browser, alice):  # noqa: F811
    from django.contrib.auth.models import User

    User.objects.create_superuser(username="olga", password=PASSWORD)
    corpus = corpus_for(alice.tenant, name="handbook")
    ok = upload(corpus, "otters.txt", b"Sea otters hold hands while they sleep.")
    broken = upload(corpus, "broken.pdf", b"%PDF-1.4 junk")
    # As ingestion leaves them (the worker's event loop cannot run beside Playwright's).
    Document.objects.filter(pk=ok.pk).update(status="ready", chunk_count=3)
    Document.objects.filter(pk=broken.pk).update(status="failed", error="EOF marker not found")
    CorpusDay.objects.create(
        corpus=corpus, day=today(), documents_ingested=1, chunks_ingested=3, failures=1,
        searches=7,
    )  # fmt: skip
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(f"{gateway.url}/admin/rag/corpus/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")

    page.wait_for_selector("svg#rag-chart-searches")
    for chart in ("statuses", "ingested", "chunks", "searches"):
        assert page.locator(f"svg#rag-chart-{chart}").is_visible()
    last = page.locator("svg#rag-chart-searches g").last
    assert last.locator("title").text_content() == f"{today().isoformat()}: 7 searches"
    assert float(last.locator("rect").get_attribute("height")) > 0
    failed = page.locator("svg#rag-chart-ingested g").last.locator("rect.error")
    assert float(failed.get_attribute("height")) > 0  # the failure, stacked in red
    page.click('#result_list a:has-text("handbook")')
    page.wait_for_selector("svg#rag-chart-statuses")
    assert "Documents, chunks, ingestion and searches of this corpus" in page.inner_text("body")
