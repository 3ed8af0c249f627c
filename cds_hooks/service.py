"""One hook call: validate the request, build the case, run the rules, answer with cards.

Shared by `imid-rems evaluate` and (later) the HTTP service, so both answer exactly the same JSON.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, tzinfo
from typing import Any

from pydantic import BaseModel, ValidationError

from cds_hooks.cards import cards_for
from cds_hooks.models import CONTEXT_MODELS, CdsResponse, HookRequest, OrderSelectContext
from fhir_mappings import InvalidInput, build_case, check_drafts, index_prefetch, parse_bundle_entries, parse_resource
from fhir_mappings.codes import default_codes
from rems import evaluate
from rems.config import Config, default_config


class PrefetchMissing(InvalidInput):
    """Data the service needs is neither prefetched nor fetchable: CDS Hooks answers 412."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"prefetch.{key}", message, 412)


def _pydantic_error(exc: ValidationError, base: str) -> InvalidInput:
    err = exc.errors()[0]
    path = base + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    return InvalidInput(path.lstrip("."), err["msg"])


def parse_request(raw: Any) -> HookRequest:
    if not isinstance(raw, dict):
        raise InvalidInput("(body)", f"expected a JSON object, got {type(raw).__name__}")
    try:
        return HookRequest.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error(exc, "") from None


def parse_context(request: HookRequest, expected_hook: str | None = None) -> BaseModel:
    if expected_hook is not None and request.hook != expected_hook:
        raise InvalidInput("hook", f"this service answers {expected_hook!r}, got {request.hook!r}")
    model = CONTEXT_MODELS.get(request.hook)
    if model is None:
        raise InvalidInput("hook", f"unsupported hook {request.hook!r}; expected one of {sorted(CONTEXT_MODELS)}")
    try:
        return model.model_validate(request.context)
    except ValidationError as exc:
        raise _pydantic_error(exc, "context") from None


def _may_be_imid(raw_entries: list[Any]) -> bool:
    """Cheap pre-check on raw JSON: could any draft be an IMiD? (Avoids parsing the whole prefetch
    for the common case of a non-IMiD order.) A medicationReference we cannot see says "maybe"."""
    codes = default_codes()
    for entry in raw_entries:
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or res.get("resourceType") != "MedicationRequest":
            continue
        if "medicationReference" in res:
            return True
        mcc = res.get("medicationCodeableConcept")
        if not isinstance(mcc, dict):
            continue
        text = " ".join(
            [str(mcc.get("text", ""))]
            + [f"{c.get('code', '')} {c.get('display', '')}" for c in mcc.get("coding", []) if isinstance(c, dict)]
        ).lower()
        for imid in codes.imids:
            if any(t in text for t in imid.text) or any(code in text.split() for code in (*imid.generic, *imid.brand)):
                return True
    return False


def evaluate_request(
    request: HookRequest,
    *,
    now: datetime,
    zone: tzinfo,
    config: Config | None = None,
    expected_hook: str | None = None,
) -> CdsResponse:
    config = config or default_config()
    context = parse_context(request, expected_hook)
    patient_id: str = context.patientId  # type: ignore[attr-defined]
    drafts_raw: dict[str, Any] | None = None
    drafts_path = ""
    if request.hook in ("order-select", "order-sign"):
        drafts_raw, drafts_path = context.draftOrders, "context.draftOrders"  # type: ignore[attr-defined]
    elif request.hook == "medication-refill":
        drafts_raw, drafts_path = context.medications, "context.medications"  # type: ignore[attr-defined]
    if drafts_raw is not None:
        if not isinstance(drafts_raw.get("entry", []), list):
            raise InvalidInput(f"{drafts_path}.entry", "expected a list")
        if not _may_be_imid(drafts_raw.get("entry", [])):
            # Still validate the drafts: a malformed request is an error, not "no cards".
            check_drafts(parse_bundle_entries(drafts_raw, drafts_path))
            return CdsResponse(cards=[])
    allowed = ("MedicationRequest", "Medication") if request.hook == "medication-refill" else None
    entries = parse_bundle_entries(drafts_raw, drafts_path, allowed) if drafts_raw else []
    # A Medication sent alongside the orders (medicationReference into the same Bundle) is data, not
    # an order: it is indexed with the chart so references to it resolve.
    drafts = [(p, r) for p, r in entries if r["resourceType"] != "Medication"]

    prefetch = dict(request.prefetch or {})
    patient_raw = prefetch.pop("patient", None)
    if patient_raw is None:
        raise PrefetchMissing("patient", "the Patient is required and was not prefetched")
    if isinstance(patient_raw, dict) and patient_raw.get("resourceType") == "OperationOutcome":
        index_prefetch({"patient": patient_raw})  # raises the 412 that quotes the EHR's message
    patient = parse_resource(patient_raw, "prefetch.patient", ("Patient",))
    if patient.get("id") != patient_id:
        raise InvalidInput("prefetch.patient.id", f"{patient.get('id')!r} is not context.patientId {patient_id!r}")
    chart = index_prefetch(prefetch)
    for p, r in entries:
        if r["resourceType"] == "Medication":
            chart.add(r, p)
    case = build_case(
        patient=patient,
        patient_path="prefetch.patient",
        drafts=[r for _, r in drafts],
        draft_paths=[p for p, _ in drafts],
        chart=chart,
        now=now,
        zone=zone,
        user=getattr(context, "userId", None),
        config=config,
    )
    only: set[str] | None = None
    if isinstance(context, OrderSelectContext) and context.selections:
        only = set(context.selections)
    if request.hook == "patient-view":
        # Until the REMS status card exists (issue 3), patient-view reports the findings on the
        # patient's active IMiD orders, as if each were being renewed today.
        active = tuple(o for o in case.chart.imid_orders if o.status == "active")
        case = dataclasses.replace(case, orders=active)
    findings = evaluate(case, config, only=only)
    return CdsResponse(cards=cards_for(findings, request.hookInstance))
