"""The sandbox EHR assembled as `make run` assembles it (`sandbox.app.create_sandbox_app` with
`default_config`), over real HTTP: the FHIR engine behind the gateway, the imid-rems service with JWT
checks on trusting the sandbox's JWKS *URL*, seeded patients and corpus charts on one server.

What only the assembly can break: the CDS service fetching its fallback data *through the gateway* with the
token the EHR issued (scope-checked), an EHR launch from the launcher page to a FHIR read with the app's
token, the backend client `default_config` registers for the refill scan, and `imid-rems sandbox run`
itself (starts everything, prints one URL, Ctrl-C stops everything).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import httpx
import jwt
import pytest

from sandbox import seed
from sandbox.app import APP_CLIENT_ID, BACKEND_CLIENT_ID, backend_key, create_sandbox_app, default_config
from sandbox.corpus import CorpusScenario, load_corpus
from sandbox.fhir_engine import FhirServer, start_fhir_server
from tests.support.cds_server import CdsServer, Clock, free_port, run_cds_server, serve_app

ROOT = Path(__file__).resolve().parents[2]
STALE = "frp-test-8-days-stale"
CLEAN = "lenalidomide-adult-male-ongoing-clean"
NY = ZoneInfo("America/New_York")


class Stack:
    def __init__(self, fhir: FhirServer, cds: CdsServer, base: str, state: Path, corpus: dict[str, CorpusScenario]):
        self.fhir, self.cds, self.base, self.state, self.corpus = fhir, cds, base, state, corpus


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("sandbox-state")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    today = datetime.now(UTC).astimezone(NY).date()
    with start_fhir_server() as fhir:
        seed.load(fhir.base, seed.generate(6, 3, today))
        corpus = {sc.name: sc for sc in load_corpus(fhir.base, names=[STALE, CLEAN])}
        clients = json.dumps([{"iss": base, "jwks_url": f"{base}/.well-known/jwks.json"}])
        with run_cds_server(
            Clock(),
            database_url=f"sqlite:///{state / 'cds.sqlite'}",
            cds_auth="on",
            cds_clients=clients,
            clinic_tz="America/New_York",
        ) as cds:
            config = default_config(base_url=base, fhir_upstream=fhir.base, service_base=cds.base, state_dir=state)
            with serve_app(create_sandbox_app(config), port):
                yield Stack(fhir, cds, base, state, corpus)


@pytest.fixture
def browser(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=30.0, trust_env=False) as client:
        yield client


def text_of(page: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


def order_form(sc: CorpusScenario) -> dict[str, str]:
    return {
        "drug": "602910",
        "schedule": "21of28",
        "days_supply": "28",
        "quantity": "21",
        "refills": "0",
        "authorization": "47193348",
        "category": "adult-female-rp",
        "prescriber": sc.user_id,
    }


def test_service_trusts_the_sandbox_through_its_jwks_url_and_fetches_through_the_gateway(
    stack: Stack, browser: httpx.Client
) -> None:
    """No prefetch: the service reads the chart from the gateway with the token the EHR issued, so a
    card about the stale test proves JWT trust (JWKS fetched from the sandbox), the token's scopes and the
    gateway's forwarding all work together."""
    sc = stack.corpus[STALE]
    stack.cds.clock.now = sc.now
    page = browser.post(f"/ehr/patients/{sc.patient_id}/sign", data={**order_form(sc), "no_prefetch": "on"})
    assert page.status_code == 200
    text = text_of(page.text)
    assert "pregnancy-test-stale" in text, text[:3000]
    assert "Sent without prefetch" in text


def test_clean_chart_gets_no_rems_card_through_the_gateway(stack: Stack, browser: httpx.Client) -> None:
    sc = stack.corpus[CLEAN]
    stack.cds.clock.now = sc.now
    form = {**order_form(sc), "category": "adult-male", "drug": "602910", "schedule": "21of28"}
    page = browser.post(f"/ehr/patients/{sc.patient_id}/sign", data={**form, "no_prefetch": "on"})
    assert page.status_code == 200
    section = page.text.split('id="hook-order-sign"', 1)[1].split("</section>", 1)[0]
    assert 'role="alert"' not in section, text_of(section)
    assert "Sent without prefetch" in section and "No cards." in section


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def test_ehr_launch_from_the_launcher_reaches_the_fhir_server_with_the_apps_token(
    stack: Stack, browser: httpx.Client
) -> None:
    sc = stack.corpus[STALE]
    launched = browser.post(
        "/ehr/launch", data={"client_id": APP_CLIENT_ID, "user": "Practitioner/x-onc", "patient": sc.patient_id}
    )
    assert launched.status_code == 303
    target = urlsplit(launched.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{stack.cds.base}/smart/launch"
    query = parse_qs(target.query)
    iss, launch = query["iss"][0], query["launch"][0]
    assert iss == f"{stack.base}/fhir"

    # the app's side: discovery at iss, authorize with PKCE, token, FHIR read
    smart = httpx.get(f"{iss}/.well-known/smart-configuration", timeout=10).json()
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(24)
    redirect = f"{stack.cds.base}/smart/callback"
    authorized = browser.get(
        smart["authorization_endpoint"],
        params={
            "response_type": "code",
            "client_id": APP_CLIENT_ID,
            "redirect_uri": redirect,
            "scope": "launch openid fhirUser patient/Patient.rs patient/Observation.rs",
            "state": state,
            "aud": iss,
            "launch": launch,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert authorized.status_code in (302, 303)
    back = urlsplit(authorized.headers["location"])
    assert f"{back.scheme}://{back.netloc}{back.path}" == redirect
    answer = parse_qs(back.query)
    assert answer["state"] == [state]
    token = httpx.post(
        smart["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": answer["code"][0],
            "redirect_uri": redirect,
            "client_id": APP_CLIENT_ID,
            "code_verifier": verifier,
        },
        timeout=10,
    ).json()
    assert token["patient"] == sc.patient_id
    assert token["fhirUser"].endswith("Practitioner/x-onc")
    read = httpx.get(
        f"{iss}/Patient/{sc.patient_id}", headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=10
    )
    assert read.status_code == 200 and read.json()["id"] == sc.patient_id
    other = httpx.get(f"{iss}/Patient", headers={"Authorization": "Bearer not-a-token"}, timeout=10)
    assert other.status_code == 401


def test_backend_client_of_default_config_gets_a_system_token_with_the_state_dir_key(stack: Stack) -> None:
    """`default_config` registers the refill scan's Backend Services client with the key it keeps in the
    state dir: an assertion signed with that key gets a system token that searches across patients."""
    smart = httpx.get(f"{stack.base}/fhir/.well-known/smart-configuration", timeout=10).json()
    key = backend_key(stack.state)
    now = int(time.time())
    assertion = jwt.encode(
        {
            "iss": BACKEND_CLIENT_ID,
            "sub": BACKEND_CLIENT_ID,
            "aud": smart["token_endpoint"],
            "exp": now + 240,
            "iat": now,
            "jti": str(uuid.uuid4()),
        },
        key.private_key,
        algorithm=key.alg,
        headers={"kid": key.kid},
    )
    response = httpx.post(
        smart["token_endpoint"],
        data={
            "grant_type": "client_credentials",
            "scope": "system/MedicationRequest.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    found = httpx.get(
        f"{stack.base}/fhir/MedicationRequest?status=active&_count=100",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert found.status_code == 200
    patients = {e["resource"]["subject"]["reference"] for e in found.json().get("entry", [])}
    assert len(patients) >= 2  # across patients: no patient limit on a system token


# --- `imid-rems sandbox run` (what `make run` starts) -------------------------------------------------------


def _wait_for_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    seen: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(seen)[-3000:]}")


def _children_of(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc), the engine and the service among them."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_sandbox_run_starts_everything_prints_one_url_and_a_signal_stops_all(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    port, service_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("IMID_REMS_CDS_CLIENTS", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cds_hooks.cli",
            "sandbox",
            "run",
            "--port",
            str(port),
            "--service-port",
            str(service_port),
            "--patients",
            "4",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=tmp_path,  # the service's SQLite file lands here, not in the checkout
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = _wait_for_line(process, r"open\s+http://", 90)
        url = re.search(r"open\s+(http://\S+)", line)
        assert url is not None and url.group(1) == f"http://127.0.0.1:{port}/"
        home = httpx.get(url.group(1), timeout=30, trust_env=False)
        assert home.status_code == 200 and "/ehr/patients/" in home.text
        discovery = httpx.get(f"http://127.0.0.1:{service_port}/cds-services", timeout=10, trust_env=False)
        assert discovery.status_code == 401  # the service runs with JWT checks on
        children = _children_of(process.pid)
        assert len(children) >= 2  # the FHIR engine and the service (and what they started)
        os.kill(process.pid, stop_signal)
        assert process.wait(30) == 0
        assert [c for c in children if _alive(c)] == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    for p in (port, service_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{p}/", timeout=2, trust_env=False)
