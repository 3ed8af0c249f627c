"""The SMART app in Chromium, launched through the sandbox EHR's real authorization server (`make run`'s stack):
the prescriber's patient page, the pharmacist's worklist and draft review down to the prescription on the FHIR
server, a blocked approval, refused launches, the EHR frame and a narrow side panel. Screenshots of every page
go to ``test-artifacts/screenshots/``.

Expectations come from the seed plan (what was put in the chart) and from the service's database and the FHIR
server, never from the page itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from cds_hooks import refill_store as store
from cds_hooks.refill_store import Draft
from fhir_mappings.medication import AUTHORIZATION_SYSTEM
from sandbox.seed_plan import PROBLEMS
from tests.browser.support import CLINIC_TZ, ROOT, Ehr, shot

PRESCRIBER = "Practitioner/sb-prac-onc1"
PHARMACIST = "Practitioner/sb-prac-rph1"
PHARMACIST_ROLE = "PractitionerRole/sb-role-rph1"
SIX_MONTHS = timedelta(days=183)


def engine_of(ehr: Ehr) -> Any:
    return ehr.cds.app.state.imid.engine


@pytest.fixture(scope="module")
def drafted(ehr: Ehr) -> list[Draft]:
    """Run the refill scan once, as an operator would (`imid-rems refills scan`), on the service's database."""
    settings = ehr.cds.app.state.imid.settings
    env = {
        **os.environ,
        "IMID_REMS_DATABASE_URL": settings.database_url,
        "IMID_REMS_FHIR_BASE_URL": settings.fhir_base_url,
        "IMID_REMS_BACKEND_CLIENT_ID": settings.backend_client_id,
        "IMID_REMS_BACKEND_KEY_FILE": str(settings.backend_key_file),
        "IMID_REMS_CLINIC_TZ": CLINIC_TZ,
    }
    cli = [sys.executable, "-m", "cds_hooks.cli", "refills", "scan"]
    done = subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode in (0, 3), done.stderr[-2000:]
    drafts = store.worklist(engine_of(ehr), status="pending", limit=500)
    assert drafts, "the scan drafted nothing: the seeded population should have refills due"
    return drafts


def fhir_get(ehr: Ehr, path: str) -> Any:
    """A read straight from the FHIR engine (no gateway): what is really on the server."""
    response = httpx.get(f"{ehr.fhir_base}/{path}", timeout=30, trust_env=False)
    response.raise_for_status()
    return response.json()


def marks(page: Page, kind: str) -> set[date]:
    days = page.locator(f'figure.timeline svg [data-kind="{kind}"]').evaluate_all(
        "els => els.map(e => e.getAttribute('data-day'))"
    )
    return {date.fromisoformat(d) for d in days}


# --- the prescriber -----------------------------------------------------------------------------------


def test_prescriber_launch_shows_the_patients_findings_and_timeline(ehr: Ehr, page: Page) -> None:
    plan = ehr.seeded(category="adult-female-rp", problem="stale-test")
    page.goto(ehr.url("/"))
    page.select_option("#launch-prescriber", PRESCRIBER)
    page.select_option("#launch-patient", plan.patient_id)
    page.get_by_role("button", name="Open imid-rems").click()
    page.wait_for_url(re.compile(r"/smart/s/[^/]+/patient"))

    patient = fhir_get(ehr, f"Patient/{plan.patient_id}")
    name = patient["name"][0]
    expect(page.get_by_test_id("patient-name")).to_have_text(" ".join([*name.get("given", []), name["family"]]))
    drug = page.locator(f'section.drug[data-drug="{plan.drug.value}"]')
    expect(drug.get_by_test_id("risk-category")).to_contain_text(plan.category.display)
    expect(drug.get_by_test_id("risk-category")).to_contain_text("documented on the order")
    codes = drug.locator("[data-testid=findings] li").evaluate_all("els => els.map(e => e.dataset.code)")
    assert PROBLEMS["stale-test"] in codes
    stale = drug.locator(f'li[data-code="{PROBLEMS["stale-test"]}"]')
    assert plan.last_negative_test is not None
    expect(stale).to_contain_text(f"Pregnancy test of {plan.last_negative_test.isoformat()} expired")

    # The timeline: exactly the negative tests of the last 6 months, the fills, today, the next test and fill.
    today = plan.today
    negatives = {d for d, positive in plan.pregnancy_tests if not positive and d >= today - SIX_MONTHS}
    assert negatives, "the plan has tests in the window"
    assert marks(page, "negative") == negatives
    assert {d for d in plan.dispensed if d >= today - SIX_MONTHS} <= marks(page, "fill")
    assert marks(page, "today") == {today}
    next_test = date.fromisoformat(drug.get_by_test_id("next-test").inner_text())
    assert marks(page, "next-test") == {next_test}
    assert next_test <= today  # a stale test: the next one is due now
    assert marks(page, "next-fill") == {date.fromisoformat(drug.get_by_test_id("next-fill").inner_text())}
    # The EHR asked for a banner (need_patient_banner) and its style (smart_style_url) is applied.
    expect(page.get_by_role("region", name="Patient", exact=True)).to_be_visible()
    link = page.get_by_role("link", name="Refill worklist")
    assert link.evaluate("e => getComputedStyle(e).color") == "rgb(91, 42, 134)"  # the sandbox's #5b2a86
    shot(page, "patient-page")
    page.screenshot(path=str(shot(page, "patient-page").with_name("patient-page-first-screen.png")))


def test_card_link_opens_the_app_on_the_patient_view(ehr: Ehr, page: Page) -> None:
    plan = ehr.seeded(category="adult-female-rp", problem="stale-test")
    page.goto(ehr.chart_url(plan.patient_id))
    page.get_by_role("button", name="Open the REMS timeline").first.click()
    page.wait_for_url(re.compile(r"/smart/s/[^/]+/patient"))
    expect(page.locator(f'section.drug[data-drug="{plan.drug.value}"]')).to_be_visible()


def test_app_context_of_a_card_opens_the_finding_it_is_about(ehr: Ehr, page: Page) -> None:
    """A card's ``smart`` link carries ``appContext`` (`cds_hooks.cards`): the patient view with the finding of
    the card's rule in focus."""
    plan = ehr.seeded(category="adult-female-rp", problem="stale-test")
    rule = PROBLEMS["stale-test"]
    context = json.dumps({"view": "patient", "order": f"MedicationRequest/{plan.active_order}", "rule": rule})
    page.goto(ehr.launch_url(user=PRESCRIBER, patient=plan.patient_id, app_context=context))
    page.wait_for_url(re.compile(rf"/patient#finding-{rule}$"))
    focused = page.locator(f"#finding-{rule}")
    expect(focused).to_have_attribute("aria-current", "true")
    expect(focused).to_have_class(re.compile(r"\bfocus\b"))
    expect(page.locator("li.finding.focus")).to_have_count(1)


def test_app_context_of_a_refill_card_opens_the_draft(ehr: Ehr, page: Page, drafted: list[Draft]) -> None:
    target = drafted[0]
    context = json.dumps({"view": "worklist", "order": target.prior_order})
    page.goto(ehr.launch_url(user=PHARMACIST, patient=target.patient_id, app_context=context))
    page.wait_for_url(re.compile(rf"/drafts/{target.id}$"))
    expect(page.locator("h1")).to_contain_text(target.drug.capitalize())
    # Without a draft for that order the worklist opens instead.
    other = json.dumps({"view": "worklist", "order": "MedicationRequest/not-drafted"})
    page.goto(ehr.launch_url(user=PHARMACIST, patient=target.patient_id, app_context=other))
    page.wait_for_url(re.compile(r"/worklist$"))


def test_no_patient_banner_when_the_ehr_shows_its_own(ehr: Ehr, page: Page) -> None:
    plan = ehr.seeded(category="adult-male", clean=True)
    page.goto(ehr.launch_url(user=PRESCRIBER, patient=plan.patient_id, need_patient_banner=False))
    page.wait_for_url(re.compile(r"/smart/s/[^/]+/patient"))
    expect(page.locator("h1")).to_contain_text("REMS picture")
    expect(page.get_by_role("region", name="Patient", exact=True)).to_have_count(0)
    expect(page.get_by_test_id("risk-category")).to_contain_text(plan.category.display)


def test_standalone_launch_asks_who_and_which_patient(ehr: Ehr, page: Page) -> None:
    plan = ehr.seeded(category="adult-male", clean=True)
    page.goto(f"{ehr.service_base}/smart/launch")
    page.select_option("select[name=user]", PRESCRIBER)
    page.select_option("select[name=patient]", plan.patient_id)
    page.get_by_role("button", name="Authorize").click()
    page.wait_for_url(re.compile(r"/smart/s/[^/]+/patient"))
    expect(page.get_by_test_id("risk-category")).to_contain_text(plan.category.display)


# --- the pharmacist -----------------------------------------------------------------------------------


def open_worklist(ehr: Ehr, page: Page) -> None:
    page.goto(ehr.url("/"))
    page.select_option("#launch-pharmacist", PHARMACIST)
    page.get_by_role("button", name="Open the pharmacist worklist").click()
    page.wait_for_url(re.compile(r"/smart/s/[^/]+/worklist"))


def needs_only_a_number(drafts: list[Draft]) -> list[Draft]:
    return [d for d in drafts if {c.code for c in d.checks if c.blocking} == {"authorization-missing"}]


def test_pharmacist_edits_enters_the_number_and_approves_to_the_fhir_server(
    ehr: Ehr, page: Page, drafted: list[Draft]
) -> None:
    open_worklist(ehr, page)
    engine = engine_of(ehr)
    counts = store.counts(engine)
    expect(page.get_by_test_id("count-pending")).to_have_text(str(counts.get("pending", 0)))
    days = page.locator("table.worklist tbody tr td.days strong").all_inner_texts()
    assert [int(d) for d in days] == sorted(int(d) for d in days), "most urgent first"
    assert len(days) == counts["pending"]
    shot(page, "worklist")
    page.screenshot(path=str(shot(page, "worklist").with_name("worklist-first-screen.png")))
    for row in page.locator("table.worklist tbody tr").all():  # the number every draft lacks is not a finding
        expect(row.locator('td[data-label="Blocking findings"] li[data-code="authorization-missing"]')).to_have_count(0)

    target = needs_only_a_number(store.worklist(engine, status="pending", limit=500))[0]
    row = page.locator(f'tr[data-draft="{target.id}"]')
    expect(row.locator("[data-ready]")).to_have_attribute("data-ready", "needs-authorization")
    row.get_by_role("link").click()
    page.wait_for_url(re.compile(rf"/drafts/{target.id}$"))
    expect(page.get_by_test_id("to-write")).to_contain_text("Authorization number")
    shot(page, "draft-review")

    # Edit with the keyboard: a 21-day supply and the REMS authorization number, saved with Enter.
    page.focus("#supply_days")
    page.keyboard.press("Control+A")
    page.keyboard.type("21")
    page.focus("#authorization_number")
    page.keyboard.type("40512345")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"done=saved"))
    expect(page.get_by_test_id("to-write")).to_contain_text("40512345")
    expect(page.get_by_test_id("to-write")).to_contain_text("21 days")
    expect(page.locator("[data-testid=checks] li.blocking")).to_have_count(0)
    to_write = page.get_by_test_id("to-write-json").text_content() or ""
    assert '"value": "40512345"' in to_write and PHARMACIST_ROLE in to_write

    approve = page.get_by_role("button", name="Approve and write to the EHR")
    approve.focus()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"done=written"))
    expect(page.get_by_test_id("draft-status")).to_have_text("Written")
    reference = page.get_by_test_id("written").locator("code").inner_text()
    expect(page.get_by_test_id("audit")).to_contain_text("approved")
    shot(page, "draft-written")

    written = fhir_get(ehr, reference)
    assert written["status"] == "active" and written["intent"] == "order"
    assert written["subject"]["reference"] == f"Patient/{target.patient_id}"
    assert written["priorPrescription"]["reference"] == target.prior_order
    assert written["requester"]["reference"] == PHARMACIST_ROLE
    assert written["dispenseRequest"]["expectedSupplyDuration"]["value"] == 21
    assert written["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    numbers = [i["value"] for i in written.get("identifier", []) if i.get("system") == AUTHORIZATION_SYSTEM]
    assert numbers == ["40512345"]
    provenance = fhir_get(ehr, f"Provenance?target={reference}")
    agents = [a["who"]["reference"] for e in provenance.get("entry", []) for a in e["resource"]["agent"]]
    assert PHARMACIST_ROLE in agents
    assert store.get_draft(engine, target.id).status == "written"  # type: ignore[union-attr]


def test_a_blocked_approval_shows_why_and_changes_nothing(ehr: Ehr, page: Page, drafted: list[Draft]) -> None:
    engine = engine_of(ehr)
    target = needs_only_a_number(store.worklist(engine, status="pending", limit=500))[-1]
    open_worklist(ehr, page)
    page.locator(f'tr[data-draft="{target.id}"]').get_by_role("link").click()
    expect(page.locator("#blocked-why")).to_contain_text("No REMS authorization number")
    with page.expect_response(re.compile(r"/approve$")) as answer:
        page.get_by_role("button", name="Approve and write to the EHR").click()
    assert answer.value.status == 422
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Approval blocked")
    expect(alert).to_contain_text("authorization-missing")
    expect(alert.locator('li[data-code="authorization-missing"]')).to_contain_text("No REMS authorization number")
    shot(page, "draft-blocked")
    after = store.get_draft(engine, target.id)
    assert after is not None and (after.status, after.version) == ("pending", target.version)


def test_worklist_fits_a_narrow_ehr_side_panel(ehr: Ehr, page: Page, drafted: list[Draft]) -> None:
    page.set_viewport_size({"width": 360, "height": 800})
    open_worklist(ehr, page)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    first = page.locator("table.worklist tbody tr").first
    assert first.evaluate("e => getComputedStyle(e).display") == "block"  # rows become stacked cards
    shot(page, "worklist-side-panel")


def test_the_app_runs_inside_the_ehr_frame(ehr: Ehr, page: Page) -> None:
    plan = ehr.seeded(category="adult-male", clean=True)
    page.goto(ehr.url("/"))
    url = ehr.launch_url(user=PRESCRIBER, patient=plan.patient_id)
    page.evaluate(
        "u => { const f = document.createElement('iframe'); f.id = 'app'; f.src = u;"
        " f.style = 'width:420px;height:700px'; document.body.prepend(f); }",
        url,
    )
    frame = page.frame_locator("#app")
    expect(frame.get_by_test_id("risk-category")).to_contain_text(plan.category.display, timeout=30_000)
    shot(page, "patient-page-in-ehr-frame")


# --- refused launches ---------------------------------------------------------------------------------


def test_a_tampered_state_is_refused(ehr: Ehr, page: Page) -> None:
    """The authorization server's redirect back to the app is caught, its state altered by one character, and
    the altered URL opened in the same browser (what an attacker splicing a callback would produce)."""
    # The browser context's own request client (it shares the browser's cookies) walks the launch step by step.
    launch = page.request.get(
        ehr.launch_url(user=PRESCRIBER, patient=ehr.seeded(clean=True).patient_id), max_redirects=0
    )
    assert launch.status == 302 and "imid_rems_browser" in {c["name"] for c in page.context.cookies()}
    authorized = page.request.get(launch.headers["location"], max_redirects=0)
    assert authorized.status in (302, 303)
    caught = [authorized.headers["location"]]
    value = re.search(r"state=([^&]+)", caught[0]).group(1)  # type: ignore[union-attr]
    flipped = ("A" if value[0] != "A" else "B") + value[1:]
    response = page.goto(caught[0].replace(f"state={value}", f"state={flipped}"))
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_have_text("Sign-in refused")
    expect(page.get_by_test_id("error-detail")).to_contain_text("state")
    shot(page, "launch-refused-tampered-state")
    # The untouched answer still works once (the state was not consumed by the forgery) — and only once.
    response = page.goto(caught[0])
    assert response is not None and response.status == 200 and "/patient" in page.url
    response = page.goto(caught[0])
    assert response is not None and response.status == 403


def test_a_launch_from_an_unknown_fhir_server_is_refused(ehr: Ehr, page: Page) -> None:
    evil = "http://127.0.0.1:9/fhir"
    response = page.goto(f"{ehr.service_base}/smart/launch?iss={evil}&launch=abc")
    assert response is not None and response.status == 403
    expect(page.locator("h1")).to_have_text("Launch refused: unknown FHIR server")
    expect(page.get_by_test_id("error-detail")).to_contain_text(evil)
    assert "/smart/launch" in page.url  # no redirect anywhere
    shot(page, "launch-refused-wrong-iss")


@pytest.fixture(autouse=True)
def _real_time(ehr: Ehr) -> Iterator[None]:
    ehr.set_now(None)
    yield
