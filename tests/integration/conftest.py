"""Fixtures for the integration tests: one FHIR R4 test server for the whole session.

The server is shared, so each test creates its own data (a fresh Patient, unique identifiers) and searches
within it. A test that needs an empty server, loaded data or a required token starts its own with
``start_fhir_server``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from sandbox.fhir_engine import FHIR_JSON, post_bundle, start_fhir_server


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
