"""One hook call: validate the request, build the case, run the rules, answer with cards.

Shared by `imid-rems evaluate` and the HTTP service (`cds_hooks.app`), so both answer exactly the same
JSON. The hooks differ in what they answer: order-select runs the REMS rules on the selected orders,
order-sign every rule on every draft, patient-view one REMS status card, medication-refill the
findings plus the drafted next prescription as a ``create`` suggestion.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from pydantic import BaseModel, ValidationError

from cds_hooks.cards import CardContext, cards_for, draft_refill, refill_card, status_card
from cds_hooks.models import CONTEXT_MODELS, Card, CdsResponse, HookRequest, OrderSelectContext
from cds_hooks.services import BY_HOOK, CdsService
from fhir_mappings import InvalidInput, build_case, check_drafts, index_prefetch, parse_bundle_entries, parse_resource
from fhir_mappings.codes import default_codes
from fhir_mappings.common import ref
from fhir_mappings.resources import ResourceIndex
from rems import evaluate
from rems.config import Config, default_config
from rems.derive import suggested_category, view_order
from rems.findings import Family
from rems.model import Case, ImidOrder, RiskCategory
from rems.rules import ALL_RULES, CLINICAL_RULES, COVERAGE_RULES, REMS_RULES, Rule
from rems.status import rems_status
from rems.timing import local_day


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


def drafts_of(request: HookRequest, context: BaseModel) -> tuple[dict[str, Any] | None, str]:
    """The Bundle of orders under review and its path: draftOrders (order-select/-sign), medications
    (medication-refill), none (patient-view)."""
    if request.hook in ("order-select", "order-sign"):
        return context.draftOrders, "context.draftOrders"  # type: ignore[attr-defined]
    if request.hook == "medication-refill":
        return context.medications, "context.medications"  # type: ignore[attr-defined]
    return None, ""


def check_request_drafts(request: HookRequest, context: BaseModel) -> None:
    """Validate the orders under review before any data is fetched for them: a malformed request is a
    400/422 naming the field whether or not the chart was prefetched."""
    drafts_raw, drafts_path = drafts_of(request, context)
    if drafts_raw is None:
        return
    if not isinstance(drafts_raw.get("entry", []), list):
        raise InvalidInput(f"{drafts_path}.entry", "expected a list")
    allowed = ("MedicationRequest", "Medication") if request.hook == "medication-refill" else None
    check_drafts(parse_bundle_entries(drafts_raw, drafts_path, allowed))


def may_skip(request: HookRequest, context: BaseModel) -> bool:
    """True when no draft can be an IMiD: the answer is ``{"cards": []}`` (after the drafts are
    validated) and no chart data is needed — nothing is fetched."""
    drafts_raw, _ = drafts_of(request, context)
    if drafts_raw is None:
        return False
    entries = drafts_raw.get("entry", [])
    return isinstance(entries, list) and not _may_be_imid(entries)


def _rules(service: CdsService) -> tuple[Rule, ...]:
    if service.families is None:
        return ALL_RULES
    by_family = {Family.REMS: REMS_RULES, Family.COVERAGE: COVERAGE_RULES, Family.CLINICAL: CLINICAL_RULES}
    return tuple(r for fam, rules in by_family.items() if fam in service.families for r in rules)


def evaluate_request(
    request: HookRequest,
    *,
    now: datetime,
    zone: tzinfo,
    config: Config | None = None,
    expected_hook: str | None = None,
    service: CdsService | None = None,
    smart_launch_url: str | None = None,
    context: BaseModel | None = None,
) -> CdsResponse:
    """The service's answer to one hook call whose prefetch is complete.

    With `service` given (the HTTP app, the CLI), a prefetch key the service declares but the request
    lacks (absent, not ``null``) is 412: the HTTP app fetches what it can first; the CLI has no server
    to ask. Without it (mapping tests), absent keys are simply no data."""
    config = config or default_config()
    required: tuple[str, ...] = ()
    if service is not None:
        expected_hook = service.hook
        required = service.required_keys
    if context is None:  # the HTTP app has already validated it (context is not changed by fetching)
        context = parse_context(request, expected_hook)
    service = service or BY_HOOK[request.hook]
    patient_id: str = context.patientId  # type: ignore[attr-defined]
    drafts_raw, drafts_path = drafts_of(request, context)
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
    absent = [k for k in required if k not in prefetch]
    if absent:
        check_drafts(drafts)  # a malformed order is 400/422 naming it, whatever else is missing
        raise PrefetchMissing(absent[0], f"not prefetched ({', '.join(absent)}) and not fetched from a FHIR server")
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
    user = getattr(context, "userId", None)
    case = build_case(
        patient=patient,
        patient_path="prefetch.patient",
        drafts=[r for _, r in drafts],
        draft_paths=[p for p, _ in drafts],
        chart=chart,
        now=now,
        zone=zone,
        user=user,
        config=config,
    )
    ctx = CardContext(
        hook_instance=request.hookInstance,
        patient_id=patient_id,
        user=user,
        drafts={ref(r): r for _, r in drafts},
        orders={o.reference: o for o in case.orders},
        smart_launch_url=smart_launch_url,
        today=local_day(now, zone),
    )
    if request.hook == "patient-view":
        card = status_card(rems_status(case, config), ctx)
        return CdsResponse(cards=[card] if card else [])
    only: set[str] | None = None
    if isinstance(context, OrderSelectContext) and context.selections:
        only = set(context.selections)
        in_drafts = {ref(r) for _, r in drafts}
        for i, selected in enumerate(context.selections):
            if selected not in in_drafts:
                raise InvalidInput(f"context.selections[{i}]", f"{selected!r} is not an order in context.draftOrders")
    findings = evaluate(case, config, rules=_rules(service), only=only)
    cards = cards_for(findings, ctx)
    if request.hook == "medication-refill":
        cards.extend(_refill_cards(case, ctx, chart, patient, now, zone, user, config))
    return CdsResponse(cards=cards)


def _refill_cards(
    case: Case,
    ctx: CardContext,
    chart: ResourceIndex,
    patient: dict[str, Any],
    now: datetime,
    zone: tzinfo,
    user: str | None,
    config: Config,
) -> list[Card]:
    """One card per IMiD being renewed: the drafted next prescription, pre-checked by running every
    rule on the drafted prescription itself against the same chart."""
    authored = now.astimezone(zone).replace(microsecond=0)
    out: list[Card] = []
    for i, order in enumerate(case.orders):
        raw = ctx.drafts.get(order.reference)
        if raw is None:
            continue
        category = order.risk_category or _suggested(case, config, order)
        drafted = draft_refill(
            order, raw, ctx, category=category, authored_on=authored, max_days=min(config.rems.max_supply_days, 28)
        )
        probe = {**drafted.resource, "id": f"imid-rems-drafted-{i}"}
        drafted_case = build_case(
            patient=patient,
            patient_path="prefetch.patient",
            drafts=[probe],
            draft_paths=[f"(drafted prescription for {order.reference})"],
            chart=chart,
            now=now,
            zone=zone,
            user=user,
            config=config,
        )
        out.append(refill_card(drafted, evaluate(drafted_case, config), ctx))
    return out


def _suggested(case: Case, config: Config, order: ImidOrder) -> RiskCategory | None:
    return suggested_category(view_order(case, config, order))
