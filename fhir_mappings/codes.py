"""The code lists of `data/codes.toml`, parsed once into sets (and text lists into `Terms`)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any

from rems.model import Drug, LabKind, NrpEvidenceKind


class Terms:
    """Phrases to look for in lower-case text: `in` any of them, with one compiled search."""

    __slots__ = ("_pattern", "phrases")

    def __init__(self, phrases: tuple[str, ...]) -> None:
        self.phrases = phrases
        self._pattern = re.compile("|".join(map(re.escape, phrases))) if phrases else None

    def found_in(self, text: str) -> bool:
        """``any(p in text for p in phrases)``."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def __repr__(self) -> str:
        return f"Terms({self.phrases!r})"


@dataclass(frozen=True)
class ImidCodes:
    drug: Drug
    text: tuple[str, ...]
    brand_text: tuple[str, ...]
    generic: Mapping[str, Decimal | None]
    brand: Mapping[str, Decimal | None]
    text_terms: Terms
    brand_terms: Terms


@dataclass(frozen=True)
class IndicationCodes:
    key: str
    icd10cm_prefix: tuple[str, ...]
    snomed: frozenset[str]
    text: tuple[str, ...]
    text_terms: Terms


@dataclass(frozen=True)
class Codes:
    rxnorm: str
    loinc: str
    snomed: str
    icd10cm: str
    nucc: str
    interpretation: str
    imids: tuple[ImidCodes, ...]
    preg_qualitative: frozenset[str]
    preg_quantitative: frozenset[str]
    preg_exclude: frozenset[str]
    preg_negative_codes: frozenset[str]
    preg_positive_codes: frozenset[str]
    preg_negative_interp: frozenset[str]
    preg_positive_interp: frozenset[str]
    preg_negative_text: tuple[str, ...]
    preg_positive_text: tuple[str, ...]
    status_code: str
    status_pregnant: frozenset[str]
    status_not_pregnant: frozenset[str]
    status_unknown: frozenset[str]
    age_at_menopause: str
    regular_cycles: frozenset[str]
    nrp: Mapping[NrpEvidenceKind, tuple[frozenset[str], frozenset[str]]]
    """kind → (SNOMED codes, ICD-10-CM codes)."""
    labs: Mapping[str, frozenset[str]]
    lab_kinds: Mapping[str, LabKind]
    """LOINC code → the lab it measures (the inverse of `labs`, computed once)."""
    preg_codes: frozenset[str]
    """Every pregnancy-test LOINC code (qualitative and quantitative)."""
    antithrombotic_rxnorm: frozenset[str]
    antithrombotic_text: tuple[str, ...]
    antithrombotic_terms: Terms
    indications: tuple[IndicationCodes, ...]
    maintenance_text: tuple[str, ...]
    maintenance_terms: Terms
    kaposi: IndicationCodes
    hiv: IndicationCodes


def _strengths(table: Mapping[str, Any]) -> dict[str, Decimal | None]:
    return {str(code): (Decimal(str(mg)) if str(mg) else None) for code, mg in table.items()}


def parse_codes(raw: Mapping[str, Any]) -> Codes:
    s, p = raw["systems"], raw["pregnancy"]
    return Codes(
        rxnorm=s["rxnorm"],
        loinc=s["loinc"],
        snomed=s["snomed"],
        icd10cm=s["icd10cm"],
        nucc=s["nucc"],
        interpretation=s["interpretation"],
        imids=tuple(_imid(name, table) for name, table in raw["imid"].items()),
        preg_qualitative=frozenset(p["qualitative"]),
        preg_quantitative=frozenset(p["quantitative"]),
        preg_exclude=frozenset(p["exclude"]),
        preg_negative_codes=frozenset(p["negative_codes"]),
        preg_positive_codes=frozenset(p["positive_codes"]),
        preg_negative_interp=frozenset(p["negative_interpretation"]),
        preg_positive_interp=frozenset(p["positive_interpretation"]),
        preg_negative_text=tuple(t.lower() for t in p["negative_text"]),
        preg_positive_text=tuple(t.lower() for t in p["positive_text"]),
        status_code=p["status_code"],
        status_pregnant=frozenset(p["status_pregnant"]),
        status_not_pregnant=frozenset(p["status_not_pregnant"]),
        status_unknown=frozenset(p["status_unknown"]),
        age_at_menopause=p["age_at_menopause"],
        regular_cycles=frozenset(p.get("regular_cycles_codes", [])),
        nrp={
            NrpEvidenceKind(kind): (frozenset(t.get("snomed", [])), frozenset(t.get("icd10cm", [])))
            for kind, t in raw["nrp"].items()
        },
        labs={k: frozenset(v) for k, v in raw["labs"].items()},
        lab_kinds={code: LabKind(kind) for kind, codes_ in raw["labs"].items() for code in codes_},
        preg_codes=frozenset(p["qualitative"]) | frozenset(p["quantitative"]),
        antithrombotic_rxnorm=frozenset(raw["antithrombotic"]["rxnorm"]),
        antithrombotic_text=tuple(t.lower() for t in raw["antithrombotic"]["text"]),
        antithrombotic_terms=Terms(tuple(t.lower() for t in raw["antithrombotic"]["text"])),
        indications=tuple(_indication(key, t) for key, t in raw["indication"].items()),
        maintenance_text=tuple(t.lower() for t in raw["maintenance"]["text"]),
        maintenance_terms=Terms(tuple(t.lower() for t in raw["maintenance"]["text"])),
        kaposi=_indication("kaposi", raw["kaposi_hiv"]["kaposi"]),
        hiv=_indication("hiv", raw["kaposi_hiv"]["hiv"]),
    )


def _imid(name: str, table: Mapping[str, Any]) -> ImidCodes:
    text = tuple(t.lower() for t in table["text"])
    brand_text = tuple(t.lower() for t in table.get("brand_text", []))
    return ImidCodes(
        drug=Drug(name),
        text=text,
        brand_text=brand_text,
        generic=_strengths(table.get("generic", {})),
        brand=_strengths(table.get("brand", {})),
        text_terms=Terms(text),
        brand_terms=Terms(brand_text),
    )


def _indication(key: str, t: Mapping[str, Any]) -> IndicationCodes:
    text = tuple(x.lower() for x in t.get("text", []))
    return IndicationCodes(
        key=key,
        icd10cm_prefix=tuple(t.get("icd10cm_prefix", [])),
        snomed=frozenset(t.get("snomed", [])),
        text=text,
        text_terms=Terms(text),
    )


@cache
def default_codes() -> Codes:
    text = resources.files("fhir_mappings").joinpath("data", "codes.toml").read_text(encoding="utf-8")
    return parse_codes(tomllib.loads(text))
