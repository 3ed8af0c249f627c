"""The rule catalogue as data (`rems.RULES`) against the code and against REMS_RULES.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rems
from rems.findings import RULES, Family, RuleCode, Severity
from rems.rules import CLINICAL_RULES, COVERAGE_RULES

from .builders import cases_firing_every_rule

CATALOGUE = Path(__file__).parents[3] / "shared/domain/REMS_RULES.md"
COVERAGE_CODES = {c for c, info in RULES.items() if info.family is Family.COVERAGE}
CLINICAL_CODES = {c for c, info in RULES.items() if info.family is Family.CLINICAL}


def catalogue_text() -> str:
    if not CATALOGUE.is_file():
        pytest.skip(f"rule catalogue not found at {CATALOGUE}")
    return CATALOGUE.read_text(encoding="utf-8")


def catalogue_rule_families() -> dict[str, Family]:
    """Rule codes in the first column of the catalogue's rule tables, by section."""
    sections = {
        "## REMS program rules": Family.REMS,
        "## Coverage rules": Family.COVERAGE,
        "## Clinical review flags": Family.CLINICAL,
    }
    found: dict[str, Family] = {}
    family: Family | None = None
    for line in catalogue_text().splitlines():
        if line.startswith("## "):
            family = next((f for prefix, f in sections.items() if line.startswith(prefix)), None)
        elif family is not None and (m := re.match(r"^\| `([a-z0-9-]+)` \|", line)):
            found[m.group(1)] = family
    return found


def test_every_rule_code_has_a_rules_entry() -> None:
    assert set(RULES) == set(RuleCode)
    for code, info in RULES.items():
        assert info.code is code
        assert info.title and info.meaning and info.sources


def test_there_are_22_rules() -> None:
    assert len(RuleCode) == 22


@pytest.mark.parametrize("code", list(RuleCode), ids=str)
def test_every_code_appears_in_the_catalogue(code: RuleCode) -> None:
    assert f"`{code.value}`" in catalogue_text()


def test_catalogue_tables_and_code_list_the_same_rules_in_the_same_families() -> None:
    families = catalogue_rule_families()
    assert set(families) == {c.value for c in RuleCode}
    assert {code: RULES[RuleCode(code)].family for code in families} == families


def test_hard_stops_are_rems_program_rules() -> None:
    assert all(info.family is Family.REMS for info in RULES.values() if info.hard_stop)


def test_coverage_rules_are_never_critical() -> None:
    """Run only the coverage rules over cases that raise every one of them."""
    findings = [f for c in cases_firing_every_rule() for f in rems.evaluate(c, rules=COVERAGE_RULES)]
    assert {f.code for f in findings} == COVERAGE_CODES
    assert {f.severity for f in findings} <= {Severity.INFO, Severity.WARNING}


def test_clinical_review_flags_are_never_critical() -> None:
    findings = [f for c in cases_firing_every_rule() for f in rems.evaluate(c, rules=CLINICAL_RULES)]
    assert {f.code for f in findings} == CLINICAL_CODES
    assert {f.severity for f in findings} <= {Severity.INFO, Severity.WARNING}


def test_clinical_review_flags_stay_advisory_when_configured_to_warning() -> None:
    overrides = "\n".join(f'{c.value} = "warning"' for c in sorted(CLINICAL_CODES))
    cfg = rems.load_config(f"[protocol.severity]\n{overrides}")
    findings = [f for c in cases_firing_every_rule() for f in rems.evaluate(c, cfg, rules=CLINICAL_RULES)]
    assert {f.severity for f in findings} == {Severity.WARNING}
