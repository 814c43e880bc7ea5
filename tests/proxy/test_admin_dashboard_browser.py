"""The admin dashboard in a real headless Chromium against a real serve: a staff user logs
in, opens it from the request logs, and sees the charts drawn from the logs."""

from __future__ import annotations

import pytest

from apps.request_logs.models import RequestLog

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PASSWORD = "a-long-test-password"


@pytest.fixture
def browser(monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop, our ORM
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_a_staff_user_sees_the_charts_of_the_request_logs(gateway, browser, alice):
    from django.contrib.auth.models import User

    User.objects.create_superuser(username="olga", password=PASSWORD)
    for status in (200, 200, 500):
        RequestLog.objects.create(
            tenant=alice.tenant, endpoint="chat.completions", status_code=status,
            latency_ms=120, prompt_tokens=3, completion_tokens=4,
        )  # fmt: skip
    page = browser.new_page()
    page.goto(f"{gateway.url}/admin/request_logs/requestlog/")
    page.fill("#id_username", "olga")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.click("text=Dashboard")

    page.wait_for_selector("svg#chart-requests")
    assert page.locator("svg#chart-requests title").count() == 24  # one bar per hour
    last_hour = page.locator("svg#chart-requests title").last.text_content()
    assert last_hour.endswith(": 3 requests")
    assert page.locator("svg#chart-errors title").last.text_content().endswith(": 1 errors")
    assert "alice" in page.locator("body").inner_text()  # the top tenants table
