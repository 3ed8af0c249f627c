"""Fixtures for the integration tests: one FHIR R4 test server for the whole session, and each database
test run on SQLite and on a real PostgreSQL (`database_url`, `engines`, `engine`).

The server is shared, so each test creates its own data (a fresh Patient, unique identifiers) and searches
within it. A test that needs an empty server, loaded data or a required token starts its own with
``start_fhir_server``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from cds_hooks import db
from sandbox.fhir_engine import FHIR_JSON, post_bundle, start_fhir_server
from tests.support import postgres


@pytest.fixture(scope="session")
def fhir_server() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT/fhir/R4``) of a FHIR test server shared by the session."""
    with start_fhir_server() as server:
        yield server.base


@pytest.fixture
def fhir(fhir_server: str) -> Iterator[httpx.Client]:
    """An httpx client on the shared server: relative URLs (``Patient/1``) resolve against its base."""
    with httpx.Client(base_url=fhir_server + "/", headers={"Accept": FHIR_JSON}, timeout=10.0) as client:
        yield client


@pytest.fixture
def post_transaction(fhir_server: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """POST a transaction (or batch) Bundle to the shared server; returns the response Bundle, raises on failure."""

    def post(bundle: dict[str, Any]) -> dict[str, Any]:
        return post_bundle(fhir_server, bundle)

    return post


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a freshly created PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.sqlite'}"
    else:
        with postgres.fresh_database() as url:
            yield url


@pytest.fixture
def engines(database_url: str) -> Iterator[Callable[[], Engine]]:
    """Makes engines ("replicas") on the database; all are disposed after the test."""
    made: list[Engine] = []

    def make() -> Engine:
        engine = db.make_engine(database_url)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def engine(engines: Callable[[], Engine]) -> Engine:
    """A migrated database."""
    e = engines()
    db.migrate(e)
    return e
