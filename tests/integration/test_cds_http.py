"""The CDS Hooks service over real HTTP (uvicorn on a loopback port, httpx), authentication off.

What a CDS client sees: discovery and its prefetch templates, the four hooks with a full prefetch, the
shape of every card and suggestion, the error answers (status and the field named), the 412 for data
nobody gave, feedback stored with the rule read back from the card uuid, CORS, and the same service on
PostgreSQL. The FHIR fallback has its own module (test_cds_fallback.py); authentication too
(test_cds_auth_http.py).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest

from cds_hooks.cards import CARD_SYSTEM, REFILL_TOPIC, RULE_SYSTEM, STATUS_TOPIC
from cds_hooks.db import make_engine, read_feedback
from fhir_mappings.medication import RISK_CATEGORY_EXTENSION
from tests.support import postgres
from tests.support.cds_server import CdsServer, Clock, free_port, run_cds_server
from tests.support.fhir_load import Scenario, card_codes, rule_codes, scenario, without_prefetch

NY = "America/New_York"
SMART = "https://smart.example.org/launch"
MAX_BODY = 100_000
SERVICES = {
    "imid-rems-order-select": "order-select",
    "imid-rems-order-sign": "order-sign",
    "imid-rems-patient-view": "patient-view",
    "imid-rems-medication-refill": "medication-refill",
}
SIGN = "/cds-services/imid-rems-order-sign"
FHIR_TOKEN = "fhir-access-token"  # noqa: S105 (a test value)


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('cds-http') / 'service.sqlite'}"


@pytest.fixture(scope="module")
def server(db_url: str) -> Iterator[CdsServer]:
    with run_cds_server(
        Clock(),
        database_url=db_url,
        cds_auth="off",
        clinic_tz=NY,
        max_body_bytes=MAX_BODY,
        smart_launch_url=SMART,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


def service_for(hook: str) -> str:
    return next(sid for sid, h in SERVICES.items() if h == hook)


def post(client: httpx.Client, server: CdsServer, path: str, body: Any) -> httpx.Response:
    return client.post(server.url(path), json=body)


def answer(client: httpx.Client, server: CdsServer, sc: Scenario, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The service's 200 answer to the scenario's request (or `body`), evaluated at the scenario's clock."""
    server.clock.now = sc.now
    request = body if body is not None else sc.request
    response = post(client, server, f"/cds-services/{service_for(request['hook'])}", request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    result: dict[str, Any] = response.json()
    return result


def assert_error(response: httpx.Response, status: int | tuple[int, ...], field: str) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["status"] == response.status_code
    assert error["field"] == field, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- discovery and the prefetch templates -------------------------------------------------------------


def test_discovery_lists_exactly_the_four_services(client: httpx.Client, server: CdsServer) -> None:
    response = client.get(server.url("/cds-services"))
    assert response.status_code == 200
    services = response.json()["services"]
    assert {s["id"]: s["hook"] for s in services} == SERVICES
    assert len(services) == 4
    for s in services:
        for name in ("id", "hook", "title", "description"):
            assert isinstance(s[name], str) and s[name].strip(), (s["id"], name)
        assert isinstance(s["prefetch"], dict) and s["prefetch"], s["id"]
        assert "patient" in s["prefetch"]


PREFETCH_TOKENS = {
    "context.patientId",
    "context.userId",
    "context.encounterId",
    "userPractitionerId",
    "userPractitionerRoleId",
    "userPatientId",
    "userRelatedPersonId",
}
REFERENCE_PARAMS = {"patient", "subject", "practitioner", "encounter", "performer", "requester", "context"}
TOKEN_PARAMS = {"code", "status", "category", "intent", "clinical-status", "verification-status", "identifier"}
DATE_PARAMS = {"date", "authoredon", "effective", "onset-date", "issued", "whenhandedover", "recorded-date"}
TOKEN = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
ID_OR_TOKEN = re.compile(r"^(\{\{[^{}]+\}\}|[A-Za-z0-9\-.]{1,64})$")
TOKEN_VALUE = re.compile(r"^([^|,]*\|)?[^|,]+$")
DATE_VALUE = re.compile(r"^(eq|lt|gt|ge|le)?\d{4}(-\d{2}(-\d{2}(T[\d:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?$|^[a-z]{2}\{\{")


def template_problems(template: str) -> list[str]:
    """Why `template` is outside CDS Hooks 2.0 prefetch: its tokens, and the query subset the spec
    allows (instance read or type search; reference, token-equality (or ``:in``) and eq/lt/gt/ge/le
    date parameters, ``_count``, ``_sort``; no ``_include``, chaining or other modifiers)."""
    problems = [
        f"{{{{{t}}}}} is not a CDS Hooks 2.0 prefetch token"
        for t in TOKEN.findall(template)
        if t not in PREFETCH_TOKENS
    ]
    if TOKEN.sub("", template).count("{") or TOKEN.sub("", template).count("}"):
        problems.append("stray braces")
    path, _, query = template.partition("?")
    parts = path.split("/")
    if not re.fullmatch(r"[A-Z][A-Za-z]+", parts[0]):
        problems.append(f"{parts[0]!r} is not a resource type")
    if len(parts) == 2:
        if query:
            problems.append("an instance read takes no parameters")
        if not ID_OR_TOKEN.match(parts[1]):
            problems.append(f"{parts[1]!r} is not an id")
        return problems
    if len(parts) != 1:
        problems.append(f"{path!r} is neither Type/id nor Type")
    for param in query.split("&") if query else []:
        name, eq, value = param.partition("=")
        if not eq or not value:
            problems.append(f"{param!r}: no value")
            continue
        base, _, modifier = name.partition(":")
        if "." in base:
            problems.append(f"{name!r}: chained parameter")
        if modifier and modifier != "in":
            problems.append(f"{name!r}: modifier :{modifier}")
        if modifier == "in" and base not in TOKEN_PARAMS:
            problems.append(f"{name!r}: :in on a non-token parameter")
        if base == "_count":
            if not value.isdigit():
                problems.append(f"_count={value!r}")
        elif base == "_sort":
            if not re.fullmatch(r"-?[a-z][a-z\-]*(,-?[a-z][a-z\-]*)*", value):
                problems.append(f"_sort={value!r}")
        elif base in REFERENCE_PARAMS:
            if not re.fullmatch(r"([A-Z][A-Za-z]+/)?(\{\{[^{}]+\}\}|[A-Za-z0-9\-.]{1,64})", value):
                problems.append(f"{name}={value!r}: not a reference value")
        elif base in TOKEN_PARAMS:
            for item in [value] if modifier == "in" else value.split(","):
                if not TOKEN_VALUE.match(item) or re.match(r"^(eq|ne|lt|gt|ge|le|sa|eb|ap)\d", item):
                    problems.append(f"{name}: {item!r} is not a plain token")
        elif base in DATE_PARAMS:
            for item in value.split(","):
                if not DATE_VALUE.match(item):
                    problems.append(f"{name}: {item!r} is not a date with eq/lt/gt/ge/le")
        else:
            problems.append(f"{name!r}: not a parameter CDS Hooks prefetch allows")
    return problems


@pytest.mark.parametrize(
    "bad",
    [
        "Patient/{{patientId}}",
        "Observation?patient={{context.patientId}}&_include=Observation:performer",
        "Observation?subject.name=Smith",
        "Observation?code:text=pregnancy",
        "Observation?patient={{context.patientId}}&date=ne2026-01-01",
        "Observation?patient={{context.patientId}}&_revinclude=Provenance:target",
        "Observation?patient={{context.patientId}}&_has:Observation:subject:code=1234-5",
        "MedicationRequest?patient={{context.patientId}}&_elements=id",
        "Patient/{{context.patientId}}/_history",
    ],
)
def test_the_template_checker_refuses_what_the_spec_does_not_allow(bad: str) -> None:
    assert template_problems(bad), bad


def test_the_template_checker_accepts_the_spec_subset() -> None:
    good = [
        "Patient/{{context.patientId}}",
        "Practitioner/{{userPractitionerId}}",
        "Observation?patient={{context.patientId}}&code=http://loinc.org|2106-3,http://loinc.org|777-3"
        "&date=ge2026-01-01&_sort=-date&_count=10",
        "Condition?subject=Patient/{{context.patientId}}&code:in=http://example.org/ValueSet/x",
    ]
    assert {t: template_problems(t) for t in good} == {t: [] for t in good}


def test_every_prefetch_template_is_cds_hooks_2_0(client: httpx.Client, server: CdsServer) -> None:
    services = client.get(server.url("/cds-services")).json()["services"]
    problems = {
        f"{s['id']}.{key}": template_problems(template)
        for s in services
        for key, template in s["prefetch"].items()
        if template_problems(template)
    }
    assert problems == {}


# --- the four hooks with a full prefetch ----------------------------------------------------------------


def test_order_sign_answers_the_scenario_codes(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("revlimid-kitchen-sink-many-problems")
    result = answer(client, server, sc)
    assert rule_codes(result) == sc.codes
    assert card_codes(result) == []


def test_order_select_answers_the_scenario_codes(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("pregnancy-test-positive-newest")
    assert sc.hook == "order-select"
    result = answer(client, server, sc)
    assert rule_codes(result) == sc.codes == ["pregnancy-test-positive"]
    assert card_codes(result) == []


def patient_view(sc: Scenario, *, activate_draft: bool = False) -> dict[str, Any]:
    """A patient-view request on the scenario's chart (optionally with its draft order made active)."""
    ctx = sc.request["context"]
    prefetch = {k: copy.deepcopy(v) for k, v in sc.request["prefetch"].items() if k != "practitionerRoles"}
    if activate_draft:
        for entry in ctx["draftOrders"]["entry"]:
            order = copy.deepcopy(entry["resource"])
            order["status"] = "active"
            prefetch["medications"].setdefault("entry", []).append({"resource": order})
    return {
        "hook": "patient-view",
        "hookInstance": f"pv-{sc.name}",
        "context": {"userId": ctx["userId"], "patientId": ctx["patientId"]},
        "prefetch": prefetch,
    }


@pytest.mark.parametrize(
    ("name", "activate", "indicator"),
    [
        ("concurrent-imid-pomalidomide-while-lenalidomide-active", False, "info"),
        ("pregnancy-test-positive-newest", True, "critical"),
    ],
)
def test_patient_view_answers_one_rems_status_card(
    client: httpx.Client, server: CdsServer, name: str, activate: bool, indicator: str
) -> None:
    sc = scenario(name)
    result = answer(client, server, sc, patient_view(sc, activate_draft=activate))
    [card] = result["cards"]
    assert card["source"]["topic"] == {"system": CARD_SYSTEM, "code": STATUS_TOPIC, "display": "REMS status"}
    assert card["indicator"] == indicator
    assert 0 < len(card["summary"]) < 140
    assert card["detail"]
    check_card_shape(card)


def test_patient_view_without_an_imid_in_effect_has_no_card(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("lenalidomide-adult-male-nothing-else-in-chart")
    assert answer(client, server, sc, patient_view(sc)) == {"cards": []}


def test_medication_refill_answers_the_codes_and_one_drafted_prescription(
    client: httpx.Client, server: CdsServer
) -> None:
    sc = scenario("medication-refill-30-days-with-refill")
    assert sc.hook == "medication-refill"
    result = answer(client, server, sc)
    assert rule_codes(result) == sc.codes
    [card] = [c for c in result["cards"] if c["source"]["topic"]["system"] == CARD_SYSTEM]
    assert card["source"]["topic"]["code"] == REFILL_TOPIC
    check_card_shape(card)
    [suggestion] = card["suggestions"]
    [action] = suggestion["actions"]
    assert action["type"] == "create"
    resource = action["resource"]
    MedicationRequest.model_validate(resource)
    assert resource["resourceType"] == "MedicationRequest"
    assert (resource["status"], resource["intent"]) == ("draft", "order")
    dispense = resource["dispenseRequest"]
    assert dispense["numberOfRepeatsAllowed"] == 0
    supply = dispense["expectedSupplyDuration"]
    assert supply["code"] == "d" and supply["system"] == "http://unitsofmeasure.org"
    assert 0 < supply["value"] <= 28
    [draft] = [e["resource"] for e in sc.request["context"]["medications"]["entry"]]
    assert resource["priorPrescription"]["reference"].startswith("MedicationRequest/")
    assert resource["subject"]["reference"] == f"Patient/{sc.patient_id}"
    assert resource["medicationCodeableConcept"] == draft["medicationCodeableConcept"]
    [category] = [e for e in resource["extension"] if e["url"] == RISK_CATEGORY_EXTENSION]
    assert category["valueCoding"]["code"]


# --- card shape ------------------------------------------------------------------------------------------


def check_card_shape(card: dict[str, Any]) -> None:
    assert isinstance(card.get("uuid"), str) and re.fullmatch(r"[0-9a-f-]{36}", card["uuid"]), card.get("uuid")
    assert 0 < len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"]
    topic = card["source"]["topic"]
    assert topic["system"] in (RULE_SYSTEM, CARD_SYSTEM) and topic["code"]
    suggestions = card.get("suggestions")
    if suggestions:
        assert card.get("selectionBehavior") in ("at-most-one", "any"), card["uuid"]
        for s in suggestions:
            assert s["uuid"] and s["label"] and s["actions"], s
            for action in s["actions"]:
                assert action["type"] in ("create", "update", "delete")
                assert action["description"]
                if action["type"] in ("create", "update"):
                    assert action["resource"]["resourceType"]
    else:
        assert "suggestions" not in card
    for reason in card.get("overrideReasons") or []:
        assert reason["code"] and reason["system"] and reason.get("display"), reason
    for link in card.get("links") or []:
        assert link["label"] and link["url"] and link["type"] in ("absolute", "smart")


SHAPE_SCENARIOS = [
    "revlimid-kitchen-sink-many-problems",
    "frp-test-8-days-stale",
    "medication-refill-30-days-with-refill",
    "authorization-missing-pomalidomide-adult-male",
    "two-imid-drafts-same-order",
    "female-no-category-reproductive-status-unknown",
]


def test_every_card_has_the_cds_hooks_shape(client: httpx.Client, server: CdsServer) -> None:
    seen: list[str] = []
    for name in SHAPE_SCENARIOS:
        sc = scenario(name)
        result = answer(client, server, sc)
        assert result["cards"], name
        for card in result["cards"]:
            check_card_shape(card)
            seen.append(card["uuid"])
            assert {r["code"] for r in card["overrideReasons"]}, card["uuid"]
    assert len(seen) == len(set(seen)), "card uuids repeat"


def test_a_retried_call_answers_the_same_card_uuids(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("revlimid-kitchen-sink-many-problems")
    first = [c["uuid"] for c in answer(client, server, sc)["cards"]]
    assert [c["uuid"] for c in answer(client, server, sc)["cards"]] == first
    sc.request["hookInstance"] = "another-hook-instance"
    assert not set(first) & {c["uuid"] for c in answer(client, server, sc)["cards"]}


def updates_of(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [a["resource"] for s in card.get("suggestions") or [] for a in s["actions"] if a["type"] == "update"]


def medication_of(resource: dict[str, Any]) -> Any:
    return resource.get("medicationCodeableConcept") or resource.get("medicationReference")


def assert_whole_draft_corrected(update: dict[str, Any], draft: dict[str, Any], *, supply: bool, refills: bool) -> None:
    """The update carries the whole draft: everything but the dispense fixes (and the narrative) as sent."""
    assert update["id"] == draft["id"]
    assert medication_of(update) == medication_of(draft)
    unchanged = {k: v for k, v in draft.items() if k not in ("dispenseRequest", "text")}
    assert {k: v for k, v in update.items() if k not in ("dispenseRequest", "text")} == unchanged
    dispense = update["dispenseRequest"]
    before = draft.get("dispenseRequest") or {}
    fixed = {"expectedSupplyDuration", "numberOfRepeatsAllowed", "quantity"}
    assert {k: v for k, v in dispense.items() if k not in fixed} == {k: v for k, v in before.items() if k not in fixed}
    days = dispense.get("expectedSupplyDuration")
    if supply:
        assert days is not None and days["value"] == 28 and days["code"] == "d", days
    elif days is not None:
        assert days["value"] <= 28
    assert dispense.get("numberOfRepeatsAllowed", 0) == 0
    if refills:
        assert dispense["numberOfRepeatsAllowed"] == 0


@pytest.mark.parametrize(
    ("name", "codes_with_update", "supply", "refills"),
    [
        ("lenalidomide-supply-29-days", {"supply-over-28-days"}, True, False),
        ("refills-not-allowed-two-repeats", {"refills-not-allowed"}, False, True),
        ("medication-refill-30-days-with-refill", {"supply-over-28-days", "refills-not-allowed"}, True, True),
        ("revlimid-kitchen-sink-many-problems", {"supply-over-28-days", "refills-not-allowed"}, True, True),
    ],
)
def test_update_suggestion_carries_the_whole_corrected_draft(
    client: httpx.Client, server: CdsServer, name: str, codes_with_update: set[str], supply: bool, refills: bool
) -> None:
    sc = scenario(name)
    ctx = sc.request["context"]
    drafts = {
        e["resource"]["id"]: e["resource"]
        for e in (ctx.get("draftOrders") or ctx.get("medications"))["entry"]
        if e["resource"]["resourceType"] == "MedicationRequest"
    }
    result = answer(client, server, sc)
    with_update = {}
    for card in result["cards"]:
        updates = updates_of(card)
        if updates:
            assert card["selectionBehavior"] == "at-most-one"
            [update] = updates
            with_update[card["source"]["topic"]["code"]] = update
    assert set(with_update) == codes_with_update
    for update in with_update.values():
        assert_whole_draft_corrected(update, drafts[update["id"]], supply=supply, refills=refills)
        MedicationRequest.model_validate(update)


def smart_links(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [link for c in result["cards"] for link in c.get("links") or [] if link["type"] == "smart"]


def test_cards_fixed_in_the_smart_app_link_to_it(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("authorization-missing-pomalidomide-adult-male")
    result = answer(client, server, sc)
    [card] = result["cards"]
    assert card["source"]["topic"]["code"] == "authorization-missing"
    [link] = card["links"]
    assert link["type"] == "smart" and link["url"] == SMART and link["label"]
    context = json.loads(link["appContext"])
    [draft] = sc.request["context"]["draftOrders"]["entry"]
    assert context["order"] == f"MedicationRequest/{draft['resource']['id']}"
    assert context["rule"] == "authorization-missing"


# --- bad input: the status and the field, never 500, never 200 -----------------------------------------


def sign_body() -> dict[str, Any]:
    return scenario("frp-test-8-days-stale").request


def with_context(**changes: Any) -> dict[str, Any]:
    body = sign_body()
    body["context"].update(changes)
    return body


def with_prefetch(key: str, value: Any) -> dict[str, Any]:
    body = sign_body()
    body["prefetch"][key] = value
    return body


def unknown_resource_in_drafts() -> dict[str, Any]:
    body = sign_body()
    body["context"]["draftOrders"]["entry"].append({"resource": {"resourceType": "NotAResource", "id": "x"}})
    return body


OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "forbidden", "diagnostics": "access to this patient is restricted"}],
}

BAD_BODIES: list[tuple[str, str, Any, int | tuple[int, ...], str]] = [
    ("malformed-json", SIGN, b'{"hook": "order-sign",', 400, "(body)"),
    ("json-array", SIGN, b"[]", 400, "(body)"),
    ("empty-body", SIGN, b"", 400, "(body)"),
    ("wrong-hook", "/cds-services/imid-rems-patient-view", sign_body(), 400, "hook"),
    ("draftOrders-a-string", SIGN, with_context(draftOrders="not a bundle"), (400, 422), "context.draftOrders"),
    (
        "draftOrders-a-patient",
        SIGN,
        with_context(draftOrders={"resourceType": "Patient"}),
        (400, 422),
        "context.draftOrders",
    ),
    ("no-patientId", SIGN, with_context(patientId=""), (400, 422), "context.patientId"),
    (
        "unknown-resource-type",
        SIGN,
        unknown_resource_in_drafts(),
        422,
        "context.draftOrders.entry[1].resource.resourceType",
    ),
    ("prefetch-outcome", SIGN, with_prefetch("observations", OUTCOME), 412, "prefetch.observations"),
    ("patient-outcome", SIGN, with_prefetch("patient", OUTCOME), 412, "prefetch.patient"),
    ("unknown-service", "/cds-services/imid-rems-nope", sign_body(), 404, "(url)"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_bad_input_is_an_error_naming_the_field(
    client: httpx.Client,
    server: CdsServer,
    path: str,
    body: Any,
    status: int | tuple[int, ...],
    field: str,
) -> None:
    server.clock.now = scenario("frp-test-8-days-stale").now
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(server.url(path), content=content, headers={"Content-Type": "application/json"})
    assert response.status_code not in (200, 500), response.text
    error = assert_error(response, status, field)
    if field.startswith("prefetch."):
        assert "restricted" in error["message"]


def oversized() -> bytes:
    body = sign_body()
    body["padding"] = "x" * MAX_BODY
    return json.dumps(body).encode()


def test_a_body_over_the_limit_is_413_with_content_length(client: httpx.Client, server: CdsServer) -> None:
    content = oversized()
    response = client.post(server.url(SIGN), content=content, headers={"Content-Type": "application/json"})
    assert "content-length" in response.request.headers
    assert_error(response, 413, "(body)")


def test_a_chunked_body_over_the_limit_is_413(client: httpx.Client, server: CdsServer) -> None:
    content = oversized()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(content), 8192):
            yield content[i : i + 8192]

    response = client.post(server.url(SIGN), content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "(body)")


def test_a_chunked_body_under_the_limit_is_answered(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    server.clock.now = sc.now
    content = json.dumps(sc.request).encode()
    response = client.post(server.url(SIGN), content=iter([content[:100], content[100:]]))
    assert response.status_code == 200, response.text
    assert rule_codes(response.json()) == sc.codes


# --- nothing to fetch, nothing to fetch from -----------------------------------------------------------


def test_non_imid_order_is_no_cards_and_no_fhir_call(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    body = without_prefetch(sc.request, f"http://127.0.0.1:{free_port()}/fhir", token=FHIR_TOKEN)
    [entry] = body["context"]["draftOrders"]["entry"]
    entry["resource"]["medicationCodeableConcept"] = {
        "coding": [
            {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "243670", "display": "aspirin 81 MG"}
        ],
        "text": "aspirin 81 mg tablet",
    }
    assert answer(client, server, sc, body) == {"cards": []}


def test_non_imid_order_is_still_validated(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    body = without_prefetch(sc.request, f"http://127.0.0.1:{free_port()}/fhir", token=FHIR_TOKEN)
    [entry] = body["context"]["draftOrders"]["entry"]
    entry["resource"]["medicationCodeableConcept"] = {"text": "aspirin 81 mg tablet"}
    entry["resource"]["authoredOn"] = "yesterday"
    response = post(client, server, SIGN, body)
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["field"].startswith("context.draftOrders.entry[0]")


def test_no_prefetch_and_no_fhir_server_is_412_naming_the_key(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    server.clock.now = sc.now
    body = without_prefetch(sc.request, None, keep=["patient", "medications", "dispenses"])
    error = assert_error(post(client, server, SIGN, body), 412, "prefetch.observations")
    assert "observations" in error["message"]


def test_null_prefetch_means_no_data_not_412(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    body = without_prefetch(sc.request, None, keep=["patient"])
    body["prefetch"].update(
        dict.fromkeys(["medications", "dispenses", "observations", "conditions", "procedures", "practitionerRoles"])
    )
    result = answer(client, server, sc, body)
    # No earlier order on file: a first prescription, and no pregnancy test for it.
    assert "initiation-tests-incomplete" in rule_codes(result)


def medication_by_reference_not_sent(fhir_server: str) -> tuple[Scenario, dict[str, Any]]:
    """The Cerner-shaped order whose Medication (no display to read) is in neither the prefetch nor the
    Bundle: the service must read it from `fhir_server`."""
    sc = scenario("cerner-medication-reference-quantity-only")
    body = copy.deepcopy(sc.request)
    meds = body["prefetch"]["medications"]
    meds["entry"] = [e for e in meds["entry"] if e["resource"]["resourceType"] != "Medication"]
    body["context"]["draftOrders"]["entry"][0]["resource"]["medicationReference"].pop("display")
    body["fhirServer"] = fhir_server
    body["prefetch"]["userRole"] = None  # everything else sent: the Medication read is the only request
    body["fhirAuthorization"] = {
        "access_token": FHIR_TOKEN,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Medication.rs",
        "subject": "imid-rems",
    }
    return sc, body


def test_an_unreachable_fhir_server_for_a_medication_read_is_412(client: httpx.Client, server: CdsServer) -> None:
    sc, body = medication_by_reference_not_sent(f"http://127.0.0.1:{free_port()}/fhir")
    server.clock.now = sc.now
    assert_error(post(client, server, SIGN, body), 412, "prefetch.medications")


def test_a_malformed_fhir_server_url_is_never_500(client: httpx.Client, server: CdsServer) -> None:
    sc, body = medication_by_reference_not_sent("http://[::1/fhir")
    server.clock.now = sc.now
    response = post(client, server, SIGN, body)
    assert response.status_code in (400, 412), response.text
    assert response.json()["error"]["field"] in ("fhirServer", "prefetch.medications")


def test_a_malformed_fhir_server_url_without_prefetch_is_412(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    server.clock.now = sc.now
    response = post(client, server, SIGN, without_prefetch(sc.request, "http://[::1/fhir", token=FHIR_TOKEN))
    assert response.status_code in (400, 412), response.text


def malformed_entry_list(body: dict[str, Any]) -> None:
    body["context"]["draftOrders"]["entry"] = "not a list"


def malformed_imid_order(body: dict[str, Any]) -> None:
    body["context"]["draftOrders"]["entry"][0]["resource"]["authoredOn"] = "yesterday"


@pytest.mark.parametrize(
    "spoil", [malformed_entry_list, malformed_imid_order], ids=["entry-not-a-list", "bad-authoredOn"]
)
def test_a_malformed_draft_is_reported_before_anything_is_fetched(
    client: httpx.Client, server: CdsServer, spoil: Any
) -> None:
    sc = scenario("frp-test-8-days-stale")
    server.clock.now = sc.now
    full = copy.deepcopy(sc.request)
    spoil(full)
    with_prefetch = post(client, server, SIGN, full)
    assert with_prefetch.status_code in (400, 422)
    field = with_prefetch.json()["error"]["field"]
    assert field.startswith("context.draftOrders.entry")
    fetching = without_prefetch(sc.request, f"http://127.0.0.1:{free_port()}/fhir", token=FHIR_TOKEN)
    spoil(fetching)
    assert_error(post(client, server, SIGN, fetching), with_prefetch.status_code, field)


def order_select(selection: str) -> tuple[Scenario, dict[str, Any]]:
    sc = scenario("frp-test-8-days-stale")
    body = copy.deepcopy(sc.request)
    body["hook"] = "order-select"
    body["context"]["selections"] = [selection]
    return sc, body


def test_order_select_judges_the_selected_draft(client: httpx.Client, server: CdsServer) -> None:
    [entry] = scenario("frp-test-8-days-stale").request["context"]["draftOrders"]["entry"]
    sc, body = order_select(f"MedicationRequest/{entry['resource']['id']}")
    assert rule_codes(answer(client, server, sc, body)) == sc.codes == ["pregnancy-test-stale"]


def test_order_select_with_a_selection_not_in_draft_orders_is_400(client: httpx.Client, server: CdsServer) -> None:
    sc, body = order_select("MedicationRequest/not-in-draft-orders")
    server.clock.now = sc.now
    assert_error(post(client, server, "/cds-services/imid-rems-order-select", body), 400, "context.selections[0]")


# --- feedback --------------------------------------------------------------------------------------------


FEEDBACK = f"{SIGN}/feedback"


def kitchen_sink_cards(client: httpx.Client, server: CdsServer, instance: str) -> dict[str, dict[str, Any]]:
    sc = scenario("revlimid-kitchen-sink-many-problems")
    sc.request["hookInstance"] = instance
    return {c["source"]["topic"]["code"]: c for c in answer(client, server, sc)["cards"]}


def test_feedback_is_stored_with_the_rule_read_from_the_card_uuid(
    client: httpx.Client, server: CdsServer, db_url: str
) -> None:
    cards = kitchen_sink_cards(client, server, "feedback-1")
    supply, specialist = cards["supply-over-28-days"], cards["prescriber-not-specialist"]
    accepted_id = supply["suggestions"][0]["uuid"]
    reason = specialist["overrideReasons"][0]
    body = {
        "feedback": [
            {
                "card": supply["uuid"],
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": accepted_id}],
                "outcomeTimestamp": "2026-11-21T15:01:02Z",
            },
            {
                "card": specialist["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": reason, "userComment": "Hematologist co-signs"},
                "outcomeTimestamp": "2026-11-21T10:03:04-05:00",
            },
        ]
    }
    response = post(client, server, FEEDBACK, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": 2}
    engine = make_engine(db_url)
    try:
        [got_accepted] = read_feedback(engine, card_uuid=supply["uuid"])
        [got_overridden] = read_feedback(engine, card_uuid=specialist["uuid"])
    finally:
        engine.dispose()
    assert got_accepted.rule_code == "supply-over-28-days"
    assert got_accepted.service_id == "imid-rems-order-sign"
    assert got_accepted.outcome == "accepted"
    assert got_accepted.accepted_suggestions == (accepted_id,)
    assert got_accepted.outcome_timestamp == datetime(2026, 11, 21, 15, 1, 2, tzinfo=UTC)
    assert got_overridden.rule_code == "prescriber-not-specialist"
    assert got_overridden.outcome == "overridden"
    assert (got_overridden.override_reason_system, got_overridden.override_reason_code) == (
        reason["system"],
        reason["code"],
    )
    assert got_overridden.override_reason_display == reason["display"]
    assert got_overridden.user_comment == "Hematologist co-signs"
    assert got_overridden.accepted_suggestions == ()
    assert got_overridden.outcome_timestamp == datetime(2026, 11, 21, 15, 3, 4, tzinfo=UTC)
    for item in (got_accepted, got_overridden):
        assert item.outcome_timestamp.utcoffset() is not None
        assert item.received_at is not None and item.received_at.utcoffset() is not None
        assert item.client_iss is None  # auth is off: no client


def good_item(card: str) -> dict[str, Any]:
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-11-21T15:00:00Z"}


BAD_ITEMS: list[tuple[str, dict[str, Any], str]] = [
    ("missing-outcome", {"outcomeTimestamp": "2026-11-21T15:00:00Z"}, "outcome"),
    ("unknown-outcome", {"outcome": "ignored", "outcomeTimestamp": "2026-11-21T15:00:00Z"}, "outcome"),
    (
        "accepted-without-suggestions",
        {"outcome": "accepted", "outcomeTimestamp": "2026-11-21T15:00:00Z"},
        "acceptedSuggestions",
    ),
    ("bad-timestamp", {"outcome": "overridden", "outcomeTimestamp": "21/11/2026 10:00"}, "outcomeTimestamp"),
    ("naive-timestamp", {"outcome": "overridden", "outcomeTimestamp": "2026-11-21T10:00:00"}, "outcomeTimestamp"),
    ("missing-timestamp", {"outcome": "overridden"}, "outcomeTimestamp"),
]


@pytest.mark.parametrize(("item", "field"), [b[1:] for b in BAD_ITEMS], ids=[b[0] for b in BAD_ITEMS])
def test_bad_feedback_is_400_naming_the_field_and_stores_nothing(
    client: httpx.Client, server: CdsServer, db_url: str, item: dict[str, Any], field: str
) -> None:
    cards = kitchen_sink_cards(client, server, f"bad-feedback-{field}-{len(item)}-{item.get('outcome')}")
    first, second = cards["cbc-overdue"]["uuid"], cards["generic-preferred"]["uuid"]
    alone = post(client, server, FEEDBACK, {"feedback": [{"card": second, **item}]})
    assert_error(alone, 400, f"feedback[0].{field}")
    after_good = post(client, server, FEEDBACK, {"feedback": [good_item(first), {"card": second, **item}]})
    assert_error(after_good, 400, f"feedback[1].{field}")
    engine = make_engine(db_url)
    try:
        assert read_feedback(engine, card_uuid=first) == []
        assert read_feedback(engine, card_uuid=second) == []
    finally:
        engine.dispose()


# --- CORS ------------------------------------------------------------------------------------------------


def test_cors_preflight_allows_authorization(client: httpx.Client, server: CdsServer) -> None:
    response = client.options(
        server.url(SIGN),
        headers={
            "Origin": "https://ehr.example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] in ("*", "https://ehr.example.org")
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in response.headers["access-control-allow-methods"]


def test_cors_on_a_normal_call(client: httpx.Client, server: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    server.clock.now = sc.now
    response = client.post(server.url(SIGN), json=sc.request, headers={"Origin": "https://ehr.example.org"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://ehr.example.org")
    discovery = client.get(server.url("/cds-services"), headers={"Origin": "https://ehr.example.org"})
    assert discovery.headers["access-control-allow-origin"] in ("*", "https://ehr.example.org")


# --- the same service on PostgreSQL ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'other.sqlite'}"
    else:
        with postgres.fresh_database() as url:
            yield url


def test_discovery_hooks_and_feedback_on_each_database(any_database: str) -> None:
    sc = scenario("revlimid-kitchen-sink-many-problems")
    with (
        run_cds_server(Clock(sc.now), database_url=any_database, cds_auth="off", clinic_tz=NY) as srv,
        httpx.Client(timeout=30.0) as c,
    ):
        assert {s["id"] for s in c.get(srv.url("/cds-services")).json()["services"]} == set(SERVICES)
        result = answer(c, srv, sc)
        assert rule_codes(result) == sc.codes
        assert smart_links(result) == []  # no smart_launch_url configured: no app links
        card = next(x for x in result["cards"] if x["source"]["topic"]["code"] == "refills-not-allowed")
        item = {
            "card": card["uuid"],
            "outcome": "accepted",
            "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}],
            "outcomeTimestamp": "2026-11-21T15:00:00.250+00:00",
        }
        response = c.post(srv.url(FEEDBACK), json={"feedback": [item]})
        assert response.status_code == 200, response.text
    engine = make_engine(any_database)
    try:
        [stored] = read_feedback(engine)
    finally:
        engine.dispose()
    assert stored.rule_code == "refills-not-allowed"
    assert stored.outcome_timestamp == datetime(2026, 11, 21, 15, 0, 0, 250000, tzinfo=UTC)
