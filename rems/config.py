"""Program definitions and protocol thresholds, loaded from the TOML data files in `rems/data/`.

`load_config()` reads the packaged defaults and merges any institution overrides given as TOML text
(tables merge, values replace). Reading our own package data is the only I/O in `rems/`; the caller
passes override *text*, never a path, so the domain stays free of the file system and the network.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from rems.model import Drug


class ConfigError(ValueError):
    """A settings/data file is malformed; the message names the key."""


@dataclass(frozen=True)
class TestSchedule:
    weekly_for_weeks: int
    regular_cycle_interval_days: int
    irregular_cycle_interval_days: int


@dataclass(frozen=True)
class RemsRules:
    max_supply_days: int
    max_refills: int
    dispense_when_days_left_at_most: int
    test_valid_days: int
    initiation_lookback_days: int
    initiation_early_test_days: tuple[int, int]
    initiation_recent_test_hours: int
    nrp_recent_test_days: int
    reproductive_age_years: int
    adult_age_years: int
    menopause_months: int
    count_preliminary_tests: bool
    quantitative_negative_below_miu_ml: Decimal
    test_schedule: TestSchedule


@dataclass(frozen=True)
class Coverage:
    min_age_years: int
    specialist_taxonomy: frozenset[str]
    immunology_taxonomy: frozenset[str]


@dataclass(frozen=True)
class Program:
    drug: Drug
    brand_names: tuple[str, ...]
    generic_preferred: bool
    dose_caps_mg: Mapping[str, Decimal]
    """Indication key → mg/day cap. ``other`` applies when the indication is unknown or unlisted."""


@dataclass(frozen=True)
class DrugProtocol:
    cbc_intensive_weeks: int
    cbc_intensive_max_age_days: int
    cbc_max_age_days: int
    anc_hold_below: Decimal | None = None
    platelets_hold_below: Decimal | None = None
    crcl_review_below: Decimal | None = None
    creatinine_review_above: Decimal | None = None


@dataclass(frozen=True)
class Config:
    rems: RemsRules
    coverage: Coverage
    programs: Mapping[Drug, Program]
    protocol: Mapping[Drug, DrugProtocol]
    review_severity: Mapping[str, str]
    """Clinical-review rule code → ``info`` | ``warning`` (never ``critical``: review flags advise)."""


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_default(name: str) -> dict[str, Any]:
    return tomllib.loads(resources.files("rems").joinpath("data", name).read_text(encoding="utf-8"))


def _dec(path: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    try:
        number = Decimal(str(value))
    except ArithmeticError as exc:
        raise ConfigError(f"{path}: expected a number, got {value!r}") from exc
    if not number.is_finite():
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    return number


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    return value


def _strs(path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{path}: expected a list of strings, got {value!r}")
    return tuple(value)


def _table(parent: Mapping[str, Any], path: str, key: str) -> Mapping[str, Any]:
    value = _get(parent, path, key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}.{key}: expected a table, got {value!r}")
    return value


_FREE_FORM = ("dose_caps_mg",)
"""Tables whose keys are the institution's to choose (indication names)."""


def _unknown_keys(override: Mapping[str, Any], known: Mapping[str, Any], path: str = "") -> list[str]:
    out: list[str] = []
    for key, value in override.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            out.append(where)
        elif isinstance(value, Mapping) and isinstance(known[key], Mapping) and key not in _FREE_FORM:
            out.extend(_unknown_keys(value, known[key], where))
    return out


def _int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: expected a whole number, got {value!r}")
    return value


def _get(table: Mapping[str, Any], path: str, key: str) -> Any:
    if key not in table:
        raise ConfigError(f"{path}.{key}: missing" if path else f"{key}: missing")
    return table[key]


@cache
def default_config() -> Config:
    """The packaged defaults, parsed once per process."""
    return load_config()


def load_config(*overrides: str) -> Config:
    """The packaged defaults merged with each override (TOML text), in order."""
    raw = _merge(_read_default("programs.toml"), _read_default("protocol.toml"))
    for i, text in enumerate(overrides):
        try:
            override = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"override #{i + 1}: not valid TOML: {exc}") from exc
        unknown = _unknown_keys(override, raw)
        if unknown:
            # A misspelt threshold silently ignored would leave the default in force unnoticed.
            raise ConfigError(f"override #{i + 1}: unknown key(s) {', '.join(unknown)}")
        raw = _merge(raw, override)
    try:
        return _build(raw)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"malformed configuration: {exc!r}") from exc


def _build(raw: Mapping[str, Any]) -> Config:
    r = _table(raw, "", "rems")
    sched = _table(r, "rems", "test_schedule")
    early = _get(r, "rems", "initiation_early_test_days")
    if not (
        isinstance(early, list)
        and len(early) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in early)
        and 0 <= early[0] <= early[1]
    ):
        raise ConfigError(f"rems.initiation_early_test_days: expected [low, high], got {early!r}")
    rems = RemsRules(
        max_supply_days=_int("rems.max_supply_days", _get(r, "rems", "max_supply_days")),
        max_refills=_int("rems.max_refills", _get(r, "rems", "max_refills")),
        dispense_when_days_left_at_most=_int(
            "rems.dispense_when_days_left_at_most", _get(r, "rems", "dispense_when_days_left_at_most")
        ),
        test_valid_days=_int("rems.test_valid_days", _get(r, "rems", "test_valid_days")),
        initiation_lookback_days=_int("rems.initiation_lookback_days", _get(r, "rems", "initiation_lookback_days")),
        initiation_early_test_days=(
            _int("rems.initiation_early_test_days", early[0]),
            _int("rems.initiation_early_test_days", early[1]),
        ),
        initiation_recent_test_hours=_int(
            "rems.initiation_recent_test_hours", _get(r, "rems", "initiation_recent_test_hours")
        ),
        nrp_recent_test_days=_int("rems.nrp_recent_test_days", _get(r, "rems", "nrp_recent_test_days")),
        reproductive_age_years=_int("rems.reproductive_age_years", _get(r, "rems", "reproductive_age_years")),
        adult_age_years=_int("rems.adult_age_years", _get(r, "rems", "adult_age_years")),
        menopause_months=_int("rems.menopause_months", _get(r, "rems", "menopause_months")),
        count_preliminary_tests=_bool("rems.count_preliminary_tests", _get(r, "rems", "count_preliminary_tests")),
        quantitative_negative_below_miu_ml=_dec(
            "rems.quantitative_negative_below_miu_ml", _get(r, "rems", "quantitative_negative_below_miu_ml")
        ),
        test_schedule=TestSchedule(
            weekly_for_weeks=_int(
                "rems.test_schedule.weekly_for_weeks", _get(sched, "rems.test_schedule", "weekly_for_weeks")
            ),
            regular_cycle_interval_days=_int(
                "rems.test_schedule.regular_cycle_interval_days",
                _get(sched, "rems.test_schedule", "regular_cycle_interval_days"),
            ),
            irregular_cycle_interval_days=_int(
                "rems.test_schedule.irregular_cycle_interval_days",
                _get(sched, "rems.test_schedule", "irregular_cycle_interval_days"),
            ),
        ),
    )
    c = _table(raw, "", "coverage")
    coverage = Coverage(
        min_age_years=_int("coverage.min_age_years", _get(c, "coverage", "min_age_years")),
        specialist_taxonomy=frozenset(
            _strs("coverage.specialist_taxonomy", _get(c, "coverage", "specialist_taxonomy"))
        ),
        immunology_taxonomy=frozenset(_strs("coverage.immunology_taxonomy", c.get("immunology_taxonomy", []))),
    )
    programs: dict[Drug, Program] = {}
    protocol: dict[Drug, DrugProtocol] = {}
    for drug in Drug:
        d = _get(raw["drug"], "drug", drug.value)
        programs[drug] = Program(
            drug=drug,
            brand_names=tuple(str(x).lower() for x in d.get("brand_names", [])),
            generic_preferred=bool(d.get("generic_preferred", False)),
            dose_caps_mg={
                str(k): _dec(f"drug.{drug.value}.dose_caps_mg.{k}", v) for k, v in d.get("dose_caps_mg", {}).items()
            },
        )
        p = _get(raw["protocol"], "protocol", drug.value)
        path = f"protocol.{drug.value}"

        def opt(key: str, p: Mapping[str, Any] = p, path: str = path) -> Decimal | None:
            return _dec(f"{path}.{key}", p[key]) if key in p else None

        protocol[drug] = DrugProtocol(
            cbc_intensive_weeks=_int(f"{path}.cbc_intensive_weeks", _get(p, path, "cbc_intensive_weeks")),
            cbc_intensive_max_age_days=_int(
                f"{path}.cbc_intensive_max_age_days", _get(p, path, "cbc_intensive_max_age_days")
            ),
            cbc_max_age_days=_int(f"{path}.cbc_max_age_days", _get(p, path, "cbc_max_age_days")),
            anc_hold_below=opt("anc_hold_below"),
            platelets_hold_below=opt("platelets_hold_below"),
            crcl_review_below=opt("crcl_review_below"),
            creatinine_review_above=opt("creatinine_review_above"),
        )
    severity: dict[str, str] = {}
    for code, level in _table(raw, "", "protocol").get("severity", {}).items():
        if level not in ("info", "warning"):
            raise ConfigError(f"protocol.severity.{code}: expected 'info' or 'warning', got {level!r}")
        severity[str(code)] = level
    return Config(rems=rems, coverage=coverage, programs=programs, protocol=protocol, review_severity=severity)
