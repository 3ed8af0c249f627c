"""Day-granular time arithmetic in the clinic's time zone.

REMS counts calendar days where the clinic is: a test collected on day D (clinic-local) is good for a
dispense on any day up to D + 7; a supply handed over on day D for N days lasts through D + N - 1, so it
"runs out" on D + N and the pharmacy may dispense again once 7 or fewer days are left, i.e. from
D + N - 7. "Within 24 hours" is clock time. A record that gives only a date is taken at the start of
that clinic-local day when clock time matters, which is the conservative reading (it makes a test
older, never younger).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import ROUND_CEILING, Decimal

from rems.config import TestSchedule


def local_day(moment: datetime | date, zone: tzinfo) -> date:
    """The clinic-local calendar day of a moment (a bare date is already a day)."""
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            return moment.date()
        return moment.astimezone(zone).date()
    return moment


def earliest_instant(moment: datetime | date, zone: tzinfo) -> datetime:
    """The instant in UTC; a bare date becomes the start of that clinic-local day.

    Always UTC: Python compares and subtracts two datetimes that share one tzinfo by wall clock,
    which is wrong by an hour across a DST change ("within 24 hours" is elapsed time)."""
    if isinstance(moment, datetime):
        aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
        return aware.astimezone(UTC)
    return datetime.combine(moment, time.min, tzinfo=zone).astimezone(UTC)


def days_between(earlier: date, later: date) -> int:
    return (later - earlier).days


def age_in_years(birth: date, on: date) -> int:
    """Completed years; someone born on 29 February turns a year older on 1 March in common years."""
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years


def months_between(earlier: date, later: date) -> int:
    """Whole calendar months from `earlier` to `later` (negative if later is before earlier)."""
    months = (later.year - earlier.year) * 12 + (later.month - earlier.month)
    if later.day < earlier.day:
        months -= 1
    return months


def test_good_through(collected: datetime | date, zone: tzinfo, valid_days: int) -> date:
    """Last clinic-local day on which a test collected at `collected` still allows a dispense."""
    return local_day(collected, zone) + timedelta(days=valid_days)


@dataclass(frozen=True)
class SupplyWindow:
    """The current supply of one drug: which record it came from and the day it runs out."""

    source: str
    """Reference of the dispense (or order) that set it."""
    runs_out: date
    """First clinic-local day without medication."""
    how: str

    def days_left(self, on: date, cap: int) -> int:
        """Days of medication left on day `on` (0 once run out), capped at `cap` (a 28-day program
        never leaves more than 28 days, whatever a malformed record says)."""
        return max(0, min(cap, (self.runs_out - on).days))

    def dispensable_from(self, at_most_days_left: int) -> date:
        return self.runs_out - timedelta(days=at_most_days_left)


def supply_runs_out(start: date, days_supply: Decimal) -> date:
    """A supply starting on `start` for `days_supply` days (fractions round up) runs out on this day."""
    whole = int(days_supply.to_integral_value(rounding=ROUND_CEILING))
    return start + timedelta(days=whole)


def next_test_due(
    *,
    therapy_start: date,
    last_negative: date | None,
    today: date,
    regular_cycles: bool,
    schedule: TestSchedule,
) -> date:
    """When the next pregnancy test is due under the ongoing schedule (001, 003): weekly in the first
    `weekly_for_weeks` weeks of therapy, then every 4 weeks with documented regular cycles, else every
    2 weeks. With no negative test on file the test is due today."""
    if last_negative is None:
        return today
    in_weekly_phase = last_negative < therapy_start + timedelta(weeks=schedule.weekly_for_weeks)
    if in_weekly_phase:
        interval = 7
    elif regular_cycles:
        interval = schedule.regular_cycle_interval_days
    else:
        interval = schedule.irregular_cycle_interval_days
    return last_negative + timedelta(days=interval)
