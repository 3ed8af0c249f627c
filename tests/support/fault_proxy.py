"""A misbehaving HTTP proxy in front of a real FHIR server (the sandbox gateway), for the refill scan's
fault tests.

    proxy = FaultProxy("http://127.0.0.1:8000")           # the upstream's origin; FHIR under the same paths
    with serve_app(proxy, port) as base:                   # tests/support/cds_server.serve_app
        proxy.chart_faults["sb-p000007"] = "500"           # chart searches naming that patient answer 500
        proxy.listing_fault = "garbage"                    # the active-order listing (later pages only,
        proxy.listing_pages_from = 2                       #  with listing_pages_from = 2)

Everything else is forwarded unchanged (method, path, query, body, Authorization) and the answer relayed
with the upstream's FHIR base URL rewritten to the proxy's, so the ``next`` links of searches stay on the proxy.
A chart search is a search that names patients (``patient=``, ``subject=``, or ``Patient?_id=``); the
listing is ``MedicationRequest?status=active`` without a patient.

Faults:

- ``500``: an OperationOutcome with status 500.
- ``garbage``: status 200, an HTML body (not JSON).
- ``entry-not-list``: status 200, a searchset Bundle whose ``entry`` is an object.
- ``slow``: answers (500) only after ``slow_s`` seconds, set beyond the client's timeout. `holds` tells a
  client which requests will be held (to give them alone a short timeout).
- ``drop``: starts a 200 answer, sends part of the body and closes the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal
from urllib.parse import parse_qsl

import httpx

Fault = Literal["500", "garbage", "entry-not-list", "slow", "drop"]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_PATIENT_PARAMS = ("patient", "subject")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class ConnectionDropped(Exception):
    """Raised inside the app to make uvicorn abort a half-sent answer."""


class FaultProxy:
    """An ASGI app forwarding to `upstream` (an origin such as ``http://127.0.0.1:8000``), with faults
    switched on by the test. ``seen`` records (kind, path, query) of each request: kind ``chart``,
    ``listing`` or ``other``."""

    def __init__(self, upstream: str, *, fhir_path: str = "/fhir", slow_s: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.fhir_path = fhir_path
        """Only URLs under this path are rewritten (the SMART token endpoint stays the upstream's own, as
        the client assertion's audience must name it)."""
        self.base: str | None = None
        """The proxy's own origin, set on the first request (for rewriting)."""
        self.chart_faults: dict[str, Fault] = {}
        self.listing_fault: Fault | None = None
        self.listing_pages_from = 1
        """The listing fault hits page n and later (page 1 has no ``_offset``)."""
        self.slow_s = slow_s
        self.seen: list[tuple[str, str, str]] = []
        self.faulted: list[tuple[Fault, str]] = []
        self._http: httpx.AsyncClient | None = None

    def clear(self) -> None:
        self.chart_faults.clear()
        self.listing_fault = None
        self.listing_pages_from = 1
        self.seen.clear()
        self.faulted.clear()

    # --- classification ---------------------------------------------------------------------------------

    @staticmethod
    def patients_named(path: str, query: str) -> set[str]:
        out: set[str] = set()
        resource_type = path.rstrip("/").rsplit("/", 1)[-1]
        for name, value in parse_qsl(query, keep_blank_values=True):
            base = name.partition(":")[0]
            if base in _PATIENT_PARAMS or (resource_type == "Patient" and base == "_id"):
                out.update(v.rsplit("/", 1)[-1] for v in value.split(",") if v)
        return out

    def kind(self, path: str, query: str) -> str:
        if self.patients_named(path, query):
            return "chart"
        params = dict(parse_qsl(query))
        if path.rstrip("/").endswith("/MedicationRequest") and params.get("status") == "active":
            return "listing"
        return "other"

    def fault_for(self, kind: str, path: str, query: str) -> Fault | None:
        if kind == "chart":
            for pid in sorted(self.patients_named(path, query)):
                if pid in self.chart_faults:
                    return self.chart_faults[pid]
        elif kind == "listing" and self.listing_fault is not None:
            offset = dict(parse_qsl(query)).get("_offset")
            count = dict(parse_qsl(query)).get("_count")
            page = 1
            if offset and count and offset.isdigit() and count.isdigit() and int(count) > 0:
                page = int(offset) // int(count) + 1
            if page >= self.listing_pages_from:
                return self.listing_fault
        return None

    def holds(self, path: str, query: str) -> bool:
        """Whether the request would meet the ``slow`` fault."""
        return self.fault_for(self.kind(path, query), path, query) == "slow"

    # --- ASGI ----------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.base is None:
            host, port = scope["server"]
            self.base = f"http://{host}:{port}"
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        kind = self.kind(path, query)
        self.seen.append((kind, path, query))
        fault = self.fault_for(kind, path, query)
        if fault is not None:
            self.faulted.append((fault, path))
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
                fault = "500"
            await self._fault(fault, send)
            return
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _HOP_BY_HOP
        }
        url = self.upstream + path + (f"?{query}" if query else "")
        assert self._http is not None
        upstream = await self._http.request(scope["method"], url, content=body or None, headers=headers)
        theirs, ours = self.upstream + self.fhir_path, self.base + self.fhir_path
        content = upstream.content.replace(theirs.encode(), ours.encode())
        out_headers = [
            (k.encode("latin-1"), v.replace(theirs, ours).encode("latin-1"))
            for k, v in upstream.headers.items()
            if k.lower() not in _HOP_BY_HOP
        ]
        out_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._http = httpx.AsyncClient(timeout=60.0, trust_env=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._http is not None:
                    await self._http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _fault(fault: Fault, send: Send) -> None:
        status, content_type, body = 200, "application/fhir+json", b""
        if fault == "500":
            status = 500
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "injected failure"}],
            }
            body = json.dumps(outcome).encode()
        elif fault == "garbage":
            content_type, body = "text/html", b"<html><body>502 Bad Gateway (injected)</body></html>"
        elif fault == "entry-not-list":
            bundle = {"resourceType": "Bundle", "type": "searchset", "entry": {"resource": {"resourceType": "Patient"}}}
            body = json.dumps(bundle).encode()
        elif fault == "drop":
            headers = [(b"content-type", content_type.encode()), (b"content-length", b"10000")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"resourceType":"Bundle","entry":[', "more_body": True})
            raise ConnectionDropped("injected: connection dropped mid-answer")
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
