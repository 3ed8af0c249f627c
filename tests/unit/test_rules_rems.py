"""REMS program rules about the order itself and who the patient is: supply, refills, authorization,
risk category (missing / mismatch), reproductive status, and the 18th-birthday boundary."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest

from rems.findings import FixKind, RuleCode, Severity
from rems.model import NrpEvidence, NrpEvidenceKind, PatientFacts, RiskCategory, Sex

from .builders import (
    NOW,
    TODAY,
    adult_male,
    at,
    boy,
    case,
    codes,
    days_before,
    frp_order,
    frp_woman,
    girl,
    hysterectomy,
    last_fill,
    lenalidomide_order,
    menopause,
    negative_test,
    nrp_woman,
    only,
    patient,
    run,
    unknown_sex_patient,
    utc,
)

RC = RuleCode
CRIT, WARN, INFO = Severity.CRITICAL, Severity.WARNING, Severity.INFO


def test_clean_adult_male_order_has_no_findings() -> None:
    assert run(case(adult_male(), lenalidomide_order())) == []


def test_clean_continuing_frp_order_has_no_findings() -> None:
    c = case(
        frp_woman(),
        frp_order(),
        dispenses=(last_fill(21),),
        pregnancy_tests=(negative_test(days_before(2)),),
    )
    assert run(c) == []


def test_clean_nrp_woman_with_hysterectomy_has_no_findings() -> None:
    c = case(
        nrp_woman(),
        lenalidomide_order(category=RiskCategory.ADULT_FEMALE_NRP),
        nrp_evidence=(hysterectomy(),),
    )
    assert run(c) == []


# ------------------------------------------------------------------------------------------------
# supply-over-28-days / supply-unknown
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("supply_days", "expected"),
    [
        pytest.param(28, [], id="28-days-passes"),
        pytest.param(1, [], id="1-day-passes"),
        pytest.param(29, [(RC.SUPPLY_OVER_28_DAYS, CRIT)], id="29-days-fails"),
        pytest.param("28.5", [(RC.SUPPLY_OVER_28_DAYS, CRIT)], id="28.5-days-fails"),
        pytest.param(84, [(RC.SUPPLY_OVER_28_DAYS, CRIT)], id="84-days-fails"),
        pytest.param(None, [(RC.SUPPLY_UNKNOWN, WARN)], id="unknown-supply-warns"),
    ],
)
def test_supply_days(supply_days: object, expected: list[tuple[RuleCode, Severity]]) -> None:
    findings = run(case(adult_male(), lenalidomide_order(supply_days=supply_days)))
    assert [(f.code, f.severity) for f in findings] == expected


def test_supply_over_28_days_offers_28_day_fix() -> None:
    f = only(run(case(adult_male(), lenalidomide_order(supply_days=29))), RC.SUPPLY_OVER_28_DAYS)
    assert f.fix is not None
    assert (f.fix.kind, f.fix.value) == (FixKind.SET_SUPPLY_DAYS, "28")
    assert f.data["supply_days"] == "29"
    assert f.order == "MedicationRequest/lenalidomide-draft"


def test_supply_unknown_quotes_the_reason() -> None:
    order = lenalidomide_order(supply_days=None, supply_problem="quantity in mL, not capsules")
    f = only(run(case(adult_male(), order)), RC.SUPPLY_UNKNOWN)
    assert "quantity in mL, not capsules" in f.detail


# ------------------------------------------------------------------------------------------------
# refills-not-allowed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refills", "expected"),
    [
        pytest.param(0, [], id="no-refills"),
        pytest.param(None, [], id="absent-means-0"),
        pytest.param(1, [(RC.REFILLS_NOT_ALLOWED, CRIT)], id="1-refill"),
        pytest.param(5, [(RC.REFILLS_NOT_ALLOWED, CRIT)], id="5-refills"),
    ],
)
def test_refills(refills: int | None, expected: list[tuple[RuleCode, Severity]]) -> None:
    findings = run(case(adult_male(), lenalidomide_order(refills=refills)))
    assert [(f.code, f.severity) for f in findings] == expected


def test_refills_summary_says_how_many() -> None:
    f = only(run(case(adult_male(), lenalidomide_order(refills=3))), RC.REFILLS_NOT_ALLOWED)
    assert f.summary.startswith("3 refills")
    assert f.fix is not None and (f.fix.kind, f.fix.value) == (FixKind.REMOVE_REFILLS, "0")


# ------------------------------------------------------------------------------------------------
# authorization-missing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        pytest.param("12345678", [], id="present"),
        pytest.param(None, [(RC.AUTHORIZATION_MISSING, CRIT)], id="absent"),
        pytest.param("", [(RC.AUTHORIZATION_MISSING, CRIT)], id="empty"),
    ],
)
def test_authorization(authorization: str | None, expected: list[tuple[RuleCode, Severity]]) -> None:
    findings = run(case(adult_male(), lenalidomide_order(authorization=authorization)))
    assert [(f.code, f.severity) for f in findings] == expected


# ------------------------------------------------------------------------------------------------
# risk-category-missing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "chart", "suggested"),
    [
        pytest.param(adult_male(), {}, "adult-male", id="adult-male-suggested"),
        pytest.param(boy(15), {}, "child-male", id="child-male-suggested"),
        pytest.param(nrp_woman(), {"nrp_evidence": (hysterectomy(),)}, "adult-female-nrp", id="nrp-suggested"),
        pytest.param(frp_woman(), {}, None, id="woman-without-evidence-no-suggestion"),
        pytest.param(unknown_sex_patient(), {}, None, id="unknown-sex-no-suggestion"),
    ],
)
def test_risk_category_missing_is_critical_and_suggests_what_chart_supports(
    who: PatientFacts, chart: dict[str, Any], suggested: str | None
) -> None:
    findings = run(case(who, lenalidomide_order(category=None), **chart))
    f = only(findings, RC.RISK_CATEGORY_MISSING)
    assert f.severity is CRIT
    assert f.fix is not None and f.fix.kind is FixKind.DOCUMENT_RISK_CATEGORY
    assert f.fix.value == suggested


def test_risk_category_present_is_not_missing() -> None:
    assert RC.RISK_CATEGORY_MISSING not in codes(run(case(adult_male(), lenalidomide_order())))


def test_unrecognized_category_text_is_quoted_back() -> None:
    order = lenalidomide_order(category=None, risk_category_unrecognized="female of childbearing potential")
    f = only(run(case(adult_male(), order)), RC.RISK_CATEGORY_MISSING)
    assert "'female of childbearing potential'" in f.detail


# ------------------------------------------------------------------------------------------------
# risk-category-mismatch
# ------------------------------------------------------------------------------------------------

_RECENT_TEST = (negative_test(days_before(5)),)
_OLD_TEST = (negative_test(days_before(40)),)


@pytest.mark.parametrize(
    ("who", "category", "chart", "expected"),
    [
        pytest.param(frp_woman(), RiskCategory.ADULT_MALE, {}, CRIT, id="male-category-on-female"),
        pytest.param(adult_male(), RiskCategory.ADULT_FEMALE_RP, {}, WARN, id="female-category-on-male"),
        pytest.param(adult_male(), RiskCategory.CHILD_MALE, {}, WARN, id="child-category-on-adult"),
        pytest.param(boy(15), RiskCategory.ADULT_MALE, {}, WARN, id="adult-category-on-child"),
        pytest.param(boy(15), RiskCategory.CHILD_MALE, {}, None, id="child-male-ok"),
        pytest.param(adult_male(), RiskCategory.ADULT_MALE, {}, None, id="adult-male-ok"),
        pytest.param(unknown_sex_patient(), RiskCategory.ADULT_MALE, {}, None, id="unknown-sex-male-cat"),
        pytest.param(unknown_sex_patient(), RiskCategory.ADULT_FEMALE_RP, {}, None, id="unknown-sex-female-cat"),
        pytest.param(
            nrp_woman(),
            RiskCategory.ADULT_FEMALE_NRP,
            {"nrp_evidence": (hysterectomy(),)},
            None,
            id="nrp-with-hysterectomy-ok",
        ),
        pytest.param(nrp_woman(), RiskCategory.ADULT_FEMALE_NRP, {}, CRIT, id="nrp-without-evidence"),
        pytest.param(
            nrp_woman(),
            RiskCategory.ADULT_FEMALE_NRP,
            {"nrp_evidence": (hysterectomy(),), "pregnancy_tests": _RECENT_TEST},
            CRIT,
            id="nrp-with-test-5-days-ago",
        ),
        pytest.param(
            nrp_woman(),
            RiskCategory.ADULT_FEMALE_NRP,
            {"nrp_evidence": (hysterectomy(),), "pregnancy_tests": _OLD_TEST},
            None,
            id="nrp-with-test-40-days-ago-ok",
        ),
        pytest.param(
            nrp_woman(),
            RiskCategory.ADULT_FEMALE_NRP,
            {"nrp_evidence": (menopause(TODAY.replace(year=TODAY.year - 2)),)},
            None,
            id="nrp-menopause-24-months-ok",
        ),
        pytest.param(
            nrp_woman(),
            RiskCategory.ADULT_FEMALE_NRP,
            {"nrp_evidence": (menopause(TODAY.replace(year=TODAY.year - 2) + timedelta(days=1)),)},
            CRIT,
            id="nrp-menopause-23-months",
        ),
        pytest.param(girl(12), RiskCategory.CHILD_FEMALE_NRP, {}, None, id="child-nrp-needs-no-evidence"),
        pytest.param(
            girl(12),
            RiskCategory.CHILD_FEMALE_NRP,
            {"pregnancy_tests": _RECENT_TEST},
            CRIT,
            id="child-nrp-with-recent-test",
        ),
    ],
)
def test_risk_category_mismatch(
    who: PatientFacts, category: RiskCategory, chart: dict[str, Any], expected: Severity | None
) -> None:
    findings = run(case(who, lenalidomide_order(category=category), **chart))
    if expected is None:
        assert RC.RISK_CATEGORY_MISMATCH not in codes(findings)
    else:
        assert only(findings, RC.RISK_CATEGORY_MISMATCH).severity is expected


def test_mismatch_lists_every_reason_on_one_card() -> None:
    # A 15-year-old girl documented as an adult male: wrong sex and wrong age, one card.
    findings = run(case(girl(15), lenalidomide_order(category=RiskCategory.ADULT_MALE)))
    f = only(findings, RC.RISK_CATEGORY_MISMATCH)
    assert f.severity is CRIT
    assert "male category on a female patient" in f.detail
    assert "adult category for a patient aged 15" in f.detail


# ------------------------------------------------------------------------------------------------
# Adult = 18 or older on the order date (birthday, 29 February, order date in the clinic zone)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("birth", "now", "adult"),
    [
        pytest.param(date(2007, 6, 18), NOW, True, id="18th-birthday-is-adult"),
        pytest.param(date(2007, 6, 19), NOW, False, id="day-before-18th-birthday-is-minor"),
        pytest.param(date(2008, 2, 29), at(date(2026, 2, 28), 10), False, id="leapling-on-28-feb"),
        pytest.param(date(2008, 2, 29), at(date(2026, 3, 1), 10), True, id="leapling-on-1-mar"),
        pytest.param(date(2006, 2, 28), at(date(2024, 2, 28), 10), True, id="18th-birthday-28-feb-leap-year"),
        pytest.param(date(2006, 3, 1), at(date(2024, 2, 29), 10), False, id="29-feb-day-before-birthday"),
        pytest.param(date(2008, 2, 29), at(date(2026, 3, 1), 0, 30), True, id="leapling-just-after-midnight"),
        pytest.param(date(2008, 2, 29), utc(at(date(2026, 2, 28), 23, 30)), False, id="leapling-utc-next-day"),
    ],
)
def test_adult_boundary(birth: date, now: datetime, adult: bool) -> None:
    c = case(adult_male(birth_date=birth), lenalidomide_order(), now=now)
    found = codes(run(c))
    if adult:
        assert found == []
    else:
        # An adult category on a minor (warning) and the plan's age limit (warning).
        assert sorted(found) == sorted([RC.RISK_CATEGORY_MISMATCH, RC.AGE_UNDER_18])


def test_age_is_taken_on_the_clinic_local_order_date() -> None:
    """Signed at 23:30 Los Angeles the evening before his 18th birthday (already the birthday in UTC):
    he is 17 on the order date, though it is his birthday by the time the rules run."""
    signed = utc(at(date(2025, 6, 17), 23, 30))
    assert signed.date() == date(2025, 6, 18)
    order = lenalidomide_order(authored_on=signed)
    findings = run(case(adult_male(birth_date=date(2007, 6, 18)), order))
    assert only(findings, RC.AGE_UNDER_18).severity is WARN
    assert only(findings, RC.RISK_CATEGORY_MISMATCH).severity is WARN


# ------------------------------------------------------------------------------------------------
# reproductive-status-unknown (and the pregnancy rules it switches on)
# ------------------------------------------------------------------------------------------------

_TWO_YEARS_AGO = TODAY.replace(year=TODAY.year - 2)


@pytest.mark.parametrize(
    ("who", "chart", "fires"),
    [
        pytest.param(frp_woman(), {}, True, id="adult-woman-no-evidence"),
        pytest.param(girl(10), {}, True, id="girl-aged-10"),
        pytest.param(girl(9), {}, False, id="girl-aged-9"),
        pytest.param(unknown_sex_patient(40), {}, True, id="unknown-sex-adult"),
        pytest.param(unknown_sex_patient(9), {}, False, id="unknown-sex-aged-9"),
        pytest.param(patient(Sex.FEMALE, None), {}, True, id="woman-of-unknown-age"),
        pytest.param(adult_male(), {}, False, id="male"),
        pytest.param(nrp_woman(), {"nrp_evidence": (hysterectomy(),)}, False, id="hysterectomy"),
        pytest.param(nrp_woman(), {"nrp_evidence": (hysterectomy(since=None),)}, False, id="undated-hyst"),
        pytest.param(
            nrp_woman(),
            {"nrp_evidence": (hysterectomy(since=TODAY + timedelta(days=14)),)},
            True,
            id="hysterectomy-scheduled-in-future",
        ),
        pytest.param(nrp_woman(), {"nrp_evidence": (menopause(_TWO_YEARS_AGO),)}, False, id="menopause-24mo"),
        pytest.param(
            nrp_woman(),
            {"nrp_evidence": (menopause(_TWO_YEARS_AGO + timedelta(days=1)),)},
            True,
            id="menopause-23mo",
        ),
        pytest.param(nrp_woman(), {"nrp_evidence": (menopause(None),)}, True, id="menopause-undated"),
    ],
)
def test_reproductive_status_unknown(who: PatientFacts, chart: dict[str, Any], fires: bool) -> None:
    findings = run(case(who, lenalidomide_order(category=None), **chart))
    if fires:
        assert only(findings, RC.REPRODUCTIVE_STATUS_UNKNOWN).severity is WARN
        # Safety default: the pregnancy-test rules apply (first prescription, no tests on file).
        assert only(findings, RC.INITIATION_TESTS_INCOMPLETE).severity is CRIT
    else:
        assert RC.REPRODUCTIVE_STATUS_UNKNOWN not in codes(findings)
        assert RC.INITIATION_TESTS_INCOMPLETE not in codes(findings)
        assert RC.PREGNANCY_TEST_MISSING not in codes(findings)


def test_bilateral_oophorectomy_settles_status() -> None:
    evidence = NrpEvidence(
        "Procedure/bso", NrpEvidenceKind.BILATERAL_OOPHORECTOMY, date(2019, 3, 1), "Bilateral oophorectomy"
    )
    findings = run(case(nrp_woman(), lenalidomide_order(category=None), nrp_evidence=(evidence,)))
    assert codes(findings) == [RC.RISK_CATEGORY_MISSING]
    assert only(findings, RC.RISK_CATEGORY_MISSING).fix.value == "adult-female-nrp"  # type: ignore[union-attr]


def test_documented_category_settles_status() -> None:
    c = case(frp_woman(), frp_order(), pregnancy_tests=(negative_test(days_before(2)),), dispenses=(last_fill(),))
    assert RC.REPRODUCTIVE_STATUS_UNKNOWN not in codes(run(c))


def test_unknown_status_on_continuing_therapy_needs_a_test() -> None:
    """No category and nothing settling it, no test on file: pregnancy-test-missing, saying why."""
    c = case(frp_woman(), lenalidomide_order(category=None), dispenses=(last_fill(),))
    findings = run(c)
    missing = only(findings, RC.PREGNANCY_TEST_MISSING)
    assert missing.severity is CRIT
    assert "treated as able to get pregnant" in missing.summary
    assert only(findings, RC.REPRODUCTIVE_STATUS_UNKNOWN).severity is WARN


def test_menopause_month_boundary_uses_order_date_in_clinic_zone() -> None:
    """Onset 18 June 2023; order signed 17 June 2025 23:30 Los Angeles (18 June in UTC): 23 months."""
    onset = date(2023, 6, 18)
    order = lenalidomide_order(category=None, authored_on=utc(at(date(2025, 6, 17), 23, 30)))
    findings = run(case(nrp_woman(), order, nrp_evidence=(menopause(onset),), now=NOW))
    assert RC.REPRODUCTIVE_STATUS_UNKNOWN in codes(findings)
