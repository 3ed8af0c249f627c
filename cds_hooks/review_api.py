"""The refill review API (JSON, under ``/api/``), used by the SMART app: the pharmacist's worklist, one draft,
edits, the authorization number, approve, reject, the audit trail.

Every call carries ``Authorization: Bearer <SMART access token>`` (see `cds_hooks.refill_review`). Answers:

====================================  ==============================================================
``GET /api/refills``                   worklist, most urgent first (``?status=pending|approved|written|
                                       write-failed|rejected|all``, ``limit`` ≤ 500, ``offset``), with
                                       counts per status
``GET /api/refills/{id}``              one draft: checks, what approval would write, last error
``GET /api/refills/{id}/audit``        its audit trail, oldest first
``PATCH /api/refills/{id}``            edit: ``{"version", "supplyDays"?, "quantity"?, "doseMg"?, "note"?,
                                       "authorizationNumber"?, "riskCategory"?}`` → re-checked draft
``POST /api/refills/{id}/approve``     ``{"version"}`` → the written draft (or 409/422/502/503)
``POST /api/refills/{id}/reject``      ``{"version", "reason"}``
====================================  ==============================================================

Errors are ``{"error": {"status", "field", "message", ...}}``: 400 malformed JSON, 401 no or inactive
token, 403 not a pharmacist, 404 no such draft, 409 someone changed it first (says who) or the checks
changed, 413 body too large, 422 a field out of range or a REMS hard stop (``blocking``: the rule codes),
502 approved but not written yet (retry), 503 the EHR could not be reached (nothing changed).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from fastapi import APIRouter, Request, Response

from cds_hooks import refill_store as store
from cds_hooks.http_json import json_response, read_json
from cds_hooks.refill_review import Introspector, Principal, ReviewError, ReviewService, preview
from cds_hooks.refill_store import Draft
from fhir_mappings.errors import InvalidInput
from fhir_mappings.writes import RefillEdit

MAX_BODY: Final = 20_000
STATUSES: Final = (*store.STATUSES, "all")
EDIT_FIELDS: Final = frozenset(
    {"version", "supplyDays", "quantity", "doseMg", "note", "authorizationNumber", "riskCategory"}
)


def _iso(v: date | datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def draft_json(draft: Draft, *, detail: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": draft.id,
        "patientId": draft.patient_id,
        "priorOrder": draft.prior_order,
        "drug": draft.drug,
        "status": draft.status,
        "version": draft.version,
        "daysLeft": draft.days_left,
        "runsOut": _iso(draft.runs_out),
        "earliestDispense": _iso(draft.earliest_dispense),
        "nextTestDue": _iso(draft.next_test_due),
        "blocking": draft.blocking,
        "blockingCodes": [c.code for c in draft.checks if c.blocking],
        "authorizationNumber": draft.authorization_number,
        "lastError": draft.last_error,
        "updatedAt": _iso(draft.updated_at),
        "updatedBy": draft.updated_by,
        "decidedBy": draft.decided_by,
        "decidedAt": _iso(draft.decided_at),
        "decisionReason": draft.decision_reason,
        "writtenReference": draft.written_reference,
        "checks": [c.as_json() for c in draft.checks],
    }
    if detail:
        out["medicationRequest"] = draft.medication_request
        out["createdAt"] = _iso(draft.created_at)
        out["checkedAt"] = _iso(draft.checked_at)
    return out


def error_response(exc: ReviewError) -> Response:
    body: dict[str, Any] = {"status": exc.status, "field": exc.field, "message": exc.message}
    for key, value in exc.extra.items():
        body[key] = draft_json(value, detail=True) if isinstance(value, Draft) else value
    response = json_response({"error": body}, exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return response


def _object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ReviewError(400, f"expected a JSON object, got {type(raw).__name__}", field="(body)")
    return raw


def _version(body: dict[str, Any]) -> int:
    v = body.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ReviewError(422, "the draft version you reviewed (a positive integer) is required", field="version")
    return v


def _decimal(body: dict[str, Any], key: str) -> Decimal | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ReviewError(422, f"expected a number, got {type(v).__name__}", field=key)
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        raise ReviewError(422, f"expected a number, got {str(v)[:40]!r}", field=key) from None
    if not d.is_finite():
        raise ReviewError(422, "expected a finite number", field=key)
    return d


def _text(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise ReviewError(422, f"expected a string, got {type(v).__name__}", field=key)
    return v


def parse_edit(body: dict[str, Any]) -> tuple[int, RefillEdit]:
    unknown = sorted(set(body) - EDIT_FIELDS)
    if unknown:
        raise ReviewError(
            422, f"not editable (editable: {', '.join(sorted(EDIT_FIELDS - {'version'}))})", field=unknown[0]
        )
    version = _version(body)
    supply = body.get("supplyDays")
    if supply is not None and (not isinstance(supply, int) or isinstance(supply, bool)):
        raise ReviewError(422, f"expected a whole number of days, got {str(supply)[:40]!r}", field="supplyDays")
    edit = RefillEdit(
        supply_days=supply,
        quantity=_decimal(body, "quantity"),
        dose_mg=_decimal(body, "doseMg"),
        note=_text(body, "note"),
        authorization=_text(body, "authorizationNumber"),
        category_code=_text(body, "riskCategory"),
    )
    if edit == RefillEdit():
        raise ReviewError(422, "nothing to change", field="(body)")
    return version, edit


def router(
    service: Callable[[], ReviewService | None],
    introspector: Callable[[], Introspector | None],
    *,
    now: Callable[[], datetime],
) -> APIRouter:
    api = APIRouter(prefix="/api")

    async def ready(request: Request) -> tuple[ReviewService, Principal]:
        svc, intro = service(), introspector()
        if svc is None or intro is None:
            raise ReviewError(503, "the refill review API needs IMID_REMS_FHIR_BASE_URL and the backend client set")
        return svc, await intro.principal(request.headers.get("authorization"))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            return _object(await read_json(request, MAX_BODY))
        except InvalidInput as exc:
            raise ReviewError(exc.status, exc.message, field=exc.path) from None

    @api.get("/refills")
    async def worklist(request: Request) -> Response:
        svc, _ = await ready(request)
        status = request.query_params.get("status", "pending")
        if status not in STATUSES:
            raise ReviewError(422, f"expected one of {', '.join(STATUSES)}", field="status")
        try:
            limit = int(request.query_params.get("limit", "100"))
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            raise ReviewError(422, "limit and offset must be whole numbers", field="limit") from None
        if not 1 <= limit <= 500 or offset < 0:
            raise ReviewError(422, "limit must be 1 to 500 and offset 0 or more", field="limit")
        drafts = store.worklist(svc.engine, status=None if status == "all" else status, limit=limit, offset=offset)  # type: ignore[arg-type]
        return json_response(
            {
                "status": status,
                "counts": store.counts(svc.engine),
                "drafts": [draft_json(d) for d in drafts],
            }
        )

    @api.get("/refills/{draft_id}")
    async def one(draft_id: str, request: Request) -> Response:
        svc, principal = await ready(request)
        draft = svc.get(draft_id)
        out = draft_json(draft, detail=True)
        if draft.status == "pending":
            out["toWrite"] = preview(draft, requester=principal.actor, now=now(), zone=svc.zone)
        return json_response(out)

    @api.get("/refills/{draft_id}/audit")
    async def audit(draft_id: str, request: Request) -> Response:
        svc, _ = await ready(request)
        svc.get(draft_id)
        rows = store.audit_trail(svc.engine, draft_id)
        return json_response(
            {
                "audit": [
                    {
                        "at": r.at.isoformat(),
                        "actor": r.actor,
                        "action": r.action,
                        "before": r.before,
                        "after": r.after,
                        "note": r.note,
                    }
                    for r in rows
                ]
            }
        )

    @api.patch("/refills/{draft_id}")
    async def edit(draft_id: str, request: Request) -> Response:
        svc, principal = await ready(request)
        version, change = parse_edit(await body_of(request))
        return json_response(draft_json(await svc.edit(draft_id, version, change, principal), detail=True))

    @api.post("/refills/{draft_id}/approve")
    async def approve(draft_id: str, request: Request) -> Response:
        svc, principal = await ready(request)
        body = await body_of(request)
        return json_response(draft_json(await svc.approve(draft_id, _version(body), principal), detail=True))

    @api.post("/refills/{draft_id}/reject")
    async def reject(draft_id: str, request: Request) -> Response:
        svc, principal = await ready(request)
        body = await body_of(request)
        reason = _text(body, "reason") or ""
        return json_response(draft_json(await svc.reject(draft_id, _version(body), reason, principal), detail=True))

    return api
