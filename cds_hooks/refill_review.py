"""Reviewing a drafted refill: who is asking (`Introspector`), re-checking against the chart, the pharmacist's
edits, approval and the write-back to the EHR (`ReviewService`).

**Who may do what.** Callers present the SMART access token the EHR issued (to the SMART app, issue 6, or to
any client of the EHR); the service asks the EHR's authorization server what it is (OAuth 2.0 Token
Introspection, ``introspection_endpoint`` in ``.well-known/smart-configuration``, authenticating as our
Backend Services client) and reads the user's ``fhirUser``. A user acts as a pharmacist when their
PractitionerRole (the ``fhirUser`` itself, or a role of that Practitioner) is coded
``practitioner-role|pharmacist`` or carries a NUCC pharmacist taxonomy (``1835…``). Any authenticated user
may read the worklist; only pharmacists may edit, approve or reject. The answer is cached for
``api_token_cache_s`` (by token hash; never longer than the token lives).

**Approval** (`ReviewService.approve`), in this order, so that nothing is half-written:

1. The chart is fetched again and the pre-checks re-run on the draft as it stands. If the FHIR server
   cannot be read the approval is refused (503), the error is recorded on the draft, nothing else changes.
   If the checks changed since the pharmacist looked, the new checks are stored and the approval refused
   (409: review again): a pharmacist approves what they saw.
2. The decision is committed (``pending`` → ``approved``): of two pharmacists approving at once exactly one
   gets here; the other is told who did (409). A remaining REMS hard stop refuses it (422, naming them).
3. The prescription is written: one FHIR ``transaction`` with the MedicationRequest (status ``active``,
   ``requester`` = the approving pharmacist's PractitionerRole, ``authoredOn`` = the approval time, the
   draft's ``request_key`` as its refill-draft identifier) as a **conditional create**
   (``ifNoneExist: identifier=…|request_key``) and its Provenance (author: the pharmacist; second agent,
   ``verifier``: the supervising prescriber of the collaborative practice agreement, i.e. the requester
   of the order being continued). The transaction is all-or-nothing; before sending it the service looks
   the identifier up, so a retry after a timeout whose write in fact landed records the existing
   prescription instead of writing again.
4. The outcome is recorded: ``written`` with the reference, or ``write-failed`` with the error (502). The
   content is frozen from step 2 on; approving again (or the periodic scan) retries the write with the
   same key and the same content, until it lands once.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal
from typing import Any, Final
from urllib.parse import quote

import httpx
from sqlalchemy import Engine

from cds_hooks import refill_store as store
from cds_hooks.backend_auth import BackendAuth, BackendAuthError
from cds_hooks.fhir_client import FhirClient, FhirError
from cds_hooks.refill_scan import RefillScanner
from cds_hooks.refill_store import Check, Draft
from cds_hooks.refills import describe_failure, load_chart, precheck, status_for
from fhir_mappings.codes import default_codes
from fhir_mappings.errors import InvalidInput
from fhir_mappings.writes import REFILL_DRAFT_SYSTEM, RefillEdit, edit_refill
from rems.config import Config
from rems.model import Drug

PRACTITIONER_ROLE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/practitioner-role"
NUCC: Final = "http://nucc.org/provider-taxonomy"
PROVENANCE_AGENT_TYPE: Final = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION: Final = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_CACHE_MAX: Final = 10_000
WRITE_LEASE_S: Final = 120.0
"""How long one writer holds an approved draft's write: longer than any FHIR timeout, short enough that a
crashed writer's draft is retried soon."""

Json = dict[str, Any]


class ReviewError(Exception):
    """An answer for the API: HTTP `status`, a message, and `field` when one input is to blame."""

    def __init__(self, status: int, message: str, *, field: str | None = None, extra: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class Principal:
    user: str
    """The ``fhirUser`` (``Practitioner/…`` or ``PractitionerRole/…``)."""
    role: str | None
    """The PractitionerRole the user acts in (the pharmacist role when there is one)."""
    pharmacist: bool

    @property
    def actor(self) -> str:
        """What the audit trail and the written prescription name: the role, else the user."""
        return self.role or self.user


def is_pharmacist_role(role: Mapping[str, Any]) -> bool:
    if role.get("active") is False:
        return False
    for key in ("code", "specialty"):
        for concept in role.get(key) or []:
            if not isinstance(concept, dict):
                continue
            for c in concept.get("coding") or []:
                if not isinstance(c, dict):
                    continue
                system, code = c.get("system"), str(c.get("code", ""))
                if system == PRACTITIONER_ROLE_SYSTEM and code == "pharmacist":
                    return True
                if system == NUCC and code.startswith("1835"):
                    return True
    return False


class Introspector:
    """Bearer token → `Principal`, through the EHR's token introspection endpoint."""

    def __init__(
        self,
        fhir: FhirClient,
        auth: BackendAuth,
        http: httpx.AsyncClient,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fhir, self.auth, self.http, self.ttl_s, self.clock = fhir, auth, http, ttl_s, clock
        self._endpoint: str | None = None
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def endpoint(self) -> str:
        if self._endpoint is None:
            url = self.fhir.url(".well-known/smart-configuration")
            try:
                response = await self.http.get(url, headers={"Accept": "application/json"})
                found = response.json().get("introspection_endpoint") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                found = None
            if not isinstance(found, str) or not found.startswith(("https://", "http://")):
                raise ReviewError(503, "the EHR's smart-configuration names no introspection_endpoint")
            self._endpoint = found
        return self._endpoint

    async def principal(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
            raise ReviewError(401, "send the SMART access token: Authorization: Bearer <token>", field="Authorization")
        token = authorization[7:].strip()
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        body = await self._introspect(token)
        if body.get("active") is not True:
            raise ReviewError(
                401, "the access token is not active (expired, revoked or unknown)", field="Authorization"
            )
        user = body.get("fhirUser")
        if not isinstance(user, str) or "/" not in user:
            raise ReviewError(403, "the access token names no user (fhirUser): launch with openid fhirUser")
        principal = await self._resolve(user)
        exp = body.get("exp")
        life = self.ttl_s
        if isinstance(exp, int | float):
            life = min(life, float(exp) - time.time())
        if life > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (principal, now + life)
        return principal

    async def _introspect(self, token: str) -> Json:
        endpoint = await self.endpoint()
        try:
            audience = await self.auth.token_endpoint()
            form = {
                "token": token,
                "client_id": self.auth.credentials.client_id,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.auth.assertion(audience),
            }
            response = await self.http.post(endpoint, data=form, headers={"Accept": "application/json"})
        except (httpx.HTTPError, BackendAuthError) as exc:
            raise ReviewError(503, f"token introspection failed: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ReviewError(503, f"token introspection answered {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ReviewError(503, "token introspection answered something that is not a JSON object")
        return body

    async def _resolve(self, user: str) -> Principal:
        rtype, _, rid = user.rstrip("/").rpartition("/")
        rtype = rtype.rsplit("/", 1)[-1]
        try:
            if rtype == "PractitionerRole":
                role = await self.fhir.read(f"PractitionerRole/{rid}")
                ok = isinstance(role, dict) and is_pharmacist_role(role)
                return Principal(f"PractitionerRole/{rid}", f"PractitionerRole/{rid}", ok)
            if rtype == "Practitioner":
                roles = await self.fhir.search(f"PractitionerRole?practitioner={quote(rid, safe='')}")
                for role in roles:
                    if is_pharmacist_role(role) and isinstance(role.get("id"), str):
                        return Principal(f"Practitioner/{rid}", f"PractitionerRole/{role['id']}", True)
                first = next((r for r in roles if isinstance(r.get("id"), str)), None)
                return Principal(f"Practitioner/{rid}", f"PractitionerRole/{first['id']}" if first else None, False)
        except FhirError as exc:
            raise ReviewError(503, f"could not read the user's role: {exc}") from None
        return Principal(user, None, False)


# --- the prescription written on approval -----------------------------------------------------------


def approved_resource(draft: Draft, *, zone: tzinfo) -> Json:
    """What approval writes: the drafted MedicationRequest, ``active``, requested by the approving
    pharmacist (``decided_by``), authored at the decision time, identified by the draft's request key."""
    if draft.decided_by is None or draft.decided_at is None:
        raise ValueError("the draft has not been approved")
    return _final(draft.medication_request, draft.request_key, draft.decided_by, draft.decided_at, zone)


def preview(draft: Draft, *, requester: str, now: datetime, zone: tzinfo) -> Json:
    """What approving `draft` now as `requester` would write (for the review screen)."""
    return _final(draft.medication_request, draft.request_key, requester, now, zone)


def _final(resource: Mapping[str, Any], key: str, requester: str, at: datetime, zone: tzinfo) -> Json:
    mr: Json = copy.deepcopy(dict(resource))
    mr.pop("id", None)
    mr["status"] = "active"
    mr["intent"] = "order"
    mr["authoredOn"] = at.astimezone(zone).replace(microsecond=0).isoformat()
    mr["requester"] = {"reference": requester}
    ids = [i for i in mr.get("identifier") or [] if isinstance(i, dict) and i.get("system") != REFILL_DRAFT_SYSTEM]
    mr["identifier"] = [{"system": REFILL_DRAFT_SYSTEM, "value": key}, *ids]
    return mr


def provenance(target: str, draft: Draft, *, supervisor: str | None, zone: tzinfo) -> Json:
    if draft.decided_by is None or draft.decided_at is None:
        raise ValueError("the draft has not been approved")
    agents: list[Json] = [
        {
            "type": {"coding": [{"system": PROVENANCE_AGENT_TYPE, "code": "author", "display": "Author"}]},
            "who": {"reference": draft.decided_by},
        }
    ]
    if supervisor and supervisor != draft.decided_by:
        agents.append(
            {
                "type": {"coding": [{"system": PROVENANCE_AGENT_TYPE, "code": "verifier", "display": "Verifier"}]},
                "who": {"reference": supervisor},
            }
        )
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": draft.decided_at.astimezone(zone).isoformat(),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "reason": [{"text": "IMiD refill prescribed by a pharmacist under a collaborative practice agreement"}],
        "agent": agents,
        "entity": [{"role": "source", "what": {"reference": draft.prior_order}}],
    }


def _location_reference(location: Any) -> str | None:
    if not isinstance(location, str):
        return None
    parts = location.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "MedicationRequest" and parts[-1]:
        return f"MedicationRequest/{parts[-1]}"
    return None


async def write_approved(fhir: FhirClient, draft: Draft, *, zone: tzinfo) -> str:
    """Write the approved draft once (module docstring, step 3); returns ``MedicationRequest/<id>``.
    Raises `FhirError`."""
    key_query = f"MedicationRequest?identifier={quote(REFILL_DRAFT_SYSTEM, safe='')}|{draft.request_key}"
    existing, prior = await asyncio.gather(fhir.search(key_query), fhir.read(draft.prior_order))
    for found in existing:
        if isinstance(found.get("id"), str):
            return f"MedicationRequest/{found['id']}"
    supervisor = None
    if isinstance(prior, dict) and isinstance(prior.get("requester"), dict):
        ref = prior["requester"].get("reference")
        supervisor = ref if isinstance(ref, str) else None
    full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, draft.request_key)}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": full_url,
                "resource": approved_resource(draft, zone=zone),
                "request": {
                    "method": "POST",
                    "url": "MedicationRequest",
                    "ifNoneExist": f"identifier={quote(REFILL_DRAFT_SYSTEM, safe='')}|{draft.request_key}",
                },
            },
            {
                "resource": provenance(full_url, draft, supervisor=supervisor, zone=zone),
                "request": {"method": "POST", "url": "Provenance"},
            },
        ],
    }
    _, body, _ = await fhir.request("POST", fhir.base.rstrip("/"), body=bundle, expect="Bundle")
    entries = body.get("entry") if body else None
    first = entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else {}
    response: Json = first["response"] if isinstance(first.get("response"), dict) else {}
    reference = _location_reference(response.get("location"))
    if reference is None:
        resource = first.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            reference = f"MedicationRequest/{resource['id']}"
    if reference is None:
        raise FhirError("the transaction's answer names no MedicationRequest location", retryable=True)
    return reference


# --- the review service -----------------------------------------------------------------------------


def strengths_for(drug: str, resource: Mapping[str, Any]) -> dict[Decimal, tuple[str, str]]:
    """Capsule strength → (RxNorm code, display) for the draft's drug, brand or generic like the draft."""
    codes = default_codes()
    imid = next((i for i in codes.imids if i.drug.value == drug), None)
    if imid is None:
        return {}
    mcc = resource.get("medicationCodeableConcept")
    coded = {str(c.get("code")) for c in (mcc or {}).get("coding") or [] if isinstance(c, dict)}
    brand = bool(coded & set(imid.brand))
    table = imid.brand if brand and imid.brand else imid.generic
    name = Drug(drug).value
    label = f" [{imid.brand_text[0].capitalize()}]" if brand and imid.brand_text else ""
    return {mg: (code, f"{name} {mg} MG Oral Capsule{label}") for code, mg in table.items() if mg is not None}


class ReviewService:
    def __init__(
        self,
        engine: Engine,
        fhir: FhirClient,
        scanner: RefillScanner,
        *,
        zone: tzinfo,
        config: Config,
        authorization_pattern: str,
        now: Callable[[], datetime],
    ) -> None:
        self.engine, self.fhir, self.scanner = engine, fhir, scanner
        self.zone, self.config, self.now = zone, config, now
        self.authorization = re.compile(authorization_pattern)
        self.worker = f"writer-{uuid.uuid4()}"
        self.write_lease_s = WRITE_LEASE_S

    def get(self, draft_id: str) -> Draft:
        draft = store.get_draft(self.engine, draft_id)
        if draft is None:
            raise ReviewError(404, f"no refill draft {draft_id!r}")
        return draft

    async def recheck(self, draft: Draft, resource: Mapping[str, Any] | None = None) -> tuple[tuple[Check, ...], Any]:
        """Fresh pre-checks of `resource` (default: the stored draft) against the chart as it is now.
        Returns (checks, supply facts to store). Raises `ReviewError` 503 when the chart cannot be read."""
        now = self.now()
        try:
            charts = await self.scanner.fetch_charts([draft.patient_id], now)
        except FhirError as exc:
            raise ReviewError(503, f"could not re-check against the chart: {exc}") from None
        chart = charts.get(draft.patient_id)
        if chart is None:
            raise ReviewError(503, "could not re-check: the patient is not on the FHIR server")
        try:
            loaded = await asyncio.to_thread(load_chart, chart, now=now, zone=self.zone, config=self.config)
        except InvalidInput as exc:
            raise ReviewError(
                503, f"could not re-check: the chart could not be read: {describe_failure(exc)}"
            ) from None
        status = status_for(loaded, draft.prior_order, self.config)
        if status is None or status.days_left is None or status.runs_out is None or status.next_fill_from is None:
            raise ReviewError(
                409, f"{draft.prior_order} is no longer the patient's current order with a known supply: not re-checked"
            )
        target = resource if resource is not None else draft.medication_request
        try:
            checks, next_test = precheck(loaded, target, status, now=now, zone=self.zone, config=self.config)
        except InvalidInput as exc:
            raise ReviewError(422, f"the edited prescription cannot be read: {exc}", field=exc.path) from None
        extra: list[Check] = []
        prior = next((o for o in loaded.case.chart.imid_orders if o.reference == draft.prior_order), None)
        auth = _authorization_of(target)
        if prior is not None and auth and prior.authorization_number and auth == prior.authorization_number:
            extra.append(
                Check(
                    "authorization-reused",
                    "critical",
                    True,
                    "The authorization number is the previous prescription's: the REMS issues one per prescription",
                )
            )
        facts = {
            "days_left": status.days_left,
            "runs_out": status.runs_out,
            "earliest_dispense": status.next_fill_from,
            "next_test_due": next_test,
        }
        return (*extra, *checks), facts

    def _record_error(self, draft: Draft, message: str, actor: str) -> None:
        store.set_error(self.engine, draft.id, message, actor=actor, now=self.now())

    async def edit(self, draft_id: str, version: int, edit: RefillEdit, principal: Principal) -> Draft:
        self._need_pharmacist(principal, "edit")
        draft = self.get(draft_id)
        if draft.status != "pending":
            raise ReviewError(409, f"refill draft {draft_id} is {draft.status}: only pending drafts can be edited")
        if draft.version != version:
            raise ReviewError(409, f"refill draft {draft_id} is at version {draft.version}, not {version}: reload it")
        if edit.authorization is not None and not self.authorization.fullmatch(edit.authorization.strip()):
            raise ReviewError(
                422,
                f"not a REMS authorization number (expected {self.authorization.pattern})",
                field="authorizationNumber",
            )
        try:
            resource, changes = edit_refill(
                draft.medication_request, edit, strengths=strengths_for(draft.drug, draft.medication_request)
            )
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            raise ReviewError(422, message or str(exc), field=field if message else None) from None
        if edit.dose_mg is not None:
            changes = (*changes, "A dose change may need a new REMS authorization number.")
        try:
            checks, facts = await self.recheck(draft, resource)
        except ReviewError as exc:
            if exc.status == 503:
                self._record_error(draft, exc.message, principal.actor)
            raise
        values: dict[str, Any] = {"medication_request": resource, **facts}
        if edit.authorization is not None:
            values["authorization_number"] = edit.authorization.strip()
        try:
            return store.edit_draft(
                self.engine,
                draft_id,
                expected_version=version,
                changes=values,
                checks=checks,
                actor=principal.actor,
                now=self.now(),
                note=" ".join(changes) or None,
            )
        except store.Conflict as exc:
            raise ReviewError(409, str(exc)) from None

    async def approve(
        self, draft_id: str, version: int, principal: Principal, *, writer: FhirClient | None = None
    ) -> Draft:
        """Approve and write (module docstring). `writer`: the client the prescription is written with — the
        pharmacist's own SMART session (the app), so the EHR applies and audits the pharmacist's own rights;
        default the service's Backend Services client (the API, and the periodic retry of a failed write)."""
        self._need_pharmacist(principal, "approve")
        draft = self.get(draft_id)
        if draft.status == "written" and draft.decided_by == principal.actor:
            return draft  # a retried approval (the answer was lost): it is done, once
        if draft.status == "write-failed" or (draft.status == "approved" and draft.decided_by == principal.actor):
            # The decision stands: retry its write (same key, same content).
            return await self._write(draft, principal.actor, writer)
        if draft.status != "pending" or draft.version != version:
            self._decide(draft_id, version, "approved", principal, None)  # raises the Conflict naming who
        try:
            checks, facts = await self.recheck(draft)
        except ReviewError as exc:
            if exc.status == 503:
                self._record_error(draft, exc.message, principal.actor)
            raise
        if tuple(checks) != draft.checks or any(getattr(draft, k) != v for k, v in facts.items()):
            try:
                changed = store.edit_draft(
                    self.engine,
                    draft_id,
                    expected_version=version,
                    changes=facts,
                    checks=checks,
                    actor=store.SCAN_ACTOR,
                    now=self.now(),
                    note="re-checked at approval",
                )
            except store.Conflict as exc:
                raise ReviewError(409, str(exc)) from None
            if changed.version != version:
                raise ReviewError(
                    409,
                    "the pre-checks changed since you looked (re-checked against the chart): review the draft again",
                    extra={"draft": changed},
                )
        decided = self._decide(draft_id, version, "approved", principal, None)
        return await self._write(decided, principal.actor, writer)

    async def retry_writes(self) -> int:
        """Write approved drafts whose write failed or never reported (periodic job). Returns how many landed."""
        landed = 0
        statuses: tuple[store.Status, ...] = ("write-failed", "approved")
        for status in statuses:
            for draft in store.worklist(self.engine, status=status, limit=200):
                try:
                    await self._write(draft, store.SCAN_ACTOR)
                    landed += 1
                except ReviewError:
                    continue
        return landed

    async def reject(self, draft_id: str, version: int, reason: str, principal: Principal) -> Draft:
        self._need_pharmacist(principal, "reject")
        if not reason.strip():
            raise ReviewError(422, "a rejection needs a reason", field="reason")
        return self._decide(draft_id, version, "rejected", principal, reason.strip()[:2000])

    def _decide(self, draft_id: str, version: int, decision: str, principal: Principal, reason: str | None) -> Draft:
        try:
            return store.decide(
                self.engine,
                draft_id,
                expected_version=version,
                decision=decision,  # type: ignore[arg-type]
                actor=principal.actor,
                reason=reason,
                now=self.now(),
            )
        except store.NotFound:
            raise ReviewError(404, f"no refill draft {draft_id!r}") from None
        except store.Blocked as exc:
            raise ReviewError(
                422,
                f"approval refused while REMS hard stops remain: {', '.join(exc.codes)}",
                extra={"blocking": list(exc.codes)},
            ) from None
        except store.Conflict as exc:
            raise ReviewError(409, str(exc), extra={"version": exc.version, "draftStatus": exc.status}) from None

    async def _write(self, draft: Draft, actor: str, writer: FhirClient | None = None) -> Draft:
        now = self.now()
        if not store.claim_write(self.engine, draft.id, worker=self.worker, now=now, lease_s=self.write_lease_s):
            raise ReviewError(
                409,
                "the prescription is being written to the EHR right now; reload the draft in a moment",
                extra={"draftStatus": draft.status},
            )
        try:
            reference = await write_approved(writer or self.fhir, draft, zone=self.zone)
        except FhirError as exc:
            failed = store.record_write(self.engine, draft.id, error=str(exc)[:1000], actor=actor, now=now)
            raise ReviewError(
                502,
                f"approved, but the prescription could not be written to the EHR yet: {exc}. "
                "Approve again to retry; it will be written once.",
                extra={"draft": failed},
            ) from None
        return store.record_write(self.engine, draft.id, written_reference=reference, actor=actor, now=now)

    @staticmethod
    def _need_pharmacist(principal: Principal, action: str) -> None:
        if not principal.pharmacist:
            raise ReviewError(403, f"only a user acting as a pharmacist may {action} a refill draft")


def _authorization_of(resource: Mapping[str, Any]) -> str | None:
    from fhir_mappings.medication import AUTHORIZATION_SYSTEM

    for i in resource.get("identifier") or []:
        if isinstance(i, dict) and i.get("system") == AUTHORIZATION_SYSTEM and isinstance(i.get("value"), str):
            return str(i["value"])
    return None
