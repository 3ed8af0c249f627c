"""CDS Hooks client JWTs over real HTTP (authentication on): what the service accepts, what it refuses
with a 401 that says why, and the replay cache shared by two app instances on one database.

Tokens are made with tests/support/jwt_keys.py; the service trusts one client (``ISS``) whose JWK Set
(an ES384 and an RS384 key) is a file. The ``aud`` is the exact URL called, so tokens are signed per
endpoint once the server's port is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from cds_hooks.db import make_engine, read_feedback
from tests.support import postgres
from tests.support.cds_server import CdsServer, Clock, run_cds_server
from tests.support.fhir_load import rule_codes, scenario
from tests.support.jwt_keys import (
    ISS,
    SigningKey,
    client_config,
    default_keys,
    ec_key,
    hmac_token,
    sign,
    unsigned_token,
    write_jwks,
)

NY = "America/New_York"
PUBLIC = "https://cds.example.org"
SIGN_PATH = "/cds-services/imid-rems-order-sign"
SELECT_PATH = "/cds-services/imid-rems-order-select"
FEEDBACK_PATH = f"{SIGN_PATH}/feedback"
SCENARIO = "frp-test-8-days-stale"


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``cds_clients`` JSON: one client whose JWK Set file holds the default ES384 and RS384 keys."""
    path = write_jwks(tmp_path_factory.mktemp("jwks") / "jwks.json", *default_keys())
    return client_config(ISS, jwks_path=path)


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('cds-auth') / 'service.sqlite'}"


@pytest.fixture(scope="module")
def server(clients: str, db_url: str) -> Iterator[CdsServer]:
    sc = scenario(SCENARIO)
    with run_cds_server(Clock(sc.now), database_url=db_url, cds_auth="on", cds_clients=clients, clinic_tz=NY) as s:
        yield s


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ec() -> SigningKey:
    return default_keys()[0]


def call(http: httpx.Client, server: CdsServer, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET discovery, or POST the scenario's order-sign request / an empty-ish feedback to `path`."""
    if path == "/cds-services":
        return http.get(server.url(path), headers=headers)
    if path.endswith("/feedback"):
        item = {"card": "00000000-0000-4000-8000-000000000000", "outcome": "overridden"}
        item["outcomeTimestamp"] = "2026-11-21T15:00:00Z"
        return http.post(server.url(path), json={"feedback": [item]}, headers=headers)
    return http.post(server.url(path), json=scenario(SCENARIO).request, headers=headers)


def assert_401(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["status"] == 401
    assert error["field"] == "Authorization"
    assert re.search(message, error["message"]), error["message"]
    assert "cards" not in response.json()


# --- accepted ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ES384", "RS384"])
def test_valid_tokens_are_accepted_on_discovery_hook_and_feedback(
    http: httpx.Client, server: CdsServer, db_url: str, which: str
) -> None:
    key = next(k for k in default_keys() if k.alg == which)
    discovery = http.get(server.url("/cds-services"), headers=bearer(sign(key, aud=server.url("/cds-services"))))
    assert discovery.status_code == 200, discovery.text
    assert len(discovery.json()["services"]) == 4

    sc = scenario(SCENARIO)
    sc.request["hookInstance"] = f"auth-{which}"
    hook = http.post(server.url(SIGN_PATH), json=sc.request, headers=bearer(sign(key, aud=server.url(SIGN_PATH))))
    assert hook.status_code == 200, hook.text
    assert rule_codes(hook.json()) == sc.codes
    card = hook.json()["cards"][0]

    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-21T15:00:00Z"}
    item["overrideReason"] = {"reason": card["overrideReasons"][0]}
    feedback = http.post(
        server.url(FEEDBACK_PATH), json={"feedback": [item]}, headers=bearer(sign(key, aud=server.url(FEEDBACK_PATH)))
    )
    assert feedback.status_code == 200, feedback.text
    engine = make_engine(db_url)
    try:
        [stored] = read_feedback(engine, card_uuid=card["uuid"])
    finally:
        engine.dispose()
    assert stored.client_iss == ISS
    assert stored.rule_code == card["source"]["topic"]["code"]


def test_aud_may_be_a_list_holding_the_url(http: httpx.Client, server: CdsServer) -> None:
    token = sign(ec(), aud=[server.url(SELECT_PATH), server.url(SIGN_PATH)])
    assert call(http, server, SIGN_PATH, bearer(token)).status_code == 200


# --- refused -------------------------------------------------------------------------------------------------


def _payload(server: CdsServer, **extra: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    return {"iss": ISS, "aud": server.url(SIGN_PATH), "iat": now, "exp": now + 60, "jti": f"j-{now}", **extra}


Refused = Callable[[CdsServer], dict[str, str]]
REFUSED: list[tuple[str, Refused, str]] = [
    ("no-header", lambda s: {}, "no Authorization header"),
    ("not-bearer", lambda s: {"Authorization": "Basic dXNlcjpwdw=="}, "must be 'Bearer <JWT>'"),
    ("not-a-jwt", lambda s: bearer("abc.def"), "malformed JWT"),
    ("wrong-key", lambda s: bearer(sign(ec_key("ec-1"), aud=s.url(SIGN_PATH))), "signature does not verify"),
    ("unknown-kid", lambda s: bearer(sign(ec_key("ec-9"), aud=s.url(SIGN_PATH))), "unknown kid"),
    ("aud-other-service", lambda s: bearer(sign(ec(), aud=s.url(SELECT_PATH))), "aud .* is not this endpoint"),
    ("aud-discovery", lambda s: bearer(sign(ec(), aud=s.url("/cds-services"))), "aud .* is not this endpoint"),
    ("aud-trailing-slash", lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH) + "/")), "aud .* is not this endpoint"),
    (
        "aud-other-host",
        lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH).replace("127.0.0.1", "localhost"))),
        "aud .* is not this endpoint",
    ),
    (
        "expired",
        lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH), now=datetime.now(UTC) - timedelta(minutes=10))),
        "expired",
    ),
    (
        "issued-in-the-future",
        lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH), now=datetime.now(UTC) + timedelta(minutes=3))),
        "in the future",
    ),
    ("long-lived", lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH), lifetime_s=3600)), "short-lived"),
    ("no-jti", lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH), omit=["jti"])), "no jti claim"),
    ("alg-none", lambda s: bearer(unsigned_token(_payload(s), {"kid": "ec-1"})), "alg 'none' is not accepted"),
    (
        "hs256-with-public-key",
        lambda s: bearer(hmac_token(default_keys()[1].public_pem(), _payload(s), {"kid": "rsa-1"})),
        "alg 'HS256' is not accepted",
    ),
    (
        "unknown-iss",
        lambda s: bearer(sign(ec(), aud=s.url(SIGN_PATH), iss="https://evil.example.org")),
        "unknown issuer",
    ),
]


@pytest.mark.parametrize(("make", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_a_bad_token_is_401_saying_why(http: httpx.Client, server: CdsServer, make: Refused, message: str) -> None:
    assert_401(call(http, server, SIGN_PATH, make(server)), message)


@pytest.mark.parametrize("path", ["/cds-services", SIGN_PATH, FEEDBACK_PATH])
def test_every_endpoint_needs_a_token(http: httpx.Client, server: CdsServer, path: str) -> None:
    assert_401(call(http, server, path, {}), "no Authorization header")
    assert_401(call(http, server, path, bearer(sign(ec(), aud=server.url("/elsewhere")))), "not this endpoint")


def test_refused_feedback_stores_nothing(http: httpx.Client, server: CdsServer, db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        before = len(read_feedback(engine))
        token = sign(ec(), aud=server.url(SIGN_PATH))  # a token for the hook, not for its feedback
        assert_401(call(http, server, FEEDBACK_PATH, bearer(token)), "not this endpoint")
        assert len(read_feedback(engine)) == before
    finally:
        engine.dispose()


def test_a_replayed_jti_is_refused(http: httpx.Client, server: CdsServer) -> None:
    token = sign(ec(), aud=server.url(SIGN_PATH))
    assert call(http, server, SIGN_PATH, bearer(token)).status_code == 200
    assert_401(call(http, server, SIGN_PATH, bearer(token)), "already used: replay refused")
    # The same jti in a freshly signed token is a replay too: the id is what counts.
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert_401(call(http, server, SIGN_PATH, bearer(sign(ec(), aud=server.url(SIGN_PATH), jti=jti))), "replay")


# --- behind a proxy: the public base URL is the audience -------------------------------------------------


def test_public_base_url_is_the_audience(http: httpx.Client, clients: str, tmp_path: Path) -> None:
    sc = scenario(SCENARIO)
    url = f"sqlite:///{tmp_path / 'public.sqlite'}"
    with run_cds_server(
        Clock(sc.now), database_url=url, cds_auth="on", cds_clients=clients, clinic_tz=NY, public_base_url=PUBLIC
    ) as s:
        ok = call(http, s, SIGN_PATH, bearer(sign(ec(), aud=PUBLIC + SIGN_PATH)))
        assert ok.status_code == 200, ok.text
        assert rule_codes(ok.json()) == sc.codes
        assert call(http, s, "/cds-services", bearer(sign(ec(), aud=PUBLIC + "/cds-services"))).status_code == 200
        assert_401(call(http, s, SIGN_PATH, bearer(sign(ec(), aud=s.url(SIGN_PATH)))), "not this endpoint")
        assert_401(call(http, s, SIGN_PATH, bearer(sign(ec(), aud=PUBLIC + SELECT_PATH))), "not this endpoint")


# --- two instances, one database: a token is used once across both ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'replicas.sqlite'}"
    else:
        with postgres.fresh_database() as url:
            yield url


def test_two_instances_refuse_a_token_replayed_across_them(
    http: httpx.Client, clients: str, shared_database: str
) -> None:
    """Two replicas behind one public URL (so one ``aud`` fits both) on one database."""
    sc = scenario(SCENARIO)
    settings: dict[str, Any] = {
        "database_url": shared_database,
        "cds_auth": "on",
        "cds_clients": clients,
        "clinic_tz": NY,
        "public_base_url": PUBLIC,
    }
    with run_cds_server(Clock(sc.now), **settings) as a, run_cds_server(Clock(sc.now), **settings) as b:
        first = sign(ec(), aud=PUBLIC + SIGN_PATH)
        assert call(http, a, SIGN_PATH, bearer(first)).status_code == 200
        assert_401(call(http, b, SIGN_PATH, bearer(first)), "already used: replay refused")
        second = sign(default_keys()[1], aud=PUBLIC + SIGN_PATH)
        assert call(http, b, SIGN_PATH, bearer(second)).status_code == 200
        assert_401(call(http, a, SIGN_PATH, bearer(second)), "already used: replay refused")


# --- browsers: CORS works with authentication on ------------------------------------------------------------


def test_cors_preflight_needs_no_token_and_a_401_is_readable(http: httpx.Client, server: CdsServer) -> None:
    origin = {"Origin": "https://ehr.example.org"}
    preflight = http.options(
        server.url(SIGN_PATH),
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = http.post(server.url(SIGN_PATH), json=scenario(SCENARIO).request, headers=origin)
    assert_401(refused, "no Authorization header")
    assert refused.headers["access-control-allow-origin"] in ("*", origin["Origin"])


# --- the audience is ours, not the caller's to choose -------------------------------------------------------


def test_the_host_header_cannot_choose_the_audience(http: httpx.Client, server: CdsServer) -> None:
    other = "http://other-cds.example.org"
    token = sign(ec(), aud=other + SIGN_PATH)
    response = http.post(
        server.url(SIGN_PATH),
        json=scenario(SCENARIO).request,
        headers={**bearer(token), "Host": "other-cds.example.org"},
    )
    # 401 (aud is not this endpoint) or a refusal of the unknown Host; never the hook's answer.
    assert response.status_code in (400, 401, 421), response.text
    assert "cards" not in response.json()
