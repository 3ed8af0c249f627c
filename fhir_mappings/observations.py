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
from functools import cache

from fhir_mappings.access import (
    VALID_CODES,
    Concept,
    Json,
    Quantity,
    choice,
    code,
    concept,
    concept_value,
    concepts,
    date_time,
    instant,
    is_code,
    obj,
    objects,
    quantity,
    string,
)
from fhir_mappings.codes import Codes
from fhir_mappings.common import ChartCondition, as_date, codes_in, concept_text, ref
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
_EFFECTIVE = frozenset({"effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant"})
OBSERVATION_VALUES = frozenset(
    f"value{t}"
    for t in (
        "Quantity",
        "CodeableConcept",
        "String",
        "Boolean",
        "Integer",
        "Range",
        "Ratio",
        "SampledData",
        "Time",
        "DateTime",
        "Period",
    )
)
_PERFORMED = frozenset({"performedDateTime", "performedPeriod", "performedString", "performedAge", "performedRange"})
_ONSET = frozenset({"onsetDateTime", "onsetAge", "onsetPeriod", "onsetRange", "onsetString"})


class ChartObservation:
    """An Observation as first read: status and code (what decides whether any rule uses it). Its value
    and times are read, and checked, only by the mapping that uses this kind of Observation."""

    __slots__ = ("_ref", "_value", "code", "loinc", "path", "raw", "status")

    def __init__(self, raw: Json, path: str, status: str, code: Concept, loinc: set[str]) -> None:
        self.raw = raw
        self.path = path
        self.status = status
        self.code = code
        self.loinc = loinc
        self._ref: str | None = None
        self._value: str | bool | None = False  # False: value[x] not looked at yet

    @property
    def ref(self) -> str:
        """``Observation/id`` (formatted when first asked for: most Observations are never cited)."""
        r = self._ref
        if r is None:
            r = self._ref = ref(self.raw)
        return r

    def value_name(self) -> str | None:
        """Which `value[x]` is present (`access.choice`: two of them is a 422), looked at once."""
        v = self._value
        if v is False:
            v = self._value = choice(self.raw, self.path, OBSERVATION_VALUES)
        return v  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"ChartObservation({self.path!r}, {self.status!r}, {self.code!r})"


def read_observation(raw: Json, path: str, codes: Codes) -> ChartObservation:
    # `code(raw, "status", ...)` and `concept(raw, "code", ...)`, both required, with the good case inline
    status = raw.get("status")
    if not (type(status) is str and (status in VALID_CODES or is_code(status))):
        status = code(raw, "status", path, required=True)  # raises, naming what is wrong
    v = raw.get("code")
    obs_code = concept_value(v, path, "code") if v is not None else concept(raw, "code", path, required=True)
    system = codes.loinc
    loinc: set[str] = set()
    for s, c, _ in obs_code.codings:
        if s == system and c:
            loinc.add(c)
    return ChartObservation(raw, path, status, obs_code, loinc)


def _norm(text: str) -> str:
    return f" {re.sub(r'[^a-z]+', ' ', text.lower()).strip()} "


@cache
def _normed(phrases: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_norm(p) for p in phrases)


def _words_match(text: str, phrases: tuple[str, ...]) -> bool:
    """Whole-word phrase match with punctuation folded to spaces on both sides ("non-reactive" in the
    list matches "Non reactive" and "NON-REACTIVE" in the record)."""
    low = _norm(text)
    return any(p in low for p in _normed(phrases))


def collection_time(obs: ChartObservation) -> tuple[datetime | date | None, str]:
    """Specimen collection time: effectiveDateTime, else effectivePeriod.start, else effectiveInstant,
    else issued."""
    raw, path = obs.raw, obs.path
    if (  # the common case, quickly; anything else through `choice`
        "effectiveDateTime" in raw
        and "effectivePeriod" not in raw
        and "effectiveInstant" not in raw
        and "effectiveTiming" not in raw
    ):
        which: str | None = "effectiveDateTime" if raw["effectiveDateTime"] is not None else None
    else:
        which = choice(raw, path, _EFFECTIVE)
    if which == "effectiveDateTime":
        return date_time(raw, which, path), which
    if which == "effectivePeriod":
        period = obj(raw, which, path)
        if period is not None and period.get("start") is not None:
            return date_time(period, "start", f"{path}.effectivePeriod"), "effectivePeriod.start"
    if which == "effectiveInstant":
        return instant(raw, which, path), which
    if raw.get("issued") is not None:
        return instant(raw, "issued", path), "issued"
    return None, "none"


def is_pregnancy_test(obs: ChartObservation, codes: Codes) -> bool:
    loinc = obs.loinc
    if not loinc.isdisjoint(codes.preg_exclude):
        return False
    if not loinc.isdisjoint(codes.preg_codes):
        return True
    if loinc:
        return False
    text = obs.code.label().lower()
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


def _reference_high(obs: ChartObservation) -> Decimal | None:
    for rr, rpath in objects(obs.raw, "referenceRange", obs.path):
        high = quantity(rr, "high", rpath)
        if high is not None and high.value is not None:
            return high.value
    return None


def _quantity_signal(obs: ChartObservation, q: Quantity, rules: RemsRules) -> TestResult | None:
    value = q.value
    if value is None:
        return None
    high = _reference_high(obs)
    unit = (q.code or q.unit or "").replace("[", "").replace("]", "").lower()
    if high is None:
        if unit not in ("miu/ml", "iu/l", "mu/ml", "u/l", "iu/ml"):
            return None  # no range and no unit we know: the 5 mIU/mL cut-off cannot apply
        if unit == "iu/ml":
            value = value * 1000
        high = rules.quantitative_negative_below_miu_ml
    if q.comparator in ("<", "<="):
        return TestResult.NEGATIVE if value <= high else None
    if q.comparator in (">", ">="):
        return TestResult.POSITIVE if value >= high else None
    return TestResult.NEGATIVE if value < high else TestResult.POSITIVE


def pregnancy_result(obs: ChartObservation, codes: Codes, rules: RemsRules) -> tuple[TestResult, str]:
    raw, path = obs.raw, obs.path
    signals: list[TestResult] = []
    shown: list[str] = []
    which = obs.value_name()
    if which == "valueCodeableConcept":
        value = concept(raw, which, path, required=True)
        found = value.all_codes()
        label = value.label()
        if not found.isdisjoint(codes.preg_negative_codes):
            signals.append(TestResult.NEGATIVE)
        elif not found.isdisjoint(codes.preg_positive_codes):
            signals.append(TestResult.POSITIVE)
        else:
            sig = _text_signal(label, codes)
            if sig:
                signals.append(sig)
        shown.append(label or ",".join(sorted(found)))
    elif which == "valueString":
        text = string(raw, which, path, required=True)
        shown.append(text)
        sig = _text_signal(text, codes)
        if sig:
            signals.append(sig)
    elif which == "valueQuantity":
        q = quantity(raw, which, path)
        if q is not None:
            shown.append(f"{q.comparator or ''}{q.value} {q.unit or q.code or ''}".strip())
            sig = _quantity_signal(obs, q, rules)
            if sig:
                signals.append(sig)
    interp: set[str] = set()
    for c in concepts(raw, "interpretation", path):
        for _, code_, _ in c.codings:
            if code_ is not None:
                interp.add(code_)
    if interp:
        if not obs.loinc.isdisjoint(codes.preg_quantitative):
            interp.discard("N")  # "normal" says negative only for a qualitative test (DECISIONS.md)
        if not interp.isdisjoint(codes.preg_negative_interp):
            signals.append(TestResult.NEGATIVE)
            shown.append("interpretation " + ",".join(sorted(interp)))
        elif not interp.isdisjoint(codes.preg_positive_interp):
            signals.append(TestResult.POSITIVE)
            shown.append("interpretation " + ",".join(sorted(interp)))
    text = "; ".join([s for s in shown if s])
    if not text:
        absent = concept(raw, "dataAbsentReason", path)
        text = "data absent: " + concept_text(absent) if absent is not None else "no value"
    if signals:
        first = signals[0]
        for s in signals:
            if s is not first:
                return TestResult.UNREADABLE, text
        return first, text
    return TestResult.UNREADABLE, text


def pregnancy_tests(
    observations: list[ChartObservation], codes: Codes, rules: RemsRules
) -> tuple[list[PregnancyTest], list[str]]:
    tests: list[PregnancyTest] = []
    unreadable: list[str] = []
    for obs in observations:
        if obs.status in DROPPED_STATUSES or not is_pregnancy_test(obs, codes):
            continue
        when, source = collection_time(obs)
        if when is None:
            unreadable.append(f"{obs.ref}: pregnancy test without a usable collection date")
            continue
        result, text = pregnancy_result(obs, codes, rules)
        loinc = obs.loinc
        code_ = (min(loinc) if loinc else None) or obs.code.label()
        tests.append(PregnancyTest(obs.ref, when, source, result, text, code_, obs.status == "preliminary"))
    return tests, unreadable


def pregnancy_statuses(observations: list[ChartObservation], codes: Codes) -> list[PregnancyStatus]:
    out = []
    for obs in observations:
        if obs.status in DROPPED_STATUSES or codes.status_code not in obs.loinc:
            continue
        when, _ = collection_time(obs)
        if when is None:
            continue
        which = obs.value_name()
        value = concept(obs.raw, "valueCodeableConcept", obs.path) if which == "valueCodeableConcept" else None
        found = {c for _, c, _ in value.codings} if value is not None else set()
        text = value.label().lower() if value is not None else ""
        if found & codes.status_pregnant or (not found and text.strip() == "pregnant"):
            state = PregnancyState.PREGNANT
        elif found & codes.status_not_pregnant or "not pregnant" in text:
            state = PregnancyState.NOT_PREGNANT
        else:
            state = PregnancyState.UNKNOWN
        out.append(PregnancyStatus(obs.ref, when, state))
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


_LAB_UNITS = {LabKind.WEIGHT: _MASS_TO_KG, LabKind.CREATININE: _CREAT_TO_MG_DL}


_LAB_FACTORS: dict[tuple[LabKind, str], Decimal | None] = {}
"""`_lab_factor` by (kind, unit as written): few distinct units, so bounded in practice (and capped)."""


def _lab_factor(kind: LabKind, unit: str) -> Decimal | None:
    key = (kind, unit)
    try:
        return _LAB_FACTORS[key]
    except KeyError:
        pass
    u = unit.replace("[", "").replace("]", "").replace(" ", "").lower()
    factor = _LAB_UNITS.get(kind, _COUNT_TO_E9).get(u)
    if len(_LAB_FACTORS) < 1024:
        _LAB_FACTORS[key] = factor
    return factor


def labs(observations: list[ChartObservation], codes: Codes) -> tuple[list[LabValue], list[str]]:
    out: list[LabValue] = []
    unreadable: list[str] = []
    kinds = codes.lab_kinds
    for obs in observations:
        if obs.status not in LAB_STATUSES:
            continue
        for c in obs.loinc:
            kind = kinds.get(c)
            if kind is not None:
                break
        else:
            continue
        when, _ = collection_time(obs)
        which = obs.value_name()
        q = quantity(obs.raw, "valueQuantity", obs.path) if which == "valueQuantity" else None
        value = q.value if q is not None else None
        if when is None or q is None or value is None:
            unreadable.append(f"{obs.ref}: {kind.value} without a usable date or value")
            continue
        unit = q.code or q.unit or ""
        factor = _lab_factor(kind, unit)
        if factor is None:
            unreadable.append(f"{obs.ref}: {kind.value} in unit {unit!r} not understood")
            continue
        out.append(LabValue(obs.ref, kind, value * factor, when, f"{q.value} {q.unit or q.code or ''}".strip()))
    return out, unreadable


_NRP_KINDS: dict[tuple[object, ...], tuple[Codes, NrpEvidenceKind | None]] = {}
"""`_nrp_kind` by what it reads (codings, text); bounded (cleared when full)."""


def _nrp_kind(concept_: Concept | None, codes: Codes) -> NrpEvidenceKind | None:
    key = (id(codes), None) if concept_ is None else (id(codes), concept_.codings)
    hit = _NRP_KINDS.get(key)
    if hit is not None and hit[0] is codes:
        return hit[1]
    kind = _nrp_kind_of(concept_, codes)
    if len(_NRP_KINDS) >= 4096:
        _NRP_KINDS.clear()
    _NRP_KINDS[key] = (codes, kind)
    return kind


def _nrp_kind_of(concept_: Concept | None, codes: Codes) -> NrpEvidenceKind | None:
    sct = codes_in(concept_, codes.snomed)
    icd = codes_in(concept_, codes.icd10cm)
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


def _since(raw: Json, path: str, name: str, choices: frozenset[str]) -> date | None:
    """The day of `name`DateTime, else of `name`Period.start (partial dates give None)."""
    which = choice(raw, path, choices)
    if which == f"{name}DateTime":
        return as_date(date_time(raw, which, path))
    if which == f"{name}Period":
        period = obj(raw, which, path, required=True)
        return as_date(date_time(period, "start", f"{path}.{which}"))
    return None


def nrp_evidence(
    procedures: list[tuple[Json, str]],
    conditions: list[ChartCondition],
    observations: list[ChartObservation],
    codes: Codes,
    birth_date: date | None,
) -> list[NrpEvidence]:
    out: list[NrpEvidence] = []
    for proc, path in procedures:
        if code(proc, "status", path, required=True) != "completed":
            continue
        proc_code = concept(proc, "code", path)
        kind = _nrp_kind(proc_code, codes)
        if kind is None:
            continue
        since = _since(proc, path, "performed", _PERFORMED)
        out.append(NrpEvidence(ref(proc), kind, since, concept_text(proc_code)))
    for cond in conditions:
        if not cond.in_effect:
            continue
        kind = _nrp_kind(cond.code, codes)
        if kind is None:
            continue
        since = _since(cond.raw, cond.path, "onset", _ONSET)
        if since is None and kind is not NrpEvidenceKind.NATURAL_MENOPAUSE:
            since = as_date(date_time(cond.raw, "recordedDate", cond.path))
        out.append(NrpEvidence(cond.ref, kind, since, concept_text(cond.code)))
    if birth_date is not None:
        for obs in observations:
            if obs.status in DROPPED_STATUSES or codes.age_at_menopause not in obs.loinc:
                continue
            which = obs.value_name()
            q = quantity(obs.raw, "valueQuantity", obs.path) if which == "valueQuantity" else None
            years = q.value if q is not None else None
            if years is None or not 0 < years < 100:
                continue
            try:
                since = birth_date.replace(year=birth_date.year + int(years))
            except ValueError:  # 29 February
                since = date(birth_date.year + int(years), 3, 1)
            out.append(
                NrpEvidence(
                    obs.ref,
                    NrpEvidenceKind.NATURAL_MENOPAUSE,
                    since,
                    f"age at menopause {years.normalize():f}",
                )
            )
    return out


def regular_cycles(observations: list[ChartObservation], conditions: list[ChartCondition], codes: Codes) -> bool:
    if not codes.regular_cycles:
        return False
    for obs in observations:
        if obs.code.all_codes() & codes.regular_cycles:
            return True
        if obs.value_name() == "valueCodeableConcept":
            value = concept(obs.raw, "valueCodeableConcept", obs.path)
            if value is not None and value.all_codes() & codes.regular_cycles:
                return True
    return any(c.code is not None and c.code.all_codes() & codes.regular_cycles for c in conditions)
