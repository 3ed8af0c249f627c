"""The sandbox EHR's CDS Hooks 2.0 client: discovery, prefetch, signed calls.

Written from the CDS Hooks 2.0 specification, not from imid-rems' own code (nothing here imports
`cds_hooks`): the sandbox must catch the service's bugs, not share them.

    cds = CdsClient("http://127.0.0.1:8000/cds-services", iss="http://127.0.0.1:8080", key=key, http=client)
    service = await cds.service_for_hook("order-sign")
    prefetch = await cds.prefetch(service, context, fhir_base, token, user=context["userId"])
    status, body = await cds.call(service["id"], "order-sign", context, prefetch=prefetch)

**Prefetch** ("Providing FHIR Resources to a CDS Service"): each template is a relative FHIR read or
search whose ``{{...}}`` tokens are ``context.<field>`` (a root-level primitive of the hook context) or one
of ``userPractitionerId``, ``userPractitionerRoleId``, ``userPatientId``, ``userRelatedPersonId`` (the id
part of the user when the user is of that type). The client answers only templates inside the
specification's query subset (instance reads; type searches with reference, token (``:in`` the only
modifier) and date (prefixes ``eq lt gt ge le``) parameters, ``_count``, ``_sort``); it never sends its
token anywhere but its own FHIR server. Queries run in parallel; ``next`` links are followed (same server
only) and the pages merged, since the spec forbids next links in prefetch. A key whose template cannot be
rendered or whose query fails is left out (the service then fetches it itself or answers 412); a key with
no data (a read answering 404/410, a search with no match) is ``null``.

**Calls** ("Trusting CDS Clients"): every call, discovery included, carries ``Authorization: Bearer <JWT>``
signed ES384 with header ``alg``, ``typ: JWT``, ``kid`` (and ``jku`` if configured) and claims ``iss``,
``aud`` (exactly the URL called), ``exp`` (at most 5 minutes ahead), ``iat`` and a fresh ``jti``. CDS Hooks
2.0 does not list ``sub``; 1.0 required it as the client id, so it is sent too (a service may check it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import jwt

from sandbox.ehr_keys import EhrKey

log = logging.getLogger("sandbox.cds_client")

FHIR_JSON: Final = "application/fhir+json"
MAX_JWT_LIFETIME_S: Final = 300
MAX_PAGES: Final = 50
DISCOVERY_TTL_S: Final = 60.0

USER_TOKENS: Final = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}
_TOKEN = re.compile(r"\{\{(.*?)\}\}")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE = re.compile(r"[A-Z][A-Za-z]+")
_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_PARAM_NAME = re.compile(r"[a-z][a-z0-9\-]*")
_DATE_PREFIXED = re.compile(r"([a-z]{2})\d{4}(-\d{2}(-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?")
_DATE_PREFIXES: Final = frozenset({"eq", "lt", "gt", "ge", "le"})
_SPECIAL_PARAMS: Final = frozenset({"_id", "_count", "_sort", "_lastUpdated"})


class TemplateError(ValueError):
    """A prefetch template outside what the client answers (the message says why; no token values)."""


class Unresolvable(ValueError):
    """A prefetch token has no value in this context (e.g. ``userPractitionerId`` for a PractitionerRole)."""


class CdsError(RuntimeError):
    """Discovery failed (unreachable service, an error status, or an answer that is not a service list)."""


def _is_id(value: str) -> bool:
    return _FHIR_ID.fullmatch(value) is not None and value not in (".", "..")


def user_tokens(user: str | None) -> dict[str, str]:
    """The user-identifier token of a ``Type/id`` user reference: ``PractitionerRole/7`` →
    ``{"userPractitionerRoleId": "7"}``; nothing for another type or a malformed reference."""
    match = _REFERENCE.fullmatch(user or "")
    if match is None or not _is_id(match.group(2)):
        return {}
    return {name: match.group(2) for name, rtype in USER_TOKENS.items() if rtype == match.group(1)}


def _context_value(value: Any) -> str | None:
    """A root-level context field as it goes into a URL, or None when it is not a primitive."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if not isinstance(value, str) or not value or value in (".", ".."):
        return None
    if _REFERENCE.fullmatch(value) or _FHIR_ID.fullmatch(value):
        return value
    return quote(value, safe="")


def _check_query(query: str) -> None:
    for name, value in parse_qsl(query, keep_blank_values=True):
        base, _, modifier = name.partition(":")
        if "." in base:
            raise TemplateError(f"chained parameter {name!r} is outside the prefetch query subset")
        if base.startswith("_"):
            if base not in _SPECIAL_PARAMS or modifier:
                raise TemplateError(f"parameter {name!r} is outside the prefetch query subset")
            continue
        if _PARAM_NAME.fullmatch(base) is None:
            raise TemplateError(f"parameter {name!r} is not a search parameter name")
        if modifier and modifier != "in":
            raise TemplateError(f"modifier :{modifier} is outside the prefetch query subset (only :in)")
        prefixed = _DATE_PREFIXED.fullmatch(value)
        if prefixed and prefixed.group(1) not in _DATE_PREFIXES:
            raise TemplateError(f"date prefix {prefixed.group(1)!r} of {name!r} is outside eq, lt, gt, ge, le")


def render_template(template: str, context: Mapping[str, Any], user: str | None) -> str:
    """The relative FHIR URL of one prefetch template in this context.

    Raises `Unresolvable` when a token has no value here, and `TemplateError` when the template is not
    a relative read or search inside the specification's query subset."""
    values = user_tokens(user)
    for name, value in context.items():
        rendered = _context_value(value)
        if rendered is not None:
            values[f"context.{name}"] = rendered

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name not in values:
            if name in USER_TOKENS or name.startswith("context."):
                raise Unresolvable(f"token {{{{{name}}}}} has no value in this context")
            raise TemplateError(f"{{{{{name}}}}} is not a CDS Hooks prefetch token")
        return values[name]

    if not isinstance(template, str) or not template.strip():
        raise TemplateError("the template is not a non-empty string")
    # The query's shape is the template's own: checked with tokens standing in, so a value never decides it.
    _check_query(urlsplit(_TOKEN.sub("TOKEN", template)).query)
    relative = _TOKEN.sub(fill, template)
    if "{{" in relative or "}}" in relative:
        raise TemplateError("unbalanced token delimiters")
    parts = urlsplit(relative)
    if parts.scheme or parts.netloc or relative.startswith("/") or parts.fragment:
        raise TemplateError("the template is not a URL relative to the FHIR server")
    segments = parts.path.split("/")
    if _TYPE.fullmatch(segments[0]) is None:
        raise TemplateError("the template does not start with a resource type")
    if len(segments) == 2:
        if parts.query or not _is_id(segments[1]):
            raise TemplateError("a read must be Type/id, without parameters")
    elif len(segments) != 1:
        raise TemplateError("only instance reads and type searches are in the prefetch query subset")
    return relative


class _Skip(Exception):
    """This key is left out of the prefetch (the reason names no values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fhir_authorization(token_response: Mapping[str, Any], subject: str) -> dict[str, Any]:
    """The CDS Hooks 2.0 ``fhirAuthorization`` object from an OAuth token response: ``access_token``,
    ``token_type`` (Bearer), ``expires_in``, ``scope``, ``subject`` = the CDS service's client id, and
    ``patient`` when the token response names one (2.0 requires it with ``patient/`` scopes)."""
    out = {
        "access_token": str(token_response["access_token"]),
        "token_type": "Bearer",
        "expires_in": int(token_response.get("expires_in", 300)),
        "scope": str(token_response.get("scope", "")),
        "subject": subject,
    }
    patient = token_response.get("patient")
    if isinstance(patient, str) and patient:
        out["patient"] = patient
    return out


class CdsClient:
    """An EHR's CDS Hooks client for one CDS service provider (its discovery URL, ``services_url``)."""

    def __init__(
        self,
        services_url: str,
        iss: str,
        key: EhrKey,
        http: httpx.AsyncClient,
        *,
        client_id: str = "sandbox-ehr",
        jku: str | None = None,
        jwt_lifetime_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < jwt_lifetime_s <= MAX_JWT_LIFETIME_S:
            raise ValueError(f"jwt_lifetime_s must be in 1..{MAX_JWT_LIFETIME_S}")
        self.services_url = services_url.rstrip("/")
        self.iss = iss
        self.key = key
        self.http = http
        self.client_id = client_id
        self.jku = jku
        self.jwt_lifetime_s = jwt_lifetime_s
        self.clock = clock
        self._discovery: tuple[float, list[dict[str, Any]]] | None = None

    # --- trust -------------------------------------------------------------------------------------------

    def service_url(self, service_id: str) -> str:
        return f"{self.services_url}/{quote(service_id, safe='')}"

    def sign(self, aud: str) -> str:
        """A fresh JWT for one call to ``aud`` (the exact URL called)."""
        issued = int(self.clock())
        payload = {
            "iss": self.iss,
            "sub": self.client_id,
            "aud": aud,
            "iat": issued,
            "exp": issued + self.jwt_lifetime_s,
            "jti": str(uuid.uuid4()),
        }
        headers: dict[str, Any] = {"kid": self.key.kid, "typ": "JWT"}
        if self.jku:
            headers["jku"] = self.jku
        return jwt.encode(payload, self.key.private_key, algorithm=self.key.alg, headers=headers)

    def public_jwks(self) -> dict[str, Any]:
        return self.key.public_jwks()

    # --- discovery ---------------------------------------------------------------------------------------

    async def discover(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The service list of ``GET {services_url}`` (cached for a minute). Raises `CdsError`."""
        now = time.monotonic()
        if not refresh and self._discovery is not None and now - self._discovery[0] < DISCOVERY_TTL_S:
            return self._discovery[1]
        try:
            response = await self.http.get(
                self.services_url,
                headers={"Authorization": f"Bearer {self.sign(self.services_url)}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise CdsError(f"the CDS service is unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise CdsError(f"discovery answered {response.status_code}: {_error_text(response)}")
        try:
            services = response.json()["services"]
        except (ValueError, KeyError, TypeError):
            raise CdsError("discovery did not answer a JSON object with a services list") from None
        if not isinstance(services, list) or not all(isinstance(s, dict) and "id" in s for s in services):
            raise CdsError("discovery did not answer a JSON object with a services list")
        self._discovery = (now, services)
        return services

    async def service_for_hook(self, hook: str) -> dict[str, Any] | None:
        return next((s for s in await self.discover() if s.get("hook") == hook), None)

    # --- prefetch ----------------------------------------------------------------------------------------

    async def prefetch(
        self, service: Mapping[str, Any], context: Mapping[str, Any], fhir_base: str, token: str | None, user: str
    ) -> dict[str, Any]:
        """The ``prefetch`` object for `service` in `context`: every key whose query succeeded."""
        values, _ = await self.prefetch_report(service, context, fhir_base, token, user)
        return values

    async def prefetch_report(
        self, service: Mapping[str, Any], context: Mapping[str, Any], fhir_base: str, token: str | None, user: str
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """(prefetch, why each left-out key was left out). Reasons name tokens and statuses, never values."""
        templates = service.get("prefetch") or {}
        skipped: dict[str, str] = {}
        jobs: dict[str, Any] = {}
        if not isinstance(templates, Mapping):
            return {}, {"*": "the service's prefetch is not an object"}
        for key, template in templates.items():
            try:
                relative = render_template(template, context, user)
            except (TemplateError, Unresolvable) as exc:
                skipped[str(key)] = str(exc)
                continue
            jobs[str(key)] = self._fetch(fhir_base, relative, token)
        values: dict[str, Any] = {}
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        for key, result in zip(jobs, results, strict=True):
            if isinstance(result, _Skip):
                skipped[key] = result.reason
            elif isinstance(result, BaseException):
                skipped[key] = f"failed ({type(result).__name__})"
            else:
                values[key] = result
        if skipped:
            log.info("prefetch left out %s", ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
        return values, skipped

    def _same_server(self, fhir_base: str, url: str) -> bool:
        base, other = urlsplit(fhir_base), urlsplit(url)
        return (base.scheme, base.netloc) == (other.scheme, other.netloc) and (other.path.rstrip("/") + "/").startswith(
            base.path.rstrip("/") + "/"
        )

    async def _get(self, url: str, token: str | None) -> Any:
        headers = {"Accept": FHIR_JSON}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            response = await self.http.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise _Skip(f"the FHIR server is unreachable ({type(exc).__name__})") from exc
        return response

    async def _fetch(self, fhir_base: str, relative: str, token: str | None) -> Any:
        url = f"{fhir_base.rstrip('/')}/{relative}"
        is_read = "?" not in relative and "/" in relative
        response = await self._get(url, token)
        if is_read and response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            raise _Skip(f"the FHIR server answered {response.status_code}")
        body = _json_object(response)
        if is_read:
            if body.get("resourceType") != relative.split("/", 1)[0]:
                raise _Skip("the read did not answer the resource asked for")
            return body
        entries: list[Any] = []
        seen = {url}
        for _ in range(MAX_PAGES):
            if body.get("resourceType") != "Bundle":
                raise _Skip("the search did not answer a Bundle")
            for entry in body.get("entry") or []:
                if isinstance(entry, dict) and (entry.get("search") or {}).get("mode") != "outcome":
                    entries.append(entry)
            next_url = next(
                (
                    link.get("url")
                    for link in body.get("link") or []
                    if isinstance(link, dict) and link.get("relation") == "next"
                ),
                None,
            )
            if not next_url:
                break
            if not isinstance(next_url, str) or not self._same_server(fhir_base, next_url):
                raise _Skip("a next link points to another server")
            if next_url in seen:
                raise _Skip("the next links loop")
            seen.add(next_url)
            response = await self._get(next_url, token)
            if response.status_code != 200:
                raise _Skip(f"a next page answered {response.status_code}")
            body = _json_object(response)
        else:
            raise _Skip(f"more than {MAX_PAGES} pages")
        if not entries:
            return None
        return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}

    # --- calls -------------------------------------------------------------------------------------------

    async def call(
        self,
        service_id: str,
        hook: str,
        context: Mapping[str, Any],
        *,
        prefetch: Mapping[str, Any] | None = None,
        fhir_server: str | None = None,
        fhir_authorization: Mapping[str, Any] | None = None,
        hook_instance: str | None = None,
    ) -> tuple[int, Any]:
        """POST one hook request; (HTTP status, parsed JSON body). A body that is not JSON comes back as
        ``{"error": {"status": <status>, "message": <text>}}``. Raises `httpx.HTTPError` when the service
        cannot be reached."""
        if fhir_authorization is not None and fhir_server is None:
            raise ValueError("fhirAuthorization needs fhirServer")
        url = self.service_url(service_id)
        body: dict[str, Any] = {
            "hookInstance": hook_instance or str(uuid.uuid4()),
            "hook": hook,
            "context": dict(context),
        }
        if fhir_server is not None:
            body["fhirServer"] = fhir_server
        if fhir_authorization is not None:
            body["fhirAuthorization"] = dict(fhir_authorization)
        if prefetch is not None:
            body["prefetch"] = dict(prefetch)
        response = await self.http.post(
            url, json=body, headers={"Authorization": f"Bearer {self.sign(url)}", "Accept": "application/json"}
        )
        try:
            parsed = response.json()
        except ValueError:
            parsed = {"error": {"status": response.status_code, "message": _error_text(response)}}
        return response.status_code, parsed


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise _Skip("the FHIR server did not answer JSON") from None
    if not isinstance(body, dict):
        raise _Skip("the FHIR server did not answer a JSON object")
    return body


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    except ValueError:
        pass
    return response.text[:500] or response.reason_phrase
