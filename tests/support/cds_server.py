"""Run the real CDS Hooks app under uvicorn on a free loopback port, in a thread, for HTTP tests.

Tests talk to it with httpx over real sockets, so routing, middleware (CORS), body limits, the
``aud`` of the JWT (the exact URL called) and lifespan (database migration) are what production runs.
The clock is a mutable cell so one server can evaluate scenarios written for different days.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn

from cds_hooks.app import create_app
from cds_hooks.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now


@dataclass
class CdsServer:
    base: str
    clock: Clock
    app: Any

    def url(self, path: str) -> str:
        return self.base + path


@contextmanager
def serve_app(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve any ASGI app under uvicorn on a loopback port (free unless given), in a thread; yields
    its base URL (``http://127.0.0.1:PORT``). Lifespan runs, as in production."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app did not start under uvicorn (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def run_cds_server(clock: Clock | None = None, **settings: Any) -> Iterator[CdsServer]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    clock = clock or Clock()
    settings.setdefault("public_base_url", base)  # the URL tests call is the service's own URL (JWT aud)
    app = create_app(Settings(**settings), now=clock)
    with serve_app(app, port):
        yield CdsServer(base, clock, app)
