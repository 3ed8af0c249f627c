"""Observation / Procedure / Condition → pregnancy tests, pregnancy status, labs, and evidence that a
patient cannot get pregnant.

Pregnancy results are read from every place real systems put them: `valueCodeableConcept` (coded or
text only), `interpretation`, `valueString`, and `valueQuantity` against the reference range. All the
signals present must agree; if they disagree, or none can be read, the result is UNREADABLE — never a
pass.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.resource import Resource

from fhir_mappings.codes import Codes
from fhir_mappings.common import as_date, codes_in, codings, concept_text, condition_in_effect, decimal, moment, ref
from rems.config import RemsRules
from rems.model import (
    LabKind,
    LabValue,
    NrpEvidence,
    NrpEvidenceKind,
    PregnancyState,
    PregnancyStatus,
    PregnancyTest,
    TestResult,
)

DROPPED_STATUSES = frozenset({"entered-in-error", "cancelled", "registered"})
"""Observation statuses that carry no result (registered: ordered, not yet resulted)."""
LAB_STATUSES = frozenset({"final", "amended", "corrected"})

_HCG_TEXT = ("pregnancy test", "hcg", "choriogonadotropin", "beta-hcg", "b-hcg")


def _norm(text: str) -> str:
    return f" {re.sub(r'[^a-z]+', ' ', text.lower()).strip()} "


def _words_match(text: str, phrases: tuple[str, ...]) -> bool:
    """Whole-word phrase match with punctuation folded to spaces on both sides ("non-reactive" in the
    list matches "Non reactive" and "NON-REACTIVE" in the record)."""
    low = _norm(text)
    return any(_norm(p) in low for p in phrases)


def collection_time(obs: Any) -> tuple[datetime | date | None, str]:
    """Specimen collection time: effectiveDateTime, else effectivePeriod.start, else effectiveInstant,
    else issued."""
    if obs.effectiveDateTime is not None:
        return moment(obs.effectiveDateTime), "effectiveDateTime"
    if obs.effectivePeriod is not None and obs.effectivePeriod.start is not None:
        return moment(obs.effectivePeriod.start), "effectivePeriod.start"
    if getattr(obs, "effectiveInstant", None) is not None:
        return moment(obs.effectiveInstant), "effectiveInstant"
    if obs.issued is not None:
        return moment(obs.issued), "issued"
    return None, "none"


def is_pregnancy_test(obs: Any, codes: Codes) -> bool:
    loinc = codes_in(obs.code, codes.loinc)
    if loinc & codes.preg_exclude:
        return False
    if loinc & (codes.preg_qualitative | codes.preg_quantitative):
        return True
    if loinc:
        return False
    text = concept_text(obs.code).lower()
    return any(t in text for t in _HCG_TEXT) and "tumor" not in text and "tumour" not in text


def _text_signal(text: str, codes: Codes) -> TestResult | None:
    neg = _words_match(text, codes.preg_negative_text)
    # "not detected" contains "detected": judge positive only on text that has no negative phrase.
    pos = not neg and _words_match(text, codes.preg_positive_text)
    if neg:
        return TestResult.NEGATIVE
    if pos:
        return TestResult.POSITIVE
    return None


def _quantity_signal(obs: Any, rules: RemsRules) -> TestResult | None:
    q = obs.valueQuantity
    value = decimal(q.value) if q is not None else None
    if value is None:
        return None
    comparator = q.comparator
    high: Decimal | None = None
    for rr in obs.referenceRange or []:
        if rr.high is not None and rr.high.value is not None:
            high = decimal(rr.high.value)
            break
    unit = (q.code or q.unit or "").replace("[", "").replace("]", "").lower()
    if high is None:
        if unit not in ("miu/ml", "iu/l", "mu/ml", "u/l", "iu/ml"):
            return None  # no range and no unit we know: the 5 mIU/mL cut-off cannot apply
        if unit == "iu/ml":
            value = value * 1000
        high = rules.quantitative_negative_below_miu_ml
    if comparator in ("<", "<="):
        return TestResult.NEGATIVE if value <= high else None
    if comparator in (">", ">="):
        return TestResult.POSITIVE if value >= high else None
    return TestResult.NEGATIVE if value < high else TestResult.POSITIVE


def pregnancy_result(obs: Any, codes: Codes, rules: RemsRules) -> tuple[TestResult, str]:
    signals: list[TestResult] = []
    shown: list[str] = []
    concept = obs.valueCodeableConcept
    if concept is not None:
        found = {c for _, c, _ in codings(concept)}
        if found & codes.preg_negative_codes:
            signals.append(TestResult.NEGATIVE)
        elif found & codes.preg_positive_codes:
            signals.append(TestResult.POSITIVE)
        else:
            sig = _text_signal(concept_text(concept), codes)
            if sig:
                signals.append(sig)
        shown.append(concept_text(concept) or ",".join(sorted(c for c in found if c is not None)))
    if obs.valueString:
        shown.append(obs.valueString)
        sig = _text_signal(obs.valueString, codes)
        if sig:
            signals.append(sig)
    if obs.valueQuantity is not None:
        q = obs.valueQuantity
        shown.append(f"{q.comparator or ''}{q.value} {q.unit or q.code or ''}".strip())
        sig = _quantity_signal(obs, rules)
        if sig:
            signals.append(sig)
    interp = {c for _, c, _ in codings(obs.interpretation) if c is not None}
    if codes_in(obs.code, codes.loinc) & codes.preg_quantitative:
        interp -= {"N"}  # "normal" says negative only for a qualitative test (DECISIONS.md)
    if interp & codes.preg_negative_interp:
        signals.append(TestResult.NEGATIVE)
        shown.append("interpretation " + ",".join(sorted(interp)))
    elif interp & codes.preg_positive_interp:
        signals.append(TestResult.POSITIVE)
        shown.append("interpretation " + ",".join(sorted(interp)))
    text = "; ".join(s for s in shown if s) or (
        "data absent: " + concept_text(obs.dataAbsentReason) if obs.dataAbsentReason else "no value"
    )
    if signals and all(s is signals[0] for s in signals):
        return signals[0], text
    return TestResult.UNREADABLE, text


def pregnancy_tests(
    observations: list[Resource], codes: Codes, rules: RemsRules
) -> tuple[list[PregnancyTest], list[str]]:
    tests: list[PregnancyTest] = []
    unreadable: list[str] = []
    for obs in observations:
        if obs.status in DROPPED_STATUSES or not is_pregnancy_test(obs, codes):
            continue
        when, source = collection_time(obs)
        if when is None:
            unreadable.append(f"{ref(obs)}: pregnancy test without a usable collection date")
            continue
        result, text = pregnancy_result(obs, codes, rules)
        code = next(iter(sorted(codes_in(obs.code, codes.loinc))), None) or concept_text(obs.code)
        tests.append(PregnancyTest(ref(obs), when, source, result, text, code, obs.status == "preliminary"))
    return tests, unreadable


def pregnancy_statuses(observations: list[Resource], codes: Codes) -> list[PregnancyStatus]:
    out = []
    for obs in observations:
        if obs.status in DROPPED_STATUSES or codes.status_code not in codes_in(obs.code, codes.loinc):
            continue
        when, _ = collection_time(obs)
        if when is None:
            continue
        found = {c for _, c, _ in codings(obs.valueCodeableConcept)}
        text = concept_text(obs.valueCodeableConcept).lower()
        if found & codes.status_pregnant or (not found and text.strip() == "pregnant"):
            state = PregnancyState.PREGNANT
        elif found & codes.status_not_pregnant or "not pregnant" in text:
            state = PregnancyState.NOT_PREGNANT
        else:
            state = PregnancyState.UNKNOWN
        out.append(PregnancyStatus(ref(obs), when, state))
    return out


_MASS_TO_KG = {
    "kg": Decimal(1),
    "g": Decimal("0.001"),
    "lb_av": Decimal("0.45359237"),
    "lb": Decimal("0.45359237"),
    "lbs": Decimal("0.45359237"),
}
_COUNT_TO_E9 = {
    "10*3/ul": Decimal(1),
    "10^3/ul": Decimal(1),
    "x10e3/ul": Decimal(1),
    "k/ul": Decimal(1),
    "thou/ul": Decimal(1),
    "10*9/l": Decimal(1),
    "10^9/l": Decimal(1),
    "x10e9/l": Decimal(1),
    "/ul": Decimal("0.001"),
    "cells/ul": Decimal("0.001"),
    "/mm3": Decimal("0.001"),
    "cells/mm3": Decimal("0.001"),
    "{cells}/ul": Decimal("0.001"),
    "10*3/mm3": Decimal(1),
}
_CREAT_TO_MG_DL = {
    "mg/dl": Decimal(1),
    "umol/l": Decimal(1) / Decimal("88.42"),
    "µmol/l": Decimal(1) / Decimal("88.42"),
}


def _lab_factor(kind: LabKind, unit: str) -> Decimal | None:
    u = unit.replace("[", "").replace("]", "").replace(" ", "").lower()
    table = {LabKind.WEIGHT: _MASS_TO_KG, LabKind.CREATININE: _CREAT_TO_MG_DL}.get(kind, _COUNT_TO_E9)
    return table.get(u)


def labs(observations: list[Resource], codes: Codes) -> tuple[list[LabValue], list[str]]:
    out: list[LabValue] = []
    unreadable: list[str] = []
    kinds = {code: LabKind(kind) for kind, codes_ in codes.labs.items() for code in codes_}
    for obs in observations:
        if obs.status not in LAB_STATUSES:
            continue
        kind = next((kinds[c] for c in codes_in(obs.code, codes.loinc) if c in kinds), None)
        if kind is None:
            continue
        when, _ = collection_time(obs)
        q = obs.valueQuantity
        value = decimal(q.value) if q is not None else None
        if when is None or value is None:
            unreadable.append(f"{ref(obs)}: {kind.value} without a usable date or value")
            continue
        unit = q.code or q.unit or ""
        factor = _lab_factor(kind, unit)
        if factor is None:
            unreadable.append(f"{ref(obs)}: {kind.value} in unit {unit!r} not understood")
            continue
        out.append(LabValue(ref(obs), kind, value * factor, when, f"{q.value} {q.unit or q.code or ''}".strip()))
    return out, unreadable


def _nrp_kind(concept: Any, codes: Codes) -> NrpEvidenceKind | None:
    sct = codes_in(concept, codes.snomed)
    icd = codes_in(concept, codes.icd10cm)
    # Hysterectomy first: codes listed under both (e.g. TAH-BSO) are hysterectomies.
    for kind in (
        NrpEvidenceKind.HYSTERECTOMY,
        NrpEvidenceKind.BILATERAL_OOPHORECTOMY,
        NrpEvidenceKind.NATURAL_MENOPAUSE,
    ):
        s, i = codes.nrp.get(kind, (frozenset(), frozenset()))
        if sct & s or icd & i:
            return kind
    return None


def nrp_evidence(
    procedures: list[Resource],
    conditions: list[Resource],
    observations: list[Resource],
    codes: Codes,
    birth_date: date | None,
) -> list[NrpEvidence]:
    out: list[NrpEvidence] = []
    for proc in procedures:
        if proc.status != "completed":
            continue
        kind = _nrp_kind(proc.code, codes)
        if kind is None:
            continue
        since = as_date(proc.performedDateTime) or (
            as_date(proc.performedPeriod.start) if proc.performedPeriod is not None else None
        )
        out.append(NrpEvidence(ref(proc), kind, since, concept_text(proc.code)))
    for cond in conditions:
        if not condition_in_effect(cond):
            continue
        kind = _nrp_kind(cond.code, codes)
        if kind is None:
            continue
        since = as_date(cond.onsetDateTime) or (
            as_date(cond.onsetPeriod.start) if cond.onsetPeriod is not None else None
        )
        if since is None and kind is not NrpEvidenceKind.NATURAL_MENOPAUSE:
            since = as_date(cond.recordedDate)
        out.append(NrpEvidence(ref(cond), kind, since, concept_text(cond.code)))
    if birth_date is not None:
        for obs in observations:
            if obs.status in DROPPED_STATUSES or codes.age_at_menopause not in codes_in(obs.code, codes.loinc):
                continue
            years = decimal(obs.valueQuantity.value) if obs.valueQuantity is not None else None
            if years is None or not 0 < years < 100:
                continue
            try:
                since = birth_date.replace(year=birth_date.year + int(years))
            except ValueError:  # 29 February
                since = date(birth_date.year + int(years), 3, 1)
            out.append(
                NrpEvidence(
                    ref(obs),
                    NrpEvidenceKind.NATURAL_MENOPAUSE,
                    since,
                    f"age at menopause {years.normalize():f}",
                )
            )
    return out


def regular_cycles(observations: list[Resource], conditions: list[Resource], codes: Codes) -> bool:
    if not codes.regular_cycles:
        return False
    for res in [*observations, *conditions]:
        concepts = [getattr(res, "code", None), getattr(res, "valueCodeableConcept", None)]
        if any({c for _, c, _ in codings(x)} & codes.regular_cycles for x in concepts):
            return True
    return False
