"""Faults on FHIR *writes*: an ASGI wrapper around a forwarding proxy (`tests.support.fault_proxy.FaultProxy`)
that misbehaves on transaction POSTs (``POST <fhir_path>``) only, for the refill approval's write-back tests.

    proxy = FaultProxy(sandbox_origin)
    writes = WriteFaults(proxy)                 # serve `writes` instead of `proxy`
    writes.fault = "500"                        # the transaction answers 500, nothing is forwarded
    writes.fault = "lost-504"                   # forwarded (it lands), then the answer is replaced by a 504
    writes.fault = "lost-drop"                  # forwarded (it lands), then the connection is cut mid-answer
    writes.delay_s = 1.5                        # forwarded after a pause (a write in flight)

Everything else goes to the wrapped app unchanged. ``transactions`` counts the transaction POSTs seen,
``forwarded`` those that reached the upstream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

WriteFault = Literal["500", "lost-504", "lost-drop"]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class AnswerLost(Exception):
    """Raised inside the app to make uvicorn abort a half-sent answer (the connection is cut)."""


class WriteFaults:
    def __init__(self, inner: App, *, fhir_path: str = "/fhir") -> None:
        self.inner = inner
        self.fhir_path = fhir_path.rstrip("/")
        self.fault: WriteFault | None = None
        self.delay_s = 0.0
        self.transactions = 0
        self.forwarded = 0

    def clear(self) -> None:
        self.fault = None
        self.delay_s = 0.0

    def is_transaction(self, scope: Scope) -> bool:
        path: str = scope.get("path", "")
        return scope["type"] == "http" and scope.get("method") == "POST" and path.rstrip("/") == self.fhir_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.is_transaction(scope):
            await self.inner(scope, receive, send)
            return
        self.transactions += 1
        fault = self.fault
        if fault == "500":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "injected transaction failure"}],
            }
            await _answer(send, 500, json.dumps(outcome).encode())
            return
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fault is None:
            await self.inner(scope, receive, send)
            self.forwarded += 1
            return

        async def swallow(_: Message) -> None:
            return None

        await self.inner(scope, receive, swallow)  # it lands upstream; its answer never reaches the caller
        self.forwarded += 1
        if fault == "lost-504":
            await _answer(send, 504, b"<html><body>504 Gateway Timeout (injected)</body></html>", "text/html")
            return
        headers = [(b"content-type", b"application/fhir+json"), (b"content-length", b"10000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"resourceType":"Bundle","entry":[', "more_body": True})
        raise AnswerLost("injected: the transaction's answer was cut off")


async def _answer(send: Send, status: int, body: bytes, content_type: str = "application/fhir+json") -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
