"""CDS Hooks client JWT checks (cds_hooks.auth): what passes, and each refusal by its message.

No network: JWK Sets come from files, or from a tiny HTTP server on 127.0.0.1 for the URL cache
policy. The replay cache is an in-memory SQLite database; the clock is the ``now`` argument (fixed at
a non-UTC offset) and, for the JWKS cache, a fake monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import jwt
import pytest
from sqlalchemy import Engine

from cds_hooks import db
from cds_hooks.auth import (
    AuthError,
    CdsClient,
    Claims,
    ClientConfigError,
    JwksStore,
    JwksUnavailable,
    ReplayCache,
    bearer_token,
    load_clients,
    parse_jwks,
    verify,
)
from tests.support.jwt_keys import (
    AUD,
    ISS,
    SigningKey,
    b64url,
    default_keys,
    ec_key,
    hmac_token,
    jwks,
    rsa_key,
    sign,
    unsigned_token,
    write_jwks,
)

T = TypeVar("T")
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=ZoneInfo("America/New_York"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class KeysNeverTouched(JwksStore):
    """A store that fails the test if verify() asks it for a key."""

    def __init__(self) -> None:
        super().__init__([])
        self.asked: list[tuple[str, str]] = []

    async def key(self, client: CdsClient, kid: str, alg: str) -> jwt.PyJWK:
        self.asked.append((kid, alg))
        raise AssertionError("a key was looked up for a token that should have been refused first")


@pytest.fixture
def engine() -> Iterator[Engine]:
    e = db.make_engine("sqlite://")
    db.migrate(e)
    yield e
    e.dispose()


@dataclass
class Env:
    """One trusted client (ISS) whose JWKS file holds the default EC (ES384) and RSA (RS384) keys."""

    clients: tuple[CdsClient, ...]
    keys: JwksStore
    replay: ReplayCache
    ec: SigningKey
    rsa: SigningKey
    jwks_path: Path

    def check(self, token: str, *, audience: str = AUD, now: datetime = NOW, keys: JwksStore | None = None) -> Claims:
        return run(
            verify(token, audience=audience, clients=self.clients, keys=keys or self.keys, replay=self.replay, now=now)
        )

    def refused(self, token: str, **kwargs: Any) -> str:
        with pytest.raises(AuthError) as caught:
            self.check(token, **kwargs)
        return caught.value.message


@pytest.fixture
def env(tmp_path: Path, engine: Engine) -> Env:
    ec, rsa = default_keys()
    path = write_jwks(tmp_path / "jwks.json", ec, rsa)
    clients = load_clients(json.dumps([{"iss": ISS, "jwks_path": str(path)}]))
    return Env(clients, JwksStore(clients), ReplayCache(engine), ec, rsa, path)


# --- accepted -----------------------------------------------------------------------------------


def test_valid_es384_token_passes(env: Env) -> None:
    token = sign(env.ec, now=NOW, jti="jti-es384", claims={"tenant": "clinic-7", "sub": "ehr-client"})
    claims = env.check(token)
    assert (claims.iss, claims.aud, claims.jti, claims.tenant, claims.sub) == (
        ISS,
        AUD,
        "jti-es384",
        "clinic-7",
        "ehr-client",
    )
    assert (claims.alg, claims.kid) == ("ES384", "ec-1")
    assert claims.expires_at == NOW + timedelta(seconds=60)
    assert claims.expires_at.tzinfo is not None and claims.issued_at == NOW


def test_valid_rs384_token_passes(env: Env) -> None:
    claims = env.check(sign(env.rsa, now=NOW))
    assert (claims.alg, claims.kid, claims.iss) == ("RS384", "rsa-1", ISS)


@pytest.mark.parametrize("make", [lambda: ec_key("ec-256", "ES256"), lambda: rsa_key("rsa-256", "RS256")])
def test_es256_and_rs256_also_pass(make: Any, tmp_path: Path, engine: Engine) -> None:
    key: SigningKey = make()
    clients = (CdsClient(ISS, jwks_path=write_jwks(tmp_path / "k.json", key)),)
    claims = run(
        verify(
            sign(key, now=NOW),
            audience=AUD,
            clients=clients,
            keys=JwksStore(clients),
            replay=ReplayCache(engine),
            now=NOW,
        )
    )
    assert claims.alg == key.alg


def test_aud_may_be_a_list_containing_the_endpoint(env: Env) -> None:
    assert env.check(sign(env.ec, now=NOW, aud=["https://other.example.org/x", AUD])).aud == AUD


def test_a_refused_token_does_not_use_up_its_jti(env: Env) -> None:
    """A token refused for its audience must not burn the jti: the right token with it still passes."""
    assert "is not this endpoint" in env.refused(sign(env.ec, now=NOW, jti="j-1", aud="https://elsewhere/x"))
    assert env.check(sign(env.ec, now=NOW, jti="j-1")).jti == "j-1"


# --- time -----------------------------------------------------------------------------------------


def test_expired_token_is_refused(env: Env) -> None:
    message = env.refused(sign(env.ec, now=NOW - timedelta(minutes=10)))
    assert message.startswith("JWT expired at 2026-11-21T14:51:00Z")


def test_exp_leeway_boundary(env: Env) -> None:
    """Accepted up to and including exp + 30 s; one second later it is expired."""
    issued = NOW - timedelta(seconds=60)  # exp = NOW
    assert env.check(sign(env.ec, now=issued, lifetime_s=60), now=NOW + timedelta(seconds=30)).jti
    message = env.refused(sign(env.ec, now=issued, lifetime_s=60), now=NOW + timedelta(seconds=31))
    assert message == "JWT expired at 2026-11-21T15:00:00Z (now 2026-11-21T15:00:31Z, leeway 30 s)"


def test_iat_leeway_boundary(env: Env) -> None:
    assert env.check(sign(env.ec, now=NOW + timedelta(seconds=30)))
    message = env.refused(sign(env.ec, now=NOW + timedelta(seconds=31)))
    assert message.startswith("JWT iat 2026-11-21T15:00:31Z is in the future")


def test_long_lived_token_is_refused(env: Env) -> None:
    """exp at most 5 minutes (+ leeway) ahead: a day-long token is a day-long replay window."""
    assert env.check(sign(env.ec, now=NOW, lifetime_s=330))
    message = env.refused(sign(env.ec, now=NOW, lifetime_s=331))
    assert "is more than 300 s ahead" in message


def test_nbf_in_the_future_is_refused(env: Env) -> None:
    message = env.refused(sign(env.ec, now=NOW, claims={"nbf": int(NOW.timestamp()) + 120}))
    assert message.startswith("JWT not valid before 2026-11-21T15:02:00Z")


def test_non_numeric_exp_is_refused(env: Env) -> None:
    message = env.refused(sign(env.ec, now=NOW, claims={"exp": "tomorrow"}))
    assert message == "JWT exp must be a number of seconds since 1970-01-01T00:00:00Z"


# --- signature and keys ---------------------------------------------------------------------------


def test_valid_signature_by_another_key_with_the_same_kid_is_refused(env: Env) -> None:
    impostor = ec_key(kid=env.ec.kid)
    assert env.refused(sign(impostor, now=NOW)) == f"JWT signature does not verify with key 'ec-1' of issuer {ISS!r}"


def test_tampered_payload_is_refused(env: Env) -> None:
    head, _body, signature = sign(env.rsa, now=NOW).split(".")
    forged = {"iss": ISS, "aud": AUD, "iat": int(NOW.timestamp()), "exp": int(NOW.timestamp()) + 60, "jti": "x"}
    message = env.refused(f"{head}.{b64url(json.dumps(forged).encode())}.{signature}")
    assert message.startswith("JWT signature does not verify")


def test_alg_none_is_refused_before_any_key_is_used(env: Env) -> None:
    keys = KeysNeverTouched()
    claims = {"iss": ISS, "aud": AUD, "iat": int(NOW.timestamp()), "exp": int(NOW.timestamp()) + 60, "jti": "n"}
    message = env.refused(unsigned_token(claims, {"kid": "rsa-1"}), keys=keys)
    assert message == "JWT alg 'none' is not accepted; sign with one of ES384, RS384, ES256, RS256"
    assert keys.asked == []


def test_hs256_signed_with_the_public_key_pem_is_refused_before_any_key_is_used(env: Env) -> None:
    """Key confusion: HMAC "signed" with the client's public RSA key as the secret."""
    keys = KeysNeverTouched()
    claims = {"iss": ISS, "aud": AUD, "iat": int(NOW.timestamp()), "exp": int(NOW.timestamp()) + 60, "jti": "h"}
    token = hmac_token(env.rsa.public_pem(), claims, {"kid": "rsa-1"})
    assert env.refused(token, keys=keys).startswith("JWT alg 'HS256' is not accepted")
    assert keys.asked == []
    # and with the real store the outcome is the same (no key is ever turned into an HMAC secret)
    assert env.refused(token).startswith("JWT alg 'HS256' is not accepted")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "ES512", "PS256", "EdDSA", "", None])
def test_other_algorithms_are_refused(env: Env, alg: str | None) -> None:
    claims = {"iss": ISS, "aud": AUD, "iat": int(NOW.timestamp()), "exp": int(NOW.timestamp()) + 60, "jti": "a"}
    token = unsigned_token(claims, {"alg": alg, "kid": "ec-1"})
    assert env.refused(token).startswith(f"JWT alg {alg!r} is not accepted")


def test_unknown_kid_is_refused(env: Env) -> None:
    stranger = ec_key(kid="not-in-the-jwks")
    assert env.refused(sign(stranger, now=NOW)) == f"unknown kid 'not-in-the-jwks' for issuer {ISS!r}"


def test_missing_kid_is_refused(env: Env) -> None:
    token = jwt.encode({"iss": ISS}, env.ec.private_key, algorithm="ES384", headers={"typ": "JWT"})
    assert env.refused(token) == "JWT header has no kid"


def test_key_type_must_match_alg(env: Env) -> None:
    """An ES384 header naming the RSA key's kid: refused for the key type, not tried."""
    liar = SigningKey(kid="rsa-1", alg="ES384", private_key=env.ec.private_key)
    assert (
        env.refused(sign(liar, now=NOW))
        == f"key 'rsa-1' of issuer {ISS!r} is RSA (alg RS384), which cannot verify ES384"
    )


def test_es256_token_cannot_use_a_p384_key(env: Env) -> None:
    p256 = ec_key(kid="ec-1", alg="ES256")
    assert env.refused(sign(p256, now=NOW)).endswith("is EC P-384 (alg ES384), which cannot verify ES256")


def test_oct_keys_in_the_jwks_are_ignored(tmp_path: Path, engine: Engine) -> None:
    """A shared-secret key in the JWK Set is never used, even for a kid the token names."""
    ec = default_keys()[0]
    oct_key = {"kty": "oct", "kid": "shared", "k": b64url(b"secret-secret-secret-secret-1234")}
    clients = (CdsClient(ISS, jwks_path=write_jwks(tmp_path / "k.json", ec, extra=[oct_key])),)
    token = jwt.encode(
        {"iss": ISS, "aud": AUD, "iat": int(NOW.timestamp()), "exp": int(NOW.timestamp()) + 60, "jti": "o"},
        ec.private_key,
        algorithm="ES384",
        headers={"kid": "shared"},
    )
    with pytest.raises(AuthError, match="unknown kid 'shared'"):
        run(verify(token, audience=AUD, clients=clients, keys=JwksStore(clients), replay=ReplayCache(engine), now=NOW))
    assert set(parse_jwks(json.dumps(jwks(ec, extra=[oct_key])))) == {"ec-1"}


def test_parse_jwks_keeps_only_public_signature_keys() -> None:
    ec, rsa = default_keys()
    weak = rsa_key(kid="weak", bits=1024)
    private = {**ec.public_jwk(), "kid": "with-d", "d": "AAAA"}
    encryption = {**ec.public_jwk(), "kid": "enc", "use": "enc"}
    p521 = {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}
    usable = parse_jwks(json.dumps(jwks(ec, rsa, weak, extra=[private, encryption, p521, {"kty": "RSA"}])))
    assert set(usable) == {"ec-1", "rsa-1", "with-d"}
    assert "d" not in usable["with-d"][0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ('{"keys": "x"}', "not a JWK Set: no 'keys' list"),
        ('{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}', "no usable key"),
    ],
)
def test_a_bad_jwks_file_stops_the_service_at_start(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ClientConfigError, match=message) as caught:
        JwksStore([CdsClient(ISS, jwks_path=path)])
    assert str(path) in str(caught.value)


def test_a_missing_jwks_file_stops_the_service_at_start(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match="cannot read: No such file or directory"):
        JwksStore([CdsClient(ISS, jwks_path=tmp_path / "absent.json")])


# --- claims ---------------------------------------------------------------------------------------


def test_wrong_audience_is_refused(env: Env) -> None:
    token = sign(env.ec, now=NOW, aud="https://cds.example.org/cds-services/another-service")
    assert env.refused(token) == (
        f"JWT aud 'https://cds.example.org/cds-services/another-service' is not this endpoint {AUD!r}"
    )


def test_audience_must_match_exactly(env: Env) -> None:
    """No prefix or trailing-slash leniency: aud is the exact URL called."""
    assert "is not this endpoint" in env.refused(sign(env.ec, now=NOW, aud=AUD + "/"))
    assert "is not this endpoint" in env.refused(sign(env.ec, now=NOW, aud=["https://cds.example.org"]))


@pytest.mark.parametrize("claim", ["jti", "exp", "iat", "aud", "iss"])
def test_missing_required_claim_is_refused(env: Env, claim: str) -> None:
    message = env.refused(sign(env.ec, now=NOW, omit=[claim]))
    assert message == f"JWT has no {claim} claim"


def test_empty_jti_is_refused(env: Env) -> None:
    assert env.refused(sign(env.ec, now=NOW, jti="")) == "JWT has no jti claim"


def test_replayed_jti_is_refused(env: Env) -> None:
    token = sign(env.ec, now=NOW, jti="once")
    env.check(token)
    assert env.refused(token) == f"JWT jti 'once' of issuer {ISS!r} was already used: replay refused"
    # a different token (RSA-signed, later) reusing the jti is a replay too
    later = NOW + timedelta(seconds=20)
    assert "already used" in env.refused(sign(env.rsa, now=later, jti="once"), now=later)


def test_jti_is_remembered_per_issuer(tmp_path: Path, engine: Engine) -> None:
    a, b = ec_key("a"), ec_key("b")
    clients = (
        CdsClient("https://ehr-a.example.org", jwks_path=write_jwks(tmp_path / "a.json", a)),
        CdsClient("https://ehr-b.example.org", jwks_path=write_jwks(tmp_path / "b.json", b)),
    )
    keys, replay = JwksStore(clients), ReplayCache(engine)
    for key, iss in ((a, clients[0].iss), (b, clients[1].iss)):
        token = sign(key, iss=iss, now=NOW, jti="shared-jti")
        assert run(verify(token, audience=AUD, clients=clients, keys=keys, replay=replay, now=NOW)).iss == iss


def test_unknown_issuer_is_refused(env: Env) -> None:
    token = sign(env.ec, now=NOW, iss="https://evil.example.com")
    assert env.refused(token) == "unknown issuer 'https://evil.example.com': not a trusted CDS client"


def test_jku_pointing_elsewhere_is_refused(env: Env) -> None:
    token = sign(env.ec, now=NOW, headers={"jku": "https://evil.example.com/jwks.json"})
    assert env.refused(token) == (
        f"JWT jku 'https://evil.example.com/jwks.json' is not the JWK Set URL configured for issuer {ISS!r}"
    )


def test_typ_other_than_jwt_is_refused(env: Env) -> None:
    assert env.refused(sign(env.ec, now=NOW, headers={"typ": "at+jwt"})) == "JWT typ 'at+jwt' is not 'JWT'"


def test_configured_sub_must_match(tmp_path: Path, engine: Engine) -> None:
    ec = default_keys()[0]
    clients = (CdsClient(ISS, jwks_path=write_jwks(tmp_path / "k.json", ec), sub="epic-client-1"),)
    keys, replay = JwksStore(clients), ReplayCache(engine)
    good = sign(ec, now=NOW, claims={"sub": "epic-client-1"})
    assert run(verify(good, audience=AUD, clients=clients, keys=keys, replay=replay, now=NOW)).sub == "epic-client-1"
    bad = sign(ec, now=NOW, claims={"sub": "someone-else"})
    with pytest.raises(AuthError) as caught:
        run(verify(bad, audience=AUD, clients=clients, keys=keys, replay=replay, now=NOW))
    assert caught.value.message == f"JWT sub 'someone-else' is not the client_id configured for issuer {ISS!r}"


# --- garbage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "no bearer token"),
        ("   ", "no bearer token"),
        ("abc", "malformed JWT: expected three base64url parts separated by dots"),
        ("a.b", "malformed JWT: expected three base64url parts separated by dots"),
        ("a.b.c.d", "malformed JWT: expected three base64url parts separated by dots"),
        ("a.b.c", "malformed JWT: Invalid header padding"),
        (b64url(b"[1,2]") + ".e30.", "malformed JWT: Invalid header string: must be a json object"),
        (b64url(b'{"alg":"ES384"}') + "." + b64url(b"not json") + ".", "malformed JWT: Invalid payload string"),
        ("x" * 20_000, "JWT longer than 16384 characters"),
    ],
)
def test_garbage_tokens_are_refused(env: Env, token: str, message: str) -> None:
    assert env.refused(token).startswith(message)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc.def.ghi  ", "abc.def.ghi"),
    ],
)
def test_bearer_token_parses_the_header(header: str, expected: str) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "no Authorization header"),
        ("", "no Authorization header"),
        ("Basic dXNlcjpwdw==", "must be 'Bearer <JWT>'"),
        ("Bearer", "must be 'Bearer <JWT>'"),
    ],
)
def test_bearer_token_refuses_other_headers(header: str | None, message: str) -> None:
    with pytest.raises(AuthError, match=message):
        bearer_token(header)


# --- client configuration -------------------------------------------------------------------------


def test_load_clients_reads_both_kinds() -> None:
    clients = load_clients(
        json.dumps(
            [
                {"iss": "https://a.example.org", "jwks_url": "https://a.example.org/jwks", "sub": "cid"},
                {"iss": "https://b.example.org", "jwks_path": "/etc/imid-rems/b.json"},
                {"iss": "local", "jwks_url": "http://127.0.0.1:8765/jwks"},
                {"iss": "local2", "jwks_url": "http://localhost/jwks"},
            ]
        )
    )
    assert clients[0] == CdsClient("https://a.example.org", jwks_url="https://a.example.org/jwks", sub="cid")
    assert clients[1].jwks_path == Path("/etc/imid-rems/b.json")
    assert [c.iss for c in clients] == ["https://a.example.org", "https://b.example.org", "local", "local2"]
    assert load_clients("[]") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "cds_clients: not valid JSON"),
        ('{"iss": "x"}', "cds_clients: expected a JSON list of clients, got dict"),
        ('["x"]', "cds_clients[0]: expected an object, got str"),
        ('[{"jwks_url": "https://a/j"}]', "cds_clients[0].iss: missing"),
        ('[{"iss": "", "jwks_url": "https://a/j"}]', "cds_clients[0].iss: must be a non-empty string"),
        ('[{"iss": "a"}]', "cds_clients[0]: give exactly one of jwks_url and jwks_path"),
        ('[{"iss": "a", "jwks_url": "https://a/j", "jwks_path": "/j"}]', "cds_clients[0]: give exactly one of"),
        ('[{"iss": "a", "jwks_uri": "https://a/j"}]', "cds_clients[0].jwks_uri: unknown field"),
        ('[{"iss": "a", "jwks_path": " "}]', "cds_clients[0].jwks_path: must not be empty"),
        (
            '[{"iss": "a", "jwks_url": "http://ehr.example.org/j"}]',
            "cds_clients[0].jwks_url: 'http://ehr.example.org/j'",
        ),
        ('[{"iss": "a", "jwks_url": "ftp://a/j"}]', "cds_clients[0].jwks_url: 'ftp://a/j' must be an https:// URL"),
        ('[{"iss": "a", "jwks_url": 7}]', "cds_clients[0].jwks_url: must be a string, got int"),
        ('[{"iss": "a", "jwks_path": "/j", "sub": ""}]', "cds_clients[0].sub: must be a non-empty string"),
        (
            '[{"iss": "a", "jwks_path": "/j"}, {"iss": "a", "jwks_path": "/k"}]',
            "cds_clients[1].iss: 'a' is already cds_clients[0]",
        ),
    ],
)
def test_load_clients_names_the_bad_item_and_field(text: str, message: str) -> None:
    with pytest.raises(ClientConfigError) as caught:
        load_clients(text)
    assert str(caught.value).startswith(message)


# --- JWK Set from a URL (local HTTP server) --------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose answer the test controls; counts the requests."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.status = 200
        self.delay_s = 0.0
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.delay_s:
                    time.sleep(server.delay_s)
                self.send_response(server.status)
                if server.status in (301, 302):
                    self.send_header("Location", "https://evil.example.com/jwks.json")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up (timeout/size tests) is expected, not an error to print

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, *keys: SigningKey) -> None:
        self.body = json.dumps(jwks(*keys)).encode()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@dataclass
class UrlEnv:
    server: JwksServer
    clients: tuple[CdsClient, ...]
    keys: JwksStore
    replay: ReplayCache
    clock: FakeClock

    async def check(self, token: str, now: datetime = NOW) -> Claims:
        return await verify(token, audience=AUD, clients=self.clients, keys=self.keys, replay=self.replay, now=now)

    async def refused(self, token: str) -> AuthError:
        with pytest.raises(AuthError) as caught:
            await self.check(token)
        return caught.value


@pytest.fixture
def url_env(jwks_server: JwksServer, engine: Engine) -> UrlEnv:
    clients = (CdsClient(ISS, jwks_url=jwks_server.url),)
    clock = FakeClock()
    store = JwksStore(clients, clock=clock, timeout_s=2.0, max_bytes=64 * 1024)
    return UrlEnv(jwks_server, clients, store, ReplayCache(engine), clock)


def test_jwks_url_is_fetched_once_and_cached(url_env: UrlEnv) -> None:
    ec, rsa = default_keys()
    url_env.server.serve(ec, rsa)

    async def scenario() -> None:
        await url_env.check(sign(ec, now=NOW))
        await url_env.check(sign(rsa, now=NOW))
        url_env.clock.t += 599  # still within the 10-minute TTL
        await url_env.check(sign(ec, now=NOW))
        assert url_env.server.requests == 1
        url_env.clock.t += 1  # TTL over: fetched again
        await url_env.check(sign(ec, now=NOW))
        assert url_env.server.requests == 2
        await url_env.keys.aclose()

    run(scenario())


def test_jku_equal_to_the_configured_url_is_accepted(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.serve(ec)

    async def scenario() -> None:
        assert (await url_env.check(sign(ec, now=NOW, headers={"jku": url_env.server.url}))).kid == "ec-1"
        await url_env.keys.aclose()

    run(scenario())


def test_unknown_kid_refetches_at_most_once_per_30_seconds(url_env: UrlEnv) -> None:
    """Key rotation works, but forged kids cannot make us hammer the EHR's JWKS host."""
    old, new = default_keys()[0], ec_key("rotated")
    url_env.server.serve(old)

    async def scenario() -> None:
        await url_env.check(sign(old, now=NOW))
        assert url_env.server.requests == 1
        url_env.server.serve(old, new)  # the EHR rotates in a new key
        url_env.clock.t += 10
        # within 30 s of the last fetch: no refetch, the new kid is unknown for now
        assert (await url_env.refused(sign(new, now=NOW))).message == f"unknown kid 'rotated' for issuer {ISS!r}"
        assert url_env.server.requests == 1
        url_env.clock.t += 20  # 30 s since the last fetch: an unknown kid may refetch
        assert (await url_env.check(sign(new, now=NOW))).kid == "rotated"
        assert url_env.server.requests == 2
        # a burst of forged kids right after: refused, and not one more fetch
        forged = [sign(ec_key(f"forged-{i}"), now=NOW) for i in range(5)]
        results = await asyncio.gather(*(url_env.check(t) for t in forged), return_exceptions=True)
        assert all(isinstance(r, AuthError) and "unknown kid 'forged-" in r.message for r in results)
        assert url_env.server.requests == 2
        await url_env.keys.aclose()

    run(scenario())


def test_concurrent_first_requests_share_one_fetch(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.serve(ec)

    async def scenario() -> None:
        claims = await asyncio.gather(*(url_env.check(sign(ec, now=NOW)) for _ in range(8)))
        assert len({c.jti for c in claims}) == 8
        assert url_env.server.requests == 1
        await url_env.keys.aclose()

    run(scenario())


def test_jwks_http_error_is_unavailable_and_retried_only_after_30_seconds(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.status = 500

    async def scenario() -> None:
        error = await url_env.refused(sign(ec, now=NOW))
        assert isinstance(error, JwksUnavailable)
        assert error.message == f"cannot retrieve the JWK Set of issuer {ISS!r}: HTTP 500 from {url_env.server.url}"
        await url_env.refused(sign(ec, now=NOW))
        assert url_env.server.requests == 1  # a failing host is not retried on every request
        url_env.server.status = 200
        url_env.server.serve(ec)
        url_env.clock.t += 30
        assert (await url_env.check(sign(ec, now=NOW))).kid == "ec-1"
        assert url_env.server.requests == 2
        await url_env.keys.aclose()

    run(scenario())


def test_stale_keys_are_used_while_the_jwks_host_is_down(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.serve(ec)

    async def scenario() -> None:
        await url_env.check(sign(ec, now=NOW))
        url_env.server.status = 503
        url_env.clock.t += 3600  # TTL long over; the refresh fails
        assert (await url_env.check(sign(ec, now=NOW))).kid == "ec-1"
        assert url_env.server.requests == 2
        url_env.clock.t += 86_400  # but not for more than a day
        error = await url_env.refused(sign(ec, now=NOW))
        assert isinstance(error, JwksUnavailable) and "could not be refreshed for too long: HTTP 503" in error.message
        await url_env.keys.aclose()

    run(scenario())


def test_jwks_larger_than_the_limit_is_refused(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.body = json.dumps({"keys": [ec.public_jwk()], "padding": "x" * 100_000}).encode()

    async def scenario() -> None:
        error = await url_env.refused(sign(ec, now=NOW))
        assert isinstance(error, JwksUnavailable) and error.message.endswith("larger than 65536 bytes")
        await url_env.keys.aclose()

    run(scenario())


def test_jwks_redirect_is_not_followed(url_env: UrlEnv) -> None:
    ec = default_keys()[0]
    url_env.server.status = 302

    async def scenario() -> None:
        error = await url_env.refused(sign(ec, now=NOW))
        assert isinstance(error, JwksUnavailable) and "HTTP 302" in error.message
        assert url_env.server.requests == 1
        await url_env.keys.aclose()

    run(scenario())


def test_jwks_fetch_times_out(jwks_server: JwksServer, engine: Engine) -> None:
    ec = default_keys()[0]
    jwks_server.serve(ec)
    jwks_server.delay_s = 1.0
    clients = (CdsClient(ISS, jwks_url=jwks_server.url),)
    store = JwksStore(clients, timeout_s=0.1)

    async def scenario() -> None:
        with pytest.raises(JwksUnavailable, match=r"timed out after 0.1 s fetching"):
            await verify(
                sign(ec, now=NOW), audience=AUD, clients=clients, keys=store, replay=ReplayCache(engine), now=NOW
            )
        await store.aclose()

    run(scenario())


def test_now_must_be_tz_aware(env: Env) -> None:
    with pytest.raises(ValueError, match="tz-aware"):
        env.check(sign(env.ec), now=datetime(2026, 11, 21, 10, 0))


def test_claims_default_now_is_the_current_time(env: Env) -> None:
    """Without ``now`` the real clock is used: a token made now passes."""
    token = sign(env.ec, jti="real-clock")
    claims = run(verify(token, audience=AUD, clients=env.clients, keys=env.keys, replay=env.replay))
    assert claims.jti == "real-clock"
