"""The sandbox EHR's CDS Hooks client: prefetch templates rendered per CDS Hooks 2.0 (every token, the query
subset, an unresolvable token → no key), prefetch resolution against a mocked FHIR server (paging, null,
failures, the token never leaving the server), and the JWT each call carries (claims and header)."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from sandbox.cds_client import (
    CdsClient,
    CdsError,
    TemplateError,
    Unresolvable,
    fhir_authorization,
    render_template,
)
from sandbox.ehr_keys import EhrKey, generate_key, load_or_create_key

FHIR = "https://ehr.test/fhir"
SERVICES = "https://cds.test/cds-services"
ISS = "https://ehr.test"
CONTEXT = {
    "userId": "PractitionerRole/role-1",
    "patientId": "pat-1",
    "encounterId": "enc-1",
    "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": []},
}
KEY = generate_key()


# --- templates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "user", "expected"),
    [
        ("Patient/{{context.patientId}}", None, "Patient/pat-1"),
        ("Encounter/{{context.encounterId}}", None, "Encounter/enc-1"),
        ("Condition?patient={{ context.patientId }}", None, "Condition?patient=pat-1"),
        ("{{context.userId}}", None, "PractitionerRole/role-1"),
        (
            "PractitionerRole?practitioner={{userPractitionerId}}",
            "Practitioner/doc-9",
            "PractitionerRole?practitioner=doc-9",
        ),
        ("PractitionerRole/{{userPractitionerRoleId}}", "PractitionerRole/role-1", "PractitionerRole/role-1"),
        ("Patient/{{userPatientId}}", "Patient/self-2", "Patient/self-2"),
        ("RelatedPerson/{{userRelatedPersonId}}", "RelatedPerson/rp-3", "RelatedPerson/rp-3"),
        (
            "Observation?patient={{context.patientId}}&code=http://loinc.org|2106-3,http://loinc.org|777-3",
            None,
            "Observation?patient=pat-1&code=http://loinc.org|2106-3,http://loinc.org|777-3",
        ),
        (
            "Observation?patient={{context.patientId}}&date=ge2026-01-01&_count=5&_sort=-date",
            None,
            "Observation?patient=pat-1&date=ge2026-01-01&_count=5&_sort=-date",
        ),
        (
            "Condition?patient={{context.patientId}}&code:in=http://vs.test/x",
            None,
            "Condition?patient=pat-1&code:in=http://vs.test/x",
        ),
        ("PractitionerRole?_id={{userPractitionerRoleId}}", "PractitionerRole/role-1", "PractitionerRole?_id=role-1"),
    ],
)
def test_every_token_renders(template: str, user: str | None, expected: str) -> None:
    assert render_template(template, CONTEXT, user) == expected


@pytest.mark.parametrize(
    ("template", "user"),
    [
        ("PractitionerRole?practitioner={{userPractitionerId}}", "PractitionerRole/role-1"),  # user is a role
        ("PractitionerRole/{{userPractitionerRoleId}}", "Practitioner/doc-9"),
        ("Patient/{{userPatientId}}", "Practitioner/doc-9"),
        ("RelatedPerson/{{userRelatedPersonId}}", None),
        ("Encounter/{{context.appointmentId}}", None),  # not in this context
        ("Bundle/{{context.draftOrders}}", None),  # not a primitive: never a token
        ("PractitionerRole/{{userPractitionerRoleId}}", "PractitionerRole/.."),  # not an id
    ],
)
def test_a_token_without_a_value_is_unresolvable(template: str, user: str | None) -> None:
    with pytest.raises(Unresolvable):
        render_template(template, CONTEXT, user)


@pytest.mark.parametrize(
    "template",
    [
        "MedicationRequest?patient={{context.patientId}}&_include=MedicationRequest:medication",
        "Patient?_revinclude=Observation:subject&_id={{context.patientId}}",
        "Observation?subject.name=smith",
        "Observation?patient={{context.patientId}}&code:text=hcg",
        "Observation?patient={{context.patientId}}&date=ne2026-01-01",
        "Observation?patient={{context.patientId}}&_has:Condition:subject:code=x",
        "https://elsewhere.test/fhir/Patient/{{context.patientId}}",
        "//elsewhere.test/Patient/{{context.patientId}}",
        "/Patient/{{context.patientId}}",
        "Patient/{{context.patientId}}/_history/1",
        "Patient/{{context.patientId}}/$everything",
        "Patient/{{context.patientId}}?_elements=name",
        "patient/{{context.patientId}}",
        "Patient/{{patientId}}",
        "Patient/{{context.patientId}",
        "",
    ],
)
def test_templates_outside_the_query_subset_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        render_template(template, CONTEXT, "PractitionerRole/role-1")


def test_a_token_value_that_looks_like_a_date_prefix_is_still_a_value() -> None:
    """Found by the corpus test: an id such as ``ce54667-pat-1`` is not a date with the prefix ``ce``."""
    context = {"patientId": "ce54667-pat-1", "userId": "Practitioner/ne2026"}
    assert render_template("Condition?patient={{context.patientId}}", context, None) == (
        "Condition?patient=ce54667-pat-1"
    )
    assert render_template("PractitionerRole?practitioner={{userPractitionerId}}", context, "Practitioner/ne2026")
    with pytest.raises(TemplateError):
        render_template("Condition?onset-date=ne2026-01-01&patient={{context.patientId}}", context, None)


def test_token_values_cannot_add_parameters_or_leave_the_path() -> None:
    context = {"patientId": "x&_include=*", "userId": "Practitioner/d"}
    assert render_template("Condition?patient={{context.patientId}}", context, None) == (
        "Condition?patient=x%26_include%3D%2A"
    )
    with pytest.raises(TemplateError):  # a read whose id is not an id after encoding
        render_template("Patient/{{context.patientId}}", {"patientId": "a/../b"}, None)
    with pytest.raises(Unresolvable):
        render_template("Patient/{{context.patientId}}", {"patientId": ".."}, None)


# --- prefetch against a mocked FHIR server ------------------------------------------------------------------


def bundle(resources: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
        "link": [{"relation": "self", "url": "x"}],
    }
    if next_url:
        out["link"].append({"relation": "next", "url": next_url})
    return out


def obs(i: int) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final", "code": {"text": "x"}}


class FakeFhir:
    """Answers by path; records every request (URL and Authorization)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append((url, request.headers.get("Authorization")))
        path = request.url.path.removeprefix("/fhir/")
        query = request.url.query.decode()
        if request.url.host != "ehr.test":
            return httpx.Response(200, json=bundle([obs(99)]))
        if path == "Patient/pat-1":
            return httpx.Response(200, json={"resourceType": "Patient", "id": "pat-1"})
        if path == "Patient/gone":
            return httpx.Response(410, json={"resourceType": "OperationOutcome"})
        if path == "Observation" and "page=2" in query:
            return httpx.Response(200, json=bundle([obs(3)]))
        if path == "Observation":
            return httpx.Response(200, json=bundle([obs(1), obs(2)], f"{FHIR}/Observation?page=2"))
        if path == "Condition":
            return httpx.Response(200, json=bundle([]))
        if path == "Procedure":
            return httpx.Response(500, json={"resourceType": "OperationOutcome"})
        if path == "MedicationDispense":
            return httpx.Response(200, json=bundle([], "https://elsewhere.test/fhir/MedicationDispense?page=2"))
        if path == "Device":
            return httpx.Response(200, text="<html>not json</html>")
        if path == "PractitionerRole/role-1":
            return httpx.Response(200, json={"resourceType": "PractitionerRole", "id": "role-1"})
        return httpx.Response(404, json={"resourceType": "OperationOutcome"})


def client(handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any) -> CdsClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return CdsClient(SERVICES, ISS, KEY, http, **kwargs)


SERVICE = {
    "id": "svc",
    "hook": "order-sign",
    "prefetch": {
        "patient": "Patient/{{context.patientId}}",
        "observations": "Observation?patient={{context.patientId}}",
        "conditions": "Condition?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
        "dispenses": "MedicationDispense?patient={{context.patientId}}",
        "devices": "Device?patient={{context.patientId}}",
        "practitionerRoles": "PractitionerRole?practitioner={{userPractitionerId}}",
        "userRole": "PractitionerRole/{{userPractitionerRoleId}}",
        "included": "MedicationRequest?patient={{context.patientId}}&_include=MedicationRequest:medication",
        "gone": "Patient/gone",
    },
}


def test_prefetch_resolves_pages_nulls_and_leaves_out_what_failed() -> None:
    fake = FakeFhir()
    values, skipped = asyncio.run(
        client(fake).prefetch_report(SERVICE, CONTEXT, FHIR, "tok", user="PractitionerRole/role-1")
    )
    assert values["patient"] == {"resourceType": "Patient", "id": "pat-1"}
    merged = values["observations"]
    assert [e["resource"]["id"] for e in merged["entry"]] == ["o1", "o2", "o3"]  # both pages, in order
    assert merged["total"] == 3 and "link" not in merged  # no next links in prefetch
    assert values["conditions"] is None  # no data: null, not an empty Bundle
    assert values["gone"] is None  # a read answering 410
    assert values["userRole"] == {"resourceType": "PractitionerRole", "id": "role-1"}
    assert set(skipped) == {"procedures", "dispenses", "devices", "practitionerRoles", "included"}
    assert set(values) | set(skipped) == set(SERVICE["prefetch"])
    assert "500" in skipped["procedures"] and "another server" in skipped["dispenses"]
    assert "userPractitionerId" in skipped["practitionerRoles"]
    assert "pat-1" not in json.dumps(skipped)  # reasons name no patient data
    # The token went with every request, and nothing went to another server or for a refused template.
    assert fake.seen and all(auth == "Bearer tok" for _, auth in fake.seen)
    assert all(url.startswith(FHIR + "/") for url, _ in fake.seen)
    assert not any("MedicationRequest" in url or "practitioner=" in url for url, _ in fake.seen)


def test_prefetch_without_a_token_sends_no_authorization() -> None:
    fake = FakeFhir()
    values = asyncio.run(client(fake).prefetch(SERVICE, CONTEXT, FHIR, None, user="PractitionerRole/role-1"))
    assert values["patient"]["id"] == "pat-1"
    assert all(auth is None for _, auth in fake.seen)


def test_a_next_link_loop_is_left_out() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=bundle([obs(1)], f"{FHIR}/Observation?page=same"))

    service = {"id": "s", "prefetch": {"observations": "Observation?patient={{context.patientId}}"}}
    values, skipped = asyncio.run(client(handler).prefetch_report(service, CONTEXT, FHIR, "t", "Practitioner/d"))
    assert values == {} and "loop" in skipped["observations"]


# --- calls and their JWT ------------------------------------------------------------------------------------


def decode(token: str, key: EhrKey, aud: str) -> tuple[dict[str, Any], dict[str, Any]]:
    public = jwt.PyJWK(key.public_jwk()).key
    claims = jwt.decode(token, public, algorithms=["ES384"], audience=aud, options={"require": ["exp", "iat"]})
    return jwt.get_unverified_header(token), claims


def test_jwt_claims_and_header() -> None:
    now = time.time() - 10.5
    cds = client(FakeFhir(), clock=lambda: now, jwt_lifetime_s=120, client_id="ehr-client")
    aud = f"{SERVICES}/imid-rems-order-sign"
    header, claims = decode(cds.sign(aud), KEY, aud)
    assert header == {"alg": "ES384", "typ": "JWT", "kid": KEY.kid}
    assert claims["iss"] == ISS and claims["sub"] == "ehr-client" and claims["aud"] == aud
    assert claims["iat"] == int(now) and claims["exp"] == int(now) + 120
    assert claims["jti"] != decode(cds.sign(aud), KEY, aud)[1]["jti"]
    with pytest.raises(jwt.InvalidAudienceError):
        decode(cds.sign(aud), KEY, SERVICES)  # the audience is the exact URL, nothing else
    other = generate_key()
    with pytest.raises(jwt.InvalidSignatureError):
        decode(cds.sign(aud), other, aud)


def test_jwt_lifetime_is_at_most_five_minutes_and_jku_only_when_configured() -> None:
    with pytest.raises(ValueError, match=r"1\.\.300"):
        client(FakeFhir(), jwt_lifetime_s=301)
    cds = client(FakeFhir(), jku="https://ehr.test/.well-known/jwks.json")
    assert jwt.get_unverified_header(cds.sign(SERVICES))["jku"] == "https://ehr.test/.well-known/jwks.json"
    assert "jku" not in jwt.get_unverified_header(client(FakeFhir()).sign(SERVICES))


class FakeCds:
    def __init__(self, status: int = 200, body: Any = None, text: str | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.body = body if body is not None else {"cards": []}
        self.text = text

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "GET":
            return httpx.Response(200, json={"services": [{"id": "svc-1", "hook": "order-sign", "prefetch": {}}]})
        if self.text is not None:
            return httpx.Response(self.status, text=self.text)
        return httpx.Response(self.status, json=self.body)


def test_call_signs_for_the_exact_service_url_and_sends_the_hook_request() -> None:
    fake = FakeCds()
    cds = client(fake)
    auth = fhir_authorization({"access_token": "at", "expires_in": 90, "scope": "user/Patient.rs"}, "imid-rems")
    status, body = asyncio.run(
        cds.call("svc-1", "order-sign", CONTEXT, prefetch={"patient": None}, fhir_server=FHIR, fhir_authorization=auth)
    )
    assert (status, body) == (200, {"cards": []})
    [request] = fake.requests
    assert str(request.url) == f"{SERVICES}/svc-1"
    token = request.headers["Authorization"].removeprefix("Bearer ")
    decode(token, KEY, f"{SERVICES}/svc-1")
    sent = json.loads(request.content)
    assert sent["hook"] == "order-sign" and sent["context"] == CONTEXT and sent["prefetch"] == {"patient": None}
    assert sent["fhirServer"] == FHIR
    assert sent["fhirAuthorization"] == {
        "access_token": "at",
        "token_type": "Bearer",
        "expires_in": 90,
        "scope": "user/Patient.rs",
        "subject": "imid-rems",
    }
    assert len(sent["hookInstance"]) == 36


def test_fhir_authorization_names_the_patient_of_a_patient_token() -> None:
    token = {"access_token": "at", "expires_in": 60, "scope": "patient/Observation.rs", "patient": "p-1"}
    assert fhir_authorization(token, "svc")["patient"] == "p-1"
    assert "patient" not in fhir_authorization({"access_token": "at", "scope": "user/Observation.rs"}, "svc")


def test_call_without_prefetch_sends_no_prefetch_key_and_refuses_authorization_without_server() -> None:
    fake = FakeCds()
    cds = client(fake)
    asyncio.run(cds.call("svc-1", "order-sign", CONTEXT))
    assert set(json.loads(fake.requests[0].content)) == {"hookInstance", "hook", "context"}
    with pytest.raises(ValueError, match="fhirServer"):
        asyncio.run(cds.call("svc-1", "order-sign", CONTEXT, fhir_authorization={"access_token": "x"}))


def test_an_error_that_is_not_json_comes_back_as_an_error_object() -> None:
    cds = client(FakeCds(502, text="<html>Bad Gateway</html>"))
    status, body = asyncio.run(cds.call("svc-1", "order-sign", CONTEXT))
    assert status == 502 and body == {"error": {"status": 502, "message": "<html>Bad Gateway</html>"}}


def test_discovery_is_signed_for_the_discovery_url_and_cached() -> None:
    fake = FakeCds()
    cds = client(fake)
    service = asyncio.run(cds.service_for_hook("order-sign"))
    assert service is not None and service["id"] == "svc-1"
    assert asyncio.run(cds.service_for_hook("patient-view")) is None
    [request] = fake.requests  # the second look-up used the cached list
    decode(request.headers["Authorization"].removeprefix("Bearer "), KEY, SERVICES)


def test_discovery_errors_raise() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"status": 401, "message": "JWT iss not trusted"}})

    with pytest.raises(CdsError, match="401: JWT iss not trusted"):
        asyncio.run(client(refuse).discover())


# --- the key ------------------------------------------------------------------------------------------------


def test_key_is_saved_owner_only_and_reloads_with_the_same_kid(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "state")
    path = tmp_path / "state" / "cds-client-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_key(tmp_path / "state")
    assert again.kid == key.kid and again.public_jwks() == key.public_jwks()
    assert generate_key().kid != key.kid
    [jwk] = key.public_jwks()["keys"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-384" and jwk["alg"] == "ES384" and "d" not in jwk
