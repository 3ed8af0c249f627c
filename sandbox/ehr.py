"""The sandbox EHR's pages: the launcher, a patient chart that fires CDS hooks, the order form.

Server-rendered HTML (Jinja2, autoescaped; plain forms, no JavaScript), mounted at the root of the sandbox
app (``app.include_router(router(...))``, no prefix):

- ``GET /`` — patients on the FHIR server (name, age, sex, current IMiD), prescribers and pharmacists, and
  the launcher: "Open imid-rems as <prescriber> for <patient>", "Open the pharmacist worklist as
  <pharmacist>". Both forms POST ``/ehr/launch``: `Launches.create_launch`, then 303 to the SMART client's
  ``launch_url?iss={config.fhir_base}&launch={id}``.
- ``GET /ehr/patients/{id}`` — chart summary (current IMiD order, last pregnancy test, last fill), the cards
  of ``patient-view`` (fired on open) and an order form prefilled from the current order.
- ``POST /ehr/patients/{id}/sign`` — builds the draft MedicationRequest the way FHIR_CONTRACT.md carries
  REMS fields (authorization number as an identifier in the rems-authorization system, risk category as the
  rems-risk-category extension, and both again in a note), fires ``order-sign`` with the prefetch resolved
  from the discovery templates (or, with "send no prefetch", only ``fhirServer`` + ``fhirAuthorization``) and
  renders the cards, or the service's error (status and message).
- ``GET /.well-known/jwks.json`` — the public key the CDS Hooks JWTs are signed with.

Card ``detail`` is markdown from the service: it is HTML-escaped first, then a small subset (paragraphs,
lists, tables, rules, ``code``, ``**bold**``, ``*em*``, http(s) links) becomes markup.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup, escape

from sandbox.cds_client import CdsClient, CdsError, fhir_authorization
from sandbox.config import Launches, SandboxConfig

TEMPLATES_DIR: Final = Path(__file__).resolve().parent / "templates"
FHIR_JSON: Final = "application/fhir+json"

RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
ORDERABLE_FORM: Final = "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm"
AUTH_SYSTEM: Final = "https://imid-rems.github.io/fhir/sid/rems-authorization"
RISK_EXTENSION: Final = "https://imid-rems.github.io/fhir/StructureDefinition/rems-risk-category"
RISK_SYSTEM: Final = "https://imid-rems.github.io/fhir/CodeSystem/rems-risk-category"

RISK_CATEGORIES: Final = {
    "adult-female-rp": "Adult Female Who Can Get Pregnant",
    "adult-female-nrp": "Adult Female Who Can Not Get Pregnant",
    "adult-male": "Adult Male",
    "child-female-rp": "Female Child Who Can Get Pregnant",
    "child-female-nrp": "Female Child Who Can Not Get Pregnant",
    "child-male": "Male Child",
}
IMID_WORDS: Final = ("lenalidomide", "revlimid", "pomalidomide", "pomalyst", "thalidomide", "thalomid")
PREGNANCY_TEST_LOINC: Final = frozenset(
    {"2106-3", "2112-1", "80384-1", "2118-8", "2110-5", "80385-8", "21198-7", "19080-1", "83086-9", "20415-6"}
    | {"45194-8", "2119-6", "34670-0", "55869-2", "25372-4", "2114-7"}
)
SCHEDULES: Final = {
    "daily": ("once daily", None),
    "21of28": ("once daily on days 1-21 of each 28-day cycle", "days 1-21 of each 28-day cycle"),
}
_REFERENCE = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_AUTH = re.compile(r"[A-Za-z0-9\-]{1,32}")


@dataclass(frozen=True)
class Drug:
    code: str
    display: str
    text: str
    mg: str


DRUGS: Final = (
    Drug("1242231", "lenalidomide 2.5 MG Oral Capsule", "lenalidomide 2.5 mg capsule", "2.5"),
    Drug("602912", "lenalidomide 5 MG Oral Capsule", "lenalidomide 5 mg capsule", "5"),
    Drug("602910", "lenalidomide 10 MG Oral Capsule", "lenalidomide 10 mg capsule", "10"),
    Drug("643712", "lenalidomide 15 MG Oral Capsule", "lenalidomide 15 mg capsule", "15"),
    Drug("1428947", "lenalidomide 20 MG Oral Capsule", "lenalidomide 20 mg capsule", "20"),
    Drug("643720", "lenalidomide 25 MG Oral Capsule", "lenalidomide 25 mg capsule", "25"),
    Drug("643722", "lenalidomide 25 MG Oral Capsule [Revlimid]", "Revlimid 25 mg capsule", "25"),
    Drug("1369730", "pomalidomide 3 MG Oral Capsule", "pomalidomide 3 mg capsule", "3"),
    Drug("1369734", "pomalidomide 4 MG Oral Capsule", "pomalidomide 4 mg capsule", "4"),
    Drug("200390", "thalidomide 50 MG Oral Capsule", "thalidomide 50 mg capsule", "50"),
    Drug("360176", "thalidomide 100 MG Oral Capsule", "thalidomide 100 mg capsule", "100"),
    Drug("360177", "thalidomide 200 MG Oral Capsule", "thalidomide 200 mg capsule", "200"),
)
DRUG_BY_CODE: Final = {d.code: d for d in DRUGS}
DEFAULT_DRUG: Final = "602910"


class FhirUnavailable(RuntimeError):
    """The FHIR server could not answer a read the page needs (message without patient data)."""


# --- markdown, safely ---------------------------------------------------------------------------------------

_CODE_SPAN = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])")


def safe_url(url: Any) -> str | None:
    """`url` when it is an absolute http(s) URL, else None (no ``javascript:``, ``data:``, relative tricks)."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    return url.strip() if parts.scheme in ("http", "https") and parts.netloc else None


def _plain_inline(raw: str) -> str:
    text = str(escape(raw))

    def link(match: re.Match[str]) -> str:
        url = safe_url(html.unescape(match.group(2)))
        if url is None:
            return match.group(1)
        return f'<a href="{escape(url)}">{match.group(1)}</a>'

    text = _LINK.sub(link, text)
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    return _EM.sub(r"<em>\1</em>", text)


def _inline(raw: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _CODE_SPAN.finditer(raw):
        out.append(_plain_inline(raw[pos : match.start()]))
        out.append(f"<code>{escape(match.group(1))}</code>")
        pos = match.end()
    out.append(_plain_inline(raw[pos:]))
    return "".join(out)


def _table(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    body = [r for r in rows[1:] if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
    head = "".join(f'<th scope="col">{_inline(c)}</th>' for c in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def render_markdown(text: Any) -> Markup:
    """A tiny, safe markdown: everything escaped, then paragraphs, ``-`` lists, ``|`` tables, ``---`` rules
    and inline code, bold, emphasis and http(s) links."""
    if not isinstance(text, str):
        return Markup("")
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip())
    out: list[str] = []
    for block in blocks:
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        if len(lines) == 1 and re.fullmatch(r"\s*(-{3,}|\*{3,})\s*", lines[0]):
            out.append("<hr>")
            continue
        if len(lines) >= 2 and all(line.lstrip().startswith("|") for line in lines):
            out.append(_table(lines))
            continue
        paragraph: list[str] = []
        items: list[str] = []
        for line in lines:
            bullet = re.match(r"\s*[-*]\s+(.*)", line)
            if bullet:
                if paragraph:
                    out.append("<p>" + "<br>".join(paragraph) + "</p>")
                    paragraph = []
                items.append(f"<li>{_inline(bullet.group(1))}</li>")
            else:
                if items:
                    out.append("<ul>" + "".join(items) + "</ul>")
                    items = []
                paragraph.append(_inline(line.strip()))
        if paragraph:
            out.append("<p>" + "<br>".join(paragraph) + "</p>")
        if items:
            out.append("<ul>" + "".join(items) + "</ul>")
    return Markup("\n".join(out))  # noqa: S704 (every piece was escaped above)


# --- what a suggestion would change ---------------------------------------------------------------------------


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
    else:
        out[path] = value


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def changes(before: Any, after: Any, limit: int = 12) -> list[str]:
    """``path: old → new`` lines between two resources (added and removed elements too)."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(before, "", a)
    _flatten(after, "", b)
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if path in a and path in b:
            if a[path] != b[path]:
                lines.append(f"{path}: {_show(a[path])} → {_show(b[path])}")
        elif path in a:
            lines.append(f"{path}: removed (was {_show(a[path])})")
        else:
            lines.append(f"{path}: set to {_show(b[path])}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"… and {len(lines) - limit} more"]
    return lines


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if isinstance(concept.get("text"), str):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and (coding.get("display") or coding.get("code")):
            return str(coding.get("display") or coding.get("code"))
    return ""


def _resource_label(resource: Any) -> str:
    if not isinstance(resource, dict):
        return "(no resource)"
    what = (
        _concept_text(resource.get("code"))
        or _concept_text(resource.get("medicationCodeableConcept"))
        or str((resource.get("medicationReference") or {}).get("display") or "")
    )
    return f"{resource.get('resourceType', '?')}{': ' + what if what else ''}"


def describe_action(action: Any, drafts: Mapping[str, Any]) -> dict[str, Any]:
    """An action as the page shows it: type, description, and what it changes."""
    if not isinstance(action, dict):
        return {"type": "?", "description": "", "changes": []}
    kind = str(action.get("type", "?"))
    resource = action.get("resource")
    lines: list[str]
    if kind == "update" and isinstance(resource, dict):
        before = drafts.get(f"{resource.get('resourceType')}/{resource.get('id')}")
        lines = changes(before, resource) if before is not None else [f"replaces {_resource_label(resource)}"]
    elif kind == "create":
        lines = [f"creates {_resource_label(resource)}"]
    elif kind == "delete":
        lines = [f"deletes {action.get('resourceId', '?')}"]
    else:
        lines = []
    return {"type": kind, "description": str(action.get("description") or ""), "changes": lines}


# --- reading the chart --------------------------------------------------------------------------------------


def human_name(resource: Any) -> str:
    if not isinstance(resource, dict):
        return ""
    names = resource.get("name")
    if isinstance(names, dict):  # Organization-style string names are not here; HumanName lists are
        names = [names]
    for name in names or []:
        if not isinstance(name, dict):
            continue
        if isinstance(name.get("text"), str):
            return str(name["text"])
        parts = [*(name.get("prefix") or []), *(name.get("given") or []), name.get("family") or ""]
        joined = " ".join(str(p) for p in parts if p)
        if joined:
            return joined
    return ""


def age_on(birth_date: Any, today: date) -> int | None:
    if not isinstance(birth_date, str):
        return None
    match = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", birth_date)
    if match is None:
        return None
    year, month, day = int(match[1]), int(match[2] or 1), int(match[3] or 1)
    return today.year - year - ((today.month, today.day) < (month, day))


def _medication_text(resource: Mapping[str, Any]) -> str:
    return _concept_text(resource.get("medicationCodeableConcept")) or str(
        (resource.get("medicationReference") or {}).get("display") or ""
    )


def is_imid(resource: Mapping[str, Any]) -> bool:
    concept = resource.get("medicationCodeableConcept") or {}
    codes = {c.get("code") for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("system") == RXNORM}
    if codes & DRUG_BY_CODE.keys():
        return True
    text = " ".join(
        [_medication_text(resource)]
        + [str(c.get("display") or "") for c in concept.get("coding") or [] if isinstance(c, dict)]
    ).lower()
    return any(word in text for word in IMID_WORDS)


def _when(resource: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = resource.get(name)
        if isinstance(value, dict):
            value = value.get("start")
        if isinstance(value, str) and value:
            return value
    return ""


CURRENT_STATUSES: Final = ("active", "on-hold", "completed")


def current_imid_order(orders: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The patient's newest IMiD prescription that is active, on hold or completed (a completed order is
    the last cycle's: REMS prescriptions carry no refills, so the next cycle is a new order)."""
    current = [o for o in orders if o.get("status") in CURRENT_STATUSES and is_imid(o)]
    return max(current, key=lambda o: _when(o, "authoredOn"), default=None)


def _value_text(obs: Mapping[str, Any]) -> str:
    if isinstance(obs.get("valueCodeableConcept"), dict):
        return _concept_text(obs["valueCodeableConcept"])
    if isinstance(obs.get("valueString"), str):
        return str(obs["valueString"])
    quantity = obs.get("valueQuantity")
    if isinstance(quantity, dict):
        return f"{quantity.get('value', '')} {quantity.get('unit') or quantity.get('code') or ''}".strip()
    interpretation = obs.get("interpretation") or []
    return ", ".join(_concept_text(i) for i in interpretation if isinstance(i, dict))


def last_pregnancy_test(observations: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    tests = [
        o
        for o in observations
        if o.get("status") not in ("entered-in-error", "cancelled")
        and any(
            isinstance(c, dict) and c.get("system") == LOINC and c.get("code") in PREGNANCY_TEST_LOINC
            for c in (o.get("code") or {}).get("coding") or []
        )
    ]
    newest = max(tests, key=lambda o: _when(o, "effectiveDateTime", "effectivePeriod", "issued"), default=None)
    if newest is None:
        return None
    return {
        "when": _when(newest, "effectiveDateTime", "effectivePeriod", "issued"),
        "result": _value_text(newest),
        "status": str(newest.get("status", "")),
        "test": _concept_text(newest.get("code")),
    }


def last_fill(dispenses: Iterable[Mapping[str, Any]]) -> dict[str, str] | None:
    fills = [d for d in dispenses if d.get("status") == "completed" and is_imid(d)]
    newest = max(fills, key=lambda d: _when(d, "whenHandedOver"), default=None)
    if newest is None:
        return None
    days = newest.get("daysSupply") or {}
    return {
        "when": _when(newest, "whenHandedOver"),
        "medication": _medication_text(newest),
        "days": str(days.get("value", "")) if isinstance(days, dict) else "",
    }


def order_summary(order: Mapping[str, Any] | None) -> dict[str, str] | None:
    if order is None:
        return None
    form = prefill(order)
    supply = (order.get("dispenseRequest") or {}).get("expectedSupplyDuration") or {}
    return {
        "id": str(order.get("id", "")),
        "medication": _medication_text(order),
        "authored": str(order.get("authoredOn") or ""),
        "status": str(order.get("status") or ""),
        "supply": f"{supply.get('value', '?')} {supply.get('unit') or supply.get('code') or ''}".strip()
        if supply
        else "",
        "refills": form["refills"],
        "authorization": form["authorization"] or "not on the order",
        "category": RISK_CATEGORIES.get(form["category"], form["category"] or "not on the order"),
        "requester": str(
            (order.get("requester") or {}).get("display") or (order.get("requester") or {}).get("reference") or ""
        ),
    }


def prefill(order: Mapping[str, Any] | None) -> dict[str, str]:
    """The order form's values from the current order (defaults without one)."""
    form = {
        "drug": DEFAULT_DRUG,
        "days_supply": "28",
        "quantity": "21",
        "refills": "0",
        "authorization": "",
        "category": "",
        "schedule": "21of28",
        "prescriber": "",
    }
    if order is None:
        return form
    concept = order.get("medicationCodeableConcept") or {}
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and coding.get("system") == RXNORM and coding.get("code") in DRUG_BY_CODE:
            form["drug"] = str(coding["code"])
    dispense = order.get("dispenseRequest") or {}
    supply = dispense.get("expectedSupplyDuration") or {}
    if supply.get("code") == "d" and isinstance(supply.get("value"), int | float):
        form["days_supply"] = str(int(supply["value"]))
    quantity = (dispense.get("quantity") or {}).get("value")
    if isinstance(quantity, int | float):
        form["quantity"] = str(int(quantity))
    if isinstance(dispense.get("numberOfRepeatsAllowed"), int):
        form["refills"] = str(dispense["numberOfRepeatsAllowed"])
    for identifier in order.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == AUTH_SYSTEM and identifier.get("value"):
            form["authorization"] = str(identifier["value"])
    for extension in order.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == RISK_EXTENSION:
            code = (extension.get("valueCoding") or {}).get("code")
            if code in RISK_CATEGORIES:
                form["category"] = str(code)
    texts = " ".join(str(d.get("text") or "") for d in order.get("dosageInstruction") or [] if isinstance(d, dict))
    form["schedule"] = "21of28" if "1-21" in texts else "daily"
    requester = (order.get("requester") or {}).get("reference")
    if isinstance(requester, str) and _REFERENCE.fullmatch(requester):
        form["prescriber"] = requester
    return form


def build_draft(form: Mapping[str, str], patient_id: str, prescriber_display: str, now: datetime) -> dict[str, Any]:
    """The draft MedicationRequest of a validated order form (FHIR_CONTRACT.md: REMS data on a
    MedicationRequest, form 1 of each field, plus a human-readable note)."""
    drug = DRUG_BY_CODE[form["drug"]]
    days = int(form["days_supply"])
    quantity = int(form["quantity"])
    schedule_text, _ = SCHEDULES[form["schedule"]]
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    draft: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": f"draft-{int(time.time() * 1000):x}",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": drug.code, "display": drug.display}],
            "text": drug.text,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": now.isoformat(timespec="seconds"),
        "requester": {
            "reference": form["prescriber"],
            **({"display": prescriber_display} if prescriber_display else {}),
        },
        "dosageInstruction": [
            {
                "sequence": 1,
                "text": f"Take 1 capsule ({drug.mg} mg) by mouth {schedule_text}.",
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "doseAndRate": [
                    {"doseQuantity": {"value": 1, "unit": "capsule", "system": ORDERABLE_FORM, "code": "CAP"}}
                ],
            }
        ],
        "dispenseRequest": {
            "numberOfRepeatsAllowed": int(form["refills"]),
            "quantity": {"value": quantity, "unit": "capsule", "system": ORDERABLE_FORM, "code": "CAP"},
            "expectedSupplyDuration": {"value": days, "unit": "days", "system": UCUM, "code": "d"},
        },
    }
    notes = []
    if form["authorization"]:
        draft["identifier"] = [{"use": "official", "system": AUTH_SYSTEM, "value": form["authorization"]}]
        notes.append(f"REMS Authorization #: {form['authorization']}")
    if form["category"]:
        display = RISK_CATEGORIES[form["category"]]
        draft["extension"] = [
            {
                "url": RISK_EXTENSION,
                "valueCoding": {"system": RISK_SYSTEM, "code": form["category"], "display": display},
            }
        ]
        notes.append(f"Risk category: {display}")
    if notes:
        draft["note"] = [{"text": ". ".join(notes)}]
    return draft


def validate_order_form(raw: Mapping[str, Any], prescribers: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the form's values as strings, problems in plain words)."""
    form = {k: str(raw.get(k, "") or "").strip() for k in prefill(None)}
    problems = []
    if form["drug"] not in DRUG_BY_CODE:
        problems.append("Choose a drug and strength from the list.")
    for name, label, low, high in (
        ("days_supply", "Days supply", 1, 365),
        ("quantity", "Quantity", 1, 1000),
        ("refills", "Refills", 0, 12),
    ):
        if not form[name].isdigit() or not low <= int(form[name]) <= high:
            problems.append(f"{label} must be a whole number from {low} to {high}.")
    if form["authorization"] and _AUTH.fullmatch(form["authorization"]) is None:
        problems.append("The REMS authorization number may hold only letters, digits and hyphens (at most 32).")
    if form["category"] and form["category"] not in RISK_CATEGORIES:
        problems.append("Choose a risk category from the list.")
    if form["schedule"] not in SCHEDULES:
        problems.append("Choose a schedule from the list.")
    if form["prescriber"] not in prescribers:
        problems.append("Choose the prescriber from the list.")
    return form, problems


# --- people -----------------------------------------------------------------------------------------------


@dataclass
class People:
    """Users the pages offer: prescribers (``PractitionerRole/x`` or ``Practitioner/x`` → label), pharmacists,
    and the ``Practitioner`` each one launches as (SMART ``fhirUser``)."""

    prescribers: dict[str, str] = field(default_factory=dict)
    pharmacists: dict[str, str] = field(default_factory=dict)
    launch_user: dict[str, str] = field(default_factory=dict)


def _is_pharmacist(resource: Mapping[str, Any]) -> bool:
    texts = [_concept_text(c) for c in (resource.get("code") or []) + (resource.get("specialty") or [])]
    texts += [_concept_text(q.get("code")) for q in resource.get("qualification") or [] if isinstance(q, dict)]
    for concept in (resource.get("code") or []) + (resource.get("specialty") or []):
        texts += [str(c.get("code") or "") for c in (concept or {}).get("coding") or [] if isinstance(c, dict)]
    return any("pharm" in t.lower() for t in texts)


def people(practitioners: Iterable[Mapping[str, Any]], roles: Iterable[Mapping[str, Any]]) -> People:
    out = People()
    names = {f"Practitioner/{p.get('id')}": human_name(p) for p in practitioners}
    pharmacist_practitioners = {f"Practitioner/{p.get('id')}" for p in practitioners if _is_pharmacist(p)}
    with_roles: set[str] = set()
    for role in roles:
        ref = f"PractitionerRole/{role.get('id')}"
        practitioner = role.get("practitioner") or {}
        person = practitioner.get("reference") if isinstance(practitioner.get("reference"), str) else None
        name = names.get(person or "") or str(practitioner.get("display") or "") or ref
        specialty = ", ".join(_concept_text(s) for s in role.get("specialty") or [] if isinstance(s, dict))
        label = f"{name} ({specialty})" if specialty else name
        if person and _REFERENCE.fullmatch(person):
            with_roles.add(person)
            out.launch_user[ref] = person
        if _is_pharmacist(role) or person in pharmacist_practitioners:
            out.pharmacists[ref] = label
        else:
            out.prescribers[ref] = label
    for ref, name in names.items():
        if ref in with_roles or not _REFERENCE.fullmatch(ref):
            continue
        out.launch_user[ref] = ref
        (out.pharmacists if ref in pharmacist_practitioners else out.prescribers)[ref] = name or ref
    for group in (out.prescribers, out.pharmacists):
        labels = list(group.values())
        for ref, label in group.items():
            if labels.count(label) > 1:  # the corpus repeats a prescriber per scenario: say which one
                group[ref] = f"{label} [{ref}]"
    return out


# --- the router ---------------------------------------------------------------------------------------------


class _Fhir:
    """The EHR's own reads of its FHIR server (a token from `fhir_token` for the EHR's client)."""

    def __init__(
        self, http: httpx.AsyncClient, base: str, fhir_token: Callable[..., dict[str, Any]], client_id: str
    ) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.fhir_token = fhir_token
        self.client_id = client_id
        self._token: tuple[float, str] | None = None

    def token(self) -> str:
        now = time.monotonic()
        if self._token is None or self._token[0] <= now:
            try:
                response = self.fhir_token(self.client_id, "system/*.rs")
                lifetime = int(response.get("expires_in", 300))
                self._token = (now + max(lifetime - 30, 1), str(response["access_token"]))
            except Exception as exc:  # the token function is another part's: say which step failed
                raise FhirUnavailable(f"no FHIR access token for the EHR pages ({type(exc).__name__})") from exc
        return self._token[1]

    @staticmethod
    def _body(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise FhirUnavailable("the FHIR server did not answer a JSON object")
        return body

    async def get(self, relative: str) -> httpx.Response:
        try:
            return await self.http.get(
                f"{self.base}/{relative}", headers={"Accept": FHIR_JSON, "Authorization": f"Bearer {self.token()}"}
            )
        except httpx.HTTPError as exc:
            raise FhirUnavailable(f"the FHIR server is unreachable ({type(exc).__name__})") from exc

    async def read(self, rtype: str, rid: str) -> dict[str, Any] | None:
        response = await self.get(f"{rtype}/{rid}")
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise FhirUnavailable(f"the FHIR server answered {response.status_code} to a read of a {rtype}")
        return self._body(response)

    async def search(self, relative: str, max_pages: int = 5) -> tuple[list[dict[str, Any]], bool]:
        """(resources of up to `max_pages` pages, whether more were left)."""
        url: str | None = relative
        out: list[dict[str, Any]] = []
        for _ in range(max_pages):
            if url is None:
                return out, False
            response = (
                await self.get(url)
                if not url.startswith("http")
                else await self.http.get(url, headers={"Accept": FHIR_JSON, "Authorization": f"Bearer {self.token()}"})
            )
            if response.status_code != 200:
                kind = relative.split("?", 1)[0]
                raise FhirUnavailable(f"the FHIR server answered {response.status_code} to a {kind} search")
            body = self._body(response)
            out.extend(e["resource"] for e in body.get("entry") or [] if isinstance(e.get("resource"), dict))
            url = next((lk.get("url") for lk in body.get("link") or [] if lk.get("relation") == "next"), None)
            if url is not None and not url.startswith(self.base + "/"):
                url = None  # never send the token to another server
        return out, url is not None


@dataclass
class HookResult:
    """One hook call as the page shows it."""

    hook: str
    service_id: str = ""
    status: int | None = None
    cards: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    sent_prefetch: bool = False
    left_out: dict[str, str] = field(default_factory=dict)


def card_view(card: Any, drafts: Mapping[str, Any], clients_by_launch_url: Mapping[str, str]) -> dict[str, Any]:
    """A card as the template shows it (every string still to be escaped by the template)."""
    if not isinstance(card, dict):
        return {"summary": "(a card that is not a JSON object)", "indicator": "?", "detail": Markup("")}
    source: dict[str, Any] = card["source"] if isinstance(card.get("source"), dict) else {}
    topic: dict[str, Any] = source["topic"] if isinstance(source.get("topic"), dict) else {}
    suggestions = []
    for s in card.get("suggestions") or []:
        if isinstance(s, dict):
            suggestions.append(
                {
                    "label": str(s.get("label") or ""),
                    "recommended": s.get("isRecommended") is True,
                    "actions": [describe_action(a, drafts) for a in s.get("actions") or []],
                }
            )
    links = []
    for link in card.get("links") or []:
        if not isinstance(link, dict):
            continue
        url = safe_url(link.get("url"))
        kind = str(link.get("type") or "absolute")
        links.append(
            {
                "label": str(link.get("label") or link.get("url") or ""),
                "url": url,
                "raw_url": str(link.get("url") or ""),
                "type": kind,
                "app_context": str(link.get("appContext") or ""),
                "client_id": clients_by_launch_url.get(url or "") if kind == "smart" else None,
            }
        )
    return {
        "uuid": str(card.get("uuid") or ""),
        "summary": str(card.get("summary") or ""),
        "indicator": str(card.get("indicator") or ""),
        "detail": render_markdown(card.get("detail")),
        "source_label": str(source.get("label") or ""),
        "source_url": safe_url(source.get("url")),
        "topic": str(topic.get("display") or topic.get("code") or ""),
        "topic_code": str(topic.get("code") or ""),
        "suggestions": suggestions,
        "links": links,
        "override_reasons": [
            str(r.get("display") or r.get("code") or "")
            for r in card.get("overrideReasons") or []
            if isinstance(r, dict)
        ],
    }


def _error_message(status: int, body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        field_name = f"{error['field']}: " if error.get("field") else ""
        return f"{field_name}{error.get('message') or ''}".strip() or json.dumps(error)[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return json.dumps(body)[:500]


def router(
    config: SandboxConfig,
    cds: CdsClient,
    launches: Launches,
    fhir_token: Callable[..., dict[str, Any]],
    *,
    fhir_base: str | None = None,
    app_client_id: str | None = None,
    ehr_client_id: str = "sandbox-ehr",
    cds_client_id: str = "imid-rems-cds",
    list_limit: int = 200,
) -> APIRouter:
    """The EHR pages.

    - `fhir_token(client_id, scope, *, patient=None, user=None) -> dict`: an OAuth token response for the FHIR
      server at `fhir_base` (default ``config.fhir_base``). Called with `ehr_client_id` and ``system/*.rs``
      for the pages' own reads and the prefetch, and with `cds_client_id`, the patient and the user for the
      ``fhirAuthorization`` each hook call carries (read scopes of the types the templates name, plus
      Medication).
    - `app_client_id`: the SMART client the launcher opens (default: the first of ``config.clients`` with a
      ``launch_url``).
    """
    base = (fhir_base or config.fhir_base).rstrip("/")
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    fhir = _Fhir(cds.http, base, fhir_token, ehr_client_id)
    api = APIRouter()

    def app_client() -> Any:
        if app_client_id is not None:
            return config.client(app_client_id)
        return next((c for c in config.clients if c.launch_url), None)

    def launch_urls() -> dict[str, str]:
        return {c.launch_url: c.client_id for c in config.clients if c.launch_url}

    def page(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**values), status_code=status)

    def error_page(status: int, message: str) -> HTMLResponse:
        return page("ehr_error.html", status, message=message)

    async def load_people() -> People:
        (practitioners, _), (roles, _) = await asyncio.gather(
            fhir.search(f"Practitioner?_count={list_limit}", max_pages=1),
            fhir.search(f"PractitionerRole?_count={list_limit}", max_pages=1),
        )
        return people(practitioners, roles)

    def cds_authorization(service: Mapping[str, Any], patient_id: str, user: str) -> dict[str, Any]:
        types = {"Medication"}
        for template in (service.get("prefetch") or {}).values():
            if isinstance(template, str):
                head = re.match(r"[A-Z][A-Za-z]+", template)
                if head:
                    types.add(head.group(0))
        scope = " ".join(f"user/{t}.rs" for t in sorted(types))
        response = fhir_token(cds_client_id, scope, patient=patient_id, user=user)
        return fhir_authorization(response, cds_client_id)

    async def fire(hook: str, context: dict[str, Any], *, send_prefetch: bool) -> HookResult:
        result = HookResult(hook=hook, sent_prefetch=send_prefetch)
        try:
            service = await cds.service_for_hook(hook)
        except CdsError as exc:
            result.error = str(exc)
            return result
        if service is None:
            result.error = f"the CDS service offers no {hook} service"
            return result
        result.service_id = str(service["id"])
        user = str(context["userId"])
        prefetch = None
        if send_prefetch:
            try:
                token = fhir.token()
            except FhirUnavailable as exc:
                result.error = str(exc)
                return result
            prefetch, result.left_out = await cds.prefetch_report(service, context, base, token, user)
        drafts = {
            f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}": e["resource"]
            for e in (context.get("draftOrders") or {}).get("entry") or []
        }
        try:
            authorization = cds_authorization(service, str(context["patientId"]), user)
        except Exception as exc:  # the token function is another part's: say which step failed
            result.error = f"no FHIR access token for the CDS service ({type(exc).__name__})"
            return result
        try:
            status, body = await cds.call(
                result.service_id,
                hook,
                context,
                prefetch=prefetch,
                fhir_server=base,
                fhir_authorization=authorization,
            )
        except httpx.HTTPError as exc:
            result.error = f"the CDS service could not be reached ({type(exc).__name__})"
            return result
        result.status = status
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("cards"), list):
            result.error = _error_message(status, body) if status != 200 else "the answer has no cards list"
            return result
        result.cards = [card_view(c, drafts, launch_urls()) for c in body["cards"]]
        return result

    @api.get("/", response_class=HTMLResponse, name="ehr_home")
    async def home() -> Response:
        try:
            (patients, more), (orders, _), team = await asyncio.gather(
                fhir.search(f"Patient?_count={list_limit}", max_pages=1),
                fhir.search(f"MedicationRequest?status={','.join(CURRENT_STATUSES)}&_count=1000", max_pages=5),
                load_people(),
            )
        except FhirUnavailable as exc:
            return error_page(502, str(exc))
        by_patient: dict[str, list[dict[str, Any]]] = {}
        for order in orders:
            ref = (order.get("subject") or {}).get("reference")
            if isinstance(ref, str):
                by_patient.setdefault(ref, []).append(order)
        today = config.now().date()
        rows = []
        for p in patients:
            current = current_imid_order(by_patient.get(f"Patient/{p.get('id')}", []))
            rows.append(
                {
                    "id": str(p.get("id")),
                    "name": human_name(p) or f"Patient/{p.get('id')}",
                    "age": age_on(p.get("birthDate"), today),
                    "sex": str(p.get("gender") or "unknown"),
                    "imid": f"{_medication_text(current)} ({current.get('status')})" if current else "",
                }
            )
        rows.sort(key=lambda r: str(r["name"]).lower())
        client = app_client()
        return page(
            "ehr_home.html",
            patients=rows,
            more_patients=more,
            limit=list_limit,
            people=team,
            app_client=client,
            practitioner_users=sorted({u for u in team.launch_user.values()}),
        )

    @api.post("/ehr/launch", name="ehr_launch")
    async def launch(request: Request) -> Response:
        form = await request.form()
        user = str(form.get("user") or "")
        patient = str(form.get("patient") or "").strip() or None
        app_context = str(form.get("app_context") or "") or None
        client_id = str(form.get("client_id") or "") or None
        client = config.client(client_id) if client_id else app_client()
        if client is None or not client.launch_url:
            return error_page(400, "No registered SMART app with a launch URL to open.")
        if not _REFERENCE.fullmatch(user):
            return error_page(400, "Choose the user to launch as (a Practitioner).")
        if patient is not None and _ID.fullmatch(patient) is None:
            return error_page(400, "The patient id is not a FHIR id.")
        launch_id = launches.create_launch(
            client_id=client.client_id, user=user, patient=patient, app_context=app_context
        )
        separator = "&" if urlsplit(client.launch_url).query else "?"
        target = f"{client.launch_url}{separator}{urlencode({'iss': config.fhir_base, 'launch': launch_id})}"
        return RedirectResponse(target, status_code=303)

    async def chart(patient_id: str) -> dict[str, Any] | None:
        patient, (orders, _), (dispenses, _), (observations, _), team = await asyncio.gather(
            fhir.read("Patient", patient_id),
            fhir.search(f"MedicationRequest?patient={patient_id}&_count=200"),
            fhir.search(f"MedicationDispense?patient={patient_id}&_count=200"),
            fhir.search(
                f"Observation?patient={patient_id}&code="
                + ",".join(f"{LOINC}|{c}" for c in sorted(PREGNANCY_TEST_LOINC))
                + "&_count=200"
            ),
            load_people(),
        )
        if patient is None:
            return None
        current = current_imid_order(orders)
        return {
            "patient": {
                "id": patient_id,
                "name": human_name(patient) or f"Patient/{patient_id}",
                "age": age_on(patient.get("birthDate"), config.now().date()),
                "sex": str(patient.get("gender") or "unknown"),
                "birth_date": str(patient.get("birthDate") or ""),
            },
            "current": current,
            "order": order_summary(current),
            "test": last_pregnancy_test(observations),
            "fill": last_fill(dispenses),
            "people": team,
        }

    def acting_user(requested: str | None, data: Mapping[str, Any]) -> str | None:
        team: People = data["people"]
        if requested and requested in team.prescribers:
            return requested
        from_order = prefill(data["current"])["prescriber"]
        if from_order in team.prescribers:
            return from_order
        return next(iter(team.prescribers), None)

    def patient_page(data: Mapping[str, Any], status: int = 200, **values: Any) -> HTMLResponse:
        return page(
            "ehr_patient.html",
            status,
            drugs=DRUGS,
            categories=RISK_CATEGORIES,
            schedules={k: v[0] for k, v in SCHEDULES.items()},
            app_client=app_client(),
            fhir_base=config.fhir_base,
            **data,
            **values,
        )

    @api.get("/ehr/patients/{patient_id}", response_class=HTMLResponse, name="ehr_patient")
    async def patient_view(patient_id: str, user: str | None = None) -> Response:
        if _ID.fullmatch(patient_id) is None:
            return error_page(404, "No such patient.")
        try:
            data = await chart(patient_id)
        except FhirUnavailable as exc:
            return error_page(502, str(exc))
        if data is None:
            return error_page(404, "No such patient on the FHIR server.")
        acting = acting_user(user, data)
        form = prefill(data["current"])
        form["prescriber"] = acting or ""
        view = None
        if acting is None:
            view = HookResult(hook="patient-view", error="no prescriber on the FHIR server to act as")
        else:
            view = await fire("patient-view", {"userId": acting, "patientId": patient_id}, send_prefetch=True)
        return patient_page(data, acting=acting, form=form, view=view, sign=None, problems=[])

    @api.post("/ehr/patients/{patient_id}/sign", response_class=HTMLResponse, name="ehr_sign")
    async def sign(patient_id: str, request: Request) -> Response:
        if _ID.fullmatch(patient_id) is None:
            return error_page(404, "No such patient.")
        raw = await request.form()
        try:
            data = await chart(patient_id)
        except FhirUnavailable as exc:
            return error_page(502, str(exc))
        if data is None:
            return error_page(404, "No such patient on the FHIR server.")
        team: People = data["people"]
        form, problems = validate_order_form({k: raw.get(k) for k in raw}, team.prescribers)
        if problems:
            return patient_page(
                data, 400, acting=form["prescriber"], form=form, view=None, sign=None, problems=problems
            )
        draft = build_draft(
            form, patient_id, re.split(r" [(\[]", team.prescribers[form["prescriber"]])[0], config.now()
        )
        context = {
            "userId": form["prescriber"],
            "patientId": patient_id,
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]},
        }
        send_prefetch = raw.get("no_prefetch") is None
        result = await fire("order-sign", context, send_prefetch=send_prefetch)
        return patient_page(
            data, acting=form["prescriber"], form=form, view=None, sign=result, problems=[], draft=draft
        )

    @api.get("/.well-known/jwks.json", name="ehr_jwks")
    async def jwks() -> JSONResponse:
        return JSONResponse(cds.public_jwks(), headers={"Cache-Control": "max-age=300"})

    return api
