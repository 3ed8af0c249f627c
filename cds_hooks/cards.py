"""Findings → CDS Hooks cards, built as objects (never by rendering JSON text).

One card per finding. `card.source.topic` carries the rule code (REMS_RULES.md). Card uuids are
derived from the hook instance, the order and the rule (uuid5): a retried call answers with the same
uuids, so feedback on either copy lands on the same card.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import date, datetime

from cds_hooks.models import Card, Coding, Source
from rems.findings import Evidence, Finding

RULE_SYSTEM = "https://imid-rems.github.io/fhir/CodeSystem/rems-rule"
SOURCE_LABEL = "IMiD REMS check"
_NAMESPACE = uuid.UUID("6f0b7f57-3c55-4c5e-9d9a-2f1d0b7e1a01")


def card_uuid(hook_instance: str, finding: Finding) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{hook_instance}|{finding.order}|{finding.code.value}"))


def _when(value: datetime | date | None) -> str:
    if value is None:
        return ""
    return f" ({value.isoformat()})"


def _evidence_line(e: Evidence) -> str:
    where = f"`{e.reference}`" if e.reference != "-" else "absent"
    return f"- {where}: {e.description}{_when(e.when)}"


def detail_markdown(f: Finding) -> str:
    parts = [f.detail]
    if f.fix is not None:
        parts.append(f"**What to do:** {f.fix.description}.")
    if f.evidence:
        parts.append("**Evidence**\n" + "\n".join(_evidence_line(e) for e in f.evidence))
    parts.append(f"Order: `{f.order}` · Rule: `{f.code.value}` ({', '.join(f.info.sources)})")
    return "\n\n".join(parts)


def finding_card(f: Finding, hook_instance: str) -> Card:
    return Card(
        uuid=card_uuid(hook_instance, f),
        summary=f.summary,
        detail=detail_markdown(f),
        indicator=f.severity.value,
        source=Source(
            label=SOURCE_LABEL,
            topic=Coding(system=RULE_SYSTEM, code=f.code.value, display=f.info.title),
        ),
    )


def cards_for(findings: Iterable[Finding], hook_instance: str) -> list[Card]:
    return [finding_card(f, hook_instance) for f in findings]
