"""Pure parts of the sandbox SMART server and gateway: PKCE, the signing key's persistence, launch validation,
which FHIR interaction a request is, and when a resource belongs to a patient (no HTTP, no FHIR server)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sandbox.config import SandboxConfig, SmartClient
from sandbox.gateway import FhirInteraction, belongs_to_patient, classify
from sandbox.smart_auth import KEY_FILE, SmartAuthServer, s256


def config(state_dir: Path | None = None) -> SandboxConfig:
    return SandboxConfig(
        base_url="http://ehr.test",
        fhir_upstream="http://127.0.0.1:1/fhir/R4",
        clients=(SmartClient("app", ("http://app.test/cb",), scope="patient/*.rs"),),
        state_dir=state_dir,
    )


def test_s256_is_rfc7636_appendix_b() -> None:
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_signing_key_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    first = SmartAuthServer(config(tmp_path))
    key_file = tmp_path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = SmartAuthServer(config(tmp_path))
    assert again.kid == first.kid and again.jwks() == first.jwks()
    assert SmartAuthServer(config()).kid != first.kid  # no state dir: a fresh key per process
    (public,) = first.jwks()["keys"]
    assert public["kty"] == "RSA" and public["alg"] == "RS256" and "d" not in public


def test_create_launch_refuses_what_it_cannot_bind(tmp_path: Path) -> None:
    auth = SmartAuthServer(config(tmp_path))
    assert auth.create_launch(client_id="app", user="Practitioner/p-1", patient="pat-1")
    with pytest.raises(ValueError, match="no SMART client"):
        auth.create_launch(client_id="other", user="Practitioner/p-1", patient="pat-1")
    with pytest.raises(ValueError, match="user"):
        auth.create_launch(client_id="app", user="p-1", patient="pat-1")
    with pytest.raises(ValueError, match="patient"):
        auth.create_launch(client_id="app", user="Practitioner/p-1", patient="Patient/pat-1")
    with pytest.raises(ValueError, match="launch_url"):
        auth.launch_url(auth.create_launch(client_id="app", user="Practitioner/p-1", patient=None))


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "Observation", FhirInteraction("s", "Observation", "search")),
        ("POST", "Observation/_search", FhirInteraction("s", "Observation", "search")),
        ("GET", "Observation/_history", FhirInteraction("s", "Observation", "search")),
        ("POST", "Observation", FhirInteraction("c", "Observation", "create")),
        ("PUT", "Observation", FhirInteraction("u", "Observation", "conditional")),
        ("DELETE", "Observation", FhirInteraction("d", "Observation", "conditional")),
        ("GET", "Observation/o-1", FhirInteraction("r", "Observation", "read", "o-1")),
        ("GET", "Observation/o-1/_history", FhirInteraction("r", "Observation", "read", "o-1")),
        ("GET", "Observation/o-1/_history/2", FhirInteraction("r", "Observation", "read", "o-1")),
        ("PUT", "Observation/o-1", FhirInteraction("u", "Observation", "update", "o-1")),
        ("PATCH", "Observation/o-1", FhirInteraction("u", "Observation", "update", "o-1")),
        ("DELETE", "Observation/o-1", FhirInteraction("d", "Observation", "delete", "o-1")),
        ("GET", "Patient/p-1/Observation", FhirInteraction("s", "Observation", "search", None, ("Patient", "p-1"))),
        ("GET", "Patient/p-1/$everything", FhirInteraction("r", "Patient", "operation", "p-1")),
        ("GET", "", FhirInteraction("s", "*", "search")),
        ("GET", "_history", FhirInteraction("s", "*", "search")),
        ("POST", "", FhirInteraction("s", "*", "batch")),
        ("POST", "$export", FhirInteraction("s", "*", "operation")),
        ("DELETE", "", None),
        ("GET", "observation", None),
        ("GET", "Observation/o 1", None),
        ("POST", "Observation/o-1", None),
        ("GET", "Observation/o-1/_history/2/extra", None),
    ],
)
def test_classify_maps_rest_calls_to_smart_interactions(
    method: str, path: str, expected: FhirInteraction | None
) -> None:
    assert classify(method, path) == expected


@pytest.mark.parametrize(
    ("resource", "belongs"),
    [
        ({"resourceType": "Patient", "id": "p-1"}, True),
        ({"resourceType": "Patient", "id": "p-2"}, False),
        ({"resourceType": "Observation", "subject": {"reference": "Patient/p-1"}}, True),
        ({"resourceType": "Observation", "subject": {"reference": "http://ehr.test/fhir/Patient/p-1"}}, True),
        ({"resourceType": "Observation", "subject": {"reference": "Patient/p-1/_history/3"}}, True),
        ({"resourceType": "Observation", "subject": {"reference": "Patient/p-10"}}, False),
        ({"resourceType": "Observation", "subject": {"reference": "Group/p-1"}}, False),
        ({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p-1"}}, True),
        ({"resourceType": "Coverage", "beneficiary": {"reference": "Patient/p-1"}}, True),
        ({"resourceType": "Observation", "performer": [{"reference": "Patient/p-1"}]}, False),
        ({"resourceType": "Medication"}, False),
        ("not a resource", False),
    ],
)
def test_belongs_to_patient(resource: object, belongs: bool) -> None:
    assert belongs_to_patient(resource, "p-1") is belongs
