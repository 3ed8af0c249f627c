"""The sandbox's synthetic IMiD population (`sandbox.seed`): deterministic, valid FHIR R4 that the product
reads as planned, in clinic-like proportions, with the manifest telling the truth about the data.

The check that matters most is `test_the_product_finds_exactly_what_was_planned`: every patient's
active order renewed at order-sign (and at medication-refill), evaluated in process, raises exactly
the rule codes the manifest planned — clean charts none, each injected problem its rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhir_mappings.codes import default_codes
from fhir_mappings.medication import AUTHORIZATION_SYSTEM, RISK_CATEGORY_EXTENSION
from rems.config import default_config
from rems.model import Drug, RiskCategory
from sandbox import seed, seed_plan
from sandbox.seed import BLOCK, CLEAN, PROBLEMS, STAFF, PatientPlan, generate, main, plan, write
from tests.support.seed_charts import (
    charts_of,
    evaluate,
    medication_refill,
    order_sign,
    other_topics,
    prefetch_of,
    rule_codes,
)

TODAY = date(2026, 11, 21)
NEW_YORK = "America/New_York"
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}([+-]\d{2}:\d{2}|Z)$")
Json = dict[str, Any]


def resources(bundles: list[Json]) -> Iterator[Json]:
    for bundle in bundles:
        for entry in bundle["entry"]:
            yield entry["resource"]


@pytest.fixture(scope="module")
def sixty() -> list[Json]:
    return list(generate(60, 7, TODAY))


@pytest.fixture(scope="module")
def sixty_plans() -> list[PatientPlan]:
    return plan(60, 7, TODAY)


# --- determinism ----------------------------------------------------------------------------------


def test_same_arguments_give_the_same_bytes(sixty: list[Json]) -> None:
    again = [orjson.dumps(b) for b in generate(60, 7, TODAY)]
    assert [orjson.dumps(b) for b in sixty] == again
    assert plan(60, 7, TODAY) == plan(60, 7, TODAY)


def test_a_different_seed_gives_a_different_population(sixty: list[Json], sixty_plans: list[PatientPlan]) -> None:
    other = list(generate(60, 8, TODAY))
    assert [orjson.dumps(b) for b in other] != [orjson.dumps(b) for b in sixty]
    other_plans = plan(60, 8, TODAY)
    assert [(p.category, p.drug, p.problems) for p in other_plans] != [
        (p.category, p.drug, p.problems) for p in sixty_plans
    ]
    # the ids are the same (loading another seed replaces the population, it never adds to it)
    assert {r["id"] for r in resources(other) if r["resourceType"] == "Patient"} == {
        r["id"] for r in resources(sixty) if r["resourceType"] == "Patient"
    }


def test_a_patient_is_the_same_whatever_the_population_size(sixty: list[Json]) -> None:
    assert plan(25, 7, TODAY) == plan(60, 7, TODAY)[:25]
    small = next(generate(25, 7, TODAY))["entry"]
    assert [orjson.dumps(e) for e in small] == [orjson.dumps(e) for e in sixty[0]["entry"][: len(small)]]


def test_bundles_hold_fifty_patients_and_the_clinic_comes_first(sixty: list[Json]) -> None:
    assert len(sixty) == 2 and BLOCK == 50
    patients = [[r["id"] for r in b_res if r["resourceType"] == "Patient"] for b_res in (resources([b]) for b in sixty)]
    assert [len(p) for p in patients] == [50, 10]
    first_types = [e["resource"]["resourceType"] for e in sixty[0]["entry"][: 3 + 2 * len(STAFF)]]
    assert first_types.count("Practitioner") == len(STAFF) and "Patient" not in first_types
    assert not any(r["resourceType"] in ("Practitioner", "PractitionerRole") for r in resources(sixty[1:]))
    assert {b["type"] for b in sixty} == {"batch"}
    assert {b["type"] for b in generate(3, 7, TODAY, bundle_type="transaction")} == {"transaction"}


def test_no_patients_is_just_the_clinic() -> None:
    (only,) = generate(0, 7, TODAY)
    assert {r["resourceType"] for r in resources([only])} == {
        "Organization",
        "Location",
        "Practitioner",
        "PractitionerRole",
    }
    with pytest.raises(ValueError, match="patients"):
        next(generate(-1, 7, TODAY))


# --- ids and references ---------------------------------------------------------------------------


def test_ids_are_valid_unique_and_put_at_their_own_url(sixty: list[Json]) -> None:
    seen: set[str] = set()
    for bundle in sixty:
        for entry in bundle["entry"]:
            r = entry["resource"]
            assert FHIR_ID.match(r["id"]), r["id"]
            key = f"{r['resourceType']}/{r['id']}"
            assert key not in seen, key
            seen.add(key)
            assert entry["request"] == {"method": "PUT", "url": key}
    assert len(seen) > 60 * 40


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def test_every_reference_resolves_within_the_dataset(sixty: list[Json]) -> None:
    known = {f"{r['resourceType']}/{r['id']}" for r in resources(sixty)}
    refs = [ref for r in resources(sixty) for ref in _references(r)]
    assert len(refs) > 60 * 80
    assert sorted(set(refs) - known) == []


def test_dates_carry_the_clinic_zone_offset_of_their_day() -> None:
    for zone in ("America/New_York", "Asia/Tokyo"):
        tz = ZoneInfo(zone)
        offsets: set[str] = set()
        for r in resources(list(generate(8, 3, TODAY, zone))):
            for key in ("authoredOn", "effectiveDateTime", "whenHandedOver", "start"):
                value = r.get(key)
                if not isinstance(value, str) or "T" not in value:
                    continue
                assert DATETIME.match(value), value
                moment = datetime.fromisoformat(value)
                assert moment.utcoffset() == moment.replace(tzinfo=tz).utcoffset(), value
                offsets.add(value[-6:])
        # New York data spans the end of daylight saving time (months of history before 21 November)
        assert offsets == ({"-04:00", "-05:00"} if zone == "America/New_York" else {"+09:00"})


# --- what the population looks like ---------------------------------------------------------------


def test_sixty_patients_cover_every_category_drug_and_problem(sixty_plans: list[PatientPlan]) -> None:
    assert {p.category for p in sixty_plans} == set(RiskCategory)
    assert {p.drug for p in sixty_plans} == set(Drug)
    first_block = {q for p in sixty_plans[:BLOCK] for q in p.problems}
    assert first_block == {*PROBLEMS, CLEAN}
    assert any(p.days_left <= 7 for p in sixty_plans) and any(p.days_left > 10 for p in sixty_plans)


def test_proportions_look_like_a_myeloma_clinic() -> None:
    plans = plan(2000, 11, TODAY)
    n = len(plans)
    category = Counter(p.category for p in plans)
    assert 0.45 < category[RiskCategory.ADULT_MALE] / n < 0.65
    assert 0.25 < category[RiskCategory.ADULT_FEMALE_NRP] / n < 0.45
    assert 0.03 < category[RiskCategory.ADULT_FEMALE_RP] / n < 0.12
    children = sum(category[c] for c in RiskCategory if not c.is_adult)
    assert 0 < children / n < 0.05
    drug = Counter(p.drug for p in plans)
    assert drug[Drug.LENALIDOMIDE] > drug[Drug.POMALIDOMIDE] > drug[Drug.THALIDOMIDE] > 0.05 * n
    assert sum("myeloma" in p.indication for p in plans) / n > 0.6
    lenalidomide = {p.indication for p in plans if p.drug is Drug.LENALIDOMIDE}
    assert lenalidomide >= {
        "myeloma-maintenance",
        "myeloma",
        "mds-del5q",
        "mantle-cell-lymphoma",
        "follicular-lymphoma",
        "marginal-zone-lymphoma",
    }
    assert {p.indication for p in plans if p.drug is Drug.POMALIDOMIDE} >= {"myeloma-relapsed", "kaposi-sarcoma-hiv"}
    assert {p.indication for p in plans if p.drug is Drug.THALIDOMIDE} == {"myeloma", "erythema-nodosum-leprosum"}
    assert all(p.drug is Drug.THALIDOMIDE for p in plans if p.is_child)
    assert 0.4 < sum(p.clean for p in plans) / n < 0.75
    problems = Counter(q for p in plans for q in p.problems)
    assert all(0 < problems[q] / n < 0.15 for q in PROBLEMS), problems
    rp = [p for p in plans if p.category.can_get_pregnant]
    assert 0.1 < sum(p.problems[0] in ("stale-test", "missing-test", "positive-test") for p in rp) / len(rp) < 0.45
    due = sum(p.days_left <= 7 for p in plans) / n
    assert 0.35 < due < 0.7
    assert 0.1 < sum(8 <= p.days_left <= 10 for p in plans) / n < 0.3
    ages = sorted(p.age for p in plans if "myeloma" in p.indication)
    assert 62 <= ages[len(ages) // 2] <= 74  # median age at myeloma diagnosis is about 69


# --- valid FHIR, the product's codes --------------------------------------------------------------


def test_every_resource_of_sixty_patients_is_valid_fhir_r4(sixty: list[Json]) -> None:
    types = Counter()
    for r in resources(sixty):
        get_fhir_model_class(r["resourceType"]).model_validate(r)
        types[r["resourceType"]] += 1
    assert set(types) == {
        "Organization",
        "Location",
        "Practitioner",
        "PractitionerRole",
        "Patient",
        "Condition",
        "Procedure",
        "MedicationRequest",
        "MedicationDispense",
        "Observation",
        "Appointment",
    }


def _codings(node: Any, system: str) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if node.get("system") == system and isinstance(node.get("code"), str):
            found.add(node["code"])
        for v in node.values():
            found |= _codings(v, system)
    elif isinstance(node, list):
        for v in node:
            found |= _codings(v, system)
    return found


def test_the_data_uses_the_codes_the_product_reads(sixty: list[Json]) -> None:
    codes = default_codes()
    by_type: dict[str, list[Json]] = {}
    for r in resources(sixty):
        by_type.setdefault(r["resourceType"], []).append(r)
    imid_codes: set[str] = set()
    for imid in codes.imids:
        imid_codes |= set(imid.generic) | set(imid.brand)
    imid_orders = [m for m in by_type["MedicationRequest"] if not m["id"].endswith("-vte")]
    assert _codings(imid_orders, codes.rxnorm) <= imid_codes
    observed = _codings(by_type["Observation"], codes.loinc)
    read = set(codes.preg_codes) | {codes.age_at_menopause} | set().union(*codes.labs.values())
    assert observed - read == {"718-7"}  # hemoglobin: realism, not read by any rule
    nrp_snomed = set().union(*(s for s, _ in codes.nrp.values()))
    assert _codings(by_type["Procedure"], codes.snomed) <= nrp_snomed
    specialists = set(default_config().coverage.specialist_taxonomy)
    role_codes = {s.role_id: s.taxonomy for s in STAFF}
    assert {role_codes[r] for r in ("sb-role-onc1", "sb-role-onc2", "sb-role-onc3", "sb-role-heme1")} <= specialists
    assert role_codes["sb-role-peds1"] in specialists and role_codes["sb-role-im1"] not in specialists
    assert all(len(s.npi) == 10 and s.npi.isdigit() for s in STAFF)


def test_the_planned_lab_values_steer_by_the_products_protocol() -> None:
    """The generator keeps clean values clear of these thresholds and puts injected ones beyond them: they
    must be the packaged protocol's (rems/data/protocol.toml)."""
    protocol = default_config().protocol
    for drug in Drug:
        p = protocol[drug]
        assert p.anc_hold_below == Decimal(str(seed_plan.ANC_HOLD[drug]))
        assert p.cbc_intensive_weeks == seed_plan.CBC_INTENSIVE_WEEKS[drug]
        held = seed_plan.PLATELET_HOLD.get(drug)
        assert p.platelets_hold_below == (Decimal(str(held)) if held is not None else None)
    assert protocol[Drug.LENALIDOMIDE].crcl_review_below == Decimal(str(seed_plan.CRCL_REVIEW_BELOW))
    assert protocol[Drug.POMALIDOMIDE].creatinine_review_above == Decimal(str(seed_plan.CREATININE_REVIEW_ABOVE))
    assert protocol[Drug.THALIDOMIDE].crcl_review_below is None
    assert protocol[Drug.THALIDOMIDE].creatinine_review_above is None


# --- the manifest agrees with the data ------------------------------------------------------------


def test_the_manifest_agrees_with_the_data(sixty: list[Json], sixty_plans: list[PatientPlan]) -> None:
    charts = charts_of(sixty)
    for p in sixty_plans:
        patient = charts.patient(p.patient_id)
        assert (patient["gender"], patient["birthDate"]) == (p.sex, p.birth_date.isoformat())
        orders = {m["id"]: m for m in charts.of(p.patient_id, "MedicationRequest")}
        imid = [m for i, m in orders.items() if "-rx" in i]
        assert len(imid) == p.cycles
        assert [m["id"] for m in imid if m["status"] == "active"] == [p.active_order]
        active = orders[p.active_order]
        extension = [e for e in active.get("extension", []) if e["url"] == RISK_CATEGORY_EXTENSION]
        if "missing-category" in p.problems:
            assert extension == [] and "Risk category" not in str(active.get("note"))
        else:
            assert [e["valueCoding"]["code"] for e in extension] == [p.category.value]
        has_auth = any(i["system"] == AUTHORIZATION_SYSTEM for i in active.get("identifier", []))
        assert has_auth is ("missing-authorization" not in p.problems)
        assert active["requester"]["reference"] == f"PractitionerRole/{p.prescriber_role}"
        assert active["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
        assert active["dispenseRequest"]["expectedSupplyDuration"]["value"] == 28
        fills = charts.of(p.patient_id, "MedicationDispense")
        assert len(fills) == p.cycles
        last = max(fills, key=lambda d: d["whenHandedOver"])
        assert last["authorizingPrescription"] == [{"reference": f"MedicationRequest/{p.active_order}"}]
        handed = datetime.fromisoformat(last["whenHandedOver"]).date()
        assert handed + timedelta(days=28) == p.runs_out == TODAY + timedelta(days=p.days_left)
        observations = charts.of(p.patient_id, "Observation")
        hcg = [o for o in observations if o["code"]["coding"][0]["code"] in ("2106-3", "21198-7")]
        if not p.category.can_get_pregnant or "missing-test" in p.problems:
            assert hcg == []
        else:
            assert len(hcg) == len(p.pregnancy_tests) > 0
            days = [datetime.fromisoformat(o["effectiveDateTime"]).date() for o in hcg]
            negative = [d for d, (_, positive) in zip(days, p.pregnancy_tests, strict=True) if not positive]
            assert max(negative) == p.last_negative_test
            assert any(positive for _, positive in p.pregnancy_tests) is ("positive-test" in p.problems)
        assert all(datetime.fromisoformat(o["effectiveDateTime"]).date() < TODAY for o in observations)
        vte = orders.get(f"{p.patient_id}-vte")
        if p.antithrombotic is None:
            assert vte is None or vte["status"] == "stopped"
        else:
            assert vte is not None and vte["status"] == "active"
            assert p.antithrombotic in vte["medicationCodeableConcept"]["text"]
        evidence = charts.of(p.patient_id, "Procedure") + [
            c for c in charts.of(p.patient_id, "Condition") if c["id"].endswith("-menopause")
        ]
        if p.category is RiskCategory.ADULT_FEMALE_NRP and "nrp-undocumented" not in p.problems:
            assert evidence or any(o["id"].endswith("-menopause-age") for o in observations)
        if p.category is not RiskCategory.ADULT_FEMALE_NRP:
            assert evidence == []
        infusions = charts.of(p.patient_id, "Appointment")
        assert bool(infusions) is (p.infusion is not None and bool(p.infusions))
    manifest = [p.manifest() for p in sixty_plans]
    assert orjson.loads(orjson.dumps(manifest)) == manifest
    assert {m["patient"] for m in manifest} == {p.patient_id for p in sixty_plans}


def test_expected_rules_follow_the_problems_the_supply_and_the_age() -> None:
    for p in plan(400, 5, TODAY):
        codes = {PROBLEMS[q] for q in p.problems if q != CLEAN}
        assert p.expected_rules - codes == (
            ({"early-refill"} if p.days_left > 7 else set()) | ({"age-under-18"} if p.age < 18 else set())
        )


# --- the product finds exactly what was planned ---------------------------------------------------


@pytest.mark.parametrize(
    ("patients", "seed_", "today", "zone", "clock"),
    [
        (200, 7, TODAY, NEW_YORK, time(10, 0)),
        (60, 12, date(2026, 3, 9), "America/Los_Angeles", time(0, 5)),  # the day after DST starts, just after midnight
        (60, 13, date(2028, 2, 29), "Asia/Tokyo", time(23, 55)),  # leap day, east of UTC, late evening
    ],
)
def test_the_product_finds_exactly_what_was_planned(
    patients: int, seed_: int, today: date, zone: str, clock: time
) -> None:
    tz = ZoneInfo(zone)
    now = datetime.combine(today, clock, tz)
    plans = plan(patients, seed_, today)
    charts = charts_of(generate(patients, seed_, today, zone))
    wrong = []
    for p in plans:
        prefetch = prefetch_of(p, charts)
        signed = evaluate(order_sign(p, prefetch, now), now, tz)
        refill = evaluate(medication_refill(p, prefetch), now, tz)
        assert other_topics(signed) == [] and other_topics(refill) == ["refill-draft"]
        want = sorted(p.expected_rules)
        if rule_codes(signed) != want or rule_codes(refill) != want:
            wrong.append((p.patient_id, p.problems, p.days_left, want, rule_codes(signed), rule_codes(refill)))
        if p.clean and p.days_left <= 7 and not p.is_child:
            assert signed.cards == [], p
    assert wrong == []
    assert any(p.clean for p in plans) and any(not p.clean for p in plans)


# --- write and the command ------------------------------------------------------------------------


def test_write_makes_one_file_per_bundle_and_removes_stale_ones(tmp_path: Path) -> None:
    bundles = list(generate(60, 7, TODAY))
    (tmp_path / "0007.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    paths = write(tmp_path, iter(bundles))
    assert [p.name for p in paths] == ["0000.json", "0001.json"]
    assert [p.read_bytes() for p in paths] == [orjson.dumps(b) for b in bundles]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000.json", "0001.json", "notes.txt"]


def test_the_command_writes_the_bundles_and_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, manifest = tmp_path / "out", tmp_path / "manifest.jsonl"
    code = main(
        ["--patients", "12", "--seed", "7", "--today", "2026-11-21", "--out", str(out), "--manifest", str(manifest)]
    )
    assert code == 0
    line = capsys.readouterr().out
    total = sum(len(b["entry"]) for b in generate(12, 7, TODAY))
    assert re.fullmatch(rf"seeded 12 patients, {total} resources \(1 files in .*\) in \d+\.\d s\n", line), line
    assert (out / "0000.json").read_bytes() == orjson.dumps(next(generate(12, 7, TODAY)))
    rows = [orjson.loads(x) for x in manifest.read_bytes().splitlines()]
    assert rows == [p.manifest() for p in plan(12, 7, TODAY)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patients", "3", "--seed", "1"], "one of the arguments --out --fhir is required"),
        (["--patients", "3", "--seed", "1", "--out", "x", "--fhir", "http://h/fhir"], "not allowed with"),
        (["--patients", "-3", "--seed", "1", "--out", "x"], "expected 0 or more"),
        (["--patients", "3", "--seed", "1", "--today", "21/11/2026", "--out", "x"], "expected YYYY-MM-DD"),
        (["--patients", "3", "--seed", "1", "--tz", "Mars/Olympus", "--out", "x"], "unknown IANA time zone"),
    ],
)
def test_the_command_refuses_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_token_without_a_server_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--patients", "1", "--seed", "1", "--out", str(tmp_path), "--token", "t"]) == 2
    assert "--token goes with --fhir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_concurrency_below_one() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        seed.load("http://127.0.0.1:9/fhir", [], concurrency=0)
