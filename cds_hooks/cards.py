"""Findings → CDS Hooks 2.0 cards, built as objects (never by rendering JSON text).

- One card per finding. `card.source.topic` carries the rule code (REMS_RULES.md). The patient-view
  status card and the medication-refill draft card are not rule findings: their topics are
  ``rems-status`` and ``refill-draft`` in `CARD_SYSTEM`, so an EHR filtering on rule codes is not misled.
- **Card uuids carry their topic.** A uuid is deterministic (hook instance + order + topic: a retried
  call answers with the same uuids) and is a version-8 UUID (RFC 9562, "custom") whose last two bytes
  are a hash of the topic code. The feedback endpoint reads the rule back from the uuid
  (`topic_of_card`), so no record of issued cards is kept and a hook call writes nothing.
- **Suggestions** (`selectionBehavior` ``at-most-one``): an ``update`` carrying the whole draft order
  with every mechanical fix for that order applied at once (supply set to 28 days *and* refills
  removed, when both are wrong — two updates of one resource would overwrite each other), and a
  ``create`` for a pregnancy-test ServiceRequest. Fixes done in the SMART app (authorization number,
  risk category, reproductive status) get a ``smart`` link with `appContext`.
- **overrideReasons** with displays on every card, so feedback says why a rule was overridden.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from cds_hooks.models import Card, Coding, Source
from fhir_mappings import writes
from rems.findings import Evidence, Finding, FixKind, RuleCode, Severity
from rems.model import Drug, ImidOrder, RiskCategory
from rems.status import CategorySource, RemsStatus

RULE_SYSTEM = "https://imid-rems.github.io/fhir/CodeSystem/rems-rule"
CARD_SYSTEM = "https://imid-rems.github.io/fhir/CodeSystem/rems-card"
OVERRIDE_SYSTEM = "https://imid-rems.github.io/fhir/CodeSystem/rems-override-reason"
SOURCE_LABEL = "IMiD REMS check"
STATUS_TOPIC = "rems-status"
REFILL_TOPIC = "refill-draft"
_NAMESPACE = uuid.UUID("6f0b7f57-3c55-4c5e-9d9a-2f1d0b7e1a01")

OVERRIDE_REASONS: tuple[Coding, ...] = (
    Coding(system=OVERRIDE_SYSTEM, code="verified-in-rems", display="Already verified in the REMS portal"),
    Coding(system=OVERRIDE_SYSTEM, code="chart-out-of-date", display="Chart is out of date; done elsewhere"),
    Coding(system=OVERRIDE_SYSTEM, code="clinically-appropriate", display="Clinically appropriate for this patient"),
    Coding(system=OVERRIDE_SYSTEM, code="will-address-before-dispense", display="Will address before dispensing"),
)


_SMART_FIXES = {
    FixKind.ENTER_AUTHORIZATION: "Enter the REMS authorization number",
    FixKind.DOCUMENT_RISK_CATEGORY: "Document the REMS risk category",
    FixKind.DOCUMENT_REPRODUCTIVE_STATUS: "Document reproductive status",
}


def _topic_tag(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()[:2]


KNOWN_TOPICS: dict[bytes, str] = {_topic_tag(c): c for c in [*(r.value for r in RuleCode), STATUS_TOPIC, REFILL_TOPIC]}


def card_uuid(hook_instance: str, order: str, topic: str) -> str:
    raw = bytearray(hashlib.sha256(f"{hook_instance}|{order}|{topic}".encode()).digest()[:16])
    raw[14:16] = _topic_tag(topic)
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(raw)))


def topic_of_card(card: str) -> str | None:
    """The rule code (or card topic) a uuid minted by `card_uuid` carries; None for any other uuid."""
    try:
        u = uuid.UUID(card)
    except ValueError:
        return None
    if u.version != 8:
        return None
    return KNOWN_TOPICS.get(u.bytes[14:16])


def suggestion_uuid(card: str, label: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{card}|{label}"))


@dataclass(frozen=True)
class CardContext:
    """What cards need beyond the findings: the raw draft orders (for update actions), who and where."""

    hook_instance: str
    patient_id: str
    user: str | None
    drafts: Mapping[str, dict[str, Any]]
    """Raw draft MedicationRequest JSON by reference (``MedicationRequest/draft-1``)."""
    orders: Mapping[str, ImidOrder]
    smart_launch_url: str | None
    """The SMART app's launch URL for ``smart`` links; None = no links."""
    today: date
    """Clinic-local day of the call (a pregnancy test with no due day is due today)."""


def _when(value: datetime | date | None) -> str:
    if value is None:
        return ""
    return f" ({value.isoformat()})"


def _evidence_line(e: Evidence) -> str:
    where = f"`{e.reference}`" if e.reference != "-" else "absent"
    return f"- {where}: {e.description}{_when(e.when)}"


def detail_markdown(f: Finding, extra: Sequence[str] = ()) -> str:
    parts = [f.detail]
    if f.fix is not None:
        parts.append(f"**What to do:** {f.fix.description}.")
    parts.extend(extra)
    if f.evidence:
        parts.append("**Evidence**\n" + "\n".join(_evidence_line(e) for e in f.evidence))
    parts.append(f"Order: `{f.order}` · Rule: `{f.code.value}` ({', '.join(f.info.sources)})")
    return "\n\n".join(parts)


def _smart_link(ctx: CardContext, label: str, app_context: dict[str, Any]) -> dict[str, Any] | None:
    if not ctx.smart_launch_url:
        return None
    return {
        "label": label,
        "url": ctx.smart_launch_url,
        "type": "smart",
        "appContext": json.dumps(app_context, separators=(",", ":"), sort_keys=True),
    }


def _order_fix(findings: Sequence[Finding], order: str) -> tuple[int | None, bool]:
    """(supply days, remove refills) for every mechanical fix found on one order."""
    days: int | None = None
    refills = False
    for f in findings:
        if f.order != order or f.fix is None:
            continue
        if f.fix.kind is FixKind.SET_SUPPLY_DAYS:
            try:
                days = int(f.fix.value) if f.fix.value else 28
            except ValueError:
                days = 28
        elif f.fix.kind is FixKind.REMOVE_REFILLS:
            refills = True
    return days, refills


def _update_suggestion(
    f: Finding, findings: Sequence[Finding], ctx: CardContext, card: str
) -> tuple[dict[str, Any], list[str]] | None:
    draft = ctx.drafts.get(f.order)
    if draft is None:
        return None
    days, refills = _order_fix(findings, f.order)
    corrected = writes.corrected_order(draft, supply_days=days, remove_refills=refills)
    what = [p for p in ((f"supply {days} days" if days else ""), ("no refills" if refills else "")) if p]
    label = "Change the order: " + " and ".join(what)
    suggestion = {
        "label": label,
        "uuid": suggestion_uuid(card, label),
        "isRecommended": True,
        "actions": [{"type": "update", "description": label, "resource": corrected.resource}],
    }
    return suggestion, list(corrected.notes)


def _test_suggestion(f: Finding, ctx: CardContext, card: str) -> dict[str, Any]:
    order = ctx.orders.get(f.order)
    due = date.fromisoformat(f.fix.value) if f.fix and f.fix.value and _is_date(f.fix.value) else None
    drug = order.drug.value if order else "IMiD"
    resource = writes.pregnancy_test_request(
        patient_id=ctx.patient_id,
        requester=ctx.user,
        due=due or ctx.today,
        reason_order=f.order if f.order.startswith("MedicationRequest/") else None,
        drug_name=drug,
    )
    label = "Order a pregnancy test"
    return {
        "label": label,
        "uuid": suggestion_uuid(card, label),
        "isRecommended": True,
        "actions": [
            {"type": "create", "description": f"{label} (REMS: within 7 days before dispensing)", "resource": resource}
        ],
    }


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def finding_card(f: Finding, findings: Sequence[Finding], ctx: CardContext) -> Card:
    uid = card_uuid(ctx.hook_instance, f.order, f.code.value)
    suggestions: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    notes: list[str] = []
    kind = f.fix.kind if f.fix else None
    if kind in (FixKind.SET_SUPPLY_DAYS, FixKind.REMOVE_REFILLS):
        made = _update_suggestion(f, findings, ctx, uid)
        if made is not None:
            suggestions.append(made[0])
            notes.extend(made[1])
    elif kind is FixKind.ORDER_PREGNANCY_TEST:
        suggestions.append(_test_suggestion(f, ctx, uid))
    elif kind in _SMART_FIXES:
        link = _smart_link(ctx, _SMART_FIXES[kind], {"view": "patient", "order": f.order, "rule": f.code.value})
        if link:
            links.append(link)
    return Card(
        uuid=uid,
        summary=f.summary,
        detail=detail_markdown(f, [f"**Note:** {n}" for n in notes]),
        indicator=f.severity.value,
        source=Source(label=SOURCE_LABEL, topic=Coding(system=RULE_SYSTEM, code=f.code.value, display=f.info.title)),
        suggestions=suggestions or None,
        selectionBehavior="at-most-one" if suggestions else None,
        overrideReasons=list(OVERRIDE_REASONS),
        links=links or None,
    )


def cards_for(findings: Sequence[Finding], ctx: CardContext) -> list[Card]:
    return [finding_card(f, findings, ctx) for f in findings]


# --- patient-view: the REMS status card -------------------------------------------------------------


def _day(d: date | None) -> str:
    return d.strftime("%b %-d") if d else "?"


def _status_line(s: RemsStatus) -> str:
    cat = s.risk_category.display if s.risk_category else "category unknown"
    parts = [f"{s.drug.value.capitalize()}: {cat}"]
    if s.pregnancy_tests_required:
        if s.positive_since_negative is not None:
            parts.append("POSITIVE pregnancy test")
        elif s.negative_good_through is not None and s.valid_test_today:
            parts.append(f"test good through {_day(s.negative_good_through)}")
        else:
            parts.append("no valid pregnancy test")
    if s.days_left is not None:
        parts.append(f"{s.days_left} days left")
    if s.next_fill_from is not None:
        parts.append(f"next fill from {_day(s.next_fill_from)}")
    return " · ".join(parts)


def _status_severity(s: RemsStatus) -> Severity:
    if s.pregnancy_tests_required and s.positive_since_negative is not None:
        return Severity.CRITICAL
    if s.problems or s.risk_category is None or (s.pregnancy_tests_required and not s.valid_test_on_next_fill):
        return Severity.WARNING
    if s.days_left is not None and s.days_left <= 7 and s.pregnancy_tests_required and not s.valid_test_today:
        return Severity.WARNING
    return Severity.INFO


def _status_detail(s: RemsStatus) -> str:
    cat = s.risk_category.display if s.risk_category else "unknown"
    source = {
        CategorySource.ORDER: "documented",
        CategorySource.SUGGESTED: "suggested by the chart, not on the order",
        CategorySource.UNKNOWN: "not documented, not settled by the chart",
    }[s.category_source]
    rows = [
        ("Risk category", f"{cat} ({source}: {s.category_basis})"),
        ("Authorization number", s.authorization_number or "not on the current order"),
    ]
    if s.pregnancy_tests_required:
        neg = s.last_negative_test
        rows.append(
            (
                "Last negative pregnancy test",
                f"{neg.day.isoformat()} (`{neg.reference}`), valid for a dispense through {s.negative_good_through}"
                if neg
                else "none on file",
            )
        )
        if s.positive_since_negative is not None:
            p = s.positive_since_negative
            rows.append(("Positive since", f"{p.day.isoformat()}: {p.text} (`{p.reference}`)"))
        rows.append(("Next test due", s.next_test_due.isoformat() if s.next_test_due else "?"))
    else:
        rows.append(("Pregnancy tests", "not required for this category"))
    if s.last_fill is not None:
        supply = f", {s.last_fill.days_supply} days" if s.last_fill.days_supply is not None else ""
        rows.append(("Last fill", f"{s.last_fill.day.isoformat()}{supply} (`{s.last_fill.reference}`)"))
    rows.append(("Days of supply left", "unknown" if s.days_left is None else str(s.days_left)))
    rows.append(("Supply runs out", s.runs_out.isoformat() if s.runs_out else "unknown"))
    rows.append(("Next fill from", s.next_fill_from.isoformat() if s.next_fill_from else "unknown"))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    out = [f"**{s.drug.value.capitalize()}** (order `{s.order}`), as of {s.today.isoformat()}", table]
    if s.problems:
        out.append("**Could not be determined**\n" + "\n".join(f"- {p}" for p in s.problems))
    return "\n\n".join(out)


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


def status_card(statuses: Sequence[RemsStatus], ctx: CardContext) -> Card | None:
    """One card for the patient, whatever the number of IMiDs (normally one)."""
    if not statuses:
        return None
    summary = " | ".join(_status_line(s) for s in statuses)
    if len(summary) > 139:
        summary = summary[:138] + "…"
    severity = max((_status_severity(s) for s in statuses), key=_RANK.__getitem__)
    uid = card_uuid(ctx.hook_instance, ctx.patient_id, STATUS_TOPIC)
    link = _smart_link(ctx, "Open the REMS timeline", {"view": "patient"})
    return Card(
        uuid=uid,
        summary=summary,
        detail="\n\n---\n\n".join(_status_detail(s) for s in statuses),
        indicator=severity.value,
        source=Source(label=SOURCE_LABEL, topic=Coding(system=CARD_SYSTEM, code=STATUS_TOPIC, display="REMS status")),
        links=[link] if link else None,
    )


# --- medication-refill: the drafted next prescription -----------------------------------------------


def draft_identifier(prior_reference: str) -> str:
    """Stable per prescription being continued: every offer for the same prior order carries the same
    identifier, so a conditional create (If-None-Exist on it) never makes two prescriptions."""
    return str(uuid.uuid5(_NAMESPACE, f"refill|{prior_reference}"))


@dataclass(frozen=True)
class DraftedRefill:
    order: ImidOrder
    """The order being renewed (from the hook's context)."""
    prior: str
    """Reference of the prescription the new one continues."""
    days: int
    category: RiskCategory | None
    resource: dict[str, Any]
    """The new MedicationRequest (no id: the EHR assigns one on create)."""


def draft_refill(
    order: ImidOrder,
    raw: dict[str, Any],
    ctx: CardContext,
    *,
    category: RiskCategory | None,
    authored_on: datetime,
    max_days: int,
) -> DraftedRefill:
    """The next prescription for a renewal: same drug and dosing, the order's supply when it is within
    the REMS limit (a 21-day cycle stays 21) else the limit, no refills, the risk category, no
    authorization number (the REMS issues a new one per prescription: the pharmacist enters it)."""
    prior = order.prior_prescription or order.reference
    days = max_days
    if order.supply is not None and 0 < order.supply.days <= max_days:
        days = int(order.supply.days)
    resource = writes.next_prescription(
        raw,
        prior_reference=prior,
        patient_id=ctx.patient_id,
        supply_days=days,
        category_code=category.value if category else "",
        category_display=category.display if category else "",
        authorization=None,
        draft_identifier=draft_identifier(prior),
        authored_on=authored_on,
        requester=ctx.user,
    )
    return DraftedRefill(order, prior, days, category, resource)


_EXPECTED_ON_A_DRAFT = frozenset({RuleCode.AUTHORIZATION_MISSING})
"""Findings every drafted refill has until the pharmacist acts: said once in the card, not as a blocker."""


def refill_card(drafted: DraftedRefill, checks: Sequence[Finding], ctx: CardContext) -> Card:
    """The drafted prescription as a ``create`` suggestion; `checks` are the rules' findings on the
    drafted prescription itself (not on the renewal request it replaces)."""
    order, days, category = drafted.order, drafted.days, drafted.category
    uid = card_uuid(ctx.hook_instance, order.reference, REFILL_TOPIC)
    open_checks = [f for f in checks if f.code not in _EXPECTED_ON_A_DRAFT]
    blocking = [f for f in open_checks if f.info.hard_stop]
    drug = Drug(order.drug).value.capitalize()
    summary = f"{drug}: next {days}-day prescription drafted, no refills"
    summary += f"; {len(blocking)} REMS problem(s) to fix first" if blocking else "; pre-checks passed"
    cat = category.display if category else "**unknown — document it**"
    lines = [
        f"A new prescription continuing `{drafted.prior}`: {order.medication_text}, {days} days, no refills, "
        f"risk category {cat}.",
        "**Enter the REMS authorization number** the REMS issues for this prescription before signing.",
    ]
    checks_md = "**Pre-checks of the drafted prescription**\n"
    if open_checks:
        checks_md += "\n".join(f"- {f.severity.value}: {f.summary} (`{f.code.value}`)" for f in open_checks)
    else:
        checks_md += "- every other REMS, coverage and clinical rule passed"
    lines.append(checks_md)
    label = f"Create the {days}-day prescription (draft)"
    indicator = max((f.severity for f in open_checks), key=_RANK.__getitem__, default=Severity.INFO)
    link = _smart_link(ctx, "Review in the pharmacist worklist", {"view": "worklist", "order": drafted.prior})
    return Card(
        uuid=uid,
        summary=summary[:139],
        detail="\n\n".join(lines),
        indicator=indicator.value,
        source=Source(label=SOURCE_LABEL, topic=Coding(system=CARD_SYSTEM, code=REFILL_TOPIC, display="Refill draft")),
        suggestions=[
            {
                "label": label,
                "uuid": suggestion_uuid(uid, label),
                "isRecommended": not blocking,
                "actions": [{"type": "create", "description": label, "resource": drafted.resource}],
            }
        ],
        selectionBehavior="at-most-one",
        overrideReasons=list(OVERRIDE_REASONS),
        links=[link] if link else None,
    )
