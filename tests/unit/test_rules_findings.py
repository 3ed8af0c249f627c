"""Properties every finding has, whatever the rule: short summaries, evidence, ordering."""

from __future__ import annotations

from datetime import date

import pytest

from rems.findings import SUMMARY_MAX, Finding, RuleCode, Severity

from .builders import cases_firing_every_rule, codes, run

ALL_FINDINGS: list[Finding] = [f for c in cases_firing_every_rule() for f in run(c)]


def test_battery_raises_every_rule() -> None:
    # Guard: the properties below are checked on every rule code.
    assert set(codes(ALL_FINDINGS)) == set(RuleCode)


@pytest.mark.parametrize("code", list(RuleCode), ids=str)
def test_summaries_are_under_140_characters(code: RuleCode) -> None:
    summaries = [f.summary for f in ALL_FINDINGS if f.code is code]
    assert summaries
    for summary in summaries:
        assert 0 < len(summary) < 140, summary


def test_long_quoted_text_is_cut_not_crashing() -> None:
    unreadable = [f for f in ALL_FINDINGS if f.code is RuleCode.PREGNANCY_TEST_MISSING and "?" in f.summary]
    assert unreadable and len(unreadable[0].summary) == SUMMARY_MAX


def test_finding_refuses_a_140_character_summary() -> None:
    Finding(RuleCode.EARLY_REFILL, Severity.WARNING, "x" * 139, "detail", "MedicationRequest/1")
    with pytest.raises(ValueError, match="early-refill"):
        Finding(RuleCode.EARLY_REFILL, Severity.WARNING, "x" * 140, "detail", "MedicationRequest/1")


@pytest.mark.parametrize("code", list(RuleCode), ids=str)
def test_every_finding_has_detail_evidence_and_names_its_order(code: RuleCode) -> None:
    for f in (f for f in ALL_FINDINGS if f.code is code):
        assert f.detail.strip()
        assert f.evidence, f
        assert f.order.startswith("MedicationRequest/")
        assert all(e.reference and e.description for e in f.evidence)
        assert f.info.code is code


@pytest.mark.parametrize("case_index", range(len(cases_firing_every_rule())))
def test_findings_are_most_severe_first(case_index: int) -> None:
    rank = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}
    findings = run(cases_firing_every_rule()[case_index])
    assert [rank[f.severity] for f in findings] == sorted(rank[f.severity] for f in findings)


def test_findings_data_dates_are_iso_strings() -> None:
    for f in ALL_FINDINGS:
        for key in ("dispensable_from", "good_through", "first_dispense_day"):
            if key in f.data:
                date.fromisoformat(f.data[key])
