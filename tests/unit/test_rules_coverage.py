"""Coverage rules (health-plan policy, seed 004): advisory, warning or info, never critical."""

from __future__ import annotations

from decimal import Decimal

import pytest

import rems
from rems.findings import FixKind, RuleCode, Severity
from rems.model import Dose, Drug, ImidOrder, Indication, RiskCategory, Sex

from .builders import (
    ALLERGY_IMMUNOLOGY,
    FAMILY_MEDICINE,
    HEMATOLOGY_ONCOLOGY,
    adult_male,
    boy,
    case,
    chart_order,
    codes,
    days_before,
    imid_order,
    lenalidomide_order,
    only,
    patient,
    pomalidomide_order,
    prescriber,
    run,
    thalidomide_order,
)

RC = RuleCode
WARN, INFO = Severity.WARNING, Severity.INFO


# ------------------------------------------------------------------------------------------------
# dose-above-policy-limit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drug", "mg", "indications", "maintenance", "cap_key"),
    [
        pytest.param(Drug.LENALIDOMIDE, 25, ["multiple-myeloma"], False, None, id="len-mm-25"),
        pytest.param(Drug.LENALIDOMIDE, 26, ["multiple-myeloma"], False, "multiple-myeloma", id="len-mm-26"),
        pytest.param(Drug.LENALIDOMIDE, 15, ["multiple-myeloma"], True, None, id="len-mm-maint-15"),
        pytest.param(
            Drug.LENALIDOMIDE, 20, ["multiple-myeloma"], True, "multiple-myeloma-maintenance", id="len-mm-maint-20"
        ),
        pytest.param(Drug.LENALIDOMIDE, 10, ["mds"], False, None, id="len-mds-10"),
        pytest.param(Drug.LENALIDOMIDE, 15, ["mds"], True, "mds", id="len-mds-15-maintenance-irrelevant"),
        pytest.param(Drug.LENALIDOMIDE, 25, ["mcl"], False, None, id="len-mcl-25"),
        pytest.param(Drug.LENALIDOMIDE, 20, ["mzl"], False, None, id="len-mzl-20"),
        pytest.param(Drug.LENALIDOMIDE, 21, ["fl"], False, "fl", id="len-fl-21"),
        pytest.param(Drug.LENALIDOMIDE, 25, [], False, None, id="len-unknown-25"),
        pytest.param(Drug.LENALIDOMIDE, 30, [], False, "other", id="len-unknown-30"),
        pytest.param(Drug.LENALIDOMIDE, 30, ["kaposi-sarcoma-hiv"], False, "other", id="len-unlisted-30"),
        pytest.param(Drug.LENALIDOMIDE, 20, ["mds", "multiple-myeloma"], False, None, id="most-permissive"),
        pytest.param(Drug.POMALIDOMIDE, 4, ["multiple-myeloma"], False, None, id="pom-4"),
        pytest.param(Drug.POMALIDOMIDE, 5, ["multiple-myeloma"], False, "other", id="pom-5"),
        pytest.param(Drug.THALIDOMIDE, 800, ["multiple-myeloma"], False, None, id="thal-no-cap"),
    ],
)
def test_dose_above_policy_limit(
    drug: Drug, mg: int, indications: list[str], maintenance: bool, cap_key: str | None
) -> None:
    order = imid_order(drug, mg_per_day=mg, indications=indications, maintenance=maintenance)
    findings = run(case(adult_male(), order))
    if cap_key is None:
        assert findings == []
    else:
        assert [(f.code, f.severity) for f in findings] == [(RC.DOSE_ABOVE_POLICY_LIMIT, WARN)]
        assert f"({cap_key})" in findings[0].summary
        assert findings[0].summary.startswith("Coverage:")


def test_dose_indication_falls_back_to_chart_conditions() -> None:
    order = lenalidomide_order(mg_per_day=15, indications=())
    findings = run(case(adult_male(), order, indications=(Indication("mds", "Condition/mds"),)))
    assert "(mds)" in only(findings, RC.DOSE_ABOVE_POLICY_LIMIT).summary


def test_dose_order_indication_wins_over_chart() -> None:
    order = lenalidomide_order(mg_per_day=15, indications=("multiple-myeloma",))
    findings = run(case(adult_male(), order, indications=(Indication("mds", "Condition/mds"),)))
    assert RC.DOSE_ABOVE_POLICY_LIMIT not in codes(findings)


def test_unknown_dose_is_no_finding() -> None:
    order = lenalidomide_order(dose=Dose(None, None, None, None))
    assert run(case(adult_male(), order)) == []


# ------------------------------------------------------------------------------------------------
# concurrent-imid
# ------------------------------------------------------------------------------------------------


def test_two_imids_in_the_same_draft_flag_each_order() -> None:
    len_ = lenalidomide_order()
    pom = pomalidomide_order()
    findings = run(case(adult_male(), len_, pom))
    concurrent = [f for f in findings if f.code is RC.CONCURRENT_IMID]
    assert {f.order for f in concurrent} == {len_.reference, pom.reference}
    assert {f.severity for f in concurrent} == {WARN}
    by_order = {f.order: f for f in concurrent}
    fix = by_order[len_.reference].fix
    assert fix is not None
    assert (fix.kind, fix.value) == (FixKind.STOP_OTHER_IMID, pom.reference)
    assert "pomalidomide" in by_order[len_.reference].summary


@pytest.mark.parametrize(
    ("other", "fires"),
    [
        pytest.param(chart_order(Drug.POMALIDOMIDE, authored=days_before(10)), True, id="active-other-imid"),
        pytest.param(chart_order(Drug.THALIDOMIDE, authored=days_before(10)), True, id="active-thalidomide"),
        pytest.param(
            chart_order(Drug.POMALIDOMIDE, authored=days_before(10), status="completed"), False, id="completed"
        ),
        pytest.param(chart_order(Drug.POMALIDOMIDE, authored=days_before(10), status="stopped"), False, id="stopped"),
        # An active order of the same drug is the prescription being renewed.
        pytest.param(chart_order(Drug.LENALIDOMIDE, authored=days_before(22)), False, id="same-drug-active"),
    ],
)
def test_concurrent_imid_in_chart(other: ImidOrder, fires: bool) -> None:
    findings = run(case(adult_male(), lenalidomide_order(), imid_orders=(other,)))
    if fires:
        f = only(findings, RC.CONCURRENT_IMID)
        assert f.severity is WARN
        assert f.evidence[0].reference == other.reference
    else:
        assert RC.CONCURRENT_IMID not in codes(findings)


def test_single_order_is_not_concurrent() -> None:
    assert RC.CONCURRENT_IMID not in codes(run(case(adult_male(), thalidomide_order())))


# ------------------------------------------------------------------------------------------------
# age-under-18
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "fires"),
    [pytest.param(17, True, id="17"), pytest.param(18, False, id="18"), pytest.param(5, True, id="5")],
)
def test_age_under_18(age: int, fires: bool) -> None:
    category = RiskCategory.ADULT_MALE if age >= 18 else RiskCategory.CHILD_MALE
    findings = run(case(boy(age), lenalidomide_order(category=category)))
    if fires:
        f = only(findings, RC.AGE_UNDER_18)
        assert (f.severity, f.summary.startswith("Coverage: patient is")) == (WARN, True)
        assert codes(findings) == [RC.AGE_UNDER_18]
    else:
        assert findings == []


def test_unknown_birth_date_is_no_age_finding() -> None:
    assert run(case(patient(Sex.MALE, None), lenalidomide_order())) == []


# ------------------------------------------------------------------------------------------------
# prescriber-not-specialist
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specialties", "indications", "via_context", "fires"),
    [
        pytest.param([FAMILY_MEDICINE], ["multiple-myeloma"], False, True, id="family-medicine"),
        pytest.param([HEMATOLOGY_ONCOLOGY], ["multiple-myeloma"], False, False, id="hem-onc"),
        pytest.param([FAMILY_MEDICINE, HEMATOLOGY_ONCOLOGY], ["multiple-myeloma"], False, False, id="one-matches"),
        pytest.param([], ["multiple-myeloma"], False, False, id="unknown-specialty"),
        pytest.param([ALLERGY_IMMUNOLOGY], ["kaposi-sarcoma-hiv"], False, False, id="immunology-for-hiv-ks"),
        pytest.param([ALLERGY_IMMUNOLOGY], ["multiple-myeloma"], False, True, id="immunology-for-myeloma"),
        pytest.param([FAMILY_MEDICINE], ["multiple-myeloma"], True, True, id="user-from-hook-context"),
        pytest.param([HEMATOLOGY_ONCOLOGY], ["multiple-myeloma"], True, False, id="hem-onc-from-hook-context"),
    ],
)
def test_prescriber_not_specialist(
    specialties: list[str], indications: list[str], via_context: bool, fires: bool
) -> None:
    doc = prescriber(*specialties)
    order = lenalidomide_order(requester=None if via_context else doc.reference, indications=indications)
    c = case(
        adult_male(),
        order,
        prescribers=(doc,),
        prescriber_reference=doc.reference if via_context else None,
    )
    findings = run(c)
    if fires:
        assert [(f.code, f.severity) for f in findings] == [(RC.PRESCRIBER_NOT_SPECIALIST, WARN)]
    else:
        assert findings == []


def test_prescriber_not_in_chart_is_no_finding() -> None:
    order = lenalidomide_order(requester="Practitioner/unknown")
    assert run(case(adult_male(), order, prescribers=(prescriber(FAMILY_MEDICINE),))) == []


def test_requester_wins_over_hook_user() -> None:
    order = lenalidomide_order(requester="Practitioner/onc")
    c = case(
        adult_male(),
        order,
        prescribers=(
            prescriber(HEMATOLOGY_ONCOLOGY, reference="Practitioner/onc"),
            prescriber(FAMILY_MEDICINE, reference="Practitioner/gp"),
        ),
        prescriber_reference="Practitioner/gp",
    )
    assert run(c) == []


# ------------------------------------------------------------------------------------------------
# generic-preferred
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "fires"),
    [
        pytest.param(lenalidomide_order(brand=True), True, id="brand-revlimid"),
        pytest.param(lenalidomide_order(brand=False), False, id="generic-lenalidomide"),
        pytest.param(pomalidomide_order(brand=True), False, id="brand-pomalyst"),
        pytest.param(thalidomide_order(brand=True), False, id="brand-thalomid"),
    ],
)
def test_generic_preferred(order: ImidOrder, fires: bool) -> None:
    findings = run(case(adult_male(), order))
    if fires:
        assert [(f.code, f.severity) for f in findings] == [(RC.GENERIC_PREFERRED, INFO)]
        fix = findings[0].fix
        assert fix is not None and (fix.kind, fix.value) == (FixKind.SWITCH_TO_GENERIC, "lenalidomide")
    else:
        assert findings == []


def test_coverage_findings_are_never_critical_even_all_at_once() -> None:
    """A 16-year-old on brand Revlimid 30 mg with pomalidomide in the same draft, from a GP."""
    gp = prescriber(FAMILY_MEDICINE)
    revlimid = lenalidomide_order(brand=True, mg_per_day=30, requester=gp.reference, category=RiskCategory.CHILD_MALE)
    pom = pomalidomide_order(mg_per_day=Decimal(5), requester=gp.reference, category=RiskCategory.CHILD_MALE)
    findings = run(case(boy(16), revlimid, pom, prescribers=(gp,)))
    coverage = {
        RC.DOSE_ABOVE_POLICY_LIMIT,
        RC.CONCURRENT_IMID,
        RC.AGE_UNDER_18,
        RC.PRESCRIBER_NOT_SPECIALIST,
        RC.GENERIC_PREFERRED,
    }
    assert set(codes(findings)) == coverage
    assert all(f.severity is not Severity.CRITICAL for f in findings)
    assert all(f.summary.startswith(("Coverage", "Another IMiD")) for f in findings)


def test_order_select_judges_only_selected_orders_but_keeps_others_as_context() -> None:
    len_, pom = lenalidomide_order(), pomalidomide_order(brand=True, refills=1)
    findings = rems.evaluate(case(adult_male(), len_, pom), only={len_.reference})
    assert {f.order for f in findings} == {len_.reference}
    assert only(findings, RC.CONCURRENT_IMID).fix.value == pom.reference  # type: ignore[union-attr]
