"""The sandbox EHR's FHIR gateway: the FHIR base SMART apps and CDS services see (``config.fhir_base``).

``{fhir_base}/{path}`` (GET, POST, PUT, PATCH, DELETE) is forwarded to the Medplum engine at
``config.fhir_upstream`` after two checks:

1. **The token.** ``Authorization: Bearer <access token>`` issued by the sandbox's `SmartAuthServer` and valid
   at ``config.now()``; otherwise ``401`` with ``WWW-Authenticate: Bearer`` and an OperationOutcome saying why.
   ``GET {fhir_base}/metadata`` and ``{fhir_base}/.well-known/smart-configuration`` are public.
2. **The scopes** (SMART 2.2, `sandbox.scopes`). The interaction needs its letter on the resource type: read,
   vread and instance history ``r``; search and type history ``s``; create ``c``; update and patch ``u``;
   delete ``d`` (v1 ``.read``/``.write``/``.*`` count as ``rs``/``cud``/``cruds``; ``*`` matches any type;
   system-level search/history needs a ``*`` scope). Otherwise ``403`` naming the scope needed.

   ``user/`` and ``system/`` scopes reach every patient. When only ``patient/`` scopes allow the interaction it
   is limited to the token's patient: a search must name that patient (``patient=``, ``subject=`` or
   ``beneficiary=``; ``_id=`` for Patient; or the ``Patient/{id}/{type}`` compartment), a read returns ``403``
   unless the resource is that Patient or its ``subject``/``patient``/``beneficiary`` refers to it, a create or
   update must write such a resource (and an update or delete may only touch one), and conditional writes,
   batches/transactions and ``$operations`` are refused. Search results are filtered to what the scopes allow
   (an ``_include`` cannot smuggle in another patient's data). Batch and transaction entries are each checked.
   Reference data outside the Patient compartment (`SHARED_TYPES`: Medication, Practitioner, Organization, ...)
   is readable with a ``patient/`` scope for its type, without the patient check.

Everything else passes through: query strings, bodies, ``If-Match``/``If-None-Exist``/``If-None-Match``/
``Prefer``/``Content-Type``, status codes, ``ETag``/``Location``. The upstream base URL is rewritten to
``config.fhir_base`` in response bodies (Bundle ``link`` and ``fullUrl``, references) and in
``Location``/``Content-Location``, so paging ``next`` links come back through the gateway. An unreachable
upstream is ``502``. CORS allows any origin (bearer tokens, never cookies). One shared ``httpx.AsyncClient``
talks to the upstream; it is closed with the app's lifespan.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response

from sandbox.config import SandboxConfig
from sandbox.cors import cors_headers, preflight
from sandbox.scopes import ResourceScope
from sandbox.smart_auth import Grant, SmartAuthServer, TokenError

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
FORWARD_REQUEST_HEADERS: Final = (
    "accept",
    "content-type",
    "if-match",
    "if-none-exist",
    "if-none-match",
    "if-modified-since",
    "prefer",
)
FORWARD_RESPONSE_HEADERS: Final = ("content-type", "etag", "location", "content-location", "last-modified")
PATIENT_REFERENCE_FIELDS: Final = ("subject", "patient", "beneficiary")
SHARED_TYPES: Final = frozenset(
    {"Medication", "Practitioner", "PractitionerRole", "Organization", "Location", "Substance", "HealthcareService"}
)
"""Types outside the Patient compartment (reference data, not anyone's chart): a ``patient/`` scope naming them
(or ``*``) reads and searches them without the patient check, so an app can follow ``medicationReference`` or
``requester``. Writing them still needs ``user/`` or ``system/`` scopes."""
UPSTREAM_TIMEOUT_S: Final = 30.0
REALM: Final = 'Bearer realm="sandbox-fhir"'

_TYPE = re.compile(r"[A-Z][A-Za-z]+")
_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")
_VERBS: Final = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}

Kind = Literal["read", "search", "create", "update", "delete", "conditional", "batch", "operation"]


@dataclass(frozen=True)
class FhirInteraction:
    """What a request to the gateway does: the SMART interaction letter, the resource type (``*`` for
    system-level), the kind of REST interaction, and the id / patient compartment it names."""

    interaction: str
    resource_type: str
    kind: Kind
    resource_id: str | None = None
    compartment: tuple[str, str] | None = None


def classify(method: str, path: str) -> FhirInteraction | None:
    """The FHIR REST interaction of ``method`` on ``path`` (relative to the FHIR base), or None when the gateway
    does not recognise it."""
    segments = [s for s in path.strip("/").split("/") if s] if path.strip("/") else []
    method = method.upper()
    n = len(segments)
    if n == 0:
        if method == "GET":
            return FhirInteraction("s", "*", "search")
        return FhirInteraction("s", "*", "batch") if method == "POST" else None
    first = segments[0]
    if n == 1 and first == "_history" and method == "GET":
        return FhirInteraction("s", "*", "search")
    if first.startswith("$"):
        return FhirInteraction("s", "*", "operation") if n == 1 and method in ("GET", "POST") else None
    if not _TYPE.fullmatch(first):
        return None
    if n == 1:
        by_method: dict[str, tuple[str, Kind]] = {
            "GET": ("s", "search"),
            "POST": ("c", "create"),
            "PUT": ("u", "conditional"),
            "PATCH": ("u", "conditional"),
            "DELETE": ("d", "conditional"),
        }
        found = by_method.get(method)
        return FhirInteraction(found[0], first, found[1]) if found else None
    second = segments[1]
    if n == 2 and second == "_search" and method in ("GET", "POST"):
        return FhirInteraction("s", first, "search")
    if n == 2 and second == "_history" and method == "GET":
        return FhirInteraction("s", first, "search")
    if n == 2 and second.startswith("$"):
        return FhirInteraction("s", first, "operation") if method in ("GET", "POST") else None
    if not _ID.fullmatch(second):
        return None
    if n == 2:
        instance: dict[str, tuple[str, Kind]] = {
            "GET": ("r", "read"),
            "PUT": ("u", "update"),
            "PATCH": ("u", "update"),
            "DELETE": ("d", "delete"),
        }
        found = instance.get(method)
        return FhirInteraction(found[0], first, found[1], second) if found else None
    third = segments[2]
    if third == "_history" and method == "GET" and (n == 3 or (n == 4 and _ID.fullmatch(segments[3]))):
        return FhirInteraction("r", first, "read", second)
    if n == 3 and third.startswith("$") and method in ("GET", "POST"):
        return FhirInteraction("r", first, "operation", second)
    if n == 3 and _TYPE.fullmatch(third) and method == "GET":
        return FhirInteraction("s", third, "search", compartment=(first, second))
    return None


def _is_patient_reference(reference: object, patient: str) -> bool:
    if not isinstance(reference, str):
        return False
    path = reference.split("/_history/", 1)[0]
    return path == f"Patient/{patient}" or path.endswith(f"/Patient/{patient}")


def belongs_to_patient(resource: object, patient: str) -> bool:
    """Whether `resource` is Patient `patient`, or refers to it by ``subject``, ``patient`` or ``beneficiary``."""
    if not isinstance(resource, dict):
        return False
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient
    for name in PATIENT_REFERENCE_FIELDS:
        value = resource.get(name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and _is_patient_reference(item.get("reference"), patient):
                return True
    return False


def _outcome(status: int, code: str, text: str, headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return Response(
        json.dumps(body),
        status_code=status,
        media_type=FHIR_JSON,
        headers={**cors_headers(), **(headers or {})},
    )


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


class _Forbidden(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Gateway:
    """The gateway's state: configuration, the authorization server, and the shared upstream client."""

    def __init__(self, config: SandboxConfig, auth: SmartAuthServer) -> None:
        self.config = config
        self.auth = auth
        self.upstream = config.fhir_upstream.rstrip("/")
        self._upstream_bytes = self.upstream.encode()
        self._base_bytes = config.fhir_base.encode()
        self._http: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            # trust_env=False: the upstream is an internal address; never route it through a proxy from the env.
            self._http = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S, trust_env=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    # --- URLs and bodies ----------------------------------------------------------------------------------------

    def rewrite(self, content: bytes) -> bytes:
        return content.replace(self._upstream_bytes, self._base_bytes)

    def _relay(self, upstream: httpx.Response, content: bytes | None = None) -> Response:
        headers = {}
        for name in FORWARD_RESPONSE_HEADERS:
            value = upstream.headers.get(name)
            if value is not None:
                headers[name] = value.replace(self.upstream, self.config.fhir_base)
        headers.update(cors_headers())
        body = self.rewrite(upstream.content if content is None else content)
        return Response(body, status_code=upstream.status_code, headers=headers)

    async def _send(
        self, method: str, path: str, *, query: str = "", body: bytes = b"", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        url = f"{self.upstream}/{quote(path.lstrip('/'), safe='/$_-.~')}"
        if query:
            url += f"?{query}"
        return await self.http().request(method, url, content=body or None, headers=headers or {})

    async def _current(self, interaction: FhirInteraction) -> httpx.Response:
        path = f"{interaction.resource_type}/{interaction.resource_id}"
        return await self._send("GET", path, headers={"Accept": FHIR_JSON})

    # --- the route ----------------------------------------------------------------------------------------------

    async def handle(self, request: Request, path: str) -> Response:
        if request.method == "OPTIONS":
            return preflight()
        if path.strip("/") == ".well-known/smart-configuration" and request.method == "GET":
            return self.auth.smart_configuration_response()
        if path.strip("/") == "metadata" and request.method == "GET":
            return await self._pass_through(request, path)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _outcome(
                401, "login", "this FHIR server needs Authorization: Bearer <access token>", {"WWW-Authenticate": REALM}
            )
        try:
            grant = self.auth.check_access_token(token.strip())
        except TokenError as error:
            challenge = f'{REALM}, error="invalid_token", error_description="{error}"'
            return _outcome(
                401,
                "login",
                f"{error}; get a new token from the SMART authorization server",
                {"WWW-Authenticate": challenge},
            )
        interaction = classify(request.method, path)
        if interaction is None:
            return _outcome(
                400, "not-supported", f"{request.method} {path or '/'} is not a FHIR interaction this gateway knows"
            )
        body = await request.body()
        try:
            return await self._authorized(request, path, body, grant, interaction)
        except _Forbidden as forbidden:
            challenge = f'{REALM}, error="insufficient_scope"'
            return _outcome(403, "forbidden", forbidden.text, {"WWW-Authenticate": challenge})
        except httpx.HTTPError as error:
            log.warning("FHIR upstream %s unreachable: %s", self.upstream, type(error).__name__)
            return _outcome(
                502, "transient", f"the FHIR server behind this gateway is unreachable ({type(error).__name__})"
            )

    async def _pass_through(self, request: Request, path: str) -> Response:
        try:
            upstream = await self._send(
                request.method, path, query=request.url.query, body=await request.body(), headers=self._headers(request)
            )
        except httpx.HTTPError as error:
            log.warning("FHIR upstream %s unreachable: %s", self.upstream, type(error).__name__)
            return _outcome(
                502, "transient", f"the FHIR server behind this gateway is unreachable ({type(error).__name__})"
            )
        return self._relay(upstream)

    @staticmethod
    def _headers(request: Request) -> dict[str, str]:
        return {name: value for name in FORWARD_REQUEST_HEADERS if (value := request.headers.get(name)) is not None}

    def _search_params(self, request: Request, body: bytes) -> list[tuple[str, str]]:
        params = list(request.query_params.multi_items())
        if request.method == "POST" and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            params += parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return params

    async def _authorized(
        self, request: Request, path: str, body: bytes, grant: Grant, interaction: FhirInteraction
    ) -> Response:
        search = self._search_params(request, body) if interaction.kind == "search" else None
        if interaction.kind == "batch":
            # A batch or transaction needs no scope of its own: each entry is checked against the scopes.
            self._check_batch(grant, body)
            matches: tuple[Any, ...] = ()
        else:
            matches = grant.scopes.matching(interaction.interaction, interaction.resource_type, search)
            if not matches:
                raise _Forbidden(self._needed(grant, interaction))
        shared = interaction.resource_type in SHARED_TYPES and interaction.kind in ("read", "search")
        patient_only = bool(matches) and not shared and all(scope.context == "patient" for scope in matches)
        if patient_only:
            await self._check_patient_request(grant, interaction, search or [], body)
        upstream = await self._send(
            request.method, path, query=request.url.query, body=body, headers=self._headers(request)
        )
        if not upstream.is_success:
            return self._relay(upstream)
        if interaction.kind == "search":
            return self._relay(upstream, self._filter_search(grant, upstream.content, search or []))
        if interaction.kind == "read" and patient_only:
            resource = _json(upstream.content)
            if isinstance(resource, dict) and resource.get("resourceType") == "Bundle":  # instance history
                return self._relay(upstream, self._filter_entries(grant, resource, "r", []))
            if grant.patient is None or not belongs_to_patient(resource, grant.patient):
                raise _Forbidden(self._not_the_patient(grant, interaction))
        return self._relay(upstream)

    # --- checks -------------------------------------------------------------------------------------------------

    @staticmethod
    def _needed(grant: Grant, interaction: FhirInteraction) -> str:
        letter, resource_type = interaction.interaction, interaction.resource_type
        contexts = sorted(grant.scopes.contexts()) or ["patient", "user", "system"]
        examples = " or ".join(f"{context}/{resource_type}.{letter}" for context in contexts)
        what = "system-level " if resource_type == "*" else ""
        return (
            f"{what}{_VERBS[letter]} on {resource_type} needs a scope granting '{letter}' such as {examples}; "
            f"this token's scope is '{grant.scope}'"
        )

    @staticmethod
    def _not_the_patient(grant: Grant, interaction: FhirInteraction) -> str:
        return (
            f"this token's patient/ scopes reach only Patient/{grant.patient} and resources about that patient; "
            f"{interaction.resource_type}/{interaction.resource_id or ''} is not"
        )

    def _names_patient(self, resource_type: str, params: Sequence[tuple[str, str]], patient: str) -> bool:
        accepted = {patient, f"Patient/{patient}", f"{self.config.fhir_base}/Patient/{patient}"}
        for name, value in params:
            base, _, modifier = name.partition(":")
            values = value.split(",")
            if resource_type == "Patient" and name == "_id" and all(v == patient for v in values):
                return True
            if base in PATIENT_REFERENCE_FIELDS and modifier in ("", "Patient") and all(v in accepted for v in values):
                return True
        return False

    async def _check_patient_request(
        self, grant: Grant, interaction: FhirInteraction, search: Sequence[tuple[str, str]], body: bytes
    ) -> None:
        patient = grant.patient
        if patient is None:
            raise _Forbidden("this token has patient/ scopes but no patient in context")
        kind = interaction.kind
        if kind == "search":
            if interaction.compartment is not None:
                if interaction.compartment != ("Patient", patient):
                    raise _Forbidden(f"a patient/ scope search may only use the compartment Patient/{patient}")
                return
            if not self._names_patient(interaction.resource_type, search, patient):
                how = "_id=" if interaction.resource_type == "Patient" else "patient=, subject= or beneficiary="
                raise _Forbidden(f"a search under patient/ scopes must name Patient/{patient} ({how}{patient})")
        elif kind == "create":
            resource = _json(body)
            if not (isinstance(resource, dict) and resource.get("resourceType") == interaction.resource_type):
                return  # the FHIR server refuses it (400) on its own
            if resource.get("resourceType") == "Patient" or not belongs_to_patient(resource, patient):
                raise _Forbidden(f"a patient/ scope may only create resources about Patient/{patient}")
        elif kind in ("update", "delete"):
            current = await self._current(interaction)
            if current.status_code == 200 and not belongs_to_patient(_json(current.content), patient):
                raise _Forbidden(self._not_the_patient(grant, interaction))
            if kind == "update":
                resource = _json(body)
                is_patient = interaction.resource_type == "Patient"
                if is_patient and interaction.resource_id != patient:
                    raise _Forbidden(self._not_the_patient(grant, interaction))
                if isinstance(resource, dict) and not is_patient and not belongs_to_patient(resource, patient):
                    raise _Forbidden(f"a patient/ scope may only write resources about Patient/{patient}")
        elif kind != "read":
            raise _Forbidden(f"patient/ scopes do not allow {kind} interactions here; use user/ or system/ scopes")

    def _check_batch(self, grant: Grant, body: bytes) -> None:
        bundle = _json(body)
        entries = bundle.get("entry", []) if isinstance(bundle, dict) else []
        for index, entry in enumerate(entries if isinstance(entries, list) else []):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict):
                continue  # the FHIR server refuses the Bundle on its own
            url = str(request.get("url", ""))
            for base in (self.config.fhir_base, self.upstream):
                if url.startswith(base + "/"):
                    url = url[len(base) + 1 :]
            parts = urlsplit(url)
            inner = classify(str(request.get("method", "")), parts.path)
            if inner is None or inner.kind == "batch":
                raise _Forbidden(f"Bundle.entry[{index}].request {request.get('method')} {url} is not allowed")
            search = parse_qsl(parts.query, keep_blank_values=True) if inner.kind == "search" else None
            matches = grant.scopes.matching(inner.interaction, inner.resource_type, search)
            if not any(scope.context != "patient" for scope in matches):
                needed = self._needed(grant, inner)
                raise _Forbidden(f"Bundle.entry[{index}]: {needed} (batches need user/ or system/ scopes)")

    def _visible(
        self, grant: Grant, resource: dict[str, Any], interaction: str, search: Sequence[tuple[str, str]]
    ) -> bool:
        matches: tuple[ResourceScope, ...] = grant.scopes.matching(
            interaction, str(resource.get("resourceType")), search
        )
        if any(scope.context != "patient" for scope in matches):
            return True
        if not matches:
            return False
        if resource.get("resourceType") in SHARED_TYPES:
            return True
        return grant.patient is not None and belongs_to_patient(resource, grant.patient)

    def _filter_entries(
        self, grant: Grant, bundle: dict[str, Any], interaction: str, search: Sequence[tuple[str, str]]
    ) -> bytes:
        entries = bundle.get("entry")
        if isinstance(entries, list):
            bundle["entry"] = [
                entry
                for entry in entries
                if isinstance(entry, dict)
                and (
                    (entry.get("search") or {}).get("mode") == "outcome"
                    or (
                        isinstance(entry.get("resource"), dict)
                        and self._visible(grant, entry["resource"], interaction, search)
                    )
                )
            ]
        return json.dumps(bundle, ensure_ascii=False).encode()

    def _filter_search(self, grant: Grant, content: bytes, search: Sequence[tuple[str, str]]) -> bytes:
        bundle = _json(content)
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            return content
        return self._filter_entries(grant, bundle, "s", search)


def router(config: SandboxConfig, auth: SmartAuthServer) -> APIRouter:
    """``{fhir_base}/{path}`` for GET, POST, PUT, PATCH, DELETE and OPTIONS, plus SMART discovery under it.
    Include it in the sandbox app (``app.include_router(router(config, auth))``); its lifespan closes the
    shared upstream client."""
    gateway = Gateway(config, auth)
    api = APIRouter(lifespan=gateway.lifespan)
    base = urlsplit(config.fhir_base).path.rstrip("/")

    async def smart_configuration() -> Response:
        return auth.smart_configuration_response()

    async def fhir(request: Request, path: str) -> Response:
        return await gateway.handle(request, path)

    async def fhir_base(request: Request) -> Response:
        return await gateway.handle(request, "")

    api.add_api_route(f"{base}/.well-known/smart-configuration", smart_configuration, methods=["GET"])
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    api.add_api_route(base, fhir_base, methods=methods, include_in_schema=False)
    api.add_api_route(f"{base}/{{path:path}}", fhir, methods=methods, include_in_schema=False)
    return api
