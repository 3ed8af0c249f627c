"""The sandbox EHR in Chromium, against the whole stack: a clinician finds a patient on the launcher page with
the keyboard, opens the chart (``patient-view`` fires), signs the prefilled order (``order-sign`` fires) and
reads the cards the imid-rems service answered with."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.browser.support import Ehr, shot

STALE = "frp-test-8-days-stale"
MAX_TABS = 400  # the launcher's controls, then one link per patient (seeded + corpus, sorted by name)


def focused(page: Page) -> dict[str, str]:
    """What has the keyboard focus: tag, href / id / text."""
    info: dict[str, str] = page.evaluate(
        """() => { const e = document.activeElement;
                   return { tag: e.tagName.toLowerCase(), href: e.getAttribute('href') || '',
                            id: e.id || '', type: e.getAttribute('type') || '', text: (e.innerText || '').trim() } }"""
    )
    return info


def tab_to(page: Page, wanted: dict[str, str]) -> int:
    """Press Tab until the focused element has every attribute of `wanted`; returns how many presses."""
    for presses in range(1, MAX_TABS + 1):
        page.keyboard.press("Tab")
        now = focused(page)
        if all(now.get(k) == v for k, v in wanted.items()):
            return presses
    raise AssertionError(f"{MAX_TABS} presses of Tab never focused {wanted}; focus is on {focused(page)}")


def test_stale_pregnancy_test_card_from_the_launcher_to_order_sign_by_keyboard(ehr: Ehr, page: Page) -> None:
    sc = ehr.scenario(STALE)  # the service's clock moves to the scenario's day
    chart_path = f"/ehr/patients/{sc.patient_id}"

    page.goto(ehr.url("/"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Sandbox EHR")
    expect(page.locator(f'a[href="{chart_path}"]')).to_have_text("Olivia Park")

    # the first Tab reaches the skip link, shown only when focused; Enter moves to the content
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    expect(page).to_have_url(ehr.url("/#main"))

    # Tab on to the patient's chart link, and open it with Enter
    tab_to(page, {"tag": "a", "href": chart_path})
    shot(page, "ehr-home-patient-link-focused")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page).to_have_url(ehr.url(chart_path))
    expect(page.get_by_role("heading", level=1)).to_have_text("Olivia Park")

    # patient-view fired on open: the REMS status card says there is no valid pregnancy test
    view = page.locator('section[aria-labelledby="hook-patient-view"]')
    expect(view).to_contain_text("Sent with prefetch")
    expect(view.get_by_role("alert")).to_have_count(0)  # no error from the service
    status = view.locator("article.card")
    expect(status).to_have_count(1)
    expect(status.get_by_role("heading", level=3)).to_contain_text("no valid pregnancy test")
    expect(status).to_contain_text("valid for a dispense through 2026-11-20")
    shot(page, "ehr-chart-frp-test-8-days-stale")

    # sign the order the form is prefilled with: from the prescriber, Tab past the checkbox to the button
    page.locator("#prescriber").focus()
    page.keyboard.press("Tab")
    assert focused(page)["type"] == "checkbox"
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Sign (fires order-sign)")).to_be_focused()
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page).to_have_url(ehr.url(f"{chart_path}/sign"))

    signed = page.locator('section[aria-labelledby="hook-order-sign"]')
    expect(signed).to_contain_text("Sent with prefetch")
    expect(signed.get_by_role("alert")).to_have_count(0)
    cards = signed.locator("article.card")
    expect(cards).to_have_count(len(sc.codes))
    topics = cards.locator("p.note", has_text="Source:").locator("code").all_inner_texts()
    assert topics == list(sc.codes) == ["pregnancy-test-stale"]
    stale = cards.first
    expect(stale).to_have_class(re.compile(r"\bcritical\b"))
    expect(stale.get_by_role("heading", level=3)).to_have_text(
        "critical: Pregnancy test of 2026-11-13 expired 2026-11-20: too old to dispense today", ignore_case=True
    )
    expect(stale).to_contain_text("Order a pregnancy test (recommended)")
    shot(page, "ehr-order-sign-frp-test-8-days-stale")


def test_seeded_patient_with_a_stale_test_shows_it_in_the_patient_view_status(ehr: Ehr, page: Page) -> None:
    """The seeded population (real today): a woman who can get pregnant whose last test is too old."""
    plan = ehr.seeded(category="adult-female-rp", problem="stale-test")
    assert plan.last_negative_test is not None
    page.goto(ehr.chart_url(plan.patient_id))
    view = page.locator('section[aria-labelledby="hook-patient-view"]')
    expect(view.get_by_role("alert")).to_have_count(0)
    status = view.locator("article.card")
    expect(status).to_have_count(1)
    expect(status.get_by_role("heading", level=3)).to_contain_text("no valid pregnancy test")
    last_test = status.locator("tr", has_text="Last negative pregnancy test")
    expect(last_test).to_contain_text(plan.last_negative_test.isoformat())
    shot(page, "ehr-chart-seeded-frp-stale-test")
