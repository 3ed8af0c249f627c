"""Day-granular time arithmetic in the clinic's zone (`rems.timing`)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from rems import timing
from rems.config import TestSchedule as Schedule
from rems.config import default_config
from rems.timing import (
    SupplyWindow,
    age_in_years,
    earliest_instant,
    local_day,
    months_between,
    next_test_due,
    supply_runs_out,
)

from .builders import LOS_ANGELES, TOKYO, at

LA = LOS_ANGELES


# ------------------------------------------------------------------------------------------------
# local_day / earliest_instant
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "zone", "expected"),
    [
        pytest.param(datetime(2025, 6, 19, 6, 30, tzinfo=UTC), LA, date(2025, 6, 18), id="utc-morning-is-LA-eve"),
        pytest.param(datetime(2025, 6, 18, 23, 30, tzinfo=LA), LA, date(2025, 6, 18), id="LA-2330-stays"),
        pytest.param(datetime(2025, 6, 18, 23, 30, tzinfo=LA), TOKYO, date(2025, 6, 19), id="LA-eve-is-tokyo-next"),
        pytest.param(datetime(2025, 6, 17, 23, 30, tzinfo=UTC), TOKYO, date(2025, 6, 18), id="utc-night-tokyo"),
        pytest.param(datetime(2025, 6, 18, 14, 30, tzinfo=UTC), TOKYO, date(2025, 6, 18), id="tokyo-2330"),
        pytest.param(date(2025, 6, 18), TOKYO, date(2025, 6, 18), id="bare-date"),
        pytest.param(datetime(2025, 6, 18, 23, 30), LA, date(2025, 6, 18), id="naive-taken-as-is"),
    ],
)
def test_local_day(moment: datetime | date, zone: object, expected: date) -> None:
    assert local_day(moment, zone) == expected  # type: ignore[arg-type]


def test_earliest_instant_of_a_date_is_start_of_clinic_day() -> None:
    instant = earliest_instant(date(2025, 6, 18), LA)
    assert instant == datetime(2025, 6, 18, 7, 0, tzinfo=UTC)
    # Returned in UTC so that elapsed-time arithmetic is right across DST changes.
    assert instant.utcoffset() == timedelta(0)


def test_earliest_instant_of_a_date_in_tokyo() -> None:
    assert earliest_instant(date(2025, 6, 18), TOKYO) == datetime(2025, 6, 17, 15, 0, tzinfo=UTC)


def test_earliest_instant_keeps_aware_datetime() -> None:
    moment = datetime(2025, 6, 18, 6, 30, tzinfo=UTC)
    assert earliest_instant(moment, LA) is moment


def test_earliest_instant_puts_naive_datetime_in_clinic_zone() -> None:
    assert earliest_instant(datetime(2025, 6, 18, 9, 0), LA) == datetime(2025, 6, 18, 16, 0, tzinfo=UTC)


# ------------------------------------------------------------------------------------------------
# age_in_years / months_between
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("birth", "on", "age"),
    [
        pytest.param(date(2007, 6, 18), date(2025, 6, 18), 18, id="birthday"),
        pytest.param(date(2007, 6, 18), date(2025, 6, 17), 17, id="day-before"),
        pytest.param(date(2007, 6, 18), date(2025, 12, 31), 18, id="later-that-year"),
        pytest.param(date(2008, 2, 29), date(2026, 2, 28), 17, id="leapling-28-feb-common-year"),
        pytest.param(date(2008, 2, 29), date(2026, 3, 1), 18, id="leapling-1-mar-common-year"),
        pytest.param(date(2008, 2, 29), date(2028, 2, 28), 19, id="leapling-28-feb-leap-year"),
        pytest.param(date(2008, 2, 29), date(2028, 2, 29), 20, id="leapling-29-feb-leap-year"),
        pytest.param(date(2025, 6, 18), date(2025, 6, 18), 0, id="newborn"),
    ],
)
def test_age_in_years(birth: date, on: date, age: int) -> None:
    assert age_in_years(birth, on) == age


@pytest.mark.parametrize(
    ("earlier", "later", "months"),
    [
        pytest.param(date(2023, 6, 18), date(2025, 6, 18), 24, id="24-months-to-the-day"),
        pytest.param(date(2023, 6, 19), date(2025, 6, 18), 23, id="one-day-short-of-24"),
        pytest.param(date(2023, 7, 18), date(2025, 6, 18), 23, id="23-months"),
        pytest.param(date(2023, 1, 31), date(2023, 2, 28), 0, id="31-jan-to-28-feb"),
        pytest.param(date(2023, 1, 31), date(2023, 3, 1), 1, id="31-jan-to-1-mar"),
        pytest.param(date(2025, 6, 18), date(2025, 6, 18), 0, id="same-day"),
        pytest.param(date(2025, 6, 18), date(2025, 4, 18), -2, id="negative"),
    ],
)
def test_months_between(earlier: date, later: date, months: int) -> None:
    assert months_between(earlier, later) == months


# ------------------------------------------------------------------------------------------------
# test_good_through
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("collected", "zone", "through"),
    [
        pytest.param(date(2025, 6, 11), LA, date(2025, 6, 18), id="date-only"),
        pytest.param(at(date(2025, 6, 11), 23, 30), LA, date(2025, 6, 18), id="LA-2330"),
        pytest.param(at(date(2025, 6, 11), 23, 30).astimezone(UTC), LA, date(2025, 6, 18), id="LA-2330-in-UTC"),
        pytest.param(datetime(2025, 6, 10, 23, 30, tzinfo=UTC), TOKYO, date(2025, 6, 18), id="tokyo-0830"),
        pytest.param(datetime(2025, 6, 10, 14, 30, tzinfo=UTC), TOKYO, date(2025, 6, 17), id="tokyo-2330"),
    ],
)
def test_test_good_through_is_collection_day_plus_7(collected: datetime | date, zone: object, through: date) -> None:
    assert timing.test_good_through(collected, zone, 7) == through  # type: ignore[arg-type]


def test_test_good_through_honours_valid_days() -> None:
    assert timing.test_good_through(date(2025, 6, 11), LA, 5) == date(2025, 6, 16)


# ------------------------------------------------------------------------------------------------
# SupplyWindow / supply_runs_out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "runs_out"),
    [
        pytest.param("28", date(2025, 6, 29), id="28-days"),
        pytest.param("1", date(2025, 6, 2), id="1-day"),
        pytest.param("20.1", date(2025, 6, 22), id="fraction-rounds-up"),
        pytest.param("21.0", date(2025, 6, 22), id="whole-decimal"),
        pytest.param("0", date(2025, 6, 1), id="zero"),
    ],
)
def test_supply_runs_out(days: str, runs_out: date) -> None:
    assert supply_runs_out(date(2025, 6, 1), Decimal(days)) == runs_out


@pytest.mark.parametrize(
    ("on", "left"),
    [
        pytest.param(date(2025, 6, 1), 28, id="first-day"),
        pytest.param(date(2025, 6, 22), 7, id="7-left"),
        pytest.param(date(2025, 6, 21), 8, id="8-left"),
        pytest.param(date(2025, 6, 29), 0, id="run-out-day"),
        pytest.param(date(2025, 7, 15), 0, id="long-after"),
        pytest.param(date(2025, 5, 1), 28, id="before-start-capped"),
    ],
)
def test_supply_window_days_left(on: date, left: int) -> None:
    window = SupplyWindow("MedicationDispense/1", date(2025, 6, 29), "test")
    assert window.days_left(on, 28) == left


def test_supply_window_dispensable_from() -> None:
    window = SupplyWindow("MedicationDispense/1", date(2025, 6, 29), "test")
    assert window.dispensable_from(7) == date(2025, 6, 22)
    assert window.days_left(window.dispensable_from(7), 28) == 7


# ------------------------------------------------------------------------------------------------
# next_test_due: weekly for 4 weeks, then 14 days (irregular/undocumented) or 28 (regular)
# ------------------------------------------------------------------------------------------------

START = date(2025, 6, 2)


@pytest.mark.parametrize(
    ("last_negative", "regular", "due"),
    [
        pytest.param(None, False, date(2025, 7, 20), id="no-test-due-today"),
        pytest.param(START, False, date(2025, 6, 9), id="day-0-weekly"),
        pytest.param(START + timedelta(days=21), False, date(2025, 6, 30), id="week-4-weekly"),
        pytest.param(START + timedelta(days=27), True, date(2025, 7, 6), id="day-27-still-weekly"),
        pytest.param(START + timedelta(days=28), False, date(2025, 7, 14), id="day-28-irregular-14"),
        pytest.param(START + timedelta(days=28), True, date(2025, 7, 28), id="day-28-regular-28"),
        pytest.param(date(2025, 9, 1), False, date(2025, 9, 15), id="later-irregular"),
        pytest.param(date(2025, 9, 1), True, date(2025, 9, 29), id="later-regular"),
    ],
)
def test_next_test_due(last_negative: date | None, regular: bool, due: date) -> None:
    schedule = default_config().rems.test_schedule
    result = next_test_due(
        therapy_start=START,
        last_negative=last_negative,
        today=date(2025, 7, 20),
        regular_cycles=regular,
        schedule=schedule,
    )
    assert result == due


def test_next_test_due_follows_configured_schedule() -> None:
    schedule = Schedule(weekly_for_weeks=2, regular_cycle_interval_days=21, irregular_cycle_interval_days=10)
    args: dict[str, Any] = {"therapy_start": START, "today": date(2025, 7, 20), "schedule": schedule}
    assert next_test_due(last_negative=START + timedelta(days=13), regular_cycles=False, **args) == date(2025, 6, 22)
    assert next_test_due(last_negative=START + timedelta(days=14), regular_cycles=False, **args) == date(2025, 6, 26)
    assert next_test_due(last_negative=START + timedelta(days=14), regular_cycles=True, **args) == date(2025, 7, 7)
