"""Start and stop the sandbox FHIR R4 server (sandbox/fhir_server: Medplum's FHIR engine in memory, run by Node).

The same engine serves the integration tests and the sandbox EHR of `make run`. The product never imports
this. ``start_fhir_server()`` returns a running server whose ``base`` is the FHIR base URL
(``http://127.0.0.1:PORT/fhir/R4``); use it as a context manager or call ``stop()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
PINNED_NODE = SERVER_DIR / "node_modules" / "node" / "bin" / "node"
START_TIMEOUT_SECONDS = 20.0
NPM_CI_TIMEOUT_SECONDS = 600.0
FHIR_JSON = "application/fhir+json"


class FhirServerError(RuntimeError):
    """The test FHIR server could not be installed or started; the message says why, with its output."""


def _installed_marker() -> Path:
    # npm writes this hidden lockfile on every install: its age is the age of node_modules.
    return SERVER_DIR / "node_modules" / ".package-lock.json"


def _node_modules_current() -> bool:
    marker = _installed_marker()
    lock = SERVER_DIR / "package-lock.json"
    return marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Serialise ``npm ci`` between test runs started at the same time in the same checkout."""
    with (SERVER_DIR / ".npm-ci.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_node_modules() -> None:
    """Run ``npm ci`` in sandbox/fhir_server when node_modules is missing or older than package-lock.json."""
    if _node_modules_current():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise FhirServerError("npm is not on PATH: it is needed once to install sandbox/fhir_server (npm ci)")
    with _install_lock():
        if _node_modules_current():
            return
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-4000:]
            raise FhirServerError(f"npm ci in {SERVER_DIR} failed with exit code {result.returncode}:\n{output}")


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    match = re.match(r"v(\d+)\.", version.strip())
    if match is None:
        raise FhirServerError(f"cannot read the version of {node}: {version!r}")
    return int(match.group(1))


def node_command() -> list[str]:
    """The Node that runs the server: the one pinned in package.json, else the system's (>= 22, or 20/21 with
    ``--experimental-websocket``, which Medplum's core needs as a global on those versions)."""
    if os.access(PINNED_NODE, os.X_OK):
        return [str(PINNED_NODE)]
    system = shutil.which("node")
    if system is None:
        raise FhirServerError(f"no Node: neither {PINNED_NODE} (run npm ci in {SERVER_DIR}) nor node on PATH")
    major = _node_major(system)
    if major >= 22:
        return [system]
    if major >= 20:
        return [system, "--experimental-websocket"]
    raise FhirServerError(f"{system} is Node {major}; the test FHIR server needs Node 20 or newer")


class FhirServer:
    """A running test FHIR server. ``base`` is its FHIR base URL, without a trailing slash."""

    def __init__(self, process: subprocess.Popen[bytes], command: list[str], workdir: Path) -> None:
        self.process = process
        self.command = command
        self.base = ""
        self._workdir = workdir

    @property
    def stderr(self) -> str:
        """What the server wrote on stderr so far."""
        path = self._workdir / "stderr.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_until_ready(self, deadline: float) -> None:
        stdout = self._workdir / "stdout.txt"
        while not self.base:
            if self.process.poll() is not None:
                raise FhirServerError(self._failure(f"exited with code {self.process.returncode} before listening"))
            first_line = stdout.read_text().partition("\n")
            if first_line[1]:
                self.base = json.loads(first_line[0])["base"]
                break
            if time.monotonic() > deadline:
                raise FhirServerError(self._failure("did not print its base URL in time"))
            time.sleep(0.05)
        last_error = ""
        while True:
            try:
                response = httpx.get(f"{self.base}/metadata", timeout=2.0)
                if response.status_code == 200:
                    return
                last_error = f"GET /metadata answered {response.status_code}"
            except httpx.HTTPError as error:
                last_error = f"GET /metadata failed: {error!r}"
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise FhirServerError(self._failure(f"is not answering ({last_error})"))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        return f"test FHIR server ({' '.join(self.command)}) {what}; its stderr:\n{self.stderr[-4000:]}"

    def stop(self) -> None:
        """Stop the server (its whole process group) and remove its output files. Safe to call twice."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> FhirServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def start_fhir_server(
    load: Sequence[Path] = (),
    require_token: str | None = None,
    *,
    timeout: float = START_TIMEOUT_SECONDS,
) -> FhirServer:
    """Start a fresh, empty (or ``load``-ed) server on a free port of 127.0.0.1 and wait until /metadata answers.

    ``load``: transaction/batch Bundle files, or directories of them, loaded before the server listens.
    ``require_token``: every request other than ``GET /metadata`` and CORS preflights then needs
    ``Authorization: Bearer <token>``, else 401.
    """
    ensure_node_modules()
    command = [*node_command(), str(SERVER_DIR / "server.mjs"), "--port", "0"]
    for path in load:
        command += ["--load", str(path)]
    if require_token is not None:
        command += ["--require-token", require_token]
    workdir = Path(tempfile.mkdtemp(prefix="fhir-test-server-"))
    with (workdir / "stdout.txt").open("wb") as stdout, (workdir / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=SERVER_DIR, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
        )
    server = FhirServer(process, command, workdir)
    try:
        server._wait_until_ready(time.monotonic() + timeout)
    except BaseException:
        server.stop()
        raise
    return server


def post_bundle(base: str, bundle: dict[str, Any], *, token: str | None = None) -> dict[str, Any]:
    """POST a transaction or batch Bundle to ``base`` and return the response Bundle.

    Raises ``FhirServerError`` unless the server answers 200 and every entry has a 2xx status.
    """
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx.post(base, json=bundle, headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise FhirServerError(f"POST {bundle.get('type')} Bundle answered {response.status_code}: {response.text}")
    result: dict[str, Any] = response.json()
    failed = [e for e in result.get("entry", []) if not str(e.get("response", {}).get("status", "")).startswith("2")]
    if failed:
        raise FhirServerError(f"{len(failed)} Bundle entries failed: {json.dumps(failed)[:4000]}")
    return result
