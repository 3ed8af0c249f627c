"""``POST /cds-services/{id}/feedback`` (CDS Hooks 2.0 "Feedback"): validate, attach the rule code, store.

The body is ``{"feedback": [{card, outcome, acceptedSuggestions?, overrideReason?, outcomeTimestamp}]}``.
The card's rule code is read back from its uuid (`cds_hooks.cards.topic_of_card`), so the service
keeps no record of the cards it issued and feedback still says which rule was overridden. A card uuid
we did not mint is stored with no rule code rather than refused: EHRs may relay feedback late, and
losing it helps nobody. Every item is checked before anything is stored: one bad item refuses the whole
body (400 naming ``feedback[i].field``) and nothing is half-stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from cds_hooks.cards import topic_of_card
from cds_hooks.db import FeedbackItem, record_feedback
from fhir_mappings import InvalidInput

MAX_ITEMS = 1000
MAX_TEXT = 2000


def _str(item: dict[str, Any], key: str, path: str, *, required: bool = True, limit: int = 200) -> str | None:
    value = item.get(key)
    if value is None:
        if required:
            raise InvalidInput(f"{path}.{key}", "missing")
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{path}.{key}", f"expected a non-empty string, got {str(value)[:60]!r}")
    if len(value) > limit:
        raise InvalidInput(f"{path}.{key}", f"longer than {limit} characters")
    return value


def _timestamp(value: str, path: str) -> datetime:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(path, f"not an ISO 8601 timestamp: {value[:40]!r}") from None
    if when.tzinfo is None:
        raise InvalidInput(path, f"needs a time zone (the spec says UTC): {value[:40]!r}")
    return when.astimezone(UTC)


def parse_feedback(raw: Any, service_id: str, client_iss: str | None, now: datetime) -> list[FeedbackItem]:
    if not isinstance(raw, dict):
        raise InvalidInput("(body)", f"expected a JSON object, got {type(raw).__name__}")
    items = raw.get("feedback")
    if not isinstance(items, list) or not items:
        raise InvalidInput("feedback", "expected a non-empty array of feedback objects")
    if len(items) > MAX_ITEMS:
        raise InvalidInput("feedback", f"{len(items)} items; at most {MAX_ITEMS} per call", 413)
    out: list[FeedbackItem] = []
    for i, item in enumerate(items):
        path = f"feedback[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(path, "expected a JSON object")
        card = str(_str(item, "card", path))
        try:
            uuid.UUID(card)
        except ValueError:
            raise InvalidInput(f"{path}.card", f"not a card uuid: {card[:60]!r}") from None
        outcome = item.get("outcome")
        if outcome not in ("accepted", "overridden"):
            raise InvalidInput(f"{path}.outcome", f"expected 'accepted' or 'overridden', got {str(outcome)[:40]!r}")
        accepted: list[str] = []
        suggestions = item.get("acceptedSuggestions")
        if outcome == "accepted":
            if not isinstance(suggestions, list) or not suggestions:
                raise InvalidInput(
                    f"{path}.acceptedSuggestions", "required for an accepted outcome (a non-empty array)"
                )
            for j, s in enumerate(suggestions):
                if not isinstance(s, dict):
                    raise InvalidInput(f"{path}.acceptedSuggestions[{j}]", "expected an object with an id")
                sid = _str(s, "id", f"{path}.acceptedSuggestions[{j}]")
                accepted.append(str(sid))
        elif suggestions is not None and suggestions != []:
            raise InvalidInput(f"{path}.acceptedSuggestions", "only an accepted outcome has accepted suggestions")
        reason_system = reason_code = reason_display = comment = None
        override = item.get("overrideReason")
        if override is not None:
            if outcome != "overridden":
                raise InvalidInput(f"{path}.overrideReason", "only an overridden outcome has an override reason")
            if not isinstance(override, dict):
                raise InvalidInput(f"{path}.overrideReason", "expected an object")
            reason = override.get("reason")
            if reason is not None:
                if not isinstance(reason, dict):
                    raise InvalidInput(f"{path}.overrideReason.reason", "expected a Coding object")
                rpath = f"{path}.overrideReason.reason"
                reason_code = _str(reason, "code", rpath)
                reason_system = _str(reason, "system", rpath, required=False, limit=500)
                reason_display = _str(reason, "display", rpath, required=False, limit=500)
            comment = _str(override, "userComment", f"{path}.overrideReason", required=False, limit=MAX_TEXT)
            if reason is None and comment is None:
                raise InvalidInput(f"{path}.overrideReason", "needs a reason or a userComment")
        stamp = _str(item, "outcomeTimestamp", path, limit=60)
        out.append(
            FeedbackItem(
                service_id=service_id,
                card_uuid=card.lower(),
                outcome=outcome,
                outcome_timestamp=_timestamp(str(stamp), f"{path}.outcomeTimestamp"),
                rule_code=topic_of_card(card),
                override_reason_system=reason_system,
                override_reason_code=reason_code,
                override_reason_display=reason_display,
                user_comment=comment,
                accepted_suggestions=tuple(accepted),
                client_iss=client_iss,
                received_at=now,
            )
        )
    return out


def store(engine: Engine, items: Sequence[FeedbackItem]) -> int:
    return record_feedback(engine, items)
