"""Static files (the admin's CSS and JS) served by the gateway process under ASGI."""

from __future__ import annotations

import httpx

SYNC_ITERATOR_WARNING = "StreamingHttpResponse must consume synchronous iterators"


def test_it_serves_static_files_without_the_sync_iterator_warning(gateway):
    response = httpx.get(f"{gateway.url}/static/admin/css/base.css")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert "body" in response.text
    assert SYNC_ITERATOR_WARNING not in gateway.output()


def test_it_answers_a_missing_static_file_with_404(gateway):
    assert httpx.get(f"{gateway.url}/static/admin/css/nope.css").status_code == 404
