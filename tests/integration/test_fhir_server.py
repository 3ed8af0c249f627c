"""The FHIR R4 test server behaves like the EHR FHIR servers our service and app will talk to.

Every feature later integration tests rely on is proven here against the running server: read, search
(_sort, _count with absolute next links, _include, patient/subject, code, date), conditional create,
versioning with ETag/If-Match, transaction and batch Bundles, /metadata, CORS, content type, errors, bearer
auth and loading Bundles at start. Each test makes its own Patient so the shared server needs no reset.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.fhir_engine import FHIR_JSON, FhirServerError, post_bundle, start_fhir_server

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
URINE_HCG = "2106-3"  # pregnancy test, urine, qualitative
PLATELETS = "777-3"
TEST_IDS = "urn:test:id"
TOKEN = "token-the-service-must-forward"  # noqa: S105 (a test value, not a secret)

PostTransaction = Callable[[dict[str, Any]], dict[str, Any]]


def fhir_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, **extra}


def make_patient(fhir: httpx.Client) -> str:
    response = fhir.post(
        "Patient", json={"resourceType": "Patient", "name": [{"family": "Test"}]}, headers=fhir_headers()
    )
    assert response.status_code == 201, response.text
    patient_id: str = response.json()["id"]
    return patient_id


def observation(patient_id: str, code: str, effective: str, *, system: str = LOINC) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": effective,
        "valueString": "negative",
    }


def create(fhir: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = fhir.post(resource["resourceType"], json=resource, headers=fhir_headers())
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def entry_ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((item["url"] for item in bundle.get("link", []) if item["relation"] == relation), None)


def is_operation_outcome(response: httpx.Response) -> bool:
    body: dict[str, Any] = response.json()
    return bool(body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error")


# --- read -----------------------------------------------------------------------------------------------------


def test_read_returns_the_stored_resource_with_etag_and_fhir_json(fhir: httpx.Client) -> None:
    created = create(fhir, observation(make_patient(fhir), URINE_HCG, "2026-03-01T09:00:00-05:00"))

    response = fhir.get(f"Observation/{created['id']}")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    assert body["id"] == created["id"]
    assert body["effectiveDateTime"] == "2026-03-01T09:00:00-05:00"
    assert response.headers["etag"] == f'W/"{body["meta"]["versionId"]}"'


def test_unknown_id_is_404_with_an_operation_outcome(fhir: httpx.Client) -> None:
    response = fhir.get(f"Observation/{uuid.uuid4()}")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith(FHIR_JSON)
    assert is_operation_outcome(response)


def test_create_ignores_an_id_sent_by_the_client(fhir: httpx.Client) -> None:
    body = {"resourceType": "Patient", "id": "chosen-by-client"}

    created = fhir.post("Patient", json=body, headers=fhir_headers()).json()

    assert created["id"] != "chosen-by-client"
    assert fhir.get("Patient/chosen-by-client").status_code == 404


def test_deleted_resource_reads_as_410(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)

    assert fhir.delete(f"Patient/{patient_id}").status_code == 200

    response = fhir.get(f"Patient/{patient_id}")
    assert response.status_code == 410
    assert is_operation_outcome(response)


# --- search ---------------------------------------------------------------------------------------------------


def test_paging_follows_absolute_next_links_through_every_result(fhir: httpx.Client, fhir_server: str) -> None:
    patient_id = make_patient(fhir)
    expected = {
        create(fhir, observation(patient_id, PLATELETS, f"2026-02-{day:02d}T08:00:00Z"))["id"] for day in range(1, 26)
    }

    url: str | None = f"{fhir_server}/Observation?subject=Patient/{patient_id}&_count=10"
    seen: list[str] = []
    page_sizes: list[int] = []
    while url is not None:
        assert url.startswith(f"{fhir_server}/Observation?")  # absolute, on this server
        response = httpx.get(url, headers={"Accept": FHIR_JSON})
        assert response.status_code == 200, response.text
        bundle = response.json()
        assert bundle["total"] == 25
        page_sizes.append(len(entry_ids(bundle)))
        seen += entry_ids(bundle)
        url = link(bundle, "next")

    assert page_sizes == [10, 10, 5]
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == expected


def test_search_without_count_is_paged_by_the_server(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    for day in range(1, 23):
        create(fhir, observation(patient_id, PLATELETS, f"2026-02-{day:02d}"))

    bundle = fhir.get("Observation", params={"patient": patient_id}).json()

    assert bundle["total"] == 22
    assert len(entry_ids(bundle)) == 20
    assert link(bundle, "next") is not None


def test_sort_by_date_descending_compares_instants_across_offsets(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    # As instants: 2026-03-02T04:30Z, 2026-03-02T01:00Z, 2026-03-01T12:00Z, 2026-01-15 (whole day, UTC).
    late_evening_new_york = create(fhir, observation(patient_id, URINE_HCG, "2026-03-01T23:30:00-05:00"))["id"]
    early_utc = create(fhir, observation(patient_id, URINE_HCG, "2026-03-02T01:00:00+00:00"))["id"]
    noon = create(fhir, observation(patient_id, URINE_HCG, "2026-03-01T12:00:00Z"))["id"]
    january = create(fhir, observation(patient_id, URINE_HCG, "2026-01-15"))["id"]

    descending = fhir.get("Observation", params={"patient": patient_id, "_sort": "-date"}).json()
    ascending = fhir.get("Observation", params={"patient": patient_id, "_sort": "date"}).json()

    assert entry_ids(descending) == [late_evening_new_york, early_utc, noon, january]
    assert entry_ids(ascending) == [january, noon, early_utc, late_evening_new_york]


def test_sort_and_count_give_the_newest_first(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    ids = [create(fhir, observation(patient_id, URINE_HCG, f"2026-04-{day:02d}T10:00:00Z"))["id"] for day in (3, 1, 2)]

    bundle = fhir.get("Observation", params={"patient": patient_id, "_sort": "-date", "_count": "1"}).json()

    assert entry_ids(bundle) == [ids[0]]
    assert bundle["total"] == 3


def test_patient_and_subject_select_one_patients_resources(fhir: httpx.Client) -> None:
    mine, other = make_patient(fhir), make_patient(fhir)
    own = {create(fhir, observation(mine, PLATELETS, "2026-01-05T10:00:00Z"))["id"] for _ in range(2)}
    create(fhir, observation(other, PLATELETS, "2026-01-05T10:00:00Z"))

    by_patient_reference = fhir.get("Observation", params={"patient": f"Patient/{mine}"}).json()
    by_patient_id = fhir.get("Observation", params={"patient": mine}).json()
    by_subject = fhir.get("Observation", params={"subject": f"Patient/{mine}"}).json()

    assert set(entry_ids(by_patient_reference)) == own
    assert set(entry_ids(by_patient_id)) == own
    assert set(entry_ids(by_subject)) == own


def test_code_token_search_matches_system_and_code(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    hcg = create(fhir, observation(patient_id, URINE_HCG, "2026-01-05T10:00:00Z"))["id"]
    create(fhir, observation(patient_id, PLATELETS, "2026-01-05T10:00:00Z"))

    def search(code: str) -> list[str]:
        return entry_ids(fhir.get("Observation", params={"patient": patient_id, "code": code}).json())

    assert search(f"{LOINC}|{URINE_HCG}") == [hcg]
    assert search(URINE_HCG) == [hcg]
    assert search(f"{LOINC}|{URINE_HCG},{LOINC}|2118-8") == [hcg]
    assert search(f"http://snomed.info/sct|{URINE_HCG}") == []


def test_date_search_with_prefixes(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    december = create(fhir, observation(patient_id, URINE_HCG, "2025-12-31T23:00:00Z"))["id"]
    new_year = create(fhir, observation(patient_id, URINE_HCG, "2026-01-01T00:30:00Z"))["id"]
    february = create(fhir, observation(patient_id, URINE_HCG, "2026-02-10"))["id"]

    def search(date: str) -> set[str]:
        return set(entry_ids(fhir.get("Observation", params={"patient": patient_id, "date": date}).json()))

    assert search("ge2026-01-01") == {new_year, february}
    assert search("lt2026-01-01") == {december}
    assert search("2026-02-10") == {february}
    assert search("ge2026-01-01T00:00:00Z") == {new_year, february}


def test_include_adds_the_referenced_medication(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    medication = create(
        fhir,
        {
            "resourceType": "Medication",
            "code": {"coding": [{"system": RXNORM, "code": "602910", "display": "lenalidomide 10 MG Oral Capsule"}]},
        },
    )
    order = create(
        fhir,
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{patient_id}"},
            "medicationReference": {"reference": f"Medication/{medication['id']}"},
        },
    )

    bundle = fhir.get(
        "MedicationRequest", params={"subject": f"Patient/{patient_id}", "_include": "MedicationRequest:medication"}
    ).json()

    assert entry_ids(bundle, "match") == [order["id"]]
    assert entry_ids(bundle, "include") == [medication["id"]]
    assert bundle["total"] == 1
    included = next(e for e in bundle["entry"] if e["search"]["mode"] == "include")
    assert included["fullUrl"].endswith(f"/Medication/{medication['id']}")


def test_unknown_search_parameter_is_400_not_an_empty_page(fhir: httpx.Client) -> None:
    response = fhir.get("Observation", params={"not-a-parameter": "x"})

    assert response.status_code == 400
    assert is_operation_outcome(response)


def test_search_parameter_type_the_server_cannot_evaluate_is_400(fhir: httpx.Client) -> None:
    response = fhir.get("Observation", params={"value-quantity": "gt5"})

    assert response.status_code == 400
    assert "quantity" in response.text


def test_malformed_date_search_is_400(fhir: httpx.Client) -> None:
    response = fhir.get("Observation", params={"date": "ge2026-13-45"})

    assert response.status_code == 400
    assert is_operation_outcome(response)


# --- conditional create and versioning ------------------------------------------------------------------------


def test_conditional_create_twice_makes_one_resource(fhir: httpx.Client) -> None:
    identifier = str(uuid.uuid4())
    body = {"resourceType": "Patient", "identifier": [{"system": TEST_IDS, "value": identifier}]}
    condition = {"If-None-Exist": f"identifier={TEST_IDS}|{identifier}"}

    first = fhir.post("Patient", json=body, headers=fhir_headers(**condition))
    second = fhir.post("Patient", json=body, headers=fhir_headers(**condition))

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    found = fhir.get("Patient", params={"identifier": f"{TEST_IDS}|{identifier}"}).json()
    assert found["total"] == 1


def test_conditional_create_matching_two_resources_is_412(fhir: httpx.Client) -> None:
    family = f"Twin{uuid.uuid4().hex}"
    for _ in range(2):
        create(fhir, {"resourceType": "Patient", "name": [{"family": family}]})

    response = fhir.post(
        "Patient",
        json={"resourceType": "Patient", "name": [{"family": family}]},
        headers=fhir_headers(**{"If-None-Exist": f"family={family}"}),
    )

    assert response.status_code == 412
    assert is_operation_outcome(response)


def test_update_with_if_match_checks_the_version(fhir: httpx.Client) -> None:
    created_response = fhir.post("Patient", json={"resourceType": "Patient", "active": True}, headers=fhir_headers())
    created = created_response.json()
    first_etag = created_response.headers["etag"]
    assert first_etag == f'W/"{created["meta"]["versionId"]}"'
    assert created_response.headers["location"].endswith(
        f"/Patient/{created['id']}/_history/{created['meta']['versionId']}"
    )

    updated_body = {**created, "active": False}
    updated = fhir.put(f"Patient/{created['id']}", json=updated_body, headers=fhir_headers(**{"If-Match": first_etag}))
    assert updated.status_code == 200, updated.text
    second_etag = updated.headers["etag"]
    assert second_etag != first_etag
    assert second_etag == f'W/"{updated.json()["meta"]["versionId"]}"'

    stale = fhir.put(f"Patient/{created['id']}", json=updated_body, headers=fhir_headers(**{"If-Match": first_etag}))
    assert stale.status_code == 412
    assert is_operation_outcome(stale)

    read = fhir.get(f"Patient/{created['id']}")
    assert read.headers["etag"] == second_etag
    assert read.json()["active"] is False
    old_version = fhir.get(f"Patient/{created['id']}/_history/{created['meta']['versionId']}")
    assert old_version.json()["active"] is True


def test_update_with_a_different_id_in_the_body_is_400(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)

    response = fhir.put(
        f"Patient/{patient_id}", json={"resourceType": "Patient", "id": "other"}, headers=fhir_headers()
    )

    assert response.status_code == 400
    assert is_operation_outcome(response)


# --- transaction and batch ------------------------------------------------------------------------------------


def test_transaction_creates_all_and_resolves_urn_references(
    fhir: httpx.Client, post_transaction: PostTransaction
) -> None:
    patient_urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": {"resourceType": "Patient", "name": [{"family": "Transaction"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": observation("placeholder", URINE_HCG, "2026-05-01T08:00:00Z")
                | {"subject": {"reference": patient_urn}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }

    result = post_transaction(bundle)

    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert [s.split()[0] for s in statuses] == ["201", "201"]
    patient_id = result["entry"][0]["resource"]["id"]
    observation_entry = result["entry"][1]
    assert observation_entry["resource"]["subject"]["reference"] == f"Patient/{patient_id}"
    assert observation_entry["response"]["etag"] == f'W/"{observation_entry["resource"]["meta"]["versionId"]}"'
    stored = fhir.get("Observation", params={"subject": f"Patient/{patient_id}"}).json()
    assert entry_ids(stored) == [observation_entry["resource"]["id"]]


def test_failed_transaction_stores_nothing(fhir: httpx.Client, fhir_server: str) -> None:
    identifier = str(uuid.uuid4())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "identifier": [{"system": TEST_IDS, "value": identifier}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "bad": 1},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }

    response = httpx.post(fhir_server, json=bundle, headers=fhir_headers())

    assert response.status_code == 400
    assert is_operation_outcome(response)
    found = fhir.get("Patient", params={"identifier": f"{TEST_IDS}|{identifier}"}).json()
    assert found["total"] == 0


def test_batch_answers_each_entry_on_its_own(fhir: httpx.Client, fhir_server: str) -> None:
    patient_id = make_patient(fhir)
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{patient_id}"}},
            {"request": {"method": "GET", "url": f"Patient/{uuid.uuid4()}"}},
            {
                "resource": observation(patient_id, PLATELETS, "2026-05-01T08:00:00Z"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "GET", "url": f"Observation?patient={patient_id}"}},
        ],
    }

    response = httpx.post(fhir_server, json=bundle, headers=fhir_headers())

    assert response.status_code == 200
    result = response.json()
    assert result["type"] == "batch-response"
    assert [e["response"]["status"].split()[0] for e in result["entry"]] == ["200", "404", "201", "200"]
    assert result["entry"][0]["resource"]["id"] == patient_id
    assert result["entry"][3]["resource"]["total"] == 1


def test_post_bundle_raises_when_an_entry_fails(fhir_server: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/nope"}}],
    }

    with pytest.raises(FhirServerError, match="1 Bundle entries failed"):
        post_bundle(fhir_server, bundle)


# --- patient, subject and _id searches use an index: same answers as evaluating every resource --------------


def test_patient_list_returns_exactly_those_patients_resources_in_store_order(fhir: httpx.Client) -> None:
    a, b, c = make_patient(fhir), make_patient(fhir), make_patient(fhir)
    a1 = create(fhir, observation(a, PLATELETS, "2026-01-05T10:00:00Z"))["id"]
    b1 = create(fhir, observation(b, PLATELETS, "2026-01-05T10:00:00Z"))["id"]
    create(fhir, observation(c, PLATELETS, "2026-01-05T10:00:00Z"))
    a2 = create(fhir, observation(a, URINE_HCG, "2026-01-06T10:00:00Z"))["id"]
    condition = {"resourceType": "Condition", "code": {"text": "myeloma"}, "subject": {"reference": f"Patient/{c}"}}
    c_condition = create(fhir, condition)["id"]

    listed = fhir.get("Observation", params={"patient": f"{a},Patient/{b},{uuid.uuid4()}", "_count": "1000"}).json()
    one_code = fhir.get("Observation", params={"subject": f"Patient/{a},Patient/{b}", "code": f"{LOINC}|{URINE_HCG}"})
    conditions = fhir.get("Condition", params={"patient": f"{a},{c}"}).json()

    assert entry_ids(listed) == [a1, b1, a2]  # creation order, as without the index
    assert listed["total"] == 3
    assert entry_ids(one_code.json()) == [a2]
    assert entry_ids(conditions) == [c_condition]


def test_a_resource_moved_to_another_patient_is_found_only_under_the_new_one(fhir: httpx.Client) -> None:
    a, b = make_patient(fhir), make_patient(fhir)
    moved = create(fhir, observation(a, PLATELETS, "2026-01-05T10:00:00Z"))
    stays = create(fhir, observation(a, PLATELETS, "2026-01-06T10:00:00Z"))["id"]

    moved["subject"] = {"reference": f"Patient/{b}"}
    assert fhir.put(f"Observation/{moved['id']}", json=moved, headers=fhir_headers()).status_code == 200

    assert entry_ids(fhir.get("Observation", params={"patient": a}).json()) == [stays]
    assert entry_ids(fhir.get("Observation", params={"patient": b}).json()) == [moved["id"]]
    assert entry_ids(fhir.get("Observation", params={"subject": f"Patient/{b}"}).json()) == [moved["id"]]
    both = fhir.get("Observation", params={"patient": f"{a},{b}"}).json()
    assert entry_ids(both) == [moved["id"], stays]  # an update keeps the resource's place in the store


def test_a_deleted_resource_is_gone_from_patient_and_id_searches(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    deleted = create(fhir, observation(patient_id, PLATELETS, "2026-01-05T10:00:00Z"))["id"]
    kept = create(fhir, observation(patient_id, PLATELETS, "2026-01-06T10:00:00Z"))["id"]

    assert fhir.delete(f"Observation/{deleted}").status_code == 200

    assert entry_ids(fhir.get("Observation", params={"patient": patient_id}).json()) == [kept]
    assert fhir.get("Observation", params={"_id": f"{deleted},{kept}"}).json()["total"] == 1


def test_id_list_search(fhir: httpx.Client) -> None:
    first, second, third = make_patient(fhir), make_patient(fhir), make_patient(fhir)

    # A token: `|id` is an id without a system; an unknown id just matches nothing.
    found = fhir.get("Patient", params={"_id": f"{third},|{first},{uuid.uuid4()}"}).json()

    assert entry_ids(found) == [first, third]  # creation order, not the order of the list
    assert fhir.get("Patient", params={"_id": second}).json()["total"] == 1


def test_conditional_create_on_a_patient_search(fhir: httpx.Client) -> None:
    a, b = make_patient(fhir), make_patient(fhir)
    hcg = observation(a, URINE_HCG, "2026-01-05")
    condition = {"If-None-Exist": f"patient={a},{b}&code={LOINC}|{URINE_HCG}"}

    first = fhir.post("Observation", json=hcg, headers=fhir_headers(**condition))
    again = fhir.post("Observation", json=hcg, headers=fhir_headers(**condition))
    for_b = fhir.post("Observation", json=observation(b, URINE_HCG, "2026-01-05"), headers=fhir_headers(**condition))
    other_code = {"If-None-Exist": f"patient={b}&code={LOINC}|{PLATELETS}"}
    platelets = fhir.post(
        "Observation", json=observation(b, PLATELETS, "2026-01-05"), headers=fhir_headers(**other_code)
    )

    assert (first.status_code, again.status_code, platelets.status_code) == (201, 200, 201)
    assert again.json()["id"] == first.json()["id"]
    assert for_b.status_code == 200  # the condition names both patients: a's test matches
    assert fhir.get("Observation", params={"patient": f"{a},{b}"}).json()["total"] == 2


def test_failed_transaction_leaves_patient_searches_as_they_were(fhir: httpx.Client, fhir_server: str) -> None:
    a, b = make_patient(fhir), make_patient(fhir)
    o1, o2, o3 = (create(fhir, observation(a, PLATELETS, f"2026-01-0{day}T10:00:00Z")) for day in (1, 2, 3))
    moved = o2 | {"subject": {"reference": f"Patient/{b}"}}
    invalid = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "bad": 1}
    never = str(uuid.uuid4())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        # Processed as deletes, creates, then updates in order: the invalid update fails after all the others.
        "entry": [
            {"request": {"method": "DELETE", "url": f"Observation/{o1['id']}"}},
            {"resource": observation(a, PLATELETS, "2026-01-04"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": moved, "request": {"method": "PUT", "url": f"Observation/{o2['id']}"}},
            {"resource": invalid | {"id": never}, "request": {"method": "PUT", "url": f"Observation/{never}"}},
        ],
    }

    response = httpx.post(fhir_server, json=bundle, headers=fhir_headers())

    assert response.status_code == 400, response.text
    found = fhir.get("Observation", params={"patient": f"{a},{b}"}).json()
    assert entry_ids(found) == [o1["id"], o2["id"], o3["id"]]  # the deleted one back in its place
    assert fhir.get("Observation", params={"patient": b}).json()["total"] == 0
    assert fhir.get(f"Observation/{o1['id']}").status_code == 200
    assert fhir.get(f"Observation/{o2['id']}").json()["meta"] == o2["meta"]
    assert fhir.get(f"Observation/{o2['id']}/_history").json()["total"] == 1


def test_paging_sees_writes_made_between_pages(fhir: httpx.Client) -> None:
    patient_id = make_patient(fhir)
    ids = [create(fhir, observation(patient_id, PLATELETS, f"2026-02-0{day}"))["id"] for day in (1, 2, 3)]

    first = fhir.get("Observation", params={"status": "final", "patient": patient_id, "_count": "2"}).json()
    added = create(fhir, observation(patient_id, PLATELETS, "2026-02-04"))["id"]
    next_url = link(first, "next")
    assert next_url is not None
    second = fhir.get(next_url).json()

    assert first["total"] == 3
    assert second["total"] == 4
    assert entry_ids(second) == [ids[2], added]


def load_file_for_index_comparison(path: Path) -> Path:
    """Patients, with references in every form the matcher tells apart, in one batch of PUTs."""
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": pid, "gender": "female"} for pid in ("ix-p1", "ix-p2", "ix-p3", "Ix-Mixed")
    ]
    resources.append({"resourceType": "Group", "id": "ix-g1", "type": "person", "actual": True})
    subjects = [
        "Patient/ix-p1",
        "Patient/ix-p2",
        "Patient/ix-p3",
        "Patient/Ix-Mixed",
        "http://elsewhere.example/fhir/Patient/ix-p1",
        "Group/ix-g1",
        "Patient/ix-p1/_history/1",
    ]
    for n, reference in enumerate(subjects * 2):
        code = PLATELETS if n % 3 else URINE_HCG
        resources.append(observation("x", code, f"2026-03-{n + 1:02d}T08:00:00Z") | {"id": f"ix-o{n}"})
        resources[-1]["subject"] = {"reference": reference}
    for n, pid in enumerate(("ix-p1", "ix-p2", "ix-p1")):
        resources.append(
            {
                "resourceType": "MedicationRequest",
                "id": f"ix-rx{n}",
                "status": "active" if n else "stopped",
                "intent": "order",
                "medicationCodeableConcept": {"text": "lenalidomide"},
                "subject": {"reference": f"Patient/{pid}"},
            }
        )
    resources.append({"resourceType": "Observation", "id": "ix-none", "status": "final", "code": {"text": "none"}})
    participants = [{"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"} for pid in ("ix-p1", "ix-p2")]
    resources.append({"resourceType": "Appointment", "id": "ix-ap", "status": "proposed", "participant": participants})
    entries = [
        {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in resources
    ]
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}))
    return path


INDEX_QUERIES = [
    "Observation?patient=ix-p1,ix-p2&_count=1000",
    "Observation?patient=Patient/ix-p1,Patient/ix-p3&code=http://loinc.org|777-3",
    "Observation?patient=ix-p1&_sort=-date",
    "Observation?patient=ix-p1,ix-p2,ix-p3&_count=3&_offset=3",
    "Observation?subject=Patient/ix-p1",
    "Observation?subject=ix-p1",
    "Observation?subject=http://elsewhere.example/fhir/Patient/ix-p1",
    "Observation?subject=Group/ix-g1",
    "Observation?patient=ix-mixed,IX-P2",
    "Observation?patient=1",
    "Observation?subject=Patient/ix-p1/_history/1",
    "Observation?patient=ix-p1&patient=ix-p2",
    "Observation?patient=ix-p1&subject=Patient/ix-p1",
    "Observation?patient:missing=true",
    "Observation?patient=ix-p2&_id=ix-o1,ix-o2,ix-o8",
    "Observation?patient=ix-p1,Patient/ix-p1,ix-p1,Patient/ix-p9",
    "Observation?subject=Patient/ix-p1\\,ix-p2,Patient/ix-p3",
    "Appointment?patient=ix-p2,ix-p1",
    "Appointment?patient=ix-p2&_id=ix-ap",
    "MedicationRequest?patient=ix-p1,ix-p2&status=active",
    "MedicationRequest?subject=Patient/ix-p1&_include=MedicationRequest:subject",
    "Patient?_id=ix-p1,IX-P2,|ix-p3,urn:x|ix-p1,ix-mixed,nope",
    "Patient?_id=ix-p1&_revinclude=Observation:patient",
    "Group?_id=ix-g1",
]


def index_answers(base: str) -> list[tuple[int, list[str], int | None]]:
    answers = []
    for query in INDEX_QUERIES:
        response = httpx.get(f"{base}/{query}")
        body = response.json()
        ids = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in body.get("entry", [])]
        answers.append((response.status_code, ids, body.get("total")))
    return answers


def change_for_index_comparison(base: str) -> None:
    """The same writes on both servers: update, delete, recreate, and a failed transaction that did all three."""
    moved = httpx.get(f"{base}/Observation/ix-o0").json() | {"subject": {"reference": "Patient/ix-p2"}}
    assert httpx.put(f"{base}/Observation/ix-o0", json=moved, headers=fhir_headers()).status_code == 200
    assert httpx.delete(f"{base}/Observation/ix-o1").status_code == 200
    assert httpx.delete(f"{base}/Observation/ix-o2").status_code == 200
    recreated = observation("ix-p3", URINE_HCG, "2026-04-01") | {"id": "ix-o2"}
    assert httpx.put(f"{base}/Observation/ix-o2", json=recreated, headers=fhir_headers()).is_success
    failing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "DELETE", "url": "Observation/ix-o3"}},
            {"request": {"method": "DELETE", "url": "Observation/ix-o9"}},
            {
                "resource": observation("ix-p1", PLATELETS, "2026-04-02"),
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": moved | {"id": "ix-o7", "subject": {"reference": "Patient/ix-p3"}},
                "request": {"method": "PUT", "url": "Observation/ix-o7"},
            },
            {
                "resource": {"resourceType": "Observation", "id": "ix-bad", "bad": 1},
                "request": {"method": "PUT", "url": "Observation/ix-bad"},
            },
        ],
    }
    assert httpx.post(base, json=failing, headers=fhir_headers()).status_code == 400


def test_indexed_searches_answer_as_the_unindexed_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = load_file_for_index_comparison(tmp_path / "index.json")
    with start_fhir_server(load=[bundle]) as indexed:
        monkeypatch.setenv("FHIR_SERVER_NO_INDEX", "1")
        with start_fhir_server(load=[bundle]) as unindexed:
            loaded = index_answers(indexed.base)
            assert loaded == index_answers(unindexed.base)
            assert loaded[0][2] == 4  # the comparison is not between two empty answers

            change_for_index_comparison(indexed.base)
            change_for_index_comparison(unindexed.base)

            changed = index_answers(indexed.base)
            assert changed == index_answers(unindexed.base)
            assert changed != loaded


# --- metadata, CORS, content type, errors ---------------------------------------------------------------------


def test_metadata_is_an_r4_capability_statement(fhir: httpx.Client) -> None:
    response = fhir.get("metadata")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR_JSON)
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"date", "code", "patient", "subject"} <= {p["name"] for p in resources["Observation"]["searchParam"]}
    assert {"transaction", "batch"} <= {i["code"] for i in statement["rest"][0]["interaction"]}


def test_cors_preflight_allows_the_headers_a_smart_app_sends(fhir_server: str) -> None:
    response = httpx.options(
        f"{fhir_server}/MedicationRequest",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, if-match, content-type",
        },
    )

    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "PUT", "DELETE"} <= methods
    allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "if-match", "if-none-exist", "content-type"} <= allowed


def test_cors_headers_on_normal_responses_expose_etag_and_location(fhir: httpx.Client) -> None:
    response = fhir.post(
        "Patient", json={"resourceType": "Patient"}, headers=fhir_headers(Origin="http://localhost:5173")
    )

    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location"} <= exposed


def test_invalid_json_body_is_400(fhir: httpx.Client) -> None:
    response = fhir.post("Patient", content=b"{not json", headers=fhir_headers())

    assert response.status_code == 400
    assert is_operation_outcome(response)


def test_invalid_resource_is_400_naming_the_element(fhir: httpx.Client) -> None:
    response = fhir.post("Patient", json={"resourceType": "Patient", "birthDate": "1970-13-01"}, headers=fhir_headers())

    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Patient.birthDate"]


def test_resource_type_must_match_the_url(fhir: httpx.Client) -> None:
    response = fhir.post("Observation", json={"resourceType": "Patient"}, headers=fhir_headers())

    assert response.status_code == 400
    assert is_operation_outcome(response)


def test_body_that_is_not_json_is_415(fhir: httpx.Client) -> None:
    response = fhir.post("Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"})

    assert response.status_code == 415
    assert is_operation_outcome(response)


def test_unknown_resource_type_is_404(fhir: httpx.Client) -> None:
    response = fhir.get("NotAResource/1")

    assert response.status_code == 404
    assert is_operation_outcome(response)


# --- bearer token and loading at start ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_server() -> Iterator[str]:
    with start_fhir_server(require_token=TOKEN) as server:
        yield server.base


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_required_token_rejects_requests_without_it(secured_server: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = httpx.get(f"{secured_server}/Patient", headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert is_operation_outcome(response)


def test_required_token_lets_the_right_bearer_token_through(secured_server: str) -> None:
    headers = fhir_headers(Authorization=f"Bearer {TOKEN}")

    created = httpx.post(f"{secured_server}/Patient", json={"resourceType": "Patient"}, headers=headers)
    # The auth scheme is case-insensitive (RFC 6750 / RFC 9110); the token is not.
    read = httpx.get(f"{secured_server}/Patient/{created.json()['id']}", headers={"Authorization": f"bearer {TOKEN}"})

    assert created.status_code == 201
    assert read.status_code == 200


def test_required_token_leaves_metadata_and_preflight_public(secured_server: str) -> None:
    assert httpx.get(f"{secured_server}/metadata").status_code == 200
    preflight = httpx.options(
        f"{secured_server}/Patient", headers={"Origin": "http://app", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 204


def transaction_file(path: Path, patient_id: str) -> Path:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "id": patient_id, "gender": "female"},
                "request": {"method": "PUT", "url": f"Patient/{patient_id}"},
            },
            {
                "resource": observation(patient_id, URINE_HCG, "2026-06-01T08:00:00Z"),
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    path.write_text(json.dumps(bundle))
    return path


def test_load_files_and_directories_at_start(tmp_path: Path) -> None:
    single = transaction_file(tmp_path / "single.json", "loaded-one")
    directory = tmp_path / "more"
    directory.mkdir()
    transaction_file(directory / "a.json", "loaded-two")
    transaction_file(directory / "b.json", "loaded-three")

    with start_fhir_server(load=[single, directory]) as server:
        for patient_id in ("loaded-one", "loaded-two", "loaded-three"):
            assert httpx.get(f"{server.base}/Patient/{patient_id}").json()["gender"] == "female"
            found = httpx.get(f"{server.base}/Observation", params={"patient": patient_id}).json()
            assert found["total"] == 1


def test_a_bundle_that_does_not_load_stops_the_start_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {}}]}))

    with pytest.raises(FhirServerError, match=r"could not load .*broken\.json"):
        start_fhir_server(load=[broken])


def test_stop_ends_the_server(tmp_path: Path) -> None:
    server = start_fhir_server()
    base = server.base

    server.stop()

    assert server.process.returncode is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/metadata")
