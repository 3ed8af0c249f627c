"""Clinical review flags (protocol thresholds): cbc-overdue, neutropenia, thrombocytopenia,
renal-dose-review, vte-prophylaxis-missing. Absence-based flags are info, value-based ones warning."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from rems.findings import RuleCode, Severity
from rems.model import Drug, LabValue, PatientFacts, RiskCategory, Sex

from .builders import (
    NOW,
    adult_male,
    anc,
    aspirin,
    case,
    chart_order,
    codes,
    creatinine,
    days_before,
    frp_order,
    frp_woman,
    imid_order,
    last_fill,
    negative_test,
    only,
    patient,
    platelets,
    run,
    utc,
    weight,
)

RC = RuleCode
WARN, INFO = Severity.WARNING, Severity.INFO


def cbc_at(when: datetime) -> tuple[LabValue, ...]:
    return (anc("2.5", when), platelets(210, when))


# ------------------------------------------------------------------------------------------------
# cbc-overdue
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drug", "chart_extra", "cbc_days_ago", "overdue"),
    [
        # Continuing lenalidomide, week 4 of the course (last fill 21 days ago): weekly CBC.
        pytest.param(Drug.LENALIDOMIDE, {"dispenses": (last_fill(21),)}, 7, False, id="len-week4-7-days"),
        pytest.param(Drug.LENALIDOMIDE, {"dispenses": (last_fill(21),)}, 8, True, id="len-week4-8-days"),
        # Course started 55 days ago: still week 8 -> weekly.
        pytest.param(
            Drug.LENALIDOMIDE,
            {
                "dispenses": (last_fill(21),),
                "imid_orders": (chart_order(authored=days_before(55), status="completed"),),
            },
            10,
            True,
            id="len-day-55-10-days",
        ),
        # Course started 56 days ago: week 9 -> monthly.
        pytest.param(
            Drug.LENALIDOMIDE,
            {
                "dispenses": (last_fill(21),),
                "imid_orders": (chart_order(authored=days_before(56), status="completed"),),
            },
            10,
            False,
            id="len-day-56-10-days",
        ),
        pytest.param(
            Drug.LENALIDOMIDE,
            {
                "dispenses": (last_fill(21),),
                "imid_orders": (chart_order(authored=days_before(90), status="completed"),),
            },
            31,
            False,
            id="len-maintenance-31-days",
        ),
        pytest.param(
            Drug.LENALIDOMIDE,
            {
                "dispenses": (last_fill(21),),
                "imid_orders": (chart_order(authored=days_before(90), status="completed"),),
            },
            32,
            True,
            id="len-maintenance-32-days",
        ),
        # First prescription: the course starts today -> weekly.
        pytest.param(Drug.LENALIDOMIDE, {}, 7, False, id="len-initiation-7-days"),
        pytest.param(Drug.LENALIDOMIDE, {}, 8, True, id="len-initiation-8-days"),
        pytest.param(Drug.POMALIDOMIDE, {}, 8, True, id="pom-initiation-8-days"),
        # Thalidomide: monthly throughout, even in week 1.
        pytest.param(Drug.THALIDOMIDE, {}, 31, False, id="thal-initiation-31-days"),
        pytest.param(Drug.THALIDOMIDE, {}, 32, True, id="thal-initiation-32-days"),
    ],
)
def test_cbc_overdue(drug: Drug, chart_extra: dict[str, Any], cbc_days_ago: int, overdue: bool) -> None:
    order = imid_order(drug)
    findings = run(case(adult_male(), order, labs=cbc_at(days_before(cbc_days_ago, 8)), **chart_extra))
    if overdue:
        assert only(findings, RC.CBC_OVERDUE).severity is INFO
    else:
        assert RC.CBC_OVERDUE not in codes(findings)


def test_cbc_none_on_file() -> None:
    f = only(run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=())), RC.CBC_OVERDUE)
    assert f.severity is INFO
    assert "none on file" in f.summary


def test_cbc_newest_of_anc_or_platelets_counts() -> None:
    labs = (anc("2.5", days_before(20)), platelets(210, days_before(2)))
    assert run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=labs)) == []


def test_cbc_age_counted_in_clinic_days() -> None:
    # 23:30 Los Angeles 8 days ago, sent in UTC (UTC date: 7 days ago) -> 8 clinic days -> overdue.
    labs = cbc_at(utc(days_before(8, 23, 30)))
    assert RC.CBC_OVERDUE in codes(run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=labs)))


def test_cbc_in_the_future_does_not_count() -> None:
    labs = cbc_at(days_before(20)) + cbc_at(NOW + timedelta(hours=1))
    assert RC.CBC_OVERDUE in codes(run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=labs)))


# ------------------------------------------------------------------------------------------------
# neutropenia / thrombocytopenia
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drug", "value", "fires"),
    [
        pytest.param(Drug.LENALIDOMIDE, "0.99", True, id="len-0.99"),
        pytest.param(Drug.LENALIDOMIDE, "1.0", False, id="len-1.0"),
        pytest.param(Drug.POMALIDOMIDE, "0.6", False, id="pom-0.6"),
        pytest.param(Drug.POMALIDOMIDE, "0.49", True, id="pom-0.49"),
        pytest.param(Drug.POMALIDOMIDE, "0.5", False, id="pom-0.5"),
        pytest.param(Drug.THALIDOMIDE, "0.7", True, id="thal-0.7"),
        pytest.param(Drug.THALIDOMIDE, "0.75", False, id="thal-0.75"),
    ],
)
def test_neutropenia(drug: Drug, value: str, fires: bool) -> None:
    labs = (anc(value, days_before(1)), platelets(210, days_before(1)))
    findings = run(case(adult_male(), imid_order(drug), labs=labs))
    if fires:
        assert [(f.code, f.severity) for f in findings] == [(RC.NEUTROPENIA, WARN)]
    else:
        assert findings == []


@pytest.mark.parametrize(
    ("drug", "value", "fires"),
    [
        pytest.param(Drug.LENALIDOMIDE, 29, True, id="len-29"),
        pytest.param(Drug.LENALIDOMIDE, 30, False, id="len-30"),
        pytest.param(Drug.POMALIDOMIDE, 24, True, id="pom-24"),
        pytest.param(Drug.POMALIDOMIDE, 25, False, id="pom-25"),
        pytest.param(Drug.THALIDOMIDE, 5, False, id="thal-no-threshold"),
    ],
)
def test_thrombocytopenia(drug: Drug, value: int, fires: bool) -> None:
    labs = (anc("2.5", days_before(1)), platelets(value, days_before(1)))
    findings = run(case(adult_male(), imid_order(drug), labs=labs))
    if fires:
        assert [(f.code, f.severity) for f in findings] == [(RC.THROMBOCYTOPENIA, WARN)]
    else:
        assert findings == []


@pytest.mark.parametrize(
    ("labs", "fires"),
    [
        pytest.param((anc("0.4", days_before(5)), anc("2.1", days_before(1))), False, id="recovered"),
        pytest.param((anc("2.1", days_before(5)), anc("0.4", days_before(1))), True, id="newly-low"),
        pytest.param((anc("2.1", days_before(5)), anc("0.4", NOW + timedelta(hours=1))), False, id="future"),
    ],
)
def test_neutropenia_uses_latest_value(labs: tuple[LabValue, ...], fires: bool) -> None:
    findings = run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=labs))
    assert (RC.NEUTROPENIA in codes(findings)) is fires


# ------------------------------------------------------------------------------------------------
# renal-dose-review
# ------------------------------------------------------------------------------------------------

_CBC = cbc_at(days_before(1))


@pytest.mark.parametrize(
    ("who", "drug", "extra_labs", "fires"),
    [
        pytest.param(adult_male(70), Drug.POMALIDOMIDE, [creatinine("3.1", days_before(2))], True, id="pom-3.1"),
        pytest.param(adult_male(70), Drug.POMALIDOMIDE, [creatinine("3.0", days_before(2))], False, id="pom-3.0"),
        # Cockcroft-Gault, male: (140 - 70) x 72 kg / (72 x 1.0) = 70 mL/min.
        pytest.param(
            adult_male(70),
            Drug.LENALIDOMIDE,
            [creatinine("1.0", days_before(2)), weight(72, days_before(2))],
            False,
            id="len-male-crcl-70",
        ),
        # (140 - 70) x 72 / (72 x 1.25) = 56 mL/min.
        pytest.param(
            adult_male(70),
            Drug.LENALIDOMIDE,
            [creatinine("1.25", days_before(2)), weight(72, days_before(2))],
            True,
            id="len-male-crcl-56",
        ),
        # Male: 70 x 72 / (72 x 1.1) = 63.6; female factor 0.85 -> 54.1.
        pytest.param(
            adult_male(70),
            Drug.LENALIDOMIDE,
            [creatinine("1.1", days_before(2)), weight(72, days_before(2))],
            False,
            id="len-male-crcl-64",
        ),
        pytest.param(
            patient(Sex.FEMALE, 70),
            Drug.LENALIDOMIDE,
            [creatinine("1.1", days_before(2)), weight(72, days_before(2))],
            True,
            id="len-female-crcl-54",
        ),
        pytest.param(
            patient(Sex.UNKNOWN, 70),
            Drug.LENALIDOMIDE,
            [creatinine("1.1", days_before(2)), weight(72, days_before(2))],
            True,
            id="len-unknown-sex-uses-female-factor",
        ),
        pytest.param(adult_male(70), Drug.LENALIDOMIDE, [creatinine("4.0", days_before(2))], False, id="len-no-weight"),
        pytest.param(
            patient(Sex.MALE, None),
            Drug.LENALIDOMIDE,
            [creatinine("4.0", days_before(2)), weight(72, days_before(2))],
            False,
            id="len-no-age",
        ),
        pytest.param(adult_male(70), Drug.THALIDOMIDE, [creatinine("5.0", days_before(2))], False, id="thal"),
    ],
)
def test_renal_dose_review(who: PatientFacts, drug: Drug, extra_labs: list[LabValue], fires: bool) -> None:
    category = RiskCategory.ADULT_MALE if who.sex is Sex.MALE else RiskCategory.ADULT_FEMALE_NRP
    findings = run(case(who, imid_order(drug, category=category), labs=_CBC + tuple(extra_labs)))
    if fires:
        assert only(findings, RC.RENAL_DOSE_REVIEW).severity is WARN
    else:
        assert RC.RENAL_DOSE_REVIEW not in codes(findings)


def test_renal_crcl_value_reported() -> None:
    labs = (*_CBC, creatinine("1.25", days_before(2)), weight(72, days_before(2)))
    f = only(run(case(adult_male(70), imid_order(Drug.LENALIDOMIDE), labs=labs)), RC.RENAL_DOSE_REVIEW)
    assert f.data["crcl"] == "56"


def test_renal_crcl_just_below_60_flags() -> None:
    # (140 - 68) x 59.6 kg / (72 x 1.0) = 59.6 mL/min: below 60.
    labs = (*_CBC, creatinine("1.0", days_before(2)), weight("59.6", days_before(2)))
    findings = run(case(adult_male(68), imid_order(Drug.LENALIDOMIDE), labs=labs))
    assert RC.RENAL_DOSE_REVIEW in codes(findings)


# ------------------------------------------------------------------------------------------------
# vte-prophylaxis-missing
# ------------------------------------------------------------------------------------------------


def test_vte_prophylaxis_missing_is_info() -> None:
    findings = run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), antithrombotics=()))
    assert [(f.code, f.severity) for f in findings] == [(RC.VTE_PROPHYLAXIS_MISSING, INFO)]


def test_vte_prophylaxis_present() -> None:
    findings = run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), antithrombotics=(aspirin(),)))
    assert findings == []


def test_vte_stopped_aspirin_does_not_count() -> None:
    findings = run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), antithrombotics=(aspirin("stopped"),)))
    assert RC.VTE_PROPHYLAXIS_MISSING in codes(findings)


def test_review_flags_apply_to_pregnancy_capable_patients_too() -> None:
    """Review flags are per order, independent of the REMS category."""
    c = case(
        frp_woman(),
        frp_order(),
        dispenses=(last_fill(21),),
        pregnancy_tests=(negative_test(days_before(2)),),
        labs=(anc("0.8", days_before(1)), platelets(20, days_before(1))),
        antithrombotics=(),
    )
    assert sorted(codes(run(c))) == sorted([RC.NEUTROPENIA, RC.THROMBOCYTOPENIA, RC.VTE_PROPHYLAXIS_MISSING])


def test_lab_decimal_value_preserved_in_summary() -> None:
    labs = (anc(Decimal("0.85"), days_before(1)), platelets(210, days_before(1)))
    f = only(run(case(adult_male(), imid_order(Drug.LENALIDOMIDE), labs=labs)), RC.NEUTROPENIA)
    assert "ANC 0.85 x10^9/L" in f.summary
    assert "hold threshold 1" in f.summary
