"""Pregnancy-test rules: positive, missing, stale (7 clinic-local calendar days), initiation (10-14 days
and 24 clock hours), preliminary results, and the clinic's time zone around midnight and DST."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest

import rems
from rems.findings import FixKind, RuleCode, Severity
from rems.model import Drug, PregnancyState, RiskCategory

from .builders import (
    LOS_ANGELES,
    NOW,
    TODAY,
    TOKYO,
    adult_male,
    at,
    case,
    chart_order,
    codes,
    days_before,
    dispense,
    frp_order,
    frp_woman,
    hysterectomy,
    last_fill,
    lenalidomide_order,
    negative_test,
    nrp_woman,
    only,
    positive_test,
    pregnancy_status,
    run,
    unknown_sex_patient,
    unreadable_test,
    utc,
)

RC = RuleCode
CRIT, WARN = Severity.CRITICAL, Severity.WARNING
PREGNANCY_CODES = {
    RC.PREGNANCY_TEST_MISSING,
    RC.PREGNANCY_TEST_STALE,
    RC.PREGNANCY_TEST_POSITIVE,
    RC.INITIATION_TESTS_INCOMPLETE,
}
COUNT_PRELIMINARY = "[rems]\ncount_preliminary_tests = true"


def continuing(*tests: Any, **chart: Any) -> rems.Case:
    """Fiona on an ongoing course (last fill 21 days ago, 7 days left), with `tests` on file."""
    chart.setdefault("dispenses", (last_fill(21),))
    return case(frp_woman(), frp_order(), pregnancy_tests=tests, **chart)


def pregnancy_findings(c: rems.Case, config: rems.Config | None = None) -> list[tuple[RuleCode, Severity]]:
    return [(f.code, f.severity) for f in run(c, config) if f.code in PREGNANCY_CODES]


# ------------------------------------------------------------------------------------------------
# pregnancy-test-positive
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tests", "statuses", "positive"),
    [
        pytest.param([positive_test(days_before(1))], [], True, id="newest-test-positive"),
        pytest.param([negative_test(days_before(5)), positive_test(days_before(1))], [], True, id="positive-after-neg"),
        pytest.param([positive_test(days_before(5)), negative_test(days_before(1))], [], False, id="newer-negative"),
        pytest.param(
            [negative_test(days_before(5))],
            [pregnancy_status(days_before(2), PregnancyState.PREGNANT)],
            True,
            id="status-pregnant-after-negative",
        ),
        pytest.param(
            [negative_test(days_before(1))],
            [pregnancy_status(days_before(2), PregnancyState.PREGNANT)],
            False,
            id="negative-after-status-pregnant",
        ),
        pytest.param(
            [negative_test(days_before(1))],
            [
                pregnancy_status(days_before(10), PregnancyState.PREGNANT),
                pregnancy_status(days_before(3), PregnancyState.NOT_PREGNANT),
            ],
            False,
            id="newest-status-not-pregnant",
        ),
        pytest.param(
            [negative_test(days_before(2))],
            [pregnancy_status(NOW + timedelta(days=1), PregnancyState.PREGNANT)],
            False,
            id="status-in-future-ignored",
        ),
        pytest.param(
            [negative_test(days_before(2)), positive_test(NOW + timedelta(hours=2))],
            [],
            False,
            id="test-in-future-ignored",
        ),
    ],
)
def test_pregnancy_test_positive(tests: list[Any], statuses: list[Any], positive: bool) -> None:
    found = pregnancy_findings(continuing(*tests, pregnancy_statuses=tuple(statuses)))
    if positive:
        # Positive dominates: no missing / stale / initiation card besides it.
        assert found == [(RC.PREGNANCY_TEST_POSITIVE, CRIT)]
    else:
        assert found == []


def test_positive_dominates_at_initiation() -> None:
    c = case(frp_woman(), frp_order(), pregnancy_tests=(positive_test(days_before(0, 8)),))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_POSITIVE, CRIT)]


def test_positive_summary_names_the_clinic_local_day() -> None:
    # Collected 23:30 Los Angeles on 16 June = 17 June in UTC: the card says 16 June.
    f = only(run(continuing(positive_test(utc(at(date(2025, 6, 16), 23, 30))))), RC.PREGNANCY_TEST_POSITIVE)
    assert "2025-06-16" in f.summary
    assert f.evidence[0].reference == "Observation/hcg-pos"


@pytest.mark.parametrize(
    ("who", "category"),
    [
        pytest.param(adult_male(), RiskCategory.ADULT_MALE, id="male-adult-male-category"),
        pytest.param(adult_male(), None, id="male-no-category"),
    ],
)
def test_male_with_positive_hcg_is_not_pregnant(who: Any, category: RiskCategory | None) -> None:
    """hCG in a male is a tumour marker, never a pregnancy."""
    c = case(who, lenalidomide_order(category=category), pregnancy_tests=(positive_test(days_before(1)),))
    assert RC.PREGNANCY_TEST_POSITIVE not in codes(run(c))


def test_male_with_positive_hcg_and_male_category_has_no_findings() -> None:
    c = case(adult_male(), lenalidomide_order(), pregnancy_tests=(positive_test(days_before(1)),))
    assert run(c) == []


@pytest.mark.parametrize(
    ("who", "category", "chart"),
    [
        pytest.param(unknown_sex_patient(), RiskCategory.ADULT_MALE, {}, id="unknown-sex"),
        pytest.param(adult_male(), RiskCategory.ADULT_FEMALE_RP, {}, id="male-with-female-category"),
        pytest.param(nrp_woman(), RiskCategory.ADULT_FEMALE_NRP, {"nrp_evidence": (hysterectomy(),)}, id="nrp-woman"),
    ],
)
def test_positive_applies_to_anyone_not_male_or_with_female_category(
    who: Any, category: RiskCategory, chart: dict[str, Any]
) -> None:
    c = case(who, lenalidomide_order(category=category), pregnancy_tests=(positive_test(days_before(1)),), **chart)
    assert only(run(c), RC.PREGNANCY_TEST_POSITIVE).severity is CRIT


def test_pregnancy_status_pregnant_without_tests_is_positive() -> None:
    c = continuing(pregnancy_statuses=(pregnancy_status(days_before(3), PregnancyState.PREGNANT),))
    f = only(run(c), RC.PREGNANCY_TEST_POSITIVE)
    assert f.severity is CRIT
    assert f.evidence[0].reference == "Observation/pregnancy-status-1"
    assert RC.PREGNANCY_TEST_MISSING not in codes(run(c))


# ------------------------------------------------------------------------------------------------
# pregnancy-test-missing
# ------------------------------------------------------------------------------------------------


def test_no_test_on_continuing_therapy_is_missing_critical() -> None:
    assert pregnancy_findings(continuing()) == [(RC.PREGNANCY_TEST_MISSING, CRIT)]


def test_recent_negative_is_not_missing() -> None:
    assert pregnancy_findings(continuing(negative_test(days_before(3)))) == []


def test_unreadable_newest_after_good_negative_is_missing_warning_quoting_result() -> None:
    c = continuing(negative_test(days_before(3)), unreadable_test(days_before(1), "see comment"))
    f = only(run(c), RC.PREGNANCY_TEST_MISSING)
    assert f.severity is WARN
    assert "'see comment'" in f.summary


def test_only_unreadable_test_is_missing_critical() -> None:
    c = continuing(unreadable_test(days_before(1)))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_MISSING, CRIT)]


def test_unreadable_newest_with_stale_negative_is_reported_once_as_stale() -> None:
    c = continuing(negative_test(days_before(9)), unreadable_test(days_before(1)))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_STALE, CRIT)]


def test_negative_collected_after_now_does_not_count() -> None:
    c = continuing(negative_test(NOW + timedelta(minutes=30)))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_MISSING, CRIT)]


@pytest.mark.parametrize(
    ("who", "category", "chart"),
    [
        pytest.param(adult_male(), RiskCategory.ADULT_MALE, {}, id="adult-male"),
        pytest.param(nrp_woman(), RiskCategory.ADULT_FEMALE_NRP, {"nrp_evidence": (hysterectomy(),)}, id="nrp-woman"),
    ],
)
def test_no_test_needed_when_patient_cannot_get_pregnant(
    who: Any, category: RiskCategory, chart: dict[str, Any]
) -> None:
    c = case(who, lenalidomide_order(category=category), dispenses=(last_fill(),), **chart)
    assert pregnancy_findings(c) == []


# ------------------------------------------------------------------------------------------------
# Preliminary results
# ------------------------------------------------------------------------------------------------


def test_preliminary_negative_ignored_by_default() -> None:
    c = continuing(negative_test(days_before(2), preliminary=True))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_MISSING, CRIT)]


def test_preliminary_negative_counts_when_configured() -> None:
    c = continuing(negative_test(days_before(2), preliminary=True))
    assert pregnancy_findings(c, rems.load_config(COUNT_PRELIMINARY)) == []


def test_preliminary_positive_ignored_by_default() -> None:
    c = continuing(negative_test(days_before(3)), positive_test(days_before(1), preliminary=True))
    assert pregnancy_findings(c) == []


def test_preliminary_positive_counts_when_configured() -> None:
    c = continuing(negative_test(days_before(3)), positive_test(days_before(1), preliminary=True))
    assert pregnancy_findings(c, rems.load_config(COUNT_PRELIMINARY)) == [(RC.PREGNANCY_TEST_POSITIVE, CRIT)]


# ------------------------------------------------------------------------------------------------
# pregnancy-test-stale: good through collection day + 7, in clinic-local calendar days
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("collected", "stale"),
    [
        pytest.param(days_before(7, 10), False, id="exactly-7-days"),
        pytest.param(days_before(7, 9), False, id="7-days-plus-1-hour-same-calendar-count"),
        pytest.param(days_before(7, 0, 1), False, id="7-days-plus-10-hours"),
        pytest.param(days_before(7, 11), False, id="7-days-minus-1-hour"),
        pytest.param(days_before(8, 10), True, id="exactly-8-days"),
        pytest.param(days_before(8, 23, 59), True, id="8-calendar-days-but-7-days-10-hours"),
        pytest.param(TODAY - timedelta(days=7), False, id="date-only-7-days"),
        pytest.param(TODAY - timedelta(days=8), True, id="date-only-8-days"),
        pytest.param(utc(days_before(7, 23, 30)), False, id="LA-23:30-7-days-sent-as-UTC"),
        pytest.param(utc(days_before(8, 23, 30)), True, id="LA-23:30-8-days-sent-as-UTC-(UTC-count-7)"),
    ],
)
def test_stale_counts_clinic_local_days(collected: datetime | date, stale: bool) -> None:
    found = pregnancy_findings(continuing(negative_test(collected)))
    assert found == ([(RC.PREGNANCY_TEST_STALE, CRIT)] if stale else [])


def test_la_test_at_2330_sent_in_utc_really_is_on_the_next_utc_day() -> None:
    # Guard for the table above: the UTC date differs from the clinic date.
    assert utc(days_before(8, 23, 30)).date() == TODAY - timedelta(days=7)


@pytest.mark.parametrize(
    ("now", "stale"),
    [
        pytest.param(at(TODAY, 23, 30), False, id="late-evening-LA"),
        pytest.param(utc(at(TODAY, 23, 30)), False, id="late-evening-LA-clock-in-UTC"),
        pytest.param(at(TODAY + timedelta(days=1), 0, 15), True, id="just-after-midnight-LA"),
    ],
)
def test_stale_uses_clinic_local_today(now: datetime, stale: bool) -> None:
    """Test collected 11 June 09:00 Los Angeles: good through 18 June local, whatever the UTC date."""
    c = case(
        frp_woman(),
        frp_order(),
        now=now,
        dispenses=(dispense(at(TODAY - timedelta(days=21), 14)),),
        pregnancy_tests=(negative_test(days_before(7, 9)),),
    )
    assert pregnancy_findings(c) == ([(RC.PREGNANCY_TEST_STALE, CRIT)] if stale else [])


@pytest.mark.parametrize(
    ("collected", "stale"),
    [
        # 23:30 UTC on 10 June is 08:30 on 11 June in Tokyo: good through 18 June local.
        pytest.param(datetime.fromisoformat("2025-06-10T23:30:00+00:00"), False, id="UTC-2330-is-next-day"),
        # 23:30 Tokyo on 10 June (14:30 UTC): good through 17 June local.
        pytest.param(at(date(2025, 6, 10), 23, 30, TOKYO), True, id="tokyo-2330-8-days"),
        pytest.param(at(date(2025, 6, 11), 0, 30, TOKYO), False, id="tokyo-0030-7-days"),
    ],
)
def test_stale_in_a_clinic_east_of_utc(collected: datetime, stale: bool) -> None:
    now = at(date(2025, 6, 18), 10, 0, TOKYO)
    c = case(
        frp_woman(),
        frp_order(),
        now=now,
        zone=TOKYO,
        dispenses=(last_fill(21, zone=TOKYO),),
        pregnancy_tests=(negative_test(collected),),
    )
    assert pregnancy_findings(c) == ([(RC.PREGNANCY_TEST_STALE, CRIT)] if stale else [])


def test_stale_finding_says_through_when_and_asks_for_a_test() -> None:
    f = only(run(continuing(negative_test(days_before(9)))), RC.PREGNANCY_TEST_STALE)
    assert f.data == {"good_through": "2025-06-16", "first_dispense_day": "2025-06-18"}
    assert f.fix is not None
    assert (f.fix.kind, f.fix.value) == (FixKind.ORDER_PREGNANCY_TEST, "2025-06-18")
    assert "today" in f.summary


def test_stale_uses_newest_negative_not_oldest() -> None:
    c = continuing(negative_test(days_before(20), reference="Observation/old"), negative_test(days_before(3)))
    assert pregnancy_findings(c) == []


@pytest.mark.parametrize(
    ("fill_days_ago", "test_days_ago", "expected"),
    [
        # 7 days left: dispensable today; a 5-day-old test is good through today + 2.
        pytest.param(21, 5, [], id="dispensable-today"),
        # 10 days left: dispensable from today + 3; the same test expires today + 2.
        pytest.param(18, 5, [(RC.PREGNANCY_TEST_STALE, CRIT)], id="early-refill-day-makes-test-stale"),
        # A 4-day-old test is good through today + 3: exactly the first dispense day.
        pytest.param(18, 4, [], id="good-on-the-early-refill-day"),
    ],
)
def test_first_dispense_day_moves_to_early_refill_date(
    fill_days_ago: int, test_days_ago: int, expected: list[tuple[RuleCode, Severity]]
) -> None:
    c = continuing(negative_test(days_before(test_days_ago)), dispenses=(last_fill(fill_days_ago),))
    assert pregnancy_findings(c) == expected


def test_stale_on_early_refill_day_names_that_day() -> None:
    c = continuing(negative_test(days_before(5)), dispenses=(last_fill(18),))
    findings = run(c)
    stale = only(findings, RC.PREGNANCY_TEST_STALE)
    assert stale.data["first_dispense_day"] == "2025-06-21"
    assert "on 2025-06-21" in stale.summary
    assert only(findings, RC.EARLY_REFILL).data["dispensable_from"] == "2025-06-21"
    # Fix: a test collected from 14 June (21 June - 7) would do, but not before today.
    assert stale.fix is not None and stale.fix.value == "2025-06-18"


def test_stale_fix_date_is_first_dispense_day_minus_7_when_later_than_today() -> None:
    # Fill 5 days ago (13 June): runs out 11 July, dispensable from 4 July; a test then must be
    # collected on or after 27 June.
    c = continuing(negative_test(days_before(2)), dispenses=(last_fill(5),))
    stale = only(run(c), RC.PREGNANCY_TEST_STALE)
    assert stale.fix is not None and stale.fix.value == "2025-06-27"


# ------------------------------------------------------------------------------------------------
# initiation-tests-incomplete: first prescription needs 10-14 days before AND within 24 hours
# ------------------------------------------------------------------------------------------------

_RECENT = negative_test(NOW - timedelta(hours=2), reference="Observation/hcg-recent")


def initiation(*tests: Any, now: datetime = NOW, **chart: Any) -> rems.Case:
    """Fiona's first prescription: no IMiD order or dispense on file."""
    return case(frp_woman(), frp_order(), now=now, pregnancy_tests=tests, **chart)


def _early(days: int, hour: int = 9, minute: int = 0) -> Any:
    return negative_test(days_before(days, hour, minute), reference="Observation/hcg-early")


@pytest.mark.parametrize(
    ("early_days", "complete"),
    [
        pytest.param(9, False, id="9-days"),
        pytest.param(10, True, id="10-days"),
        pytest.param(12, True, id="12-days"),
        pytest.param(14, True, id="14-days"),
        pytest.param(15, False, id="15-days"),
    ],
)
def test_initiation_early_test_window(early_days: int, complete: bool) -> None:
    found = pregnancy_findings(initiation(_early(early_days), _RECENT))
    assert found == ([] if complete else [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)])


@pytest.mark.parametrize(
    ("early", "complete"),
    [
        # 14 days at 23:59 local: nearly 15 x 24 hours, still calendar day -14.
        pytest.param(_early(14, 23, 59), True, id="14-calendar-days-late-evening"),
        # 10 days at 00:01 local: over 10 x 24 hours, calendar day -10.
        pytest.param(_early(10, 0, 1), True, id="10-calendar-days-just-after-midnight"),
        # 15 days at 23:30 Los Angeles, sent in UTC: the UTC date is 14 days ago, clinic date 15.
        pytest.param(negative_test(utc(days_before(15, 23, 30))), False, id="LA-2330-15-days-sent-as-UTC"),
        # 10 days at 23:30 Los Angeles, sent in UTC: UTC date 9 days ago, clinic date 10.
        pytest.param(negative_test(utc(days_before(10, 23, 30))), True, id="LA-2330-10-days-sent-as-UTC"),
        pytest.param(negative_test(TODAY - timedelta(days=14)), True, id="date-only-14-days"),
        pytest.param(negative_test(TODAY - timedelta(days=15)), False, id="date-only-15-days"),
    ],
)
def test_initiation_early_window_counts_clinic_calendar_days(early: Any, complete: bool) -> None:
    found = pregnancy_findings(initiation(early, _RECENT))
    assert found == ([] if complete else [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)])


@pytest.mark.parametrize(
    ("collected", "complete"),
    [
        pytest.param(NOW - timedelta(hours=24), True, id="exactly-24-hours"),
        pytest.param(NOW - timedelta(hours=24, minutes=1), False, id="24-hours-plus-1-minute"),
        pytest.param(NOW - timedelta(hours=23, minutes=59), True, id="23h59"),
        pytest.param(NOW, True, id="collected-now"),
        pytest.param(utc(NOW - timedelta(hours=24)), True, id="exactly-24-hours-sent-as-UTC"),
        pytest.param(utc(NOW - timedelta(hours=24, minutes=1)), False, id="24h01-sent-as-UTC"),
        pytest.param(TODAY, True, id="date-only-today-is-start-of-today"),
        # Date-only yesterday = 00:00 yesterday, 34 hours before 10:00 today: too old.
        pytest.param(TODAY - timedelta(days=1), False, id="date-only-yesterday"),
        pytest.param(NOW + timedelta(minutes=1), False, id="in-the-future"),
    ],
)
def test_initiation_recent_test_within_24_clock_hours(collected: datetime | date, complete: bool) -> None:
    recent = negative_test(collected, reference="Observation/hcg-recent")
    found = pregnancy_findings(initiation(_early(12), recent))
    assert found == ([] if complete else [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)])


def test_initiation_24_hours_in_a_clinic_east_of_utc() -> None:
    now = at(date(2025, 6, 18), 8, 0, TOKYO)  # 23:00 UTC on 17 June
    early = negative_test(at(date(2025, 6, 6), 9, 0, TOKYO), reference="Observation/hcg-early")
    ok = negative_test(utc(now - timedelta(hours=24)), reference="Observation/hcg-recent")
    late = negative_test(utc(now - timedelta(hours=24, minutes=1)), reference="Observation/hcg-recent")
    assert pregnancy_findings(case(frp_woman(), frp_order(), now=now, zone=TOKYO, pregnancy_tests=(early, ok))) == []
    assert pregnancy_findings(case(frp_woman(), frp_order(), now=now, zone=TOKYO, pregnancy_tests=(early, late))) == [
        (RC.INITIATION_TESTS_INCOMPLETE, CRIT)
    ]


@pytest.mark.parametrize(
    ("early_day", "complete"),
    [
        # 08:30 Tokyo on 8 June is 23:30 UTC on 7 June: clinic count 10 (UTC count 11).
        pytest.param(at(date(2025, 6, 8), 8, 30, TOKYO), True, id="tokyo-0830-10-days"),
        # 08:30 Tokyo on 9 June is 23:30 UTC on 8 June: clinic count 9 (UTC count 10).
        pytest.param(utc(at(date(2025, 6, 9), 8, 30, TOKYO)), False, id="tokyo-0830-9-days-sent-as-UTC"),
    ],
)
def test_initiation_early_window_east_of_utc(early_day: datetime, complete: bool) -> None:
    now = at(date(2025, 6, 18), 10, 0, TOKYO)
    tests = (negative_test(early_day, reference="Observation/hcg-early"), negative_test(now - timedelta(hours=1)))
    found = pregnancy_findings(case(frp_woman(), frp_order(), now=now, zone=TOKYO, pregnancy_tests=tests))
    assert found == ([] if complete else [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)])


# Across a DST change "24 hours" is elapsed time, not wall-clock difference.
_SPRING_NOW = at(date(2025, 3, 9), 11, 30, LOS_ANGELES)  # PDT; clocks went forward at 02:00
_FALL_NOW = at(date(2025, 11, 2), 9, 30, LOS_ANGELES)  # PST; clocks went back at 02:00


def _dst_case(now: datetime, recent: datetime) -> rems.Case:
    early = negative_test(now - timedelta(days=12), reference="Observation/hcg-early")
    return initiation(early, negative_test(recent, reference="Observation/hcg-recent"), now=now)


def test_spring_forward_23_5_elapsed_hours_sent_as_utc_passes() -> None:
    recent = utc(at(date(2025, 3, 8), 11, 0, LOS_ANGELES))
    assert _SPRING_NOW.astimezone(LOS_ANGELES) - recent == timedelta(hours=23, minutes=30)
    assert pregnancy_findings(_dst_case(_SPRING_NOW, recent)) == []


def test_spring_forward_23_5_elapsed_hours_in_clinic_zone_passes() -> None:
    recent = at(date(2025, 3, 8), 11, 0, LOS_ANGELES)  # PST, 23.5 real hours before 11:30 PDT
    assert pregnancy_findings(_dst_case(_SPRING_NOW, recent)) == []


def test_fall_back_24_5_elapsed_hours_sent_as_utc_fails() -> None:
    recent = utc(at(date(2025, 11, 1), 10, 0, LOS_ANGELES))  # PDT, 24.5 real hours before 09:30 PST
    assert pregnancy_findings(_dst_case(_FALL_NOW, recent)) == [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)]


def test_fall_back_24_5_elapsed_hours_in_clinic_zone_fails() -> None:
    recent = at(date(2025, 11, 1), 10, 0, LOS_ANGELES)
    assert pregnancy_findings(_dst_case(_FALL_NOW, recent)) == [(RC.INITIATION_TESTS_INCOMPLETE, CRIT)]


def test_initiation_without_tests_replaces_missing() -> None:
    findings = run(initiation())
    f = only(findings, RC.INITIATION_TESTS_INCOMPLETE)
    assert f.severity is CRIT
    assert "one 10-14 days before, one within 24 hours before" in f.summary
    assert RC.PREGNANCY_TEST_MISSING not in codes(findings)
    assert RC.PREGNANCY_TEST_STALE not in codes(findings)


def test_initiation_with_only_early_test_names_the_missing_one() -> None:
    f = only(run(initiation(_early(12))), RC.INITIATION_TESTS_INCOMPLETE)
    assert "(one within 24 hours before)" in f.summary


def test_initiation_positive_recent_test_is_positive_only() -> None:
    c = initiation(_early(12), positive_test(NOW - timedelta(hours=3)))
    assert pregnancy_findings(c) == [(RC.PREGNANCY_TEST_POSITIVE, CRIT)]


@pytest.mark.parametrize(
    ("chart", "is_initiation"),
    [
        pytest.param({}, True, id="nothing-on-file"),
        pytest.param({"dispenses": (dispense(days_before(28, 14)),)}, False, id="dispense-28-days-ago"),
        pytest.param({"dispenses": (dispense(days_before(29, 14)),)}, True, id="dispense-29-days-ago"),
        pytest.param(
            {"dispenses": (dispense(days_before(10, 14), drug=Drug.THALIDOMIDE),)},
            False,
            id="other-imid-dispensed",
        ),
        pytest.param({"imid_orders": (chart_order(authored=days_before(28)),)}, False, id="order-28-days-ago"),
        pytest.param({"imid_orders": (chart_order(authored=days_before(29)),)}, True, id="order-29-days-ago"),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(25), status="completed"),)},
            False,
            id="completed-order",
        ),
        pytest.param(
            {"imid_orders": (chart_order(Drug.POMALIDOMIDE, authored=days_before(28), status="completed"),)},
            False,
            id="other-imid-ordered",
        ),
        pytest.param({"imid_orders": (chart_order(authored=days_before(3), status="draft"),)}, True, id="draft-order"),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), status="cancelled"),)},
            True,
            id="cancelled-order",
        ),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), status="entered-in-error"),)},
            True,
            id="entered-in-error-order",
        ),
    ],
)
def test_what_counts_as_initiation(chart: dict[str, Any], is_initiation: bool) -> None:
    """Only a negative test 2 days old on file: fine on continuing therapy, incomplete at initiation."""
    c = case(frp_woman(), frp_order(), pregnancy_tests=(negative_test(days_before(2)),), **chart)
    found = codes(run(c))
    assert (RC.INITIATION_TESTS_INCOMPLETE in found) is is_initiation
    assert RC.PREGNANCY_TEST_MISSING not in found
    assert RC.PREGNANCY_TEST_STALE not in found


def test_order_under_review_does_not_end_initiation() -> None:
    order = frp_order(reference="MedicationRequest/new", status="active", authored_on=NOW)
    c = case(frp_woman(), order, imid_orders=(order,), pregnancy_tests=(negative_test(days_before(2)),))
    assert RC.INITIATION_TESTS_INCOMPLETE in codes(run(c))


def test_chart_order_without_authored_on_counts_by_start() -> None:
    previous = lenalidomide_order(
        reference="MedicationRequest/prev", status="active", authored_on=None, start=TODAY - timedelta(days=20)
    )
    c = case(frp_woman(), frp_order(), imid_orders=(previous,), pregnancy_tests=(negative_test(days_before(2)),))
    assert RC.INITIATION_TESTS_INCOMPLETE not in codes(run(c))


def test_undated_pregnancy_test_is_a_warning_not_a_pass() -> None:
    """A test we could not place in time might be a newer positive: warn, even with a valid negative."""
    ongoing = {"dispenses": (last_fill(),), "pregnancy_tests": (negative_test(days_before(2)),)}
    clean = case(frp_woman(), frp_order(), **ongoing)
    assert RuleCode.PREGNANCY_TEST_MISSING not in codes(run(clean))
    undated = case(
        frp_woman(),
        frp_order(),
        **ongoing,
        unreadable_pregnancy_tests=("Observation/hcg-9: pregnancy test without a usable collection date",),
    )
    found = only(run(undated), RuleCode.PREGNANCY_TEST_MISSING)
    assert found.severity is Severity.WARNING
    assert found.evidence[0].description.startswith("Observation/hcg-9")


def test_unreadable_test_after_a_positive_does_not_clear_it() -> None:
    """Negative, then positive, then a result nobody could read: still contraindicated."""
    c = continuing(
        negative_test(days_before(9)), positive_test(days_before(4)), unreadable_test(days_before(1), "see comment")
    )
    assert (RC.PREGNANCY_TEST_POSITIVE, CRIT) in pregnancy_findings(c)
