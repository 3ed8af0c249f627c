"""Refill drafting and pre-checks, pure (`cds_hooks.refills`): which active IMiD orders get a drafted next
prescription, what that prescription says, its pre-checks and the pregnancy-test plan, and the clinic-local
day arithmetic behind them.

Two kinds of charts: the seeded population (`sandbox.seed`, built in process, as the scan would read it
from the server), whose manifest says what must be drafted and which rules must fire; and small hand-made
FHIR charts (an adult man or a woman who can get pregnant on lenalidomide, one dispense), where each test
sets only the fact it is about. The clock: Saturday 21 November 2026, 10:00 in New York (EST, UTC-05:00).
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_hooks import refills
from cds_hooks.cards import draft_identifier
from cds_hooks.refill_store import Check
from cds_hooks.refills import (
    Loaded,
    PatientChart,
    PatientPlan,
    Planned,
    describe_failure,
    infusion_appointments,
    load_chart,
    plan_patient,
    status_for,
)
from fhir_mappings.errors import InvalidInput
from rems.config import default_config
from rems.findings import RULES
from rems.status import RemsStatus
from sandbox.seed import generate, plan
from tests.support.seed_charts import CHART_KEYS, charts_of, searchset

Json = dict[str, Any]

NY = ZoneInfo("America/New_York")
AUCKLAND = ZoneInfo("Pacific/Auckland")
"""East of UTC: UTC+13:00 in November (NZDT)."""
TODAY = date(2026, 11, 21)
NOW = datetime.combine(TODAY, time(10, 0), NY)
HORIZON = 10

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
BASE = "https://imid-rems.github.io/fhir"
AUTHORIZATION_SYSTEM = f"{BASE}/sid/rems-authorization"
REFILL_DRAFT_SYSTEM = f"{BASE}/sid/refill-draft"
RISK_CATEGORY_EXTENSION = f"{BASE}/StructureDefinition/rems-risk-category"
RISK_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/rems-risk-category"

HARD_STOPS = frozenset(code.value for code, info in RULES.items() if info.hard_stop)
NOT_RULES = ("earliest-dispense", "pregnancy-test-plan", "chart-unreadable")


# ------------------------------------------------------------------------------------------------
# Hand-made FHIR charts
# ------------------------------------------------------------------------------------------------


def patient_json(sex: str = "male", born: str = "1960-03-01") -> Json:
    return {"resourceType": "Patient", "id": "p1", "gender": sex, "birthDate": born}


def lenalidomide_order(
    rid: str = "rx1",
    *,
    authored: datetime,
    supply_days: int = 28,
    capsules: int | None = None,
    category: str | None = "adult-male",
    category_note: str | None = None,
    authorization: str | None = "12345678",
    status: str = "active",
) -> Json:
    """Generic lenalidomide 10 mg, 1 capsule daily, `supply_days` days (and as many capsules unless
    `capsules`), no refills; the category as the extension (`category`) and/or in a note."""
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
        "dispenseRequest": {
            "numberOfRepeatsAllowed": 0,
            "quantity": {"value": capsules or supply_days, "unit": "capsule", "system": UCUM, "code": "{capsule}"},
            "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"},
        },
    }
    if category is not None:
        order["extension"] = [
            {"url": RISK_CATEGORY_EXTENSION, "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": category}}
        ]
    notes = []
    if authorization is not None:
        order["identifier"] = [{"system": AUTHORIZATION_SYSTEM, "value": authorization}]
        notes.append(f"REMS Authorization #: {authorization}")
    if category_note is not None:
        notes.append(f"Risk category: {category_note}")
    if notes:
        order["note"] = [{"text": "\n".join(notes)}]
    return order


def dispense_json(rid: str, order_id: str, *, handed: datetime, days: int = 28) -> Json:
    return {
        "resourceType": "MedicationDispense",
        "id": rid,
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "602910"}]},
        "authorizingPrescription": [{"reference": f"MedicationRequest/{order_id}"}],
        "daysSupply": {"value": days, "unit": "day", "system": UCUM, "code": "d"},
        "whenHandedOver": handed.isoformat(),
    }


def pregnancy_test(rid: str, *, taken: datetime, result: str = "Negative") -> Json:
    code = {"Negative": "260385009", "Positive": "10828004"}[result]
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "2106-3"}]},
        "effectiveDateTime": taken.isoformat(),
        "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": code}], "text": result},
    }


def hysterectomy() -> Json:
    return {
        "resourceType": "Procedure",
        "id": "proc1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": SNOMED, "code": "236886002", "display": "Hysterectomy"}]},
        "performedDateTime": "2015-05-04",
    }


def appointment(rid: str, *, start: str, status: str = "booked", service: str = "Infusion") -> Json:
    return {
        "resourceType": "Appointment",
        "id": rid,
        "status": status,
        "serviceType": [{"text": service}],
        "description": f"{service} visit",
        "start": start,
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
    }


def aspirin() -> Json:
    return {
        "resourceType": "MedicationRequest",
        "id": "asa",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "authoredOn": "2026-01-05T10:00:00-05:00",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "243670", "display": "aspirin 81 MG"}]},
    }


def lab(rid: str, code: str, value: float, *, taken: datetime) -> Json:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": taken.isoformat(),
        "valueQuantity": {"value": value, "unit": "10*3/uL", "system": UCUM, "code": "10*3/uL"},
    }


def cbc(taken: datetime) -> tuple[Json, ...]:
    """A normal CBC: ANC and platelets."""
    return (lab("anc", "751-8", 2.4, taken=taken), lab("plt", "777-3", 210, taken=taken))


def chart_of(
    patient: Json,
    *,
    orders: tuple[Json, ...] = (),
    dispenses: tuple[Json, ...] = (),
    observations: tuple[Json, ...] = (),
    procedures: tuple[Json, ...] = (),
    appointments: tuple[Json, ...] = (),
) -> PatientChart:
    prefetch = {
        "medications": searchset(orders),
        "dispenses": searchset(dispenses),
        "observations": searchset(observations),
        "conditions": searchset(()),
        "procedures": searchset(procedures),
    }
    return PatientChart(patient, prefetch, appointments)


def handed_over(days_left: int, *, today: date = TODAY, zone: tzinfo = NY, supply: int = 28) -> datetime:
    """Noon (clinic-local) of the day a `supply`-day fill was handed over that leaves `days_left` today."""
    return datetime.combine(today + timedelta(days=days_left - supply), time(12, 0), zone)


def on_supply(
    days_left: int,
    *,
    patient: Json | None = None,
    today: date = TODAY,
    zone: tzinfo = NY,
    observations: tuple[Json, ...] = (),
    procedures: tuple[Json, ...] = (),
    appointments: tuple[Json, ...] = (),
    clean: bool = True,
    **order: Any,
) -> PatientChart:
    """A patient (default: an adult man) whose active order `rx1` was signed and filled (28 days) so that
    `days_left` are left `today`. `clean`: aspirin on file and a normal CBC yesterday, so no clinical-review
    flag is raised."""
    handed = handed_over(days_left, today=today, zone=zone)
    signed = handed.replace(hour=9)
    extras = (aspirin(),) if clean else ()
    labs = cbc(datetime.combine(today - timedelta(days=1), time(8, 0), zone)) if clean else ()
    return chart_of(
        patient or patient_json(),
        orders=(lenalidomide_order("rx1", authored=signed, **order), *extras),
        dispenses=(dispense_json("fill1", "rx1", handed=handed),),
        observations=(*observations, *labs),
        procedures=procedures,
        appointments=appointments,
    )


def woman(born: str = "1990-06-01") -> Json:
    return patient_json("female", born)


def plan_of(chart: PatientChart, *, now: datetime = NOW, zone: tzinfo = NY, horizon: int = HORIZON) -> PatientPlan:
    return plan_patient(chart, now=now, zone=zone, config=default_config(), horizon_days=horizon)


def only(result: PatientPlan) -> Planned:
    assert len(result.planned) == 1, (result.planned, result.skipped)
    return result.planned[0]


def rule_codes(checks: tuple[Check, ...]) -> set[str]:
    return {c.code for c in checks if not c.code.startswith("check-") and c.code not in NOT_RULES}


def check(checks: tuple[Check, ...], code: str) -> Check:
    found = [c for c in checks if c.code == code]
    assert len(found) == 1, (code, [c.code for c in checks])
    return found[0]


def status_of(chart: PatientChart, *, now: datetime = NOW, zone: tzinfo = NY) -> tuple[Loaded, RemsStatus]:
    loaded = load_chart(chart, now=now, zone=zone, config=default_config())
    status = status_for(loaded, "MedicationRequest/rx1", default_config())
    assert status is not None
    return loaded, status


# ------------------------------------------------------------------------------------------------
# The seeded population: drafted exactly as planned
# ------------------------------------------------------------------------------------------------

SEEDED = 120


def test_seeded_population_is_drafted_exactly_as_planned() -> None:
    plans = plan(SEEDED, 1, TODAY)
    charts = charts_of(generate(SEEDED, seed=1, today=TODAY, zone="America/New_York"))
    assert {p.days_left for p in plans} >= {0, 7, 8, 10, 11}  # both sides of the horizon and of the 7 days
    drafted = 0
    for p in plans:
        c = charts.by_patient[p.patient_id]
        prefetch = {key: searchset(c[rtype]) for rtype, key in CHART_KEYS.items()}
        result = plan_of(PatientChart(c["Patient"][0], prefetch, tuple(c["Appointment"])))
        active = f"MedicationRequest/{p.active_order}"
        assert result.current_orders == {active}, p.patient_id
        if p.days_left > HORIZON:
            assert result.planned == ()
            assert [(s.order, s.reason, s.days_left) for s in result.skipped] == [
                (active, f"{p.days_left} days left", p.days_left)
            ]
            continue
        drafted += 1
        d = only(result)
        assert (d.draft.patient_id, d.draft.prior_order, d.draft.drug) == (p.patient_id, active, p.drug.value)
        assert (d.draft.days_left, d.draft.runs_out) == (p.days_left, p.runs_out), p.patient_id
        assert d.draft.earliest_dispense == max(TODAY, p.runs_out - timedelta(days=7)), p.patient_id
        want = set(p.expected_rules) - {"prescriber-not-specialist"} | {"authorization-missing"}
        assert rule_codes(d.checks) == want, (p.patient_id, p.problems)
        assert {c.code for c in d.checks if c.blocking} == want & HARD_STOPS, p.patient_id
        supply = check(d.checks, "earliest-dispense")
        assert supply.summary.startswith(f"{p.days_left} days left: runs out {p.runs_out.isoformat()}")
        assert (d.draft.next_test_due is None) == (not p.category.can_get_pregnant), p.patient_id
    assert drafted == sum(1 for p in plans if p.days_left <= HORIZON) == 82


# ------------------------------------------------------------------------------------------------
# When a draft is made
# ------------------------------------------------------------------------------------------------


def test_ten_days_left_is_drafted() -> None:
    d = only(plan_of(on_supply(10)))
    assert (d.draft.days_left, d.draft.runs_out, d.draft.earliest_dispense) == (
        10,
        date(2026, 12, 1),
        date(2026, 11, 24),
    )
    assert (d.draft.patient_id, d.draft.prior_order, d.draft.drug) == ("p1", "MedicationRequest/rx1", "lenalidomide")


def test_eleven_days_left_is_not_drafted_yet() -> None:
    result = plan_of(on_supply(11))
    assert result.planned == ()
    assert [(s.order, s.reason, s.days_left) for s in result.skipped] == [("MedicationRequest/rx1", "11 days left", 11)]
    assert result.current_orders == {"MedicationRequest/rx1"}


def test_the_horizon_is_configurable() -> None:
    assert only(plan_of(on_supply(11), horizon=11)).draft.days_left == 11
    assert plan_of(on_supply(10), horizon=9).planned == ()
    assert only(plan_of(on_supply(0), horizon=0)).draft.runs_out == TODAY


def test_a_supply_that_cannot_be_worked_out_is_skipped_and_said() -> None:
    order = lenalidomide_order("rx1", authored=datetime(2026, 11, 10, 9, 0, tzinfo=NY))
    del order["dispenseRequest"]
    order["dosageInstruction"][0] = {"text": "Take as directed"}
    result = plan_of(chart_of(patient_json(), orders=(order,)))
    assert result.planned == ()
    assert [(s.reason, s.days_left) for s in result.skipped] == [
        ("supply unknown: days left cannot be worked out", None)
    ]


def test_an_active_order_signed_after_the_last_fill_and_not_dispensed_is_the_next_fill() -> None:
    handed = handed_over(3)
    renewal = lenalidomide_order("rx2", authored=handed + timedelta(days=20))  # the prescriber renewed already
    chart = chart_of(
        patient_json(),
        orders=(lenalidomide_order("rx1", authored=handed.replace(hour=9), status="completed"), renewal),
        dispenses=(dispense_json("fill1", "rx1", handed=handed),),
    )
    result = plan_of(chart)
    assert result.planned == ()
    assert [(s.order, s.reason, s.days_left) for s in result.skipped] == [
        ("MedicationRequest/rx2", "not dispensed yet: it is the next fill", 23)  # counted from its start
    ]
    assert result.current_orders == {"MedicationRequest/rx2"}

    # Once that order is dispensed (16 Nov, 28 days: runs out 14 Dec), it is the one to continue.
    filled = dispense_json("fill2", "rx2", handed=handed + timedelta(days=20))
    dispensed = chart_of(
        patient_json(),
        orders=(lenalidomide_order("rx1", authored=handed.replace(hour=9), status="completed"), renewal),
        dispenses=(dispense_json("fill1", "rx1", handed=handed), filled),
    )
    assert plan_of(dispensed).planned == ()
    d = only(plan_of(dispensed, horizon=28))
    assert (d.draft.prior_order, d.draft.days_left, d.draft.runs_out) == (
        "MedicationRequest/rx2",
        23,
        date(2026, 12, 14),
    )


# ------------------------------------------------------------------------------------------------
# The drafted prescription
# ------------------------------------------------------------------------------------------------


def test_the_draft_is_a_new_order_continuing_the_active_one() -> None:
    d = only(plan_of(on_supply(5)))
    mr = d.draft.medication_request
    assert "id" not in mr and "authoredOn" not in mr and "requester" not in mr
    assert (mr["resourceType"], mr["status"], mr["intent"]) == ("MedicationRequest", "draft", "order")
    assert mr["priorPrescription"] == {"reference": "MedicationRequest/rx1"}
    assert mr["subject"] == {"reference": "Patient/p1"}
    assert mr["medicationCodeableConcept"]["coding"][0]["code"] == "602910"
    assert mr["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    assert mr["dispenseRequest"]["expectedSupplyDuration"] == {"value": 28, "unit": "days", "system": UCUM, "code": "d"}
    assert mr["dispenseRequest"]["quantity"]["value"] == 28
    assert mr["identifier"] == [{"system": REFILL_DRAFT_SYSTEM, "value": draft_identifier("MedicationRequest/rx1")}]
    assert not any("Authorization" in n["text"] for n in mr["note"])


@pytest.mark.parametrize(("ordered", "drafted"), [(28, 28), (21, 21), (14, 14), (30, 28), (56, 28)])
def test_the_drafted_supply_is_the_orders_up_to_28_days(ordered: int, drafted: int) -> None:
    d = only(plan_of(on_supply(4, supply_days=ordered)))
    assert d.draft.medication_request["dispenseRequest"]["expectedSupplyDuration"]["value"] == drafted
    assert d.draft.medication_request["dispenseRequest"]["quantity"]["value"] == drafted
    assert rule_codes(d.checks) == {"authorization-missing"}  # no supply-over-28-days on the draft


def test_the_documented_category_is_carried_over_but_no_authorization_number() -> None:
    d = only(plan_of(on_supply(5, category="adult-male", authorization="87654321")))
    mr = d.draft.medication_request
    assert mr["extension"] == [
        {
            "url": RISK_CATEGORY_EXTENSION,
            "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": "adult-male", "display": "Adult Male"},
        }
    ]
    assert [i["system"] for i in mr["identifier"]] == [REFILL_DRAFT_SYSTEM]
    assert "87654321" not in repr(mr)
    assert rule_codes(d.checks) == {"authorization-missing"}
    assert check(d.checks, "authorization-missing").blocking is True


def test_a_category_documented_only_in_the_orders_note_is_carried_over() -> None:
    d = only(plan_of(on_supply(5, category=None, category_note="Adult Male")))
    assert d.draft.medication_request["extension"][0]["valueCoding"]["code"] == "adult-male"
    assert "risk-category-missing" not in rule_codes(d.checks)


def test_a_category_the_chart_merely_suggests_is_not_written() -> None:
    d = only(plan_of(on_supply(5, category=None)))  # a man: the chart suggests adult-male, the order says nothing
    mr = d.draft.medication_request
    assert "extension" not in mr
    assert not any("risk category" in n["text"].lower() for n in mr.get("note", []))
    assert rule_codes(d.checks) == {"authorization-missing", "risk-category-missing"}
    assert {c.code for c in d.checks if c.blocking} == {"authorization-missing", "risk-category-missing"}


# ------------------------------------------------------------------------------------------------
# Pre-checks
# ------------------------------------------------------------------------------------------------


def test_blocking_checks_are_the_rems_hard_stops_only() -> None:
    # A woman who can get pregnant, no test on file, nothing for thromboprophylaxis, no CBC, 9 days left.
    d = only(plan_of(on_supply(9, patient=woman(), category="adult-female-rp", clean=False)))
    assert rule_codes(d.checks) == {
        "authorization-missing",
        "pregnancy-test-missing",
        "early-refill",
        "cbc-overdue",
        "vte-prophylaxis-missing",
    }
    assert {c.code for c in d.checks if c.blocking} == {"authorization-missing", "pregnancy-test-missing"}
    assert {c.code: c.severity for c in d.checks if c.blocking} == {
        "authorization-missing": "critical",
        "pregnancy-test-missing": "critical",
    }
    passed = [c for c in d.checks if c.code.startswith("check-")]
    assert {c.code for c in passed} == {"check-renal", "check-concurrent-imid", "check-coverage"}
    assert all(c.severity == "info" and not c.blocking for c in passed)


def test_the_supply_check_says_days_left_run_out_and_earliest_dispense() -> None:
    supply = check(only(plan_of(on_supply(9))).checks, "earliest-dispense")
    assert (supply.severity, supply.blocking) == ("info", False)
    assert supply.summary == "9 days left: runs out 2026-11-30; the pharmacy may dispense from 2026-11-23"
    assert check(only(plan_of(on_supply(0))).checks, "earliest-dispense").severity == "warning"


# ------------------------------------------------------------------------------------------------
# The pregnancy-test plan
# ------------------------------------------------------------------------------------------------


def test_no_test_plan_for_a_man() -> None:
    d = only(plan_of(on_supply(5)))
    assert d.draft.next_test_due is None
    assert [c.code for c in d.checks if c.code == "pregnancy-test-plan"] == []
    assert check(d.checks, "check-pregnancy-test").summary == "No pregnancy test required for this risk category"
    loaded, status = status_of(on_supply(5))
    assert refills.test_plan(status, loaded.appointments, default_config()) == (None, None)


def test_no_test_plan_for_a_woman_who_cannot_get_pregnant() -> None:
    chart = on_supply(5, patient=woman("1958-02-01"), category="adult-female-nrp", procedures=(hysterectomy(),))
    d = only(plan_of(chart))
    assert d.draft.next_test_due is None
    assert "pregnancy-test-plan" not in {c.code for c in d.checks}
    assert rule_codes(d.checks) == {"authorization-missing"}


def frp(days_left: int, *, tests: tuple[Json, ...] = (), appointments: tuple[Json, ...] = ()) -> PatientChart:
    return on_supply(
        days_left, patient=woman(), category="adult-female-rp", observations=tests, appointments=appointments
    )


def test_a_current_negative_test_that_covers_the_earliest_dispense_is_the_plan() -> None:
    # 10 days left: dispensable from 24 Nov; a test of 20 Nov is good through 27 Nov.
    d = only(plan_of(frp(10, tests=(pregnancy_test("hcg1", taken=datetime(2026, 11, 20, 8, 0, tzinfo=NY)),))))
    plan_check = check(d.checks, "pregnancy-test-plan")
    assert plan_check.summary == (
        "Pregnancy test of 2026-11-20 is good through 2026-11-27, which covers the earliest dispense day 2026-11-24"
    )
    assert (plan_check.severity, plan_check.blocking) == ("info", False)
    assert "pregnancy-test-stale" not in rule_codes(d.checks)
    assert d.draft.next_test_due == date(2026, 11, 27)  # weekly in the first 4 weeks of therapy


def test_an_infusion_visit_inside_the_window_is_where_the_test_is_drawn() -> None:
    # 10 days left: the window is 21 Nov (today) .. 30 Nov (the day before it runs out).
    visits = (
        appointment("late", start="2026-12-02T09:00:00-05:00"),  # outside: after the supply ran out
        appointment("cancelled", start="2026-11-23T09:00:00-05:00", status="cancelled"),
        appointment("clinic", start="2026-11-24T09:00:00-05:00", service="Follow-up clinic visit"),
        appointment("inf", start="2026-11-26T13:00:00-05:00"),
    )
    d = only(plan_of(frp(10, appointments=visits)))
    plan_check = check(d.checks, "pregnancy-test-plan")
    assert plan_check.summary == (
        "Draw the pregnancy test at the infusion visit on 2026-11-26: it allows dispensing 2026-11-26 to 2026-12-03"
    )
    assert plan_check.detail == "Appointment/inf: Infusion visit"
    assert d.draft.next_test_due == date(2026, 11, 26)


def test_visits_that_do_not_fit_leave_the_window_to_draw_in() -> None:
    visits = (
        appointment("late", start="2026-12-10T09:00:00-05:00"),  # after the supply runs out
        appointment("cancelled", start="2026-11-23T09:00:00-05:00", status="cancelled"),
        appointment("clinic", start="2026-11-24T09:00:00-05:00", service="Follow-up clinic visit"),
    )
    # 18 days left (horizon 20): dispensable from 2 Dec, so the test can be drawn from 25 Nov.
    d = only(plan_of(frp(18, appointments=visits), horizon=20))
    plan_check = check(d.checks, "pregnancy-test-plan")
    assert plan_check.summary == (
        "Draw the next pregnancy test between 2026-11-25 and 2026-12-02: it must be at most 7 days old on the "
        "earliest dispense day 2026-12-02"
    )
    assert plan_check.severity == "info"
    assert d.draft.next_test_due == date(2026, 12, 2)
    # 10 days left: the window opens today.
    d = only(plan_of(frp(10, appointments=visits)))
    assert check(d.checks, "pregnancy-test-plan").summary.startswith(
        "Draw the next pregnancy test between 2026-11-21 and 2026-11-24:"
    )
    assert d.draft.next_test_due == date(2026, 11, 24)


def test_a_refill_dispensable_now_needs_the_test_today() -> None:
    d = only(plan_of(frp(5)))
    plan_check = check(d.checks, "pregnancy-test-plan")
    assert plan_check.summary == "Draw the next pregnancy test today (2026-11-21): the refill can be dispensed now"
    assert plan_check.severity == "warning"
    assert d.draft.next_test_due == TODAY


def test_test_plan_takes_the_first_infusion_visit_in_the_window() -> None:
    # 18 days left: dispensable from 2 Dec; a test is good for 7 days, so the window opens 25 Nov.
    loaded, status = status_of(frp(18))
    assert loaded.appointments == ()
    visits = (
        (date(2026, 11, 22), "Appointment/a1", "too early"),
        (date(2026, 11, 25), "Appointment/a2", "first that fits"),
        (date(2026, 11, 28), "Appointment/a3", ""),
    )
    plan_check, day = refills.test_plan(status, visits, default_config())
    assert day == date(2026, 11, 25)
    assert plan_check is not None and plan_check.detail == "Appointment/a2: first that fits"
    # A 14-day validity (configurable) opens the window today: the visit of 22 Nov fits.
    config = default_config()
    config = dataclasses.replace(config, rems=dataclasses.replace(config.rems, test_valid_days=14))
    plan_check, day = refills.test_plan(status, visits, config)
    assert day == date(2026, 11, 22)
    assert plan_check is not None and plan_check.summary.endswith("it allows dispensing 2026-11-22 to 2026-12-06")


# ------------------------------------------------------------------------------------------------
# Clinic-local days
# ------------------------------------------------------------------------------------------------


def test_appointment_days_are_clinic_local_in_new_york() -> None:
    same_evening = (
        appointment("a", start="2026-11-24T23:30:00-05:00"),
        appointment("b", start="2026-11-25T04:30:00Z"),  # the same instant as the server may send it
        appointment("c", start="2026-11-25T05:30:00Z"),  # 00:30 local on 25 Nov
    )
    assert [(d, ref) for d, ref, _ in infusion_appointments(same_evening, NY)] == [
        (date(2026, 11, 24), "Appointment/a"),
        (date(2026, 11, 24), "Appointment/b"),
        (date(2026, 11, 25), "Appointment/c"),
    ]


def test_appointment_days_are_clinic_local_in_auckland() -> None:
    visits = (
        appointment("a", start="2026-11-24T23:30:00+13:00"),
        appointment("b", start="2026-11-24T19:00:00Z"),  # 08:00 NZDT on 25 Nov
        appointment("c", start="2026-11-25T04:30:00Z"),  # 17:30 NZDT on 25 Nov
    )
    assert [(d, ref) for d, ref, _ in infusion_appointments(visits, AUCKLAND)] == [
        (date(2026, 11, 24), "Appointment/a"),
        (date(2026, 11, 25), "Appointment/b"),
        (date(2026, 11, 25), "Appointment/c"),
    ]


def test_appointments_without_a_usable_start_are_skipped() -> None:
    visits = (
        appointment("naive", start="2026-11-24T09:00:00"),
        appointment("bad", start="next tuesday"),
        {**appointment("nostart", start="x"), "start": None},
        {"resourceType": "Encounter", "id": "e", "status": "booked", "start": "2026-11-24T09:00:00Z"},
        appointment("ok", start="2026-11-24T09:00:00Z"),
    )
    assert [ref for _, ref, _ in infusion_appointments(visits, NY)] == ["Appointment/ok"]


def test_a_late_evening_visit_sent_in_utc_counts_on_its_local_day_new_york() -> None:
    # 10 days left: the window ends 30 Nov. 04:30Z on 1 Dec is 23:30 on 30 Nov in New York: inside.
    d = only(plan_of(frp(10, appointments=(appointment("inf", start="2026-12-01T04:30:00Z"),))))
    assert d.draft.next_test_due == date(2026, 11, 30)
    assert "infusion visit on 2026-11-30" in check(d.checks, "pregnancy-test-plan").summary
    # 05:30Z on 1 Dec is 00:30 on 1 Dec, the day the supply runs out: outside.
    d = only(plan_of(frp(10, appointments=(appointment("inf", start="2026-12-01T05:30:00Z"),))))
    assert d.draft.next_test_due == date(2026, 11, 24)
    assert "between 2026-11-21 and 2026-11-24" in check(d.checks, "pregnancy-test-plan").summary


def test_a_morning_visit_sent_in_utc_counts_on_its_local_day_auckland() -> None:
    # In Auckland today is 21 Nov; 19:00Z on 20 Nov is 08:00 NZDT today: inside the window (which opens today).
    now = datetime.combine(TODAY, time(10, 0), AUCKLAND)
    chart = on_supply(
        10,
        patient=woman(),
        category="adult-female-rp",
        zone=AUCKLAND,
        appointments=(appointment("inf", start="2026-11-20T19:00:00Z"),),
    )
    d = only(plan_of(chart, now=now, zone=AUCKLAND))
    assert (d.draft.days_left, d.draft.runs_out) == (10, date(2026, 12, 1))
    assert d.draft.next_test_due == TODAY
    assert "infusion visit on 2026-11-21" in check(d.checks, "pregnancy-test-plan").summary


@pytest.mark.parametrize("zone", [NY, AUCKLAND], ids=["new-york", "auckland"])
def test_local_midnight_moves_days_left_by_one(zone: ZoneInfo) -> None:
    chart = on_supply(10, zone=zone)  # handed over 3 Nov, runs out 1 Dec (clinic-local)
    before = datetime.combine(date(2026, 11, 20), time(23, 59), zone)
    after = datetime.combine(TODAY, time(0, 1), zone)
    assert before.utcoffset() != timedelta(0)  # the UTC day differs from the local one around midnight
    late = plan_of(chart, now=before, zone=zone)
    assert late.planned == () and [s.days_left for s in late.skipped] == [11]
    d = only(plan_of(chart, now=after, zone=zone))
    assert (d.draft.days_left, d.draft.runs_out, d.draft.earliest_dispense) == (
        10,
        date(2026, 12, 1),
        date(2026, 11, 24),
    )


def test_days_left_follow_the_clinic_day_not_the_utc_day() -> None:
    chart = on_supply(10)
    # 23:30 in New York on 21 Nov is 04:30Z on 22 Nov: still 10 days left in the clinic.
    evening = datetime(2026, 11, 21, 23, 30, tzinfo=NY)
    assert only(plan_of(chart, now=evening)).draft.days_left == 10
    assert only(plan_of(chart, now=evening.astimezone(ZoneInfo("UTC")))).draft.days_left == 10


# ------------------------------------------------------------------------------------------------
# Unreadable charts
# ------------------------------------------------------------------------------------------------


def test_an_unreadable_chart_raises_naming_the_field() -> None:
    bad = pregnancy_test("hcg1", taken=datetime(2026, 11, 20, 8, 0, tzinfo=NY))
    bad["effectiveDateTime"] = "yesterday"
    with pytest.raises(InvalidInput) as failure:
        plan_of(frp(5, tests=(bad,)))
    assert failure.value.path == "chart.observations.entry[0].resource.effectiveDateTime"
    assert describe_failure(failure.value).startswith("chart.observations.entry[0].resource.effectiveDateTime: ")
    assert describe_failure(RuntimeError("secret detail")) == "RuntimeError"


def test_the_failure_reason_names_the_field_but_never_its_value() -> None:
    # describe_failure promises "names the field, never a value": the reason goes to the scan report
    # and to the draft's last_error next to the patient id, so a birth date must not be in it.
    with pytest.raises(InvalidInput) as failure:
        plan_of(on_supply(5, patient=patient_json(born="1961-02-30")))
    reason = describe_failure(failure.value)
    assert reason.startswith("patient.birthDate")
    assert "1961-02-30" not in reason
