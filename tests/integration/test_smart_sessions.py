"""The SMART app's server-side state (`smart_app.sessions`) on SQLite and PostgreSQL: launches are single use and
bound to the browser, sessions open only for their browser, and of replicas refreshing at once exactly one wins."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from cds_hooks import db
from smart_app import sessions
from smart_app.sessions import PendingLaunch, SessionError, Tokens
from tests.support.threads import all_at_once

NOW = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
LAUNCH = PendingLaunch(
    iss="https://ehr.example/fhir",
    launch="L1",
    code_verifier="v" * 86,
    nonce="n1",
    token_endpoint="https://ehr.example/auth/token",  # noqa: S106 (a URL)
    scope="launch openid fhirUser",
)
TOKENS = Tokens("access-1", "refresh-1", NOW + timedelta(hours=1), "launch openid fhirUser patient/*.rs")


@pytest.fixture
def engine(engines: Callable[[], Engine]) -> Engine:
    e = engines()
    db.migrate(e)
    return e


def new_session(engine: Engine, browser: str = "browser-1") -> str:
    return sessions.create_session(
        engine,
        browser=browser,
        launch=LAUNCH,
        tokens=TOKENS,
        context={"patient": "p1", "fhir_user": "Practitioner/1", "need_patient_banner": False, "style": {"--x": "1"}},
        now=NOW,
        lifetime_s=3600,
    )


def test_a_launch_is_taken_once_by_the_browser_that_started_it(engine: Engine) -> None:
    sessions.save_launch(engine, "state-1", "browser-1", LAUNCH, NOW)
    with pytest.raises(SessionError, match="does not match"):
        sessions.take_launch(engine, "state-1", "browser-2", NOW)  # another browser
    with pytest.raises(SessionError, match="does not match"):
        sessions.take_launch(engine, "state-X", "browser-1", NOW)  # an altered state
    with pytest.raises(SessionError, match="cookie is missing"):
        sessions.take_launch(engine, "state-1", None, NOW)
    assert sessions.take_launch(engine, "state-1", "browser-1", NOW) == LAUNCH
    with pytest.raises(SessionError, match="already"):
        sessions.take_launch(engine, "state-1", "browser-1", NOW)  # single use
    with engine.connect() as conn:  # only hashes are stored
        row = conn.execute(select(sessions.smart_launch)).first()
    assert row is None


def test_a_launch_expires_after_ten_minutes(engine: Engine) -> None:
    sessions.save_launch(engine, "state-1", "b", LAUNCH, NOW)
    late = NOW + timedelta(seconds=sessions.LAUNCH_LIFETIME_S + 1)
    with pytest.raises(SessionError, match="took longer"):
        sessions.take_launch(engine, "state-1", "b", late)


def test_the_database_keeps_hashes_of_state_and_cookie(engine: Engine) -> None:
    sessions.save_launch(engine, "state-secret", "browser-secret", LAUNCH, NOW)
    sid = new_session(engine, "browser-secret")
    with engine.connect() as conn:
        launch = conn.execute(select(sessions.smart_launch)).mappings().one()
        session = conn.execute(select(sessions.smart_session)).mappings().one()
    assert launch["state_hash"] == sessions.digest("state-secret") and "state-secret" not in str(dict(launch))
    assert session["browser_hash"] == sessions.digest("browser-secret") and session["id"] == sid


def test_a_session_opens_only_for_its_browser_and_until_it_expires_or_ends(engine: Engine) -> None:
    sid = new_session(engine)
    got = sessions.load_session(engine, sid, "browser-1", NOW)
    assert (got.patient, got.fhir_user, got.need_patient_banner, got.style) == (
        "p1",
        "Practitioner/1",
        False,
        {"--x": "1"},
    )
    assert got.tokens == TOKENS and got.version == 1 and len(got.csrf) >= 43
    assert got.csrf_ok(got.csrf) and not got.csrf_ok(got.csrf[:-1] + "x") and not got.csrf_ok(None)
    for browser in ("browser-2", None, ""):
        with pytest.raises(SessionError, match="no imid-rems session"):
            sessions.load_session(engine, sid, browser, NOW)
    with pytest.raises(SessionError, match="no imid-rems session"):
        sessions.load_session(engine, "no-such-id", "browser-1", NOW)
    with pytest.raises(SessionError, match="expired"):
        sessions.load_session(engine, sid, "browser-1", NOW + timedelta(seconds=3601))
    sessions.end_session(engine, sid, "refresh refused: invalid_grant", NOW)
    with pytest.raises(SessionError, match=r"ended \(refresh refused"):
        sessions.load_session(engine, sid, "browser-1", NOW)
    with engine.connect() as conn:
        row = conn.execute(select(sessions.smart_session)).mappings().one()
    assert (row["access_token"], row["refresh_token"]) == ("", None)  # tokens dropped
    assert sessions.reload(engine, sid) is None


def test_of_replicas_refreshing_at_once_exactly_one_refreshes(engine: Engine) -> None:
    sid = new_session(engine)
    session = sessions.load_session(engine, sid, "browser-1", NOW)
    won = all_at_once(8, lambda _: sessions.claim_refresh(engine, session, NOW, 15))
    assert sorted(won) == [False] * 7 + [True]
    # The lease is held: nobody else may refresh until it lapses or the winner stores its tokens.
    assert not sessions.claim_refresh(engine, session, NOW + timedelta(seconds=10), 15)
    renewed = Tokens("access-2", "refresh-2", NOW + timedelta(hours=2), TOKENS.scope)
    sessions.store_tokens(engine, session, renewed)
    now_session = sessions.reload(engine, sid)
    assert now_session is not None and now_session.tokens == renewed and now_session.version == 2
    # A replica still holding version 1 cannot refresh over version 2 (it would spend a rotated token).
    assert not sessions.claim_refresh(engine, session, NOW + timedelta(minutes=5), 15)
    assert sessions.claim_refresh(engine, now_session, NOW + timedelta(minutes=5), 15)


def test_a_lapsed_refresh_lease_can_be_taken_again(engine: Engine) -> None:
    sid = new_session(engine)
    session = sessions.load_session(engine, sid, "browser-1", NOW)
    assert sessions.claim_refresh(engine, session, NOW, 15)
    assert sessions.claim_refresh(engine, session, NOW + timedelta(seconds=16), 15)  # the first replica died
    sessions.release_refresh(engine, session)
    assert sessions.claim_refresh(engine, session, NOW + timedelta(seconds=17), 15)
