"""Prefetch templates → data: render the tokens, and fetch from ``fhirServer`` whatever the EHR did not send.

CDS Hooks 2.0 ("Providing FHIR Resources to a CDS Service"): a key the client could not or would not
satisfy is *absent*; a key with no data is ``null``. Absent keys are fetched here, in parallel, with the
request's ``fhirAuthorization.access_token``, following ``next`` links (only on the same server: the
token never leaves it). When neither prefetch nor the server gives the data, the service answers 412.

Nothing here knows which FHIR server answers: plain FHIR REST (read, search, Bundle paging), so the
same code runs against HAPI, Epic, Oracle Health or the Medplum engine the tests use.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
import orjson

from cds_hooks.fhir_client import next_link, outcome_text, redact
from fhir_mappings import InvalidInput

log = logging.getLogger("imid_rems.prefetch")

TOKEN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
MAX_PAGES = 20
"""Pages followed per key. A patient's chart for these queries fits in a few pages; more means a loop
or a server ignoring the query, and we stop rather than hang the prescriber."""
MAX_ENTRIES = 5000
MAX_RESPONSE_BYTES = 10_000_000
MAX_REFERENCE_READS = 20


class FetchFailed(InvalidInput):
    """The FHIR server could not give data the service needs: 412 (CDS Hooks reserves it for this)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"prefetch.{key}", message, 412)


def _user_tokens(user_id: Any) -> dict[str, str]:
    """``userPractitionerId`` etc. from ``context.userId`` (``Practitioner/123``)."""
    if not isinstance(user_id, str) or "/" not in user_id:
        return {}
    rtype, _, rid = user_id.rstrip("/").rpartition("/")
    rtype = rtype.rsplit("/", 1)[-1]
    names = {
        "Practitioner": "userPractitionerId",
        "PractitionerRole": "userPractitionerRoleId",
        "Patient": "userPatientId",
        "RelatedPerson": "userRelatedPersonId",
    }
    return {names[rtype]: rid} if rtype in names and rid else {}


def render(template: str, context: Mapping[str, Any]) -> str | None:
    """The template with its tokens replaced, or None when a token has no value in this context (the
    query cannot be asked: e.g. ``{{userPractitionerId}}`` when the user is a PractitionerRole)."""
    values: dict[str, str] = _user_tokens(context.get("userId"))
    for name, value in context.items():
        if isinstance(value, str | int) and not isinstance(value, bool):
            values[f"context.{name}"] = str(value)
    missing = False

    def sub(match: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(match.group(1))
        if value is None:
            missing = True
            return ""
        return quote(value, safe="")

    out = TOKEN.sub(sub, template)
    return None if missing else out


def missing_keys(templates: Mapping[str, str], prefetch: Mapping[str, Any] | None) -> list[str]:
    """Template keys the client did not send at all (``null`` counts as sent: it means "no data")."""
    sent = prefetch or {}
    return [k for k in templates if k not in sent]


def check_fhir_server(url: str) -> str:
    """``fhirServer`` must be an absolute http(s) URL with a host: anything else is a 400 naming it,
    before any request is made."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise InvalidInput("fhirServer", f"not a valid URL: {url[:100]!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("fhirServer", f"expected an absolute http(s) URL, got {url[:100]!r}")
    return url


@dataclass(frozen=True)
class FhirSource:
    base: str
    token: str | None

    def url(self, relative: str) -> str:
        return urljoin(self.base.rstrip("/") + "/", relative.lstrip("/"))

    def same_server(self, url: str) -> bool:
        a, b = urlsplit(self.base), urlsplit(url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc) and b.path.startswith(a.path.rstrip("/"))

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/fhir+json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.HTTPError):
        return f"unreachable ({type(exc).__name__})"
    return type(exc).__name__


async def _get_json(client: httpx.AsyncClient, source: FhirSource, url: str, key: str) -> Any:
    try:
        response = await client.get(url, headers=source.headers())
    except httpx.HTTPError as exc:
        raise FetchFailed(key, f"fhirServer {_describe(exc)} for {redact(url)}") from None
    if response.status_code in (404, 410):
        return None
    if response.status_code >= 400:
        detail = outcome_text(response.content, 160)
        raise FetchFailed(key, f"fhirServer answered {response.status_code} for {redact(url)}{detail}")
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise FetchFailed(key, f"fhirServer answer over {MAX_RESPONSE_BYTES} bytes for {redact(url)}")
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise FetchFailed(key, f"fhirServer answered something that is not JSON for {redact(url)}") from None
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FetchFailed(key, f"fhirServer answered JSON that is not a FHIR resource for {redact(url)}")
    return body


async def fetch_key(client: httpx.AsyncClient, source: FhirSource, key: str, relative: str) -> Any:
    """One template's data: a resource (read), a searchset Bundle with every page's entries, or None."""
    url = source.url(relative)
    first = await _get_json(client, source, url, key)
    if first is None or first.get("resourceType") != "Bundle":
        return first
    entries = list(first.get("entry") or [])
    page, seen = first, {url}
    for _ in range(MAX_PAGES - 1):
        nxt = next_link(page)
        if nxt is None:
            break
        nxt = urljoin(url, nxt)
        if not source.same_server(nxt):
            raise FetchFailed(key, "fhirServer sent a next link to another server; the token is not sent there")
        if nxt in seen:
            break
        seen.add(nxt)
        page = await _get_json(client, source, nxt, key)
        if page is None or page.get("resourceType") != "Bundle":
            raise FetchFailed(key, "fhirServer's next page is not a Bundle")
        entries.extend(page.get("entry") or [])
        if len(entries) > MAX_ENTRIES:
            raise FetchFailed(key, f"more than {MAX_ENTRIES} resources; the query is too broad for this server")
    else:
        if next_link(page) is not None:
            raise FetchFailed(key, f"more than {MAX_PAGES} pages; stopped rather than keep the prescriber waiting")
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


async def fetch_missing(
    client: httpx.AsyncClient,
    source: FhirSource,
    templates: Mapping[str, str],
    keys: Iterable[str],
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Every missing key fetched in parallel. A template whose tokens this context cannot fill (no user)
    gives ``None``: nothing can be asked, which is what ``null`` means."""
    jobs: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key in keys:
        relative = render(templates[key], context)
        if relative is None:
            out[key] = None
        else:
            jobs[key] = fetch_key(client, source, key, relative)
    if jobs:
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        for key, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, InvalidInput):
                    raise result
                raise FetchFailed(key, f"fhirServer request failed ({type(result).__name__})") from result
            out[key] = result
    return out


def _relative(target: Any) -> str | None:
    """``Type/id`` of a literal reference (relative or absolute), or None (contained, logical, junk)."""
    if not isinstance(target, str) or target.startswith("#"):
        return None
    parts = target.rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha() and parts[-1]:
        return f"{parts[-2]}/{parts[-1]}"
    return None


def _referenced(resources: Iterable[Any]) -> set[str]:
    """What IMiD-relevant orders and dispenses point to and the rules read: the Medication
    (``medicationReference``) and ``supportingInformation`` (where some EHRs keep the risk category)."""
    refs: set[str] = set()
    for res in resources:
        if not isinstance(res, dict) or res.get("resourceType") not in ("MedicationRequest", "MedicationDispense"):
            continue
        med = res.get("medicationReference")
        targets = [med.get("reference") if isinstance(med, dict) else None]
        info = res.get("supportingInformation")
        if isinstance(info, list):
            targets.extend(i.get("reference") for i in info if isinstance(i, dict))
        refs.update(r for r in map(_relative, targets) if r is not None)
    return refs


def _present(values: Iterable[Any]) -> Iterable[Any]:
    for value in values:
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            for entry in value.get("entry") or []:
                if isinstance(entry, dict):
                    yield entry.get("resource")
        else:
            yield value


async def fetch_referenced(
    client: httpx.AsyncClient, source: FhirSource, drafts: Any, prefetch: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Resources that orders point to but nobody sent (prefetch templates cannot ``_include``): read
    them, in parallel, so an Epic-style order (medication by reference) is recognised and a category kept
    in ``supportingInformation`` is seen. None when nothing is missing."""
    resources = list(_present([drafts, *prefetch.values()]))
    have = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources if isinstance(r, dict)}
    wanted = sorted(_referenced(resources) - have)[:MAX_REFERENCE_READS]
    if not wanted:
        return None
    found = await asyncio.gather(
        *(
            _get_json(client, source, source.url(ref), "medications" if ref.startswith("Medication/") else "referenced")
            for ref in wanted
        )
    )
    entries = [{"resource": r} for r in found if isinstance(r, dict) and r.get("resourceType") != "OperationOutcome"]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
