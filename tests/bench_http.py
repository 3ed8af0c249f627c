"""`make bench`: order-sign over HTTP, next to a trivial FastAPI endpoint receiving the same body.

Each server runs alone in its own process (uvicorn, one worker, uvloop + httptools); the load comes
from this process over loopback keep-alive connections, with a minimal HTTP/1.1 client (a few µs a
request) so the client is not what is measured. Reported: p50/p99 latency at concurrency 1 and 10,
throughput, and the ratio to the bare endpoint. Timing never decides a test; this only reports.

The bare endpoint reads the body, parses it as JSON (orjson) and answers ``{"cards": []}``: what any
endpoint receiving a CDS Hooks call must at least do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parent.parent
PATH = "/cds-services/imid-rems-order-sign"


# --- the servers -------------------------------------------------------------------------------------


def bare_app() -> Any:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(b'{"cards":[]}', media_type="application/json")

    return app


def serve(kind: str, port: int, now: str | None, db: str, clients: str | None) -> None:
    import uvicorn

    if kind == "bare":
        app = bare_app()
    else:
        from cds_hooks.app import create_app
        from cds_hooks.settings import Settings

        settings = Settings(
            database_url=f"sqlite:///{db}",
            cds_auth="on" if clients else "off",
            cds_clients=clients or "[]",
            public_base_url=f"http://127.0.0.1:{port}",
        )
        fixed = datetime.fromisoformat(now) if now else None
        app = create_app(settings, now=(lambda: fixed) if fixed else None)
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop", http="httptools"
    )


# --- the client --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request_bytes(port: int, body: bytes, token: str | None) -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    return status, body


@dataclass
class Result:
    latencies: list[float]
    elapsed: float

    def pct(self, p: float) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(p * len(s)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed


async def load(port: int, payloads: list[bytes], concurrency: int, check: bytes) -> Result:
    queue = list(reversed(payloads))
    latencies: list[float] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                payload = queue.pop()
                t0 = time.perf_counter()
                writer.write(payload)
                status, body = await read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200 or body != check:
                    raise SystemExit(f"unexpected answer {status}: {body[:300]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(latencies, time.perf_counter() - t0)


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def start(kind: str, now: str, db: str, clients: str | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.bench_http", "serve", kind, str(port), "--now", now, "--db", db]
    if clients:
        cmd += ["--clients", clients]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONHASHSEED": "0"})
    wait_port(port, proc)
    return proc, port


def main() -> int:
    from tests.support.jwt_keys import client_config, ec_key, rsa_key, sign, write_jwks
    from tests.support.large_request import count_resources, large_order_sign

    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    args = ap.parse_args()
    raw, now, _zone = large_order_sign()
    body = orjson.dumps(raw)
    n = args.requests
    rows: list[tuple[str, int, Result]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ec384, rs384 = ec_key(alg="ES384"), rsa_key(alg="RS384")
        clients = client_config(jwks_path=write_jwks(Path(tmp) / "jwks.json", ec384, rs384))
        for kind in ("bare", "imid", "imid-auth", "imid-auth-rs"):
            key = rs384 if kind == "imid-auth-rs" else ec384
            server_kind = "bare" if kind == "bare" else "imid"
            proc, port = start(
                server_kind,
                now.isoformat(),
                str(Path(tmp) / f"{kind}.sqlite"),
                clients if kind == "imid-auth" else None,
            )
            try:
                aud = f"http://127.0.0.1:{port}{PATH}"

                def payloads(
                    count: int, port: int = port, aud: str = aud, kind: str = kind, key: Any = key
                ) -> list[bytes]:
                    if "auth" not in kind:
                        return [request_bytes(port, body, None)] * count
                    # one fresh token (unique jti) per request, signed before the clock starts
                    return [request_bytes(port, body, sign(key, aud=aud, lifetime_s=240)) for _ in range(count)]

                check = b'{"cards":[]}'
                asyncio.run(load(port, payloads(500), 4, check))  # warm-up
                for conc in (1, 10):
                    rows.append((kind, conc, asyncio.run(load(port, payloads(n), conc, check))))
            finally:
                proc.terminate()
                proc.wait(10)
    out = sys.stdout
    out.write(
        f"order-sign over HTTP, {count_resources(raw)}-resource prefetch ({len(body) // 1024} kB body), "
        f"{n} requests per row, one uvicorn worker, this machine\n"
    )
    bare = {c: r for k, c, r in rows if k == "bare"}
    out.write(f"  {'server':<22}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'vs bare':>9}\n")
    for kind, conc, r in rows:
        label = {
            "bare": "bare FastAPI endpoint",
            "imid": "imid-rems (auth off)",
            "imid-auth": "imid-rems (ES384 JWT)",
            "imid-auth-rs": "imid-rems (RS384 JWT)",
        }[kind]
        ratio = r.rps / bare[conc].rps
        out.write(f"  {label:<22}{conc:>5}{r.pct(0.5):>9.2f}{r.pct(0.99):>9.2f}{r.rps:>9.0f}{ratio:>8.0%}\n")
    out.write(json.dumps({f"{k}-c{c}": {"p50": r.pct(0.5), "p99": r.pct(0.99), "rps": r.rps} for k, c, r in rows}))
    out.write("\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("kind")
        p.add_argument("port", type=int)
        p.add_argument("--now")
        p.add_argument("--db", default=":memory:")
        p.add_argument("--clients")
        a = p.parse_args()
        serve(a.kind, a.port, a.now, a.db, a.clients)
    else:
        sys.exit(main())
