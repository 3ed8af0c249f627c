"""`rems.status.rems_status`: the patient-view REMS summary, one per IMiD with an active order.

The clock is `builders.NOW` (Wednesday 18 June 2025, 10:00 in Los Angeles) unless a test moves it.
Every chart order here is *active* (the status describes the chart, not drafts under review).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import rems
from rems.model import Case, Drug, ImidOrder, PatientFacts, PregnancyState, RiskCategory, Sex, Sourced
from rems.status import CategorySource, Fill, PregnancyRecord, RemsStatus, rems_status

from .builders import (
    LOS_ANGELES,
    NOW,
    TODAY,
    TOKYO,
    adult_male,
    at,
    case,
    days_before,
    dispense,
    frp_woman,
    hysterectomy,
    imid_order,
    last_fill,
    negative_test,
    nrp_woman,
    patient,
    positive_test,
    pregnancy_status,
    pregnancy_test,
    unknown_sex_patient,
    unreadable_test,
    utc,
)

ACTIVE = "MedicationRequest/len-active"


def active_order(
    drug: Drug = Drug.LENALIDOMIDE,
    *,
    category: RiskCategory | None = RiskCategory.ADULT_FEMALE_RP,
    authored: datetime | None = None,
    reference: str = ACTIVE,
    status: str = "active",
    **fields: Any,
) -> ImidOrder:
    """An IMiD order in the chart (active unless `status`), authored 60 days before `NOW` unless
    `authored` (so the course is past the weekly-test phase), 28 days, authorization 12345678."""
    when = authored if authored is not None else days_before(60)
    return imid_order(drug, reference=reference, status=status, authored_on=when, category=category, **fields)


def frp_case(*tests: Any, fill: Any = None, now: datetime = NOW, **chart: Any) -> Case:
    """Fiona (adult female who can get pregnant) on lenalidomide: an active order, the fill of 21 days
    ago (7 days left) unless `fill`, and the given pregnancy tests."""
    chart.setdefault("imid_orders", (active_order(),))
    chart.setdefault("dispenses", (fill if fill is not None else last_fill(21),))
    return case(frp_woman(), now=now, pregnancy_tests=tests, **chart)


def one(c: Case, config: rems.Config | None = None) -> RemsStatus:
    statuses = rems_status(c, config)
    assert len(statuses) == 1, statuses
    return statuses[0]


# ------------------------------------------------------------------------------------------------
# Pregnancy tests
# ------------------------------------------------------------------------------------------------


def test_frp_on_schedule() -> None:
    """Negative test 2 days ago, fill 21 days ago: everything in order, next test in 2 weeks."""
    s = one(frp_case(negative_test(days_before(2))))
    assert s.drug is Drug.LENALIDOMIDE and s.order == ACTIVE and s.other_orders == ()
    assert s.risk_category is RiskCategory.ADULT_FEMALE_RP
    assert s.category_source is CategorySource.ORDER
    assert s.pregnancy_tests_required is True
    assert s.last_negative_test == PregnancyRecord("Observation/hcg-1", date(2025, 6, 16), "Negative")
    assert s.negative_good_through == date(2025, 6, 23)
    assert s.positive_since_negative is None
    assert s.valid_test_today is True and s.valid_test_on_next_fill is True
    assert s.next_test_due == date(2025, 6, 30)  # irregular / undocumented cycles: every 2 weeks
    assert s.last_fill == Fill("MedicationDispense/fill-1", date(2025, 5, 28), Decimal(28))
    assert (s.days_left, s.runs_out, s.next_fill_from) == (7, date(2025, 6, 25), TODAY)
    assert s.supply_source == "MedicationDispense/fill-1"
    assert s.authorization_present and s.authorization_number == "12345678"
    assert s.problems == ()


def test_regular_cycles_make_the_next_test_due_in_4_weeks() -> None:
    s = one(frp_case(negative_test(days_before(2)), regular_cycles=True))
    assert s.next_test_due == date(2025, 7, 14)


def test_weekly_tests_in_the_first_4_weeks_of_the_course() -> None:
    """Course started 10 days ago: the next test is a week after the last negative."""
    c = frp_case(
        negative_test(days_before(3)),
        fill=last_fill(10),
        imid_orders=(active_order(authored=days_before(10)),),
    )
    assert one(c).next_test_due == date(2025, 6, 22)


@pytest.mark.parametrize(
    ("collected", "good_through", "valid"),
    [
        pytest.param(days_before(7, 9), date(2025, 6, 18), True, id="7-days-ago-good-through-today"),
        pytest.param(days_before(7, 9, 1), date(2025, 6, 18), True, id="7-days-less-1-minute"),
        pytest.param(days_before(8, 23, 59), date(2025, 6, 17), False, id="8-days-ago-late-evening"),
        pytest.param(days_before(9), date(2025, 6, 16), False, id="9-days-ago-stale"),
        # 05:30 UTC on 11 June is 22:30 on 10 June in Los Angeles: the clinic-local day counts.
        pytest.param(datetime(2025, 6, 11, 5, 30, tzinfo=ZoneInfo("UTC")), date(2025, 6, 17), False, id="utc-date"),
        pytest.param(date(2025, 6, 11), date(2025, 6, 18), True, id="date-only"),
    ],
)
def test_stale_test_boundaries(collected: datetime | date, good_through: date, valid: bool) -> None:
    s = one(frp_case(negative_test(collected)))
    assert s.negative_good_through == good_through
    assert s.valid_test_today is valid
    assert s.valid_test_on_next_fill is valid  # 7 days left: the next fill is today


def test_stale_test_is_still_the_last_negative_and_the_next_test_is_overdue() -> None:
    s = one(frp_case(negative_test(days_before(20))))
    assert s.last_negative_test is not None and s.last_negative_test.day == date(2025, 5, 29)
    assert s.valid_test_today is False
    assert s.next_test_due == date(2025, 6, 12)  # in the past: overdue


def test_test_good_today_but_expired_by_the_earliest_fill_day() -> None:
    """18 days left: the next fill is from 29 June, after the 16 June test expires (23 June)."""
    s = one(frp_case(negative_test(days_before(2)), fill=last_fill(10)))
    assert s.next_fill_from == date(2025, 6, 29)
    assert s.valid_test_today is True
    assert s.valid_test_on_next_fill is False


def test_test_valid_days_come_from_the_program_config() -> None:
    config = rems.load_config("[rems]\ntest_valid_days = 5\n")
    s = one(frp_case(negative_test(days_before(6))), config)
    assert s.negative_good_through == date(2025, 6, 17)
    assert s.valid_test_today is False


def test_positive_test_after_the_negative() -> None:
    s = one(frp_case(negative_test(days_before(5)), positive_test(days_before(1), text="POSITIVE")))
    assert s.positive_since_negative == PregnancyRecord("Observation/hcg-pos", date(2025, 6, 17), "POSITIVE")
    assert s.last_negative_test is not None and s.last_negative_test.day == date(2025, 6, 13)
    assert s.valid_test_today is False and s.valid_test_on_next_fill is False


def test_positive_followed_by_a_negative_is_history() -> None:
    s = one(frp_case(positive_test(days_before(40)), negative_test(days_before(1))))
    assert s.positive_since_negative is None
    assert s.valid_test_today is True


def test_positive_then_unreadable_still_shows_the_positive() -> None:
    """A newer unreadable result does not hide a positive taken after the last negative."""
    s = one(
        frp_case(
            negative_test(days_before(5)),
            positive_test(days_before(3)),
            unreadable_test(days_before(1), "see comment"),
        )
    )
    assert s.positive_since_negative is not None and s.positive_since_negative.day == date(2025, 6, 15)
    assert s.valid_test_today is False
    assert any("could not be read: 'see comment'" in p for p in s.problems)


def test_documented_pregnant_after_the_negative_counts_as_positive() -> None:
    c = frp_case(
        negative_test(days_before(5)),
        pregnancy_statuses=(pregnancy_status(days_before(1), PregnancyState.PREGNANT),),
    )
    s = one(c)
    assert s.positive_since_negative == PregnancyRecord(
        "Observation/pregnancy-status-1", date(2025, 6, 17), "pregnancy status: pregnant"
    )
    assert s.valid_test_today is False


def test_pregnant_status_superseded_by_a_newer_status_is_not_shown() -> None:
    c = frp_case(
        pregnancy_statuses=(
            pregnancy_status(days_before(30), PregnancyState.PREGNANT),
            pregnancy_status(days_before(2), PregnancyState.NOT_PREGNANT),
        ),
    )
    assert one(c).positive_since_negative is None


def test_no_tests_on_file() -> None:
    s = one(frp_case())
    assert s.last_negative_test is None and s.negative_good_through is None
    assert s.valid_test_today is False and s.valid_test_on_next_fill is False
    assert s.next_test_due == TODAY
    assert s.problems == ()


def test_male_needs_no_tests_and_his_hcg_is_not_a_pregnancy_test() -> None:
    c = case(
        adult_male(),
        imid_orders=(active_order(category=RiskCategory.ADULT_MALE),),
        dispenses=(last_fill(21),),
        pregnancy_tests=(positive_test(days_before(1)),),  # a tumour marker in a man
    )
    s = one(c)
    assert s.pregnancy_tests_required is False
    assert s.risk_category is RiskCategory.ADULT_MALE and s.category_source is CategorySource.ORDER
    assert s.last_negative_test is None and s.positive_since_negative is None
    assert s.valid_test_today is None and s.valid_test_on_next_fill is None and s.next_test_due is None
    assert s.days_left == 7
    assert s.problems == ()


def test_woman_who_cannot_get_pregnant_still_shows_a_positive() -> None:
    c = case(
        nrp_woman(),
        imid_orders=(active_order(category=RiskCategory.ADULT_FEMALE_NRP),),
        dispenses=(last_fill(21),),
        nrp_evidence=(hysterectomy(),),
        pregnancy_tests=(positive_test(days_before(1)),),
    )
    s = one(c)
    assert s.pregnancy_tests_required is False
    assert s.positive_since_negative is not None
    assert s.next_test_due is None and s.valid_test_today is None


# ------------------------------------------------------------------------------------------------
# Risk category source
# ------------------------------------------------------------------------------------------------


def test_category_documented_on_the_order_names_the_element() -> None:
    order = active_order(risk_category_source=Sourced(ACTIVE, "extension rems-risk-category"))
    s = one(frp_case(negative_test(days_before(1)), imid_orders=(order,)))
    assert s.category_source is CategorySource.ORDER
    assert s.category_basis == f"documented on the order: extension rems-risk-category ({ACTIVE})"


@pytest.mark.parametrize(
    ("who", "evidence", "suggested"),
    [
        pytest.param(adult_male(), (), RiskCategory.ADULT_MALE, id="man"),
        pytest.param(patient(Sex.MALE, 15), (), RiskCategory.CHILD_MALE, id="boy"),
        pytest.param(nrp_woman(), (hysterectomy(),), RiskCategory.ADULT_FEMALE_NRP, id="hysterectomy"),
    ],
)
def test_category_suggested_by_the_chart(who: PatientFacts, evidence: tuple[Any, ...], suggested: RiskCategory) -> None:
    c = case(who, imid_orders=(active_order(category=None),), dispenses=(last_fill(21),), nrp_evidence=evidence)
    s = one(c)
    assert s.risk_category is suggested
    assert s.category_source is CategorySource.SUGGESTED
    assert s.category_basis.startswith("not on the order; suggested by the chart: sex ")
    assert s.pregnancy_tests_required is False
    assert s.problems == ()


def test_category_unknown_for_a_woman_without_evidence_requires_tests() -> None:
    c = case(frp_woman(), imid_orders=(active_order(category=None),), dispenses=(last_fill(21),))
    s = one(c)
    assert s.risk_category is None and s.category_source is CategorySource.UNKNOWN
    assert s.pregnancy_tests_required is True
    assert s.next_test_due == TODAY
    assert s.problems == (
        "nothing on the order or chart settles whether the patient can get pregnant: pregnancy tests treated as "
        "required",
    )


def test_unknown_sex_and_birth_date_are_problems() -> None:
    c = case(unknown_sex_patient(None), imid_orders=(active_order(category=None),), dispenses=(last_fill(21),))
    s = one(c)
    assert s.category_source is CategorySource.UNKNOWN
    assert s.pregnancy_tests_required is True
    assert s.problems[:2] == (
        "sex unknown (read from: none)",
        "birth date unknown: adult or child category cannot be checked",
    )


def test_unrecognised_category_text_is_quoted() -> None:
    order = active_order(category=None, risk_category_unrecognized="FCBP?")
    c = case(adult_male(), imid_orders=(order,), dispenses=(last_fill(21),))
    assert "risk category on the order not recognised: 'FCBP?'" in one(c).problems


# ------------------------------------------------------------------------------------------------
# Supply: days left, runs out, next fill
# ------------------------------------------------------------------------------------------------


def male_supply_case(*dispenses: Any, now: datetime = NOW, zone: Any = LOS_ANGELES, **order: Any) -> Case:
    order.setdefault("category", RiskCategory.ADULT_MALE)
    return case(adult_male(), now=now, zone=zone, imid_orders=(active_order(**order),), dispenses=dispenses)


@pytest.mark.parametrize(
    ("now", "days_left", "next_fill"),
    [
        pytest.param(at(date(2025, 6, 17), 23, 59), 1, date(2025, 6, 17), id="a-minute-before-midnight"),
        pytest.param(at(date(2025, 6, 18), 0, 1), 0, date(2025, 6, 18), id="a-minute-after-midnight"),
    ],
)
def test_days_left_turns_over_at_clinic_midnight(now: datetime, days_left: int, next_fill: date) -> None:
    """Handed over at 23:30 on 21 May in Los Angeles (06:30 UTC on 22 May): the supply runs out on
    18 June, the clinic-local day, not the UTC one."""
    c = male_supply_case(dispense(utc(at(date(2025, 5, 21), 23, 30))), now=now)
    s = one(c)
    assert s.runs_out == date(2025, 6, 18)
    assert s.days_left == days_left and s.next_fill_from == next_fill


def test_days_left_in_a_clinic_east_of_utc() -> None:
    """16:00 UTC on 21 May is 01:00 on 22 May in Tokyo: runs out 19 June there."""
    now = datetime(2025, 6, 18, 10, 0, tzinfo=TOKYO)
    c = male_supply_case(dispense(datetime(2025, 5, 21, 16, 0, tzinfo=ZoneInfo("UTC"))), now=now, zone=TOKYO)
    s = one(c)
    assert s.runs_out == date(2025, 6, 19) and s.days_left == 1


@pytest.mark.parametrize(
    ("handed_over", "now", "days_left"),
    [
        # Spring forward (9 March 2025): the 23-hour day still counts as one calendar day.
        pytest.param(at(date(2025, 3, 8), 23, 30), at(date(2025, 3, 9), 23, 30), 27, id="spring-23-hours-later"),
        pytest.param(at(date(2025, 3, 1), 14), at(date(2025, 3, 9), 23, 59), 20, id="spring-before-midnight"),
        pytest.param(at(date(2025, 3, 1), 14), at(date(2025, 3, 10), 0, 30), 19, id="spring-after-midnight"),
        # Fall back (2 November 2025): the 25-hour day is still one calendar day.
        pytest.param(at(date(2025, 11, 1), 23, 30), at(date(2025, 11, 2), 23, 30), 27, id="fall-25-hours-later"),
        pytest.param(at(date(2025, 11, 1), 0, 30), at(date(2025, 11, 2), 23, 59), 27, id="fall-47-hours-later"),
    ],
)
def test_days_left_across_a_dst_change(handed_over: datetime, now: datetime, days_left: int) -> None:
    s = one(male_supply_case(dispense(handed_over), now=now, authored=handed_over - timedelta(days=1)))
    assert s.days_left == days_left
    assert s.runs_out == handed_over.date() + timedelta(days=28)


def test_no_dispense_yet_counts_the_order_itself() -> None:
    """An active order signed 3 days ago with no dispense on file: supplied from its start."""
    c = male_supply_case(authored=days_before(3))
    s = one(c)
    assert s.last_fill is None
    assert s.supply_source == ACTIVE
    assert s.supply_how is not None and "no dispense on file" in s.supply_how
    assert (s.days_left, s.runs_out, s.next_fill_from) == (25, date(2025, 7, 13), date(2025, 7, 6))


def test_a_dispense_of_the_order_replaces_the_order_supply() -> None:
    c = male_supply_case(dispense(days_before(2, 14), prescription=ACTIVE), authored=days_before(10))
    s = one(c)
    assert s.supply_source == "MedicationDispense/fill-1" and s.days_left == 26


def test_run_out_supply_shows_zero_days_and_fills_today() -> None:
    s = one(male_supply_case(last_fill(40)))
    assert s.days_left == 0 and s.runs_out == date(2025, 6, 6)
    assert s.next_fill_from == TODAY


@pytest.mark.parametrize(
    ("days_ago", "days_left", "next_fill"),
    [
        pytest.param(28, 0, TODAY, id="runs-out-today"),
        pytest.param(21, 7, TODAY, id="7-left"),
        pytest.param(20, 8, date(2025, 6, 19), id="8-left"),
        pytest.param(0, 28, date(2025, 7, 9), id="filled-today"),
    ],
)
def test_days_left_and_next_fill(days_ago: int, days_left: int, next_fill: date) -> None:
    s = one(male_supply_case(last_fill(days_ago)))
    assert s.days_left == days_left and s.next_fill_from == next_fill


def test_days_left_capped_at_28_and_the_cap_is_reported() -> None:
    s = one(male_supply_case(dispense(days_before(1, 14), days_supply=90)))
    assert s.days_left == 28
    assert any("leaves 89 days" in p for p in s.problems)


def test_unknown_supply_is_none_and_a_problem() -> None:
    c = male_supply_case(supply_days=None)
    s = one(c)
    assert s.days_left is None and s.runs_out is None and s.next_fill_from is None
    assert s.problems == (
        "days of supply left unknown: the order's days' supply is unknown (no expectedSupplyDuration and no quantity)",
    )


def test_dispense_without_days_supply_is_a_problem_but_the_order_still_counts() -> None:
    c = male_supply_case(dispense(days_before(2, 14), days_supply=None), authored=days_before(3))
    s = one(c)
    assert s.last_fill == Fill("MedicationDispense/fill-1", date(2025, 6, 16), None)
    assert s.days_left == 25  # from the order
    assert "dispense of 2025-06-16 states no days' supply (MedicationDispense/fill-1)" in s.problems


def test_unknown_supply_leaves_the_next_fill_test_question_open() -> None:
    c = frp_case(negative_test(days_before(1)), imid_orders=(active_order(supply_days=None),), dispenses=())
    s = one(c)
    assert s.valid_test_today is True and s.valid_test_on_next_fill is None


# ------------------------------------------------------------------------------------------------
# Which orders, authorization, unreadable data
# ------------------------------------------------------------------------------------------------


def test_no_active_order_no_status() -> None:
    orders = (
        active_order(status="completed", reference="MedicationRequest/old"),
        active_order(status="draft", reference="MedicationRequest/draft"),
    )
    assert rems_status(case(frp_woman(), imid_orders=orders)) == ()


def test_one_status_per_drug_for_the_newest_order() -> None:
    older = active_order(reference="MedicationRequest/older", authored=days_before(30))
    newer = active_order(reference="MedicationRequest/newer", authored=days_before(2), authorization=None)
    s = one(frp_case(negative_test(days_before(1)), imid_orders=(older, newer)))
    assert s.order == "MedicationRequest/newer" and s.other_orders == ("MedicationRequest/older",)
    assert s.authorization_present is False and s.authorization_number is None
    assert s.problems[0].startswith("2 active lenalidomide orders (MedicationRequest/older besides")


def test_two_imids_give_two_statuses_in_drug_order() -> None:
    orders = (
        active_order(Drug.THALIDOMIDE, reference="MedicationRequest/thal"),
        active_order(Drug.LENALIDOMIDE),
    )
    statuses = rems_status(frp_case(negative_test(days_before(1)), imid_orders=orders))
    assert [(s.drug, s.order) for s in statuses] == [
        (Drug.LENALIDOMIDE, ACTIVE),
        (Drug.THALIDOMIDE, "MedicationRequest/thal"),
    ]
    assert statuses[1].last_fill is None  # the fill was lenalidomide
    assert statuses[0].days_left == 7


def test_unreadable_data_is_listed_not_dropped() -> None:
    c = frp_case(
        negative_test(days_before(3)),
        unreadable_test(days_before(1), "indeterminate"),
        pregnancy_test(days_before(0, 8), rems.model.TestResult.POSITIVE, preliminary=True, reference="Observation/p"),
        negative_test(NOW + timedelta(days=2), reference="Observation/future"),
        unreadable_pregnancy_tests=("Observation/undated: pregnancy test with month-only date 2025-06",),
        unreadable=("Observation/anc-x: ANC in unit 'cells' not understood",),
    )
    s = one(c)
    assert s.last_negative_test is not None and s.last_negative_test.day == date(2025, 6, 15)
    assert s.valid_test_today is True  # the unreadable and preliminary results are shown, not counted
    assert s.problems == (
        "pregnancy test of 2025-06-17 could not be read: 'indeterminate' (Observation/hcg-unreadable)",
        "preliminary pregnancy test of 2025-06-18 not counted: 'Positive' (Observation/p)",
        "pregnancy test dated in the future (2025-06-20, Observation/future): not counted",
        "pregnancy test with no usable date: Observation/undated: pregnancy test with month-only date 2025-06",
        "record not read: Observation/anc-x: ANC in unit 'cells' not understood",
    )


def test_unreadable_results_older_than_the_negative_are_not_problems() -> None:
    s = one(frp_case(unreadable_test(days_before(6)), negative_test(days_before(2))))
    assert s.problems == ()


@pytest.mark.parametrize(
    ("filled_days_ago", "shown"),
    [
        pytest.param(20, True, id="completed-order-8-days-left"),
        pytest.param(28 + 27, True, id="ran-out-27-days-ago-still-recent"),
        pytest.param(28 + 28, False, id="ran-out-28-days-ago-no-longer-on-it"),
    ],
)
def test_completed_order_with_a_recent_supply_still_gives_a_status(filled_days_ago: int, shown: bool) -> None:
    """Many EHRs mark a prescription completed once dispensed: the patient is still on the drug until the
    supply runs out, and for RECENT_THERAPY_DAYS after (awaiting the renewal)."""
    done = active_order(status="completed", reference="MedicationRequest/done", authored=days_before(filled_days_ago))
    c = case(
        adult_male(),
        imid_orders=(done,),
        dispenses=(dispense(days_before(filled_days_ago), prescription="MedicationRequest/done"),),
    )
    statuses = rems_status(c)
    assert bool(statuses) is shown
    if shown:
        assert statuses[0].order == "MedicationRequest/done"
        assert statuses[0].days_left == max(0, 28 - filled_days_ago)
