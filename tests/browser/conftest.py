"""Fixtures of the browser tests: Debian's Chromium driven by Playwright for Python, and the whole stack.

- ``chromium`` — the browser (`playwright.sync_api.Browser`), launched once for the browser tests from
  ``$IMID_REMS_CHROMIUM`` (default ``/usr/bin/chromium``; Playwright's own browser downloads are never used);
- ``context`` / ``page`` — a fresh `BrowserContext` (1100x800, no cookies shared between tests) and a page in
  it, per test. When the test fails, the page's screenshot and HTML are kept in
  ``test-artifacts/browser/<test>-failure.png`` / ``.html``;
- ``ehr`` — the whole `make run` stack (`tests.browser.support.Ehr`), started once for the browser tests.

``chromium`` and ``ehr`` are *package*-scoped, not session-scoped: while Playwright's sync API is started it
keeps an asyncio loop marked as running in the main thread, so ``asyncio.run`` in any later test would fail.
Package scope stops it after the last test of tests/browser. For the same reason, a browser test cannot
call ``asyncio.run`` itself (nor use a fixture that does) while it holds ``page``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.browser.support import FAILURES, Ehr, safe_name, start_ehr

CHROMIUM = os.environ.get("IMID_REMS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in CI containers: Chromium's sandbox refuses to start as root without it
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # small /dev/shm in containers: shared memory in /tmp instead
]
VIEWPORT = {"width": 1100, "height": 800}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (``item.rep_setup`` / ``rep_call``) for fixtures' teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="package")
def chromium() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM} (the browser tests drive Debian's Chromium): run .ci/run, or "
            "`apt-get install chromium`, or set IMID_REMS_CHROMIUM to a Chromium executable",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(chromium: Browser) -> Iterator[BrowserContext]:
    ctx = chromium.new_context(viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]})
    ctx.set_default_timeout(30_000)
    try:
        yield ctx
    finally:
        ctx.close()


def _failed(item: pytest.Item) -> bool:
    return any(getattr(getattr(item, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


@pytest.fixture
def page(context: BrowserContext, request: pytest.FixtureRequest) -> Iterator[Page]:
    pg = context.new_page()
    yield pg
    if _failed(request.node):
        FAILURES.mkdir(parents=True, exist_ok=True)
        stem = FAILURES / f"{safe_name(request.node.name)}-failure"
        with contextlib.suppress(Exception):  # a crashed page still lets the test's own failure be reported
            pg.screenshot(path=f"{stem}.png", full_page=True)
        with contextlib.suppress(Exception):
            Path(f"{stem}.html").write_text(pg.content(), encoding="utf-8")


@pytest.fixture(scope="package")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ehr]:
    with start_ehr(tmp_path_factory.mktemp("ehr-state")) as stack:
        yield stack
