"""The service's own FHIR client for population work (the refill scan, approvals' write-back), with a SMART
Backend Services token (`cds_hooks.backend_auth`).

Everything the server answers is checked before it is used: a status other than 2xx, a body that is not JSON,
JSON that is not the expected resource, a Bundle whose ``entry`` is not a list of objects, a next link to
another server: each raises `FhirError` with a message that names the request (path only: queries carry
patient ids, which stay out of messages and logs) and what was wrong. A 401 drops the cached token and the
request is tried once more with a new one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Protocol
from urllib.parse import urljoin, urlsplit

import httpx
import orjson

from cds_hooks.backend_auth import BackendAuth, BackendAuthError

FHIR_JSON: Final = "application/fhir+json"
MAX_RESPONSE_BYTES: Final = 50_000_000
MAX_PAGES: Final = 10_000

Json = dict[str, Any]


class FhirError(RuntimeError):
    """A FHIR request that failed, or whose answer could not be used. ``retryable``: the server was
    down, slow or answered 5xx/429 (the next attempt may succeed); False for 4xx and garbage."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def redact(url: str) -> str:
    """The path without the query (patient ids stay out of messages)."""
    parts = urlsplit(url)
    return parts.path + ("?…" if parts.query else "")


def outcome_text(content: bytes, limit: int = 200) -> str:
    """``": <the OperationOutcome's first message>"`` (at most `limit` characters), or "" when there is none."""
    try:
        issue = orjson.loads(content)["issue"][0]
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        return f": {str(text)[:limit]}" if text else ""
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return ""


class TokenSource(Protocol):
    """Where a client's bearer token comes from: `BackendAuth` (the service's own), or a SMART app session's
    user token (`smart_app.web`). `forget` is called after a 401 (the next `token` gets a new one)."""

    async def token(self) -> str: ...

    def forget(self) -> None: ...


class FhirClient:
    """Reads and writes on one FHIR server. `auth` None: no Authorization header (an open server)."""

    def __init__(self, base: str, http: httpx.AsyncClient, auth: TokenSource | BackendAuth | None) -> None:
        self.base = base.rstrip("/") + "/"
        self.http = http
        self.auth = auth

    def url(self, relative: str) -> str:
        return urljoin(self.base, relative.lstrip("/"))

    def same_server(self, url: str) -> bool:
        a, b = urlsplit(self.base), urlsplit(url)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc) and b.path.startswith(a.path.rstrip("/"))

    async def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {"Accept": FHIR_JSON}
        if self.auth is not None:
            try:
                headers["Authorization"] = f"Bearer {await self.auth.token()}"
            except BackendAuthError as exc:
                raise FhirError(f"no access token: {exc}") from None
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        expect: str | None = None,
    ) -> tuple[int, Json | None, httpx.Headers]:
        """One request; returns (status, parsed body or None when empty, headers). `expect`: the
        resourceType the body must be."""
        content = orjson.dumps(body) if body is not None else None
        extra = dict(headers or {})
        if content is not None:
            extra["Content-Type"] = FHIR_JSON
        for attempt in (1, 2):
            try:
                response = await self.http.request(method, url, content=content, headers=await self._headers(extra))
            except httpx.TimeoutException:
                raise FhirError(f"FHIR server timed out on {method} {redact(url)}") from None
            except httpx.HTTPError as exc:
                raise FhirError(f"FHIR server unreachable ({type(exc).__name__}) on {method} {redact(url)}") from None
            if response.status_code == 401 and self.auth is not None and attempt == 1:
                self.auth.forget()
                continue
            break
        status = response.status_code
        if status >= 400:
            retryable = status >= 500 or status in (408, 429)
            raise FhirError(
                f"FHIR server answered {status} on {method} {redact(url)}{outcome_text(response.content)}",
                status=status,
                retryable=retryable,
            )
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise FhirError(f"FHIR answer over {MAX_RESPONSE_BYTES} bytes on {method} {redact(url)}", retryable=False)
        if not response.content.strip():
            return status, None, response.headers
        try:
            parsed = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FhirError(f"FHIR server answered something that is not JSON on {method} {redact(url)}") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
            raise FhirError(f"FHIR server answered JSON that is not a FHIR resource on {method} {redact(url)}")
        if expect is not None and parsed["resourceType"] != expect:
            raise FhirError(
                f"FHIR server answered a {str(parsed['resourceType'])[:40]}, not a {expect}, on {method} {redact(url)}"
            )
        return status, parsed, response.headers

    async def read(self, relative: str) -> Json | None:
        """A resource, or None when the server says it does not exist (404/410)."""
        try:
            _, body, _ = await self.request("GET", self.url(relative))
        except FhirError as exc:
            if exc.status in (404, 410):
                return None
            raise
        return body

    async def pages(self, relative: str) -> AsyncIterator[list[Json]]:
        """The matching resources of a search, one page at a time (following ``next`` links on the same
        server). Entries whose ``search.mode`` is ``outcome`` (server messages) are left out."""
        url = self.url(relative)
        seen = {url}
        for _ in range(MAX_PAGES):
            _, bundle, _ = await self.request("GET", url, expect="Bundle")
            if bundle is None:
                raise FhirError(f"FHIR server answered an empty body on GET {redact(url)}")
            yield _entries(bundle, url)
            nxt = next_link(bundle)
            if nxt is None:
                return
            nxt = urljoin(url, nxt)
            if not self.same_server(nxt):
                raise FhirError(f"FHIR server sent a next link to another server on GET {redact(url)}", retryable=False)
            if nxt in seen:
                return
            seen.add(nxt)
            url = nxt
        raise FhirError(f"more than {MAX_PAGES} pages on GET {redact(url)}", retryable=False)

    async def search(self, relative: str) -> list[Json]:
        """Every matching resource, all pages."""
        out: list[Json] = []
        async for page in self.pages(relative):
            out.extend(page)
        return out


def next_link(bundle: Mapping[str, Any]) -> str | None:
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def _entries(bundle: Mapping[str, Any], url: str) -> list[Json]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise FhirError(f"FHIR Bundle.entry is not a list on GET {redact(url)}", retryable=False)
    out: list[Json] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise FhirError(f"FHIR Bundle.entry[{i}] is not an object on GET {redact(url)}", retryable=False)
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise FhirError(f"FHIR Bundle.entry[{i}].resource is not a resource on GET {redact(url)}", retryable=False)
        out.append(resource)
    return out
