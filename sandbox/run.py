"""``imid-rems sandbox run`` (what `make run` starts): the local stack, and one URL to open.

1. The FHIR engine (Medplum's, under Node) on a free loopback port, loaded at start with the synthetic
   IMiD population (`sandbox.seed`, deterministic for ``--patients`` / ``--seed`` and today's date) and
   then with the scenario corpus (`sandbox.corpus`).
2. The imid-rems CDS Hooks service (``imid-rems serve``, a child process) on ``--service-port``, with JWT
   checks ON, trusting exactly one CDS client: this sandbox, whose public key it fetches from
   ``{sandbox}/.well-known/jwks.json``. Its database is the embedded default (a SQLite file).
3. The sandbox EHR (`sandbox.app`) on ``--port``, in this process: SMART authorization server and FHIR
   gateway, the launcher and the page that fires the CDS hooks.

Ctrl-C (or SIGTERM) stops all three. If a child dies, everything stops and says which one.
Keys the sandbox generates live in ``--state-dir`` (default ``.sandbox/``, ignored by git).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".sandbox"
START_TIMEOUT_S = 60.0


class SandboxError(RuntimeError):
    """The stack could not start; the message says which part and why."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SandboxError(f"{what} exited with code {process.returncode} while starting (see its log above)")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise SandboxError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT_S:.0f} s")


def service_env(
    *,
    sandbox_base: str,
    service_base: str,
    database_url: str | None = None,
    backend_key_file: Path | None = None,
) -> dict[str, str]:
    """The imid-rems service's settings: auth on, one trusted CDS client (this sandbox); with
    `backend_key_file`, the sandbox's FHIR gateway as the EHR for the refill scan (every 5 minutes) and the
    review API, through the ``imid-rems-backend`` Backend Services client."""
    env = dict(os.environ)
    if backend_key_file is not None:
        env.update(
            {
                "IMID_REMS_FHIR_BASE_URL": f"{sandbox_base}/fhir",
                "IMID_REMS_BACKEND_CLIENT_ID": "imid-rems-backend",
                "IMID_REMS_BACKEND_KEY_FILE": str(backend_key_file),
                "IMID_REMS_REFILL_SCAN_INTERVAL_S": "300",
            }
        )
    env.update(
        {
            "IMID_REMS_CDS_AUTH": "on",
            "IMID_REMS_CDS_CLIENTS": json.dumps(
                [{"iss": sandbox_base, "jwks_url": f"{sandbox_base}/.well-known/jwks.json"}]
            ),
            "IMID_REMS_PUBLIC_BASE_URL": service_base,
            "IMID_REMS_SMART_LAUNCH_URL": f"{service_base}/smart/launch",
            "IMID_REMS_SMART_ISSUERS": f"{sandbox_base}/fhir",
            "IMID_REMS_SMART_CLIENT_ID": "imid-rems-app",
        }
    )
    if database_url:
        env["IMID_REMS_DATABASE_URL"] = database_url
    return env


@contextlib.contextmanager
def service_process(host: str, port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``imid-rems serve`` as a child in its own process group (stopped with it)."""
    if not _port_free(host, port):
        raise SandboxError(f"port {port} on {host} is taken: stop what uses it or pass --service-port")
    command = [sys.executable, "-m", "cds_hooks.cli", "serve", "--host", host, "--port", str(port)]
    # cwd: the invoking directory, so the default SQLite file (imid-rems.sqlite) lands where `make run` runs
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(host, port, process, "the imid-rems service")
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def _watch(
    server: Any, banner: str, started: float, children: dict[str, subprocess.Popen[bytes]], stopping: threading.Event
) -> None:
    """Print the URL once the sandbox listens; then stop the stack (as Ctrl-C would) if a child dies."""
    while not server.started and not stopping.wait(0.05):
        pass
    if server.started:
        sys.stdout.write(banner.replace("is up:", f"is up ({time.monotonic() - started:.1f} s):"))
        sys.stdout.flush()
    while not stopping.wait(0.5):
        for name, child in children.items():
            if child.poll() is not None:
                sys.stderr.write(f"sandbox: {name} exited with code {child.returncode}; stopping everything\n")
                server.should_exit = True
                return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imid-rems sandbox run", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="interface for the sandbox and the service (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="the sandbox EHR's port: the URL to open (default 8080)")
    p.add_argument("--service-port", type=int, default=8000, help="the imid-rems service's port (default 8000)")
    p.add_argument("--patients", type=int, default=50, help="synthetic patients to seed (default 50)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic population (default 1)")
    p.add_argument("--tz", default="America/New_York", help="the clinic's IANA time zone (default America/New_York)")
    p.add_argument("--no-corpus", action="store_true", help="do not load the scenario corpus")
    p.add_argument("--state-dir", default=str(STATE_DIR), help="where the sandbox keeps its keys and seed files")
    return p


class _Terminated(Exception):
    """SIGTERM, turned into an exception so every `finally` stops what it started."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # uvicorn handles Ctrl-C / SIGTERM itself, then restores this handler and re-raises the signal: with the
    # default SIGTERM action the process would die there, leaving the FHIR engine and the service running.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except (KeyboardInterrupt, _Terminated):  # everything this started is stopped by now
        sys.stdout.write("imid-rems sandbox: stopped\n")
        return 0
    except SandboxError as exc:
        sys.stderr.write(f"imid-rems sandbox: {exc}\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from sandbox import corpus, seed
    from sandbox.app import BACKEND_KEY_FILE, backend_key, create_sandbox_app, default_config
    from sandbox.fhir_engine import FhirServerError, start_fhir_server

    host = args.host
    sandbox_base = f"http://{host}:{args.port}"
    service_base = f"http://{host}:{args.service_port}"
    if not _port_free(host, args.port):
        raise SandboxError(f"port {args.port} on {host} is taken: stop what uses it or pass --port")
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    zone = ZoneInfo(args.tz)
    today = datetime.now(UTC).astimezone(zone).date()

    started = time.monotonic()
    seed_dir = state / "seed"
    for old in seed_dir.glob("*.json"):
        old.unlink()
    seed.write(seed_dir, seed.generate(args.patients, args.seed, today, args.tz))
    try:
        fhir = start_fhir_server(load=[seed_dir])
    except FhirServerError as exc:
        raise SandboxError(str(exc)) from None
    try:
        if not args.no_corpus:
            corpus.load_corpus(fhir.base)
        config = default_config(
            base_url=sandbox_base, fhir_upstream=fhir.base, service_base=service_base, state_dir=state
        )
        app = create_sandbox_app(config)
        backend_key(state)  # created on first use; the service signs its Backend Services assertions with it
        env = service_env(
            sandbox_base=sandbox_base, service_base=service_base, backend_key_file=state / BACKEND_KEY_FILE
        )
        with service_process(host, args.service_port, env) as service:
            config_ = uvicorn.Config(app, host=host, port=args.port, log_level="warning", access_log=False)
            server = uvicorn.Server(config_)
            banner = (
                "\n"
                f"  imid-rems sandbox is up: open  {sandbox_base}/\n"
                f"  ({args.patients} synthetic patients{'' if args.no_corpus else ' + the scenario corpus'}; "
                f"imid-rems service at {service_base}/cds-services; Ctrl-C stops everything)\n\n"
            )
            stopping = threading.Event()
            children = {"the imid-rems service": service, "the FHIR engine": fhir.process}
            watcher = threading.Thread(target=_watch, args=(server, banner, started, children, stopping), daemon=True)
            watcher.start()
            try:
                server.run()  # in this thread: it handles Ctrl-C / SIGTERM and returns
            finally:
                stopping.set()
    finally:
        fhir.stop()
    return 0
