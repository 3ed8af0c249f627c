"""The SMART app's patient REMS page as data (`smart_app.picture`): the timeline of pregnancy tests and
fills (kinds, validity windows, missing and overdue marks, clinic-local days), the open findings for the
next fill (drafted next prescription vs an order not dispensed yet), and the SVG drawing.

Charts are small hand-made FHIR JSON, parsed with `cds_hooks.refills.load_chart` as the app would. The
clock: Saturday 21 November 2026, 10:00 in New York (EST, UTC-05:00), so any time after 19:00 local is
already the next day in UTC. With the default 6 months the timeline starts on 22 May 2026.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_hooks.refills import Loaded, PatientChart, draft_prescription, load_chart, precheck
from rems.config import default_config
from rems.status import CategorySource, rems_status
from smart_app.picture import (
    AUTHORIZATION_MISSING,
    AUTHORIZATION_ON_ORDER,
    DRAFTED_NEXT,
    NEXT_NEEDS_NUMBER,
    NO_NAME,
    FillMark,
    PatientPicture,
    Timeline,
    patient_name,
    patient_picture,
    timeline_rows,
    timeline_svg,
)
from tests.support.seed_charts import searchset

Json = dict[str, Any]

NY = ZoneInfo("America/New_York")
TODAY = date(2026, 11, 21)
NOW = datetime.combine(TODAY, time(10, 0), NY)
START = date(2026, 5, 22)
"""Where a 6-month timeline starts (183 days before today)."""
SVG = "{http://www.w3.org/2000/svg}"

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
BASE = "https://imid-rems.github.io/fhir"
AUTHORIZATION_SYSTEM = f"{BASE}/sid/rems-authorization"
RISK_CATEGORY_EXTENSION = f"{BASE}/StructureDefinition/rems-risk-category"
RISK_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/rems-risk-category"


# ------------------------------------------------------------------------------------------------
# Hand-made FHIR charts
# ------------------------------------------------------------------------------------------------


def at(day: date, hour: int = 12, minute: int = 0) -> datetime:
    """`hour:minute` New York time on `day`."""
    return datetime.combine(day, time(hour, minute), NY)


def patient_json(sex: str = "male", born: str = "1960-03-01", **fields: Any) -> Json:
    """Patient p1 (an adult man unless `sex`); `fields` adds elements such as ``name``."""
    return {"resourceType": "Patient", "id": "p1", "gender": sex, "birthDate": born, **fields}


def woman() -> Json:
    """A 36-year-old woman: pair her with the 'adult-female-rp' category."""
    return patient_json("female", "1990-06-01")


def order_json(
    rid: str = "rx1",
    *,
    authored: datetime,
    category: str = "adult-male",
    authorization: str | None = "12345678",
    status: str = "active",
    supply_days: int | None = 28,
) -> Json:
    """Generic lenalidomide 10 mg, one capsule daily, `supply_days` days, no refills, the category as the
    extension and the authorization number as an identifier. `supply_days=None`: no dispenseRequest and no
    structured dosing, so the supply cannot be worked out."""
    order: Json = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": authored.isoformat(),
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "602910", "display": "lenalidomide 10 MG Oral Capsule"}]
        },
        "dosageInstruction": [
            {
                "text": "Take 1 capsule by mouth daily",
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "capsule", "system": UCUM, "code": "{capsule}"}}],
            }
        ],
        "extension": [
            {"url": RISK_CATEGORY_EXTENSION, "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": category}}
        ],
    }
    if supply_days is None:
        order["dosageInstruction"] = [{"text": "Take as directed"}]
    else:
        order["dispenseRequest"] = {
            "numberOfRepeatsAllowed": 0,
            "quantity": {"value": supply_days, "unit": "capsule", "system": UCUM, "code": "{capsule}"},
            "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"},
        }
    if authorization is not None:
        order["identifier"] = [{"system": AUTHORIZATION_SYSTEM, "value": authorization}]
    return order


def dispense_json(rid: str, order_id: str = "rx1", *, handed: datetime | str, days: int | None = 28) -> Json:
    """A completed dispense of order `order_id`, `days` days' supply (None: not stated), handed over at
    `handed` (a string is sent as is, e.g. in UTC)."""
    out: Json = {
        "resourceType": "MedicationDispense",
        "id": rid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "602910"}]},
        "authorizingPrescription": [{"reference": f"MedicationRequest/{order_id}"}],
        "whenHandedOver": handed if isinstance(handed, str) else handed.isoformat(),
    }
    if days is not None:
        out["daysSupply"] = {"value": days, "unit": "day", "system": UCUM, "code": "d"}
    return out


def hcg(rid: str, *, taken: datetime | str | None, result: str = "Negative", text: str | None = None) -> Json:
    """A serum hCG (LOINC 2106-3) collected at `taken` (a string is sent as is; None: no date at all),
    coded negative or positive in SNOMED; `text` replaces the value's text."""
    code = {"Negative": "260385009", "Positive": "10828004"}[result]
    obs: Json = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "2106-3"}]},
        "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": code}], "text": text or result},
    }
    if taken is not None:
        obs["effectiveDateTime"] = taken if isinstance(taken, str) else taken.isoformat()
    return obs


def pregnant(rid: str, *, when: datetime) -> Json:
    """A pregnancy status observation (LOINC 82810-3): pregnant."""
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "82810-3"}]},
        "effectiveDateTime": when.isoformat(),
        "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "77386006"}], "text": "Pregnant"},
    }


def aspirin() -> Json:
    """Aspirin 81 mg: VTE prophylaxis on file."""
    return {
        "resourceType": "MedicationRequest",
        "id": "asa",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2026-01-05T10:00:00-05:00",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "243670", "display": "aspirin 81 MG"}]},
    }


def cbc() -> tuple[Json, ...]:
    """A normal CBC (ANC and platelets) yesterday morning."""
    taken = at(TODAY - timedelta(days=1), 8).isoformat()

    def lab(rid: str, code: str, value: float) -> Json:
        return {
            "resourceType": "Observation",
            "id": rid,
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "effectiveDateTime": taken,
            "valueQuantity": {"value": value, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
        }

    return (lab("anc", "751-8", 2.4), lab("plt", "777-3", 210))


def chart_of(
    patient: Json,
    *,
    orders: tuple[Json, ...],
    dispenses: tuple[Json, ...] = (),
    observations: tuple[Json, ...] = (),
    clean: bool = True,
) -> PatientChart:
    """The chart under the CDS prefetch keys; `clean`: with aspirin and a normal CBC (no clinical-review
    flag)."""
    prefetch = {
        "medications": searchset((*orders, aspirin()) if clean else orders),
        "dispenses": searchset(dispenses),
        "observations": searchset((*observations, *cbc()) if clean else observations),
        "conditions": searchset(()),
        "procedures": searchset(()),
    }
    return PatientChart(patient, prefetch)


def load(chart: PatientChart, now: datetime = NOW) -> Loaded:
    return load_chart(chart, now=now, zone=NY, config=default_config())


def picture_of(chart: PatientChart, now: datetime = NOW, months: int = 6) -> PatientPicture:
    return patient_picture(load(chart, now), now=now, zone=NY, config=default_config(), months=months)


def timeline_of(chart: PatientChart, now: datetime = NOW) -> Timeline:
    drugs = picture_of(chart, now).drugs
    assert len(drugs) == 1
    return drugs[0].timeline


def marks(timeline: Timeline) -> list[tuple[date, str, date | None]]:
    return [(m.day, m.kind, m.window_end) for m in timeline.tests]


def frp_course() -> PatientChart:
    """A woman who can get pregnant, on lenalidomide since April: a fill on 1 May (runs out 29 May, so it
    starts before the timeline), then 15 Oct and 12 Nov. Negative tests on 13 Oct (covers the 15 Oct fill)
    and 3 Nov (good through 10 Nov: the 12 Nov fill had no valid test). The next test (every 2 weeks) was
    due 17 Nov and none is on file."""
    return chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 4, 30), 9), category="adult-female-rp"),),
        dispenses=(
            dispense_json("f-apr", handed=at(date(2026, 4, 20))),  # ran out 18 May: before the timeline
            dispense_json("f0", handed=at(date(2026, 5, 1))),
            dispense_json("f1", handed=at(date(2026, 10, 15))),
            dispense_json("f2", handed=at(date(2026, 11, 12))),
        ),
        observations=(hcg("h1", taken=at(date(2026, 10, 13), 9)), hcg("h2", taken=at(date(2026, 11, 3), 9))),
    )


# ------------------------------------------------------------------------------------------------
# The timeline
# ------------------------------------------------------------------------------------------------


def test_tests_windows_a_missing_test_at_a_fill_and_an_overdue_test() -> None:
    t = timeline_of(frp_course())
    assert (t.start, t.today, t.tests_required) == (START, TODAY, True)
    assert marks(t) == [
        (date(2026, 10, 13), "negative", date(2026, 10, 20)),
        (date(2026, 11, 3), "negative", date(2026, 11, 10)),
        (date(2026, 11, 12), "missing", None),  # the 3 Nov test expired on 10 Nov
        (date(2026, 11, 17), "overdue", None),
    ]
    assert [m.reference for m in t.tests] == ["Observation/h1", "Observation/h2", None, None]
    assert t.tests[2].text == "no valid negative test at this dispense"
    assert t.tests[3].text == "test due 2026-11-17 not on file"
    # 19 days left: dispensable from 3 Dec, runs out 10 Dec; the drawing ends a week after 3 Dec.
    assert (t.next_test_due, t.next_fill_from, t.runs_out) == (
        date(2026, 11, 17),
        date(2026, 12, 3),
        date(2026, 12, 10),
    )
    assert t.end == date(2026, 12, 10)


def test_fills_overlapping_the_window_are_kept_and_start_before_it() -> None:
    t = timeline_of(frp_course())
    assert t.fills == (
        FillMark(date(2026, 5, 1), Decimal(28), date(2026, 5, 29), "MedicationDispense/f0"),
        FillMark(date(2026, 10, 15), Decimal(28), date(2026, 11, 12), "MedicationDispense/f1"),
        FillMark(date(2026, 11, 12), Decimal(28), date(2026, 12, 10), "MedicationDispense/f2"),
    )
    # The fill of 1 May is drawn from the timeline's start (x = 100, the left edge of the plot).
    svg = ET.fromstring(timeline_svg(t))  # noqa: S314 - our own output
    f0 = next(g for g in svg.iter(f"{SVG}g") if g.get("data-kind") == "fill" and g.get("data-day") == "2026-05-01")
    rect = f0.find(f"{SVG}rect")
    assert rect is not None and rect.get("x") == "100"


def test_a_shorter_timeline_starts_later_and_drops_older_fills() -> None:
    t = picture_of(frp_course(), months=3).drugs[0].timeline
    assert t.start == TODAY - timedelta(days=91)
    assert [f.reference for f in t.fills] == ["MedicationDispense/f1", "MedicationDispense/f2"]


def test_a_positive_after_a_negative_uncovers_the_next_fill() -> None:
    # Negative 10 Nov (good through 17 Nov) covers the 12 Nov fill; the positive of 14 Nov means the fill of
    # 16 Nov had no valid negative test although the 10 Nov one had not expired. "Pregnant" status on 18 Nov.
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 12), 9), category="adult-female-rp"),),
        dispenses=(
            dispense_json("f1", handed=at(date(2026, 11, 12))),
            dispense_json("f2", handed=at(date(2026, 11, 16)), days=21),
        ),
        observations=(
            hcg("neg", taken=at(date(2026, 11, 10), 9)),
            hcg("pos", taken=at(date(2026, 11, 14), 9), result="Positive"),
            pregnant("status", when=at(date(2026, 11, 18), 9)),
        ),
    )
    t = timeline_of(chart)
    assert marks(t) == [
        (date(2026, 11, 10), "negative", date(2026, 11, 17)),
        (date(2026, 11, 14), "positive", None),
        (date(2026, 11, 16), "missing", None),
        (date(2026, 11, 17), "overdue", None),  # weekly in the first month; the positive was before it was due
        (date(2026, 11, 18), "positive", None),
    ]
    assert [m.text for m in t.tests if m.kind == "positive"] == ["Positive", "pregnancy status: pregnant"]
    assert [m.reference for m in t.tests if m.kind == "positive"] == ["Observation/pos", "Observation/status"]


def test_a_man_gets_tests_on_file_but_no_missing_or_overdue_marks() -> None:
    chart = chart_of(
        patient_json(),
        orders=(order_json("rx1", authored=at(date(2026, 9, 1), 9)),),
        dispenses=(
            dispense_json("f1", handed=at(date(2026, 10, 15))),
            dispense_json("f2", handed=at(date(2026, 11, 12))),
        ),
    )
    t = timeline_of(chart)
    assert (t.tests_required, t.tests, t.next_test_due) == (False, (), None)
    assert [f.day for f in t.fills] == [date(2026, 10, 15), date(2026, 11, 12)]
    assert "pregnancy tests not required" in timeline_svg(t)


@pytest.mark.parametrize(
    ("taken", "day", "covers_18_nov"),
    [
        ("2026-11-10T23:30:00-05:00", date(2026, 11, 10), False),
        ("2026-11-11T04:30:00Z", date(2026, 11, 10), False),  # the same instant, as a server may send it
        ("2026-11-11T05:30:00Z", date(2026, 11, 11), True),  # 00:30 on 11 Nov in New York
    ],
    ids=["local", "utc-same-evening", "utc-after-local-midnight"],
)
def test_a_test_counts_on_its_clinic_local_day(taken: str, day: date, covers_18_nov: bool) -> None:
    assert NOW.utcoffset() == timedelta(hours=-5)
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 18), 9), category="adult-female-rp"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 18))),),
        observations=(hcg("h1", taken=taken),),
    )
    t = timeline_of(chart)
    assert (t.tests[0].day, t.tests[0].kind, t.tests[0].window_end) == (day, "negative", day + timedelta(days=7))
    assert ("missing" in {m.kind for m in t.tests}) is not covers_18_nov


@pytest.mark.parametrize(
    ("handed", "missing"),
    [
        ("2026-11-17T23:30:00-05:00", False),  # exactly 7 days after the test: its last day
        ("2026-11-18T04:30:00Z", False),  # the same instant in UTC: still 17 Nov in the clinic
        ("2026-11-18T00:30:00-05:00", True),  # 7 days and 1 hour: the next clinic day, expired
    ],
    ids=["7-days", "7-days-utc", "7-days-1-hour"],
)
def test_a_negative_test_is_good_through_the_seventh_day(handed: str, missing: bool) -> None:
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 17), 9), category="adult-female-rp"),),
        dispenses=(dispense_json("f1", handed=handed),),
        observations=(hcg("h1", taken=at(date(2026, 11, 10), 23, 30)),),
    )
    t = timeline_of(chart)
    assert t.tests[0].window_end == date(2026, 11, 17)
    assert [m.day for m in t.tests if m.kind == "missing"] == ([date(2026, 11, 18)] if missing else [])


def test_a_test_taken_after_the_dispense_on_the_same_day_does_not_cover_it() -> None:
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 17), 9), category="adult-female-rp"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 17), 10)),),
        observations=(hcg("h1", taken=at(date(2026, 11, 17), 15)),),
    )
    assert marks(timeline_of(chart)) == [
        (date(2026, 11, 17), "negative", date(2026, 11, 24)),
        (date(2026, 11, 17), "missing", None),
    ]


def test_rows_list_the_same_events_in_order() -> None:
    rows = timeline_rows(timeline_of(frp_course()))
    assert [(r.day, r.lane) for r in rows] == [
        (date(2026, 5, 1), "Fills"),
        (date(2026, 10, 13), "Pregnancy tests"),
        (date(2026, 10, 15), "Fills"),
        (date(2026, 11, 3), "Pregnancy tests"),
        (date(2026, 11, 12), "Pregnancy tests"),
        (date(2026, 11, 12), "Fills"),
        (date(2026, 11, 17), "Pregnancy tests"),
        (date(2026, 11, 17), "Plan"),
        (date(2026, 11, 21), "Plan"),
        (date(2026, 12, 3), "Plan"),
        (date(2026, 12, 10), "Plan"),
    ]
    assert rows[1].what == "Negative pregnancy test (Negative): allows a dispense through 2026-10-20"
    assert rows[4].what == "Dispensed with no valid negative pregnancy test"
    assert rows[5].what == "Dispensed 28 days' supply, runs out 2026-12-10"


# ------------------------------------------------------------------------------------------------
# Open findings for the next fill
# ------------------------------------------------------------------------------------------------


def test_a_filled_order_is_judged_through_the_drafted_next_prescription() -> None:
    drug = picture_of(frp_course()).drugs[0]
    assert drug.next_fill_order == DRAFTED_NEXT
    assert (drug.drug, drug.category_label, drug.category_source) == (
        "lenalidomide",
        "Adult Female Who Can Get Pregnant",
        CategorySource.ORDER,
    )
    assert drug.authorization.present and drug.authorization.number == "12345678"
    assert (drug.authorization.on_order, drug.authorization.note) == ("MedicationRequest/rx1", AUTHORIZATION_ON_ORDER)
    codes = [c.code for c in drug.findings]
    # The draft never carries an authorization number (the pharmacist enters the REMS's new one): that is said
    # once in the authorization box, not as a finding about the chart.
    assert "authorization-missing" not in codes
    assert drug.authorization.next_prescription == NEXT_NEEDS_NUMBER
    assert codes[:1] == ["pregnancy-test-stale"]
    assert set(codes[1:]) == {"early-refill", "earliest-dispense", "pregnancy-test-plan"}
    assert {c.code for c in drug.passed} == {
        "check-cbc",
        "check-renal",
        "check-concurrent-imid",
        "check-vte-prophylaxis",
        "check-coverage",
    }
    assert all(c.severity == "info" and not c.blocking for c in drug.passed)


def test_findings_are_blocking_first_then_by_severity() -> None:
    # A woman on an order documenting the male category (a critical finding, but not a REMS hard stop),
    # filled 10 Nov (17 days left: early refill), no VTE prophylaxis, no CBC (info, by protocol default).
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 10), 9), category="adult-male"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 10))),),
        clean=False,
    )
    loaded = load(chart)
    drug = patient_picture(loaded, now=NOW, zone=NY, config=default_config()).drugs[0]
    assert [(c.code, c.severity, c.blocking) for c in drug.findings] == [
        ("risk-category-mismatch", "critical", False),
        ("early-refill", "warning", False),
        ("cbc-overdue", "info", False),
        ("vte-prophylaxis-missing", "info", False),
        ("earliest-dispense", "info", False),
    ]
    # The pre-check list itself puts the mismatch first.
    order = loaded.case.chart.imid_orders[0]
    draft = draft_prescription(order, loaded.index.by_ref[order.reference], "p1", default_config())
    checks, _ = precheck(loaded, draft, drug.status, now=NOW, zone=NY, config=default_config())
    assert checks[0].code == "risk-category-mismatch"
    pre = sorted(c.code for c in checks if not c.code.startswith("check-"))
    assert pre == sorted(["authorization-missing", *(c.code for c in drug.findings)])


def renewal_not_yet_filled() -> PatientChart:
    """rx1 (completed) was filled 27 Oct: 3 days left today, runs out 24 Nov. The prescriber signed rx2 on
    16 Nov without an authorization number; nothing has dispensed it yet."""
    return chart_of(
        patient_json(),
        orders=(
            order_json("rx1", authored=at(date(2026, 10, 27), 9), status="completed"),
            order_json("rx2", authored=at(date(2026, 11, 16), 9), authorization=None),
        ),
        dispenses=(dispense_json("f1", handed=at(date(2026, 10, 27))),),
    )


def test_an_active_order_not_dispensed_yet_is_judged_itself() -> None:
    loaded = load(renewal_not_yet_filled())
    drug = patient_picture(loaded, now=NOW, zone=NY, config=default_config()).drugs[0]
    assert drug.next_fill_order == "MedicationRequest/rx2"
    assert drug.authorization == type(drug.authorization)(False, None, "MedicationRequest/rx2", AUTHORIZATION_MISSING)
    assert drug.findings[0].code == "authorization-missing" and drug.findings[0].blocking
    # Not an early refill of itself: the supply on hand is the 27 Oct fill (rems_status counts rx2 from its
    # start, 23 days; the picture shows what the pharmacy will face).
    assert rems_status(loaded.case, default_config())[0].days_left == 23
    assert "early-refill" not in {c.code for c in drug.findings}
    assert (drug.status.days_left, drug.status.runs_out, drug.status.next_fill_from) == (
        3,
        date(2026, 11, 24),
        TODAY,
    )
    assert drug.status.supply_source == "MedicationDispense/f1"
    assert drug.timeline.next_fill_from == TODAY
    supply = next(c for c in drug.findings if c.code == "earliest-dispense")
    assert supply.summary == "3 days left: runs out 2026-11-24; the pharmacy may dispense from 2026-11-21"


def test_a_first_order_with_no_fill_is_judged_itself() -> None:
    chart = chart_of(patient_json(), orders=(order_json("rx1", authored=at(TODAY, 8), authorization=None),))
    drug = picture_of(chart).drugs[0]
    assert drug.next_fill_order == "MedicationRequest/rx1"
    assert "early-refill" not in {c.code for c in drug.findings}
    assert drug.status.next_fill_from == TODAY and drug.status.days_left is None
    supply = next(c for c in drug.findings if c.code == "earliest-dispense")
    assert (supply.severity, supply.summary) == ("warning", "Days of supply left unknown")
    assert supply.detail == "no earlier supply of lenalidomide on file: MedicationRequest/rx1 is the first fill"
    assert drug.timeline.fills == ()


def test_the_renewal_once_dispensed_is_continued_by_a_draft() -> None:
    chart = chart_of(
        patient_json(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 16), 9)),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 16))),),
    )
    assert picture_of(chart).drugs[0].next_fill_order == DRAFTED_NEXT


def test_a_recently_completed_order_is_continued_by_a_draft() -> None:
    chart = chart_of(
        patient_json(),
        orders=(order_json("rx1", authored=at(date(2026, 10, 20), 9), status="completed"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 10, 20))),),
    )
    drug = picture_of(chart).drugs[0]
    assert drug.status.order == "MedicationRequest/rx1"
    assert drug.next_fill_order == DRAFTED_NEXT
    assert drug.status.days_left == 0


def test_an_unknown_supply_still_gets_findings_and_a_fill_mark() -> None:
    chart = chart_of(
        patient_json(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 1), 9), supply_days=None),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 1)), days=None),),
    )
    drug = picture_of(chart).drugs[0]
    assert drug.status.days_left is None and drug.next_fill_order == DRAFTED_NEXT
    supply = next(c for c in drug.findings if c.code == "earliest-dispense")
    assert (supply.severity, supply.summary) == ("warning", "Days of supply left unknown")
    assert drug.timeline.fills == (FillMark(date(2026, 11, 1), None, None, "MedicationDispense/f1"),)
    assert drug.timeline.end == TODAY + timedelta(days=7)
    ET.fromstring(timeline_svg(drug.timeline))  # noqa: S314 - our own output


# ------------------------------------------------------------------------------------------------
# The patient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "shown"),
    [
        ([{"text": "Ada Lovelace", "given": ["X"], "family": "Y"}], "Ada Lovelace"),
        ([{"given": ["Ada", "Augusta"], "family": "King"}], "Ada Augusta King"),
        ([{"use": "old", "family": "Byron"}, {"use": "official", "given": ["Ada"], "family": "King"}], "Ada King"),
        ([{"use": "nickname", "text": " "}], NO_NAME),
        (None, NO_NAME),
    ],
)
def test_the_patients_name(names: Any, shown: str) -> None:
    assert patient_name(patient_json(name=names) if names is not None else patient_json()) == shown


def test_the_patient_and_chart_problems() -> None:
    chart = chart_of(
        patient_json(name=[{"given": ["Adam"], "family": "Smith"}]),
        orders=(order_json("rx1", authored=at(date(2026, 11, 1), 9)),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 1))),),
        observations=(hcg("undated", taken=None),),
    )
    p = picture_of(chart)
    assert (p.patient_id, p.name, p.birth_date, p.gender, p.today) == ("p1", "Adam Smith", "1960-03-01", "male", TODAY)
    assert [d.drug for d in p.drugs] == ["lenalidomide"]
    assert len(p.problems) == 1 and p.problems[0].startswith("pregnancy test with no usable date: Observation/undated")


def test_no_imid_no_drugs() -> None:
    chart = chart_of(patient_json(), orders=())
    assert picture_of(chart).drugs == ()


# ------------------------------------------------------------------------------------------------
# The drawing
# ------------------------------------------------------------------------------------------------


def test_the_svg_is_xml_labelled_and_has_one_element_per_mark() -> None:
    t = timeline_of(frp_course())
    text = timeline_svg(t, id_prefix="len")
    svg = ET.fromstring(text)  # noqa: S314 - our own output
    assert svg.tag == f"{SVG}svg"
    assert (svg.get("role"), svg.get("aria-labelledby"), svg.get("width")) == ("img", "len-title len-desc", "100%")
    assert svg.get("viewBox") == "0 0 720 136"
    title, desc = svg.find(f"{SVG}title"), svg.find(f"{SVG}desc")
    assert title is not None and title.get("id") == "len-title"
    assert title.text == "Pregnancy tests and fills, 2026-05-22 to 2026-12-10"
    assert desc is not None and desc.get("id") == "len-desc"
    assert desc.text == (
        "Pregnancy tests and fills, 2026-05-22 to 2026-12-10: 2 negative, 0 positive, 1 missing, 1 overdue; "
        "3 fills; next test due 2026-11-17; next fill from 2026-12-03; supply runs out 2026-12-10."
    )
    marked = [e for e in svg.iter() if e.get("data-kind")]
    assert [(e.get("data-kind"), e.get("data-day")) for e in marked] == [
        ("fill", "2026-05-01"),
        ("fill", "2026-10-15"),
        ("fill", "2026-11-12"),
        ("today", "2026-11-21"),
        ("next-test", "2026-11-17"),
        ("next-fill", "2026-12-03"),
        ("negative", "2026-10-13"),
        ("negative", "2026-11-03"),
        ("missing", "2026-11-12"),
        ("overdue", "2026-11-17"),
    ]
    for e in marked:
        tip = e.find(f"{SVG}title")
        assert tip is not None and tip.text and e.get("data-day", "") in tip.text
    classes = {c for e in svg.iter() for c in (e.get("class") or "").split()}
    assert classes >= {"tl-negative", "tl-missing", "tl-window", "tl-fill", "tl-today", "tl-next-test", "tl-next-fill"}
    windows = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "tl-window"]
    assert [(w.get("data-from"), w.get("data-to")) for w in windows] == [
        ("2026-10-13", "2026-10-20"),
        ("2026-11-03", "2026-11-10"),
    ]
    # Shapes differ, not only colours: circle, hollow dashed ring with "!", diamond.
    negative = next(e for e in marked if e.get("data-kind") == "negative")
    assert negative.find(f"{SVG}circle") is not None
    missing = next(e for e in marked if e.get("data-kind") == "missing")
    ring = missing.find(f"{SVG}circle")
    assert ring is not None and ring.get("stroke-dasharray") and ring.get("fill") == "#ffffff"
    assert [x.text for x in missing.iter(f"{SVG}text")] == ["!"]


def test_the_positive_marker_is_a_diamond() -> None:
    chart = chart_of(
        woman(),
        orders=(order_json("rx1", authored=at(date(2026, 11, 12), 9), category="adult-female-rp"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 12))),),
        observations=(hcg("pos", taken=at(date(2026, 11, 14), 9), result="Positive"),),
    )
    svg = ET.fromstring(timeline_svg(timeline_of(chart)))  # noqa: S314 - our own output
    positive = next(e for e in svg.iter() if e.get("data-kind") == "positive")
    assert "tl-positive" in (positive.get("class") or "")
    assert positive.find(f"{SVG}polygon") is not None


def test_text_from_the_chart_is_escaped() -> None:
    evil = "<script>alert('x')</script> & Co"
    chart = chart_of(
        {**woman(), "name": [{"text": evil}]},
        orders=(order_json("rx1", authored=at(date(2026, 11, 12), 9), category="adult-female-rp"),),
        dispenses=(dispense_json("f1", handed=at(date(2026, 11, 12))),),
        observations=(hcg("h1", taken=at(date(2026, 11, 11), 9), text=evil),),
    )
    p = picture_of(chart)
    assert p.name == evil
    t = p.drugs[0].timeline
    assert t.tests[0].text == evil
    text = timeline_svg(t, label=f"{p.name}: lenalidomide")
    assert "<script>" not in text and "& Co" not in text
    svg = ET.fromstring(text)  # noqa: S314 - our own output
    title = svg.find(f"{SVG}title")
    assert (
        title is not None and title.text == f"{evil}: lenalidomide: Pregnancy tests and fills, 2026-05-22 to 2026-12-10"
    )
    assert not list(svg.iter("script")) and not list(svg.iter(f"{SVG}script"))
    negative = next(e for e in svg.iter() if e.get("data-kind") == "negative")
    tip = negative.find(f"{SVG}title")
    assert tip is not None and tip.text == f"2026-11-11: {evil} (Observation/h1)"


def test_two_timelines_get_different_ids_by_default() -> None:
    a = timeline_of(frp_course())
    b = timeline_of(renewal_not_yet_filled())
    id_a = ET.fromstring(timeline_svg(a)).get("aria-labelledby")  # noqa: S314 - our own output
    id_b = ET.fromstring(timeline_svg(b)).get("aria-labelledby")  # noqa: S314 - our own output
    assert id_a and id_b and id_a != id_b
