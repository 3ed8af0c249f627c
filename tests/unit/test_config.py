"""Configuration: packaged defaults, institution overrides (TOML text), and malformed overrides."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

import rems
from rems.findings import RuleCode, Severity
from rems.model import Drug

from .builders import (
    adult_male,
    anc,
    case,
    codes,
    days_before,
    frp_order,
    frp_woman,
    last_fill,
    lenalidomide_order,
    negative_test,
    only,
    platelets,
    run,
)

RC = RuleCode


# ------------------------------------------------------------------------------------------------
# Defaults (the catalogue's values)
# ------------------------------------------------------------------------------------------------


def test_default_rems_rules_match_the_catalogue() -> None:
    r = rems.default_config().rems
    assert (r.max_supply_days, r.max_refills, r.dispense_when_days_left_at_most) == (28, 0, 7)
    assert (r.test_valid_days, r.initiation_lookback_days) == (7, 28)
    assert (r.initiation_early_test_days, r.initiation_recent_test_hours) == ((10, 14), 24)
    assert (r.nrp_recent_test_days, r.reproductive_age_years, r.adult_age_years) == (30, 10, 18)
    assert r.menopause_months == 24
    assert r.count_preliminary_tests is False
    s = r.test_schedule
    assert (s.weekly_for_weeks, s.regular_cycle_interval_days, s.irregular_cycle_interval_days) == (4, 28, 14)


def test_default_protocol_thresholds() -> None:
    p = rems.default_config().protocol
    assert (p[Drug.LENALIDOMIDE].anc_hold_below, p[Drug.LENALIDOMIDE].platelets_hold_below) == (
        Decimal("1.0"),
        Decimal(30),
    )
    assert p[Drug.LENALIDOMIDE].crcl_review_below == Decimal(60)
    assert p[Drug.LENALIDOMIDE].creatinine_review_above is None
    assert p[Drug.POMALIDOMIDE].creatinine_review_above == Decimal("3.0")
    assert p[Drug.POMALIDOMIDE].crcl_review_below is None
    assert p[Drug.THALIDOMIDE].platelets_hold_below is None
    assert (p[Drug.THALIDOMIDE].cbc_intensive_weeks, p[Drug.THALIDOMIDE].cbc_max_age_days) == (0, 31)


def test_default_coverage_and_programs() -> None:
    cfg = rems.default_config()
    assert cfg.coverage.min_age_years == 18
    assert cfg.programs[Drug.LENALIDOMIDE].generic_preferred is True
    assert cfg.programs[Drug.POMALIDOMIDE].generic_preferred is False
    caps = cfg.programs[Drug.LENALIDOMIDE].dose_caps_mg
    assert {k: int(v) for k, v in caps.items()} == {
        "multiple-myeloma": 25,
        "multiple-myeloma-maintenance": 15,
        "mds": 10,
        "mcl": 25,
        "mzl": 20,
        "fl": 20,
        "other": 25,
    }
    assert dict(cfg.programs[Drug.POMALIDOMIDE].dose_caps_mg) == {"other": Decimal(4)}
    assert dict(cfg.programs[Drug.THALIDOMIDE].dose_caps_mg) == {}


def test_default_review_severities_are_never_critical() -> None:
    severity = rems.default_config().review_severity
    assert severity == {
        "cbc-overdue": "info",
        "vte-prophylaxis-missing": "info",
        "neutropenia": "warning",
        "thrombocytopenia": "warning",
        "renal-dose-review": "warning",
    }


def test_default_config_is_loaded_once() -> None:
    assert rems.default_config() is rems.default_config()


def test_load_config_without_overrides_equals_defaults() -> None:
    assert rems.load_config() == rems.default_config()


# ------------------------------------------------------------------------------------------------
# Overrides change behaviour
# ------------------------------------------------------------------------------------------------

ANC_1_5 = "[protocol.lenalidomide]\nanc_hold_below = 1.5"


def _anc_case(value: str) -> rems.Case:
    return case(adult_male(), lenalidomide_order(), labs=(anc(value, days_before(1)), platelets(29, days_before(1))))


def test_anc_override_changes_threshold_and_rule_honours_it() -> None:
    cfg = rems.load_config(ANC_1_5)
    assert cfg.protocol[Drug.LENALIDOMIDE].anc_hold_below == Decimal("1.5")
    assert RC.NEUTROPENIA not in codes(run(_anc_case("1.2")))
    f = only(run(_anc_case("1.2"), cfg), RC.NEUTROPENIA)
    assert f.severity is Severity.WARNING
    assert "threshold 1.5" in f.summary


def test_override_merges_tables_keeping_other_keys() -> None:
    cfg = rems.load_config(ANC_1_5)
    assert cfg.protocol[Drug.LENALIDOMIDE].platelets_hold_below == Decimal(30)
    assert cfg.protocol[Drug.LENALIDOMIDE].crcl_review_below == Decimal(60)
    assert cfg.protocol[Drug.POMALIDOMIDE].anc_hold_below == Decimal("0.5")
    # The untouched platelet threshold still fires on the same case.
    assert RC.THROMBOCYTOPENIA in codes(run(_anc_case("1.2"), cfg))


def test_later_override_wins() -> None:
    cfg = rems.load_config(ANC_1_5, "[protocol.lenalidomide]\nanc_hold_below = 0.8")
    assert cfg.protocol[Drug.LENALIDOMIDE].anc_hold_below == Decimal("0.8")
    assert RC.NEUTROPENIA not in codes(run(_anc_case("0.9"), cfg))


def test_test_valid_days_override_makes_a_test_stale() -> None:
    c = case(frp_woman(), frp_order(), dispenses=(last_fill(),), pregnancy_tests=(negative_test(days_before(6)),))
    assert RC.PREGNANCY_TEST_STALE not in codes(run(c))
    stale = only(run(c, rems.load_config("[rems]\ntest_valid_days = 5")), RC.PREGNANCY_TEST_STALE)
    assert stale.data["good_through"] == "2025-06-17"


def test_max_supply_override() -> None:
    c = case(adult_male(), lenalidomide_order(supply_days=30))
    assert RC.SUPPLY_OVER_28_DAYS in codes(run(c))
    assert run(c, rems.load_config("[rems]\nmax_supply_days = 30")) == []


def test_review_severity_override() -> None:
    c = case(adult_male(), lenalidomide_order(), antithrombotics=())
    cfg = rems.load_config('[protocol.severity]\nvte-prophylaxis-missing = "warning"')
    assert only(run(c), RC.VTE_PROPHYLAXIS_MISSING).severity is Severity.INFO
    assert only(run(c, cfg), RC.VTE_PROPHYLAXIS_MISSING).severity is Severity.WARNING


def test_dose_cap_override() -> None:
    c = case(adult_male(), lenalidomide_order(mg_per_day=25))
    assert run(c) == []
    cfg = rems.load_config("[drug.lenalidomide.dose_caps_mg]\nmultiple-myeloma = 20")
    assert only(run(c, cfg), RC.DOSE_ABOVE_POLICY_LIMIT).severity is Severity.WARNING
    assert cfg.programs[Drug.LENALIDOMIDE].dose_caps_mg["mds"] == Decimal(10)


def test_override_does_not_change_the_defaults() -> None:
    rems.load_config(ANC_1_5)
    assert rems.default_config().protocol[Drug.LENALIDOMIDE].anc_hold_below == Decimal("1.0")
    assert rems.load_config().protocol[Drug.LENALIDOMIDE].anc_hold_below == Decimal("1.0")


# ------------------------------------------------------------------------------------------------
# Malformed overrides: ConfigError naming the key
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        pytest.param('[rems]\nmax_supply_days = "28"', "rems.max_supply_days", id="string-for-int"),
        pytest.param("[rems]\ntest_valid_days = 7.5", "rems.test_valid_days", id="float-for-int"),
        pytest.param("[rems]\nmax_refills = true", "rems.max_refills", id="bool-for-int"),
        pytest.param(
            '[protocol.lenalidomide]\nanc_hold_below = "abc"', "protocol.lenalidomide.anc_hold_below", id="not-number"
        ),
        pytest.param(
            "[protocol.lenalidomide]\nanc_hold_below = true", "protocol.lenalidomide.anc_hold_below", id="bool-number"
        ),
        pytest.param(
            '[protocol.severity]\ncbc-overdue = "critical"', "protocol.severity.cbc-overdue", id="critical-review"
        ),
        pytest.param(
            "[rems]\ninitiation_early_test_days = [14, 10]", "rems.initiation_early_test_days", id="reversed-window"
        ),
        pytest.param("[rems]\ninitiation_early_test_days = [10]", "rems.initiation_early_test_days", id="one-bound"),
        pytest.param(
            '[rems.test_schedule]\nweekly_for_weeks = "4"', "rems.test_schedule.weekly_for_weeks", id="schedule"
        ),
        pytest.param(
            '[drug.pomalidomide]\ndose_caps_mg = { other = "four" }',
            "drug.pomalidomide.dose_caps_mg.other",
            id="dose-cap",
        ),
        pytest.param("[rems\nmax_supply_days = 28", "override #1", id="invalid-toml"),
    ],
)
def test_malformed_override_raises_config_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(rems.ConfigError, match=re.escape(key)):
        rems.load_config(override)


def test_second_invalid_override_is_named() -> None:
    with pytest.raises(rems.ConfigError, match=re.escape("override #2")):
        rems.load_config(ANC_1_5, "not = [toml")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=re.escape("rems.max_supply_days")):
        rems.load_config('[rems]\nmax_supply_days = "28"')


@pytest.mark.parametrize(
    ("override", "key"),
    [
        pytest.param(
            '[rems]\ncount_preliminary_tests = "false"',
            "rems.count_preliminary_tests",
            id="string-for-bool",
        ),
        pytest.param(
            "[rems]\ntest_schedule = 7",
            "rems.test_schedule",
            id="scalar-for-table",
        ),
        pytest.param(
            '[coverage]\nspecialist_taxonomy = "207RH0003X"',
            "coverage.specialist_taxonomy",
            id="string-for-list",
        ),
        pytest.param(
            "[protocol.lenalidomide]\nanc_hold_below = nan",
            "protocol.lenalidomide.anc_hold_below",
            id="nan-threshold",
        ),
        pytest.param(
            '[rems]\ninitiation_early_test_days = ["a", 10]',
            "rems.initiation_early_test_days",
            id="string-in-window",
        ),
    ],
)
def test_malformed_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(rems.ConfigError, match=re.escape(key)):
        rems.load_config(override)


def test_misspelt_override_key_is_refused_not_ignored() -> None:
    """A typo'd threshold must not leave the default silently in force."""
    with pytest.raises(rems.ConfigError, match=re.escape("protocol.lenalidomide.anc_hold_bellow")):
        rems.load_config("[protocol.lenalidomide]\nanc_hold_bellow = 1.5")


def test_new_indication_cap_is_accepted() -> None:
    """Dose caps are keyed by the institution's indication names: new keys are allowed there."""
    cfg = rems.load_config("[drug.lenalidomide.dose_caps_mg]\namyloidosis = 15")
    assert cfg.programs[rems.Drug.LENALIDOMIDE].dose_caps_mg["amyloidosis"] == 15
