"""SMART Backend Services from the service's side (`cds_hooks.backend_auth`), against the sandbox's real
authorization server and FHIR gateway over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from cds_hooks.backend_auth import BackendAuth, BackendAuthError, BackendCredentials
from sandbox.app import BACKEND_CLIENT_ID, backend_key, create_sandbox_app, default_config
from sandbox.ehr_keys import generate_key
from sandbox.fhir_engine import start_fhir_server
from tests.support.cds_server import free_port, serve_app


class Sandbox:
    def __init__(self, base: str, state: Path) -> None:
        self.base, self.state = base, state

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    state = tmp_path_factory.mktemp("backend-auth")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_fhir_server() as fhir:
        config = default_config(
            base_url=base, fhir_upstream=fhir.base, service_base="http://127.0.0.1:9", state_dir=state
        )
        with serve_app(create_sandbox_app(config), port):
            yield Sandbox(base, state)


def credentials(sandbox: Sandbox, **changes: object) -> BackendCredentials:
    key = backend_key(sandbox.state)
    values: dict[str, object] = {
        "client_id": BACKEND_CLIENT_ID,
        "private_key": key.private_key,
        "kid": key.kid,
        "alg": key.alg,
        "scope": "system/MedicationRequest.rs",
    }
    values.update(changes)
    return BackendCredentials(**values)  # type: ignore[arg-type]


class Counting:
    def __init__(self) -> None:
        self.token_posts = 0

    async def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path.endswith("/auth/token"):
            self.token_posts += 1


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_token_opens_the_fhir_gateway_for_a_system_search(sandbox: Sandbox) -> None:
    async def go() -> int:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            auth = BackendAuth(sandbox.fhir, credentials(sandbox), http)
            token = await auth.token()
            found = await http.get(
                f"{sandbox.fhir}/MedicationRequest?status=active", headers={"Authorization": f"Bearer {token}"}
            )
            denied = await http.get(f"{sandbox.fhir}/Observation", headers={"Authorization": f"Bearer {token}"})
            assert denied.status_code == 403  # the scope asked for was MedicationRequest only
            return found.status_code

    assert run(go()) == 200


def test_assertion_claims_follow_backend_services(sandbox: Sandbox) -> None:
    creds = credentials(sandbox)
    auth = BackendAuth(sandbox.fhir, creds, httpx.AsyncClient())
    token = auth.assertion("https://ehr.example/token")
    header = jwt.get_unverified_header(token)
    assert header["kid"] == creds.kid and header["alg"] == "ES384"
    claims = jwt.decode(
        token,
        backend_key(sandbox.state).private_key.public_key(),
        algorithms=["ES384"],
        audience="https://ehr.example/token",
    )
    assert claims["iss"] == claims["sub"] == BACKEND_CLIENT_ID
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert auth.assertion("https://ehr.example/token") != token  # a fresh jti each time


def test_token_is_cached_until_shortly_before_it_expires_and_shared_by_concurrent_callers(sandbox: Sandbox) -> None:
    now = [1_000_000.0]
    counting = Counting()

    async def go() -> tuple[set[str], int, str]:
        async with httpx.AsyncClient(trust_env=False, timeout=10, event_hooks={"request": [counting]}) as http:
            auth = BackendAuth(sandbox.fhir, credentials(sandbox), http, clock=lambda: now[0])
            first = await asyncio.gather(*(auth.token() for _ in range(5)))
            posts = counting.token_posts
            now[0] += 300 - 20  # within the last 30 s of a 300 s token: renewed
            renewed = await auth.token()
            return set(first), posts, renewed

    tokens, posts, renewed = run(go())  # type: ignore[misc]
    assert len(tokens) == 1 and posts == 1
    assert renewed not in tokens and counting.token_posts == 2


def test_a_key_the_server_does_not_know_is_refused_with_the_servers_error(sandbox: Sandbox) -> None:
    stranger = generate_key()

    async def go() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            creds = credentials(sandbox, private_key=stranger.private_key)  # right kid, wrong key
            await BackendAuth(sandbox.fhir, creds, http).token()

    with pytest.raises(BackendAuthError, match=r"answered 40[01] \(invalid_client"):
        run(go())


def test_no_smart_configuration_is_a_clear_error() -> None:
    async def go() -> None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
            await BackendAuth(f"http://127.0.0.1:{free_port()}/fhir", BackendCredentials("x", None, "k"), http).token()

    with pytest.raises(
        BackendAuthError, match=r"SMART discovery at http://127\.0\.0\.1:\d+/fhir/\.well-known/smart-configuration"
    ):
        run(go())


def test_only_the_algorithms_backend_services_names() -> None:
    with pytest.raises(ValueError, match="alg must be one of"):
        BackendCredentials("x", None, "k", alg="HS256")
