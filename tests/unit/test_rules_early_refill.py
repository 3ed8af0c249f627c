"""early-refill: the pharmacy may dispense only with 7 or fewer days left on the current supply of the
same drug (latest-running dispense, else an order in effect with no dispense referring to it)."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

import pytest

from rems.findings import FixKind, RuleCode, Severity
from rems.model import Drug

from .builders import (
    TODAY,
    TOKYO,
    adult_male,
    at,
    case,
    chart_order,
    codes,
    days_before,
    dispense,
    last_fill,
    lenalidomide_order,
    only,
    run,
    utc,
)

RC = RuleCode


@pytest.mark.parametrize(
    ("fill_days_ago", "days_left"),
    [
        pytest.param(28, None, id="run-out-today"),
        pytest.param(21, None, id="7-days-left"),
        pytest.param(20, 8, id="8-days-left"),
        pytest.param(1, 27, id="27-days-left"),
        pytest.param(35, None, id="ran-out-a-week-ago"),
    ],
)
def test_early_refill_at_7_vs_8_days_left(fill_days_ago: int, days_left: int | None) -> None:
    findings = run(case(adult_male(), lenalidomide_order(), dispenses=(last_fill(fill_days_ago),)))
    if days_left is None:
        assert findings == []
    else:
        assert [(f.code, f.severity) for f in findings] == [(RC.EARLY_REFILL, Severity.WARNING)]
        f = findings[0]
        from_day = TODAY + timedelta(days=days_left - 7)
        assert f.data == {"dispensable_from": from_day.isoformat(), "days_left": str(days_left)}
        assert f.fix is not None and (f.fix.kind, f.fix.value) == (FixKind.DELAY_UNTIL, from_day.isoformat())
        assert from_day.isoformat() in f.summary


def test_early_refill_counts_handover_day_in_clinic_zone() -> None:
    """Handed over 23:30 Los Angeles on 29 May (30 May in UTC): runs out 26 June, 8 days left."""
    handed = utc(at(TODAY - timedelta(days=20), 23, 30))
    assert handed.date() == TODAY - timedelta(days=19)
    f = only(run(case(adult_male(), lenalidomide_order(), dispenses=(dispense(handed),))), RC.EARLY_REFILL)
    assert f.data["days_left"] == "8"


def test_early_refill_in_a_clinic_east_of_utc() -> None:
    """Handed over 23:30 UTC on 28 May = 08:30 on 29 May in Tokyo: runs out 26 June, 8 days left on
    18 June (a UTC count would say 7)."""
    now = at(date(2025, 6, 18), 10, 0, TOKYO)
    handed = datetime.fromisoformat("2025-05-28T23:30:00+00:00")
    findings = run(case(adult_male(), lenalidomide_order(), now=now, zone=TOKYO, dispenses=(dispense(handed),)))
    assert only(findings, RC.EARLY_REFILL).data == {"dispensable_from": "2025-06-19", "days_left": "8"}


def test_latest_running_dispense_wins() -> None:
    old = dispense(days_before(5, 14), days_supply=28, reference="MedicationDispense/old")
    # A later fill that runs out sooner is not the current supply: the 28-day one is.
    short = dispense(days_before(2, 14), days_supply=7, reference="MedicationDispense/short")
    f = only(run(case(adult_male(), lenalidomide_order(), dispenses=(short, old))), RC.EARLY_REFILL)
    assert f.evidence[0].reference == "MedicationDispense/old"
    assert f.data["days_left"] == "23"


def test_days_left_capped_at_28() -> None:
    malformed = dispense(days_before(0, 8), days_supply=90)
    f = only(run(case(adult_male(), lenalidomide_order(), dispenses=(malformed,))), RC.EARLY_REFILL)
    assert f.data["days_left"] == "28"


def test_fractional_days_supply_rounds_up() -> None:
    # 20.5 days handed over 13 days ago: runs out on day 21 -> 8 days left.
    f = only(
        run(case(adult_male(), lenalidomide_order(), dispenses=(dispense(days_before(13, 14), days_supply="20.5"),))),
        RC.EARLY_REFILL,
    )
    assert f.data["days_left"] == "8"


@pytest.mark.parametrize(
    ("chart", "fires"),
    [
        pytest.param({"dispenses": (last_fill(5, drug=Drug.POMALIDOMIDE),)}, False, id="other-drug-dispensed"),
        pytest.param({"dispenses": (dispense(days_before(5, 14), days_supply=None),)}, False, id="no-days-supply"),
        pytest.param({"imid_orders": (chart_order(authored=days_before(3)),)}, True, id="active-order-no-dispense"),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), status="completed"),)},
            True,
            id="completed-order-no-dispense",
        ),
        pytest.param({"imid_orders": (chart_order(authored=days_before(3), status="draft"),)}, False, id="draft-order"),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), status="cancelled"),)},
            False,
            id="cancelled-order",
        ),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), status="stopped"),)}, False, id="stopped-order"
        ),
        pytest.param(
            {"imid_orders": (chart_order(authored=days_before(3), supply_days=None),)},
            False,
            id="order-without-supply",
        ),
    ],
)
def test_current_supply_sources(chart: dict[str, Any], fires: bool) -> None:
    findings = run(case(adult_male(), lenalidomide_order(), **chart))
    if fires:
        f = only(findings, RC.EARLY_REFILL)
        assert f.severity is Severity.WARNING
        assert f.evidence[0].reference == "MedicationRequest/lenalidomide-previous"
        assert f.data["days_left"] == "25"
    else:
        assert RC.EARLY_REFILL not in codes(findings)


def test_order_window_is_skipped_once_a_dispense_refers_to_it() -> None:
    """Order started 3 days ago (would leave 25 days) but its dispense was handed over 21 days ago
    (7 days left): the dispense is the supply."""
    prev = chart_order(authored=days_before(3), reference="MedicationRequest/prev")
    fill = dispense(days_before(21, 14), prescription="MedicationRequest/prev")
    findings = run(case(adult_male(), lenalidomide_order(), imid_orders=(prev,), dispenses=(fill,)))
    assert RC.EARLY_REFILL not in codes(findings)
