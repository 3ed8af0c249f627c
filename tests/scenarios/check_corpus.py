"""Sanity check of the scenario corpus (pure standard library; does not run the engine).

    .venv/bin/python -m tests.scenarios.check_corpus     # from the repository root (also run by make test)

Checks every scenario directory:
- `request.json` and `expected.json` exist and are valid JSON;
- the request is a CDS Hooks 2.0 request (order-sign / order-select / medication-refill) with the
  context keys that hook needs, the prefetch keys we use, a Patient whose id is `context.patientId`,
  and draft MedicationRequests;
- every FHIR dateTime that carries a time also carries a UTC offset (FHIR forbids a bare local time);
- `expected.json` has `description`, `now` (with offset), `timezone` (an IANA zone) and `codes`, sorted,
  every one a rule code of REMS_RULES.md.

Then checks that the corpus as a whole covers all 22 rule codes, the three drugs, the six risk
categories, the three hooks, and holds at least 46 scenarios, of which at least 8 are clean (no warning
or critical finding: only the info-level codes, or none). Exit status 1 on any problem.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rems.findings import RuleCode

HERE = Path(__file__).resolve().parent

RULE_CODES = tuple(code.value for code in RuleCode)
INFO_BY_DEFAULT = {"cbc-overdue", "vte-prophylaxis-missing", "generic-preferred"}
"""Severity info with the packaged defaults (DECISIONS.md, rems/data/protocol.toml): a scenario whose
codes are all in here has no warning or critical card."""

HOOKS = ("order-sign", "order-select", "medication-refill")
PREFETCH_KEYS = {"patient", "medications", "dispenses", "observations", "conditions", "procedures", "practitionerRoles"}
CATEGORY_SYSTEM = "https://imid-rems.github.io/fhir/CodeSystem/rems-risk-category"
CATEGORY_EXTENSION = "https://imid-rems.github.io/fhir/StructureDefinition/rems-risk-category"
CATEGORY_NAMES = {  # note-text forms (REMS form names) -> code; older names are not counted for coverage
    "adult female who can get pregnant": "adult-female-rp",
    "female child who can get pregnant": "child-female-rp",
    "adult female who can not get pregnant": "adult-female-nrp",
    "adult female who cannot get pregnant": "adult-female-nrp",
    "female child who can not get pregnant": "child-female-nrp",
    "female child who cannot get pregnant": "child-female-nrp",
    "adult male": "adult-male",
    "male child": "child-male",
}
DRUG_WORDS = {
    "lenalidomide": "lenalidomide",
    "revlimid": "lenalidomide",
    "pomalidomide": "pomalidomide",
    "pomalyst": "pomalidomide",
    "thalidomide": "thalidomide",
    "thalomid": "thalidomide",
}
MIN_SCENARIOS, MIN_CLEAN = 46, 8

DATETIME_WITH_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
OFFSET = re.compile(r"(Z|[+-]\d{2}:\d{2})$")
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def strings(node: object, path: str = "$"):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def bundle_resources(bundle: object) -> list[dict]:
    if not isinstance(bundle, dict):
        return []
    return [e["resource"] for e in bundle.get("entry", []) if isinstance(e, dict) and "resource" in e]


def drugs_of(order: dict, by_id: dict[str, dict]) -> set[str]:
    text = json.dumps(order.get("medicationCodeableConcept", {}))
    ref = (order.get("medicationReference") or {}).get("reference", "")
    if ref.startswith("Medication/") and ref.split("/", 1)[1] in by_id:
        text += json.dumps(by_id[ref.split("/", 1)[1]].get("code", {}))
    text += json.dumps(order.get("medicationReference", {}))
    return {drug for word, drug in DRUG_WORDS.items() if word in text.lower()}


def categories_of(order: dict, observations: dict[str, dict]) -> set[str]:
    found: set[str] = set()
    for ext in order.get("extension", []):
        if ext.get("url") == CATEGORY_EXTENSION:
            found.add(ext.get("valueCoding", {}).get("code", ""))
    contained = {c.get("id"): c for c in order.get("contained", [])}
    for info in order.get("supportingInformation", []):
        ref = info.get("reference", "")
        obs = contained.get(ref[1:]) if ref.startswith("#") else observations.get(ref.split("/", 1)[-1])
        for coding in ((obs or {}).get("valueCodeableConcept") or {}).get("coding", []):
            if coding.get("system") == CATEGORY_SYSTEM:
                found.add(coding.get("code", ""))
    for note in order.get("note", []):
        m = re.search(r"risk category:\s*(.+)", note.get("text", ""), re.IGNORECASE)
        if m and m.group(1).strip().lower() in CATEGORY_NAMES:
            found.add(CATEGORY_NAMES[m.group(1).strip().lower()])
    return found


def check_scenario(d: Path, problems: list[str]) -> dict | None:
    def bad(msg: str) -> None:
        problems.append(f"{d.name}: {msg}")

    if not KEBAB.match(d.name):
        bad("directory name is not kebab-case")
    docs = {}
    for name in ("request.json", "expected.json"):
        f = d / name
        if not f.is_file():
            bad(f"missing {name}")
            return None
        try:
            docs[name] = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            bad(f"{name} is not valid JSON: {exc}")
            return None
    req, exp = docs["request.json"], docs["expected.json"]

    # expected.json
    for key in ("description", "now", "timezone", "codes"):
        if key not in exp:
            bad(f"expected.json lacks {key!r}")
            return None
    extra = set(exp) - {"description", "now", "timezone", "codes"}
    if extra:
        bad(f"expected.json has unknown keys {sorted(extra)}")
    codes = exp["codes"]
    if not isinstance(codes, list) or codes != sorted(codes):
        bad("codes is not a sorted list")
    unknown = [c for c in codes if c not in RULE_CODES]
    if unknown:
        bad(f"unknown rule codes {unknown}")
    if not (isinstance(exp["now"], str) and DATETIME_WITH_TIME.match(exp["now"]) and OFFSET.search(exp["now"])):
        bad(f"now {exp['now']!r} is not a dateTime with a UTC offset")
    try:
        ZoneInfo(exp["timezone"])
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        bad(f"timezone {exp['timezone']!r} is not an IANA zone")
    if not exp["description"].strip():
        bad("empty description")

    # request.json
    hook = req.get("hook")
    if hook not in HOOKS:
        bad(f"hook {hook!r} not one of {HOOKS}")
    for key in ("hookInstance", "fhirServer", "context", "prefetch"):
        if key not in req:
            bad(f"request lacks {key!r}")
            return None
    ctx, prefetch = req["context"], req["prefetch"]
    for key in ("userId", "patientId"):
        if key not in ctx:
            bad(f"context lacks {key!r}")
    draft_key = "medications" if hook == "medication-refill" else "draftOrders"
    if draft_key not in ctx:
        bad(f"context lacks {draft_key!r} for {hook}")
        return None
    if hook == "order-select" and not ctx.get("selections"):
        bad("order-select without context.selections")
    bundle = ctx[draft_key]
    if bundle.get("resourceType") != "Bundle":
        bad(f"context.{draft_key} is not a Bundle")
    drafts = bundle_resources(bundle)
    if not drafts:
        bad("no draft orders")
    for r in drafts:
        if r.get("resourceType") != "MedicationRequest" or r.get("status") != "draft":
            bad(f"context.{draft_key} holds a non-draft or non-MedicationRequest: {r.get('id')}")
        if r.get("subject", {}).get("reference") != f"Patient/{ctx.get('patientId')}":
            bad(f"draft {r.get('id')} subject is not context.patientId")
    if hook == "order-select":
        ids = {f"MedicationRequest/{r.get('id')}" for r in drafts}
        for sel in ctx.get("selections", []):
            if sel not in ids:
                bad(f"selection {sel} is not a draft order")
    if set(prefetch) - PREFETCH_KEYS:
        bad(f"unknown prefetch keys {sorted(set(prefetch) - PREFETCH_KEYS)}")
    patient = prefetch.get("patient")
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        bad("prefetch.patient is not a Patient")
    elif patient.get("id") != ctx.get("patientId"):
        bad("prefetch.patient.id differs from context.patientId")
    for key in PREFETCH_KEYS - {"patient"}:
        value = prefetch.get(key)
        if value is not None and (value.get("resourceType") != "Bundle" or value.get("type") != "searchset"):
            bad(f"prefetch.{key} is neither null nor a searchset Bundle")
    for path, s in strings(req):
        if DATETIME_WITH_TIME.match(s) and not OFFSET.search(s):
            bad(f"{path} = {s!r}: dateTime with a time but no UTC offset")

    meds = {r["id"]: r for r in bundle_resources(prefetch.get("medications")) if r.get("resourceType") == "Medication"}
    observations = {r["id"]: r for r in bundle_resources(prefetch.get("observations"))}
    drugs = set().union(*(drugs_of(r, meds) for r in drafts)) if drafts else set()
    if not drugs:
        bad("no IMiD recognised in the draft orders")
    cats = set().union(*(categories_of(r, observations) for r in drafts)) if drafts else set()
    return {"codes": codes, "drugs": drugs, "categories": cats, "hook": hook}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")


def main() -> int:
    problems: list[str] = []
    dirs = sorted(p for p in HERE.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    results = {d.name: r for d in dirs if (r := check_scenario(d, problems)) is not None}

    code_count = Counter(c for r in results.values() for c in set(r["codes"]))
    drugs = Counter(x for r in results.values() for x in r["drugs"])
    cats = Counter(x for r in results.values() for x in r["categories"])
    hooks = Counter(r["hook"] for r in results.values())
    clean = [n for n, r in results.items() if set(r["codes"]) <= INFO_BY_DEFAULT]
    fully_clean = [n for n, r in results.items() if not r["codes"]]

    missing_codes = [c for c in RULE_CODES if c not in code_count]
    missing_drugs = [x for x in ("lenalidomide", "pomalidomide", "thalidomide") if x not in drugs]
    missing_cats = [
        x
        for x in (
            "adult-female-rp",
            "child-female-rp",
            "adult-female-nrp",
            "child-female-nrp",
            "adult-male",
            "child-male",
        )
        if x not in cats
    ]
    missing_hooks = [h for h in HOOKS if h not in hooks]
    if missing_codes:
        problems.append(f"corpus: rule codes never expected: {missing_codes}")
    if missing_drugs:
        problems.append(f"corpus: drugs never ordered: {missing_drugs}")
    if missing_cats:
        problems.append(f"corpus: risk categories never documented: {missing_cats}")
    if missing_hooks:
        problems.append(f"corpus: hooks never used: {missing_hooks}")
    if len(results) < MIN_SCENARIOS:
        problems.append(f"corpus: {len(results)} scenarios, want at least {MIN_SCENARIOS}")
    if len(clean) < MIN_CLEAN:
        problems.append(f"corpus: {len(clean)} clean scenarios, want at least {MIN_CLEAN}")

    say(f"scenarios: {len(results)} ({len(dirs)} directories)")
    say(f"clean (no warning/critical): {len(clean)}, of which no card at all: {len(fully_clean)}")
    say("hooks: " + ", ".join(f"{h} {hooks[h]}" for h in HOOKS))
    say("drugs: " + ", ".join(f"{x} {n}" for x, n in sorted(drugs.items())))
    say("categories: " + ", ".join(f"{x} {n}" for x, n in sorted(cats.items())))
    say(f"rule codes covered: {len(code_count)}/{len(RULE_CODES)}")
    for c in RULE_CODES:
        say(f"  {c:30} {code_count.get(c, 0)}")
    if problems:
        say(f"\n{len(problems)} problem(s):")
        for p in problems:
            say("  " + p)
        return 1
    say("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
