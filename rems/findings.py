"""Findings: what a rule concluded, with its evidence and fix.

The rule codes are the stable identifiers of `../shared/domain/REMS_RULES.md`; they travel to the EHR as
``card.source.topic.code``. `RULES` is the catalogue as data: the README table and the tests read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime

SUMMARY_MAX = 139
"""CDS Hooks: a card summary SHOULD be under 140 characters."""


class Severity(enum.StrEnum):
    """Matches the CDS Hooks card `indicator` values."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Family(enum.StrEnum):
    REMS = "rems"
    COVERAGE = "coverage"
    CLINICAL = "clinical"


class RuleCode(enum.StrEnum):
    SUPPLY_OVER_28_DAYS = "supply-over-28-days"
    SUPPLY_UNKNOWN = "supply-unknown"
    REFILLS_NOT_ALLOWED = "refills-not-allowed"
    RISK_CATEGORY_MISSING = "risk-category-missing"
    RISK_CATEGORY_MISMATCH = "risk-category-mismatch"
    AUTHORIZATION_MISSING = "authorization-missing"
    PREGNANCY_TEST_MISSING = "pregnancy-test-missing"
    PREGNANCY_TEST_STALE = "pregnancy-test-stale"
    PREGNANCY_TEST_POSITIVE = "pregnancy-test-positive"
    INITIATION_TESTS_INCOMPLETE = "initiation-tests-incomplete"
    EARLY_REFILL = "early-refill"
    REPRODUCTIVE_STATUS_UNKNOWN = "reproductive-status-unknown"
    DOSE_ABOVE_POLICY_LIMIT = "dose-above-policy-limit"
    CONCURRENT_IMID = "concurrent-imid"
    AGE_UNDER_18 = "age-under-18"
    PRESCRIBER_NOT_SPECIALIST = "prescriber-not-specialist"
    GENERIC_PREFERRED = "generic-preferred"
    CBC_OVERDUE = "cbc-overdue"
    NEUTROPENIA = "neutropenia"
    THROMBOCYTOPENIA = "thrombocytopenia"
    RENAL_DOSE_REVIEW = "renal-dose-review"
    VTE_PROPHYLAXIS_MISSING = "vte-prophylaxis-missing"


@dataclass(frozen=True)
class RuleInfo:
    code: RuleCode
    family: Family
    title: str
    """Short human name; the card topic `display`."""
    meaning: str
    sources: tuple[str, ...]
    """Seed documents (``000`` … ``004``) or ``safety default``."""
    hard_stop: bool
    """True for the REMS conditions a pharmacy must refuse to dispense on (or we must never pass)."""


def _r(code: RuleCode, family: Family, title: str, meaning: str, sources: str, *, hard_stop: bool = False) -> RuleInfo:
    return RuleInfo(code, family, title, meaning, tuple(sources.split()), hard_stop)


_RC = RuleCode
RULES: dict[RuleCode, RuleInfo] = {
    r.code: r
    for r in (
        _r(
            _RC.SUPPLY_OVER_28_DAYS,
            Family.REMS,
            "Supply over 28 days",
            "The order supplies more than 28 days.",
            "000 001",
            hard_stop=True,
        ),
        _r(
            _RC.SUPPLY_UNKNOWN,
            Family.REMS,
            "Days' supply unknown",
            "Days' supply cannot be determined from the order.",
            "safety-default",
        ),
        _r(
            _RC.REFILLS_NOT_ALLOWED,
            Family.REMS,
            "Refills not allowed",
            "The order allows refills; IMiD REMS allows none.",
            "000 001",
            hard_stop=True,
        ),
        _r(
            _RC.RISK_CATEGORY_MISSING,
            Family.REMS,
            "Risk category missing",
            "No REMS risk category documented on the order.",
            "001",
            hard_stop=True,
        ),
        _r(
            _RC.RISK_CATEGORY_MISMATCH,
            Family.REMS,
            "Risk category contradicts chart",
            "The documented category contradicts sex, age, pregnancy tests or evidence in the chart.",
            "001",
        ),
        _r(
            _RC.AUTHORIZATION_MISSING,
            Family.REMS,
            "Authorization number missing",
            "No REMS authorization number documented on the order.",
            "000 001",
            hard_stop=True,
        ),
        _r(
            _RC.PREGNANCY_TEST_MISSING,
            Family.REMS,
            "Pregnancy test missing",
            "A patient who can get pregnant has no usable negative pregnancy test.",
            "001",
            hard_stop=True,
        ),
        _r(
            _RC.PREGNANCY_TEST_STALE,
            Family.REMS,
            "Pregnancy test expired",
            "The newest negative test will be older than 7 days on the first dispense day.",
            "000",
            hard_stop=True,
        ),
        _r(
            _RC.PREGNANCY_TEST_POSITIVE,
            Family.REMS,
            "Pregnancy test positive",
            "The newest pregnancy test is positive or the patient is documented pregnant.",
            "001 004",
            hard_stop=True,
        ),
        _r(
            _RC.INITIATION_TESTS_INCOMPLETE,
            Family.REMS,
            "Initiation pregnancy tests incomplete",
            "First prescription without negative tests 10-14 days and within 24 hours before.",
            "001",
            hard_stop=True,
        ),
        _r(
            _RC.EARLY_REFILL,
            Family.REMS,
            "Too early to dispense",
            "Current supply has more than 7 days left; the pharmacy cannot dispense yet.",
            "000 001",
        ),
        _r(
            _RC.REPRODUCTIVE_STATUS_UNKNOWN,
            Family.REMS,
            "Reproductive status unknown",
            "Female (or unknown sex) patient of 10 or older: nothing settles whether she can get pregnant.",
            "safety-default",
        ),
        _r(
            _RC.DOSE_ABOVE_POLICY_LIMIT,
            Family.COVERAGE,
            "Dose above plan limit",
            "Daily dose above the health plan's cap for the indication.",
            "004",
        ),
        _r(
            _RC.CONCURRENT_IMID,
            Family.COVERAGE,
            "Concurrent IMiD",
            "Another IMiD is active or in the same draft.",
            "004",
        ),
        _r(
            _RC.AGE_UNDER_18,
            Family.COVERAGE,
            "Patient under 18",
            "The health plan covers IMiDs from age 18.",
            "004",
        ),
        _r(
            _RC.PRESCRIBER_NOT_SPECIALIST,
            Family.COVERAGE,
            "Prescriber not a specialist",
            "The prescriber is not oncology/hematology (or immunology for HIV-related Kaposi sarcoma).",
            "004",
        ),
        _r(
            _RC.GENERIC_PREFERRED,
            Family.COVERAGE,
            "Generic preferred",
            "Brand Revlimid ordered where generic lenalidomide is preferred.",
            "004",
        ),
        _r(_RC.CBC_OVERDUE, Family.CLINICAL, "CBC overdue", "No CBC within the protocol window.", "002 003"),
        _r(
            _RC.NEUTROPENIA,
            Family.CLINICAL,
            "Low neutrophils",
            "Latest ANC below the protocol hold threshold.",
            "002 004",
        ),
        _r(
            _RC.THROMBOCYTOPENIA,
            Family.CLINICAL,
            "Low platelets",
            "Latest platelet count below the protocol hold threshold.",
            "002 004",
        ),
        _r(
            _RC.RENAL_DOSE_REVIEW,
            Family.CLINICAL,
            "Renal dose review",
            "CrCl below threshold (lenalidomide) or serum creatinine above 3.0 mg/dL (pomalidomide).",
            "002 004",
        ),
        _r(
            _RC.VTE_PROPHYLAXIS_MISSING,
            Family.CLINICAL,
            "No VTE prophylaxis",
            "No active anticoagulant or antiplatelet therapy (boxed warning).",
            "003 004",
        ),
    )
}


class FixKind(enum.StrEnum):
    """Machine-readable fixes; the CDS layer turns some into suggestions (update/create actions)."""

    SET_SUPPLY_DAYS = "set-supply-days"
    REMOVE_REFILLS = "remove-refills"
    ORDER_PREGNANCY_TEST = "order-pregnancy-test"
    ENTER_AUTHORIZATION = "enter-authorization"
    DOCUMENT_RISK_CATEGORY = "document-risk-category"
    DOCUMENT_REPRODUCTIVE_STATUS = "document-reproductive-status"
    DELAY_UNTIL = "delay-until"
    SWITCH_TO_GENERIC = "switch-to-generic"
    ORDER_CBC = "order-cbc"
    STOP_OTHER_IMID = "stop-other-imid"
    REVIEW = "review"


@dataclass(frozen=True)
class Fix:
    kind: FixKind
    description: str
    """Imperative, e.g. "Set supply to 28 days"."""
    value: str | None = None
    """Parameter of the fix (days, date, suggested category code, order reference)."""


@dataclass(frozen=True)
class Evidence:
    reference: str
    """A FHIR-style reference (``Observation/hcg-2``) or ``-`` when the evidence is an absence."""
    description: str
    when: datetime | date | None = None


@dataclass(frozen=True)
class Finding:
    code: RuleCode
    severity: Severity
    summary: str
    detail: str
    order: str
    """Reference of the order the finding is about."""
    evidence: tuple[Evidence, ...] = ()
    fix: Fix | None = None
    data: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    """Computed values a front end may want (dates as ISO strings): e.g. ``dispensable_from``."""

    def __post_init__(self) -> None:
        if len(self.summary) > SUMMARY_MAX:
            raise ValueError(f"summary over {SUMMARY_MAX} characters for {self.code}: {self.summary!r}")

    @property
    def info(self) -> RuleInfo:
        return RULES[self.code]
