"""CDS Hooks requests in, cards out (https://cds-hooks.hl7.org/2.0/), through
`cds_hooks.service.evaluate_request` and the `imid-rems evaluate` command line.

Card shape per the spec and FHIR_CONTRACT.md "Cards"; stable card uuids for a retried hook call; a
non-IMiD order answers no cards without reading the chart; bad input is an error that names the field
(`InvalidInput.path`, `.status`) or exit code 2 — never an empty answer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from cds_hooks.cli import build_parser, cmd_evaluate, main
from cds_hooks.service import evaluate_request, parse_request
from cds_hooks.services import BY_HOOK
from cds_hooks.settings import get_settings
from fhir_mappings import InvalidInput
from rems.findings import RuleCode

from .fhir_json import (
    AUTHORIZATION_SYSTEM,
    CHICAGO,
    NOW,
    PATIENT_ID,
    PATIENT_REF,
    RISK_CATEGORY_EXTENSION,
    RISK_CATEGORY_SYSTEM,
    RULE_SYSTEM,
    TOKYO,
    UCUM,
    bundle,
    capsule_dose,
    lenalidomide_request,
    loinc,
    medication,
    medication_request,
    observation,
    patient,
    quantity,
    rxnorm,
    snomed,
)

HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
RULE_CODES = {c.value for c in RuleCode}


def order_sign(
    *drafts: dict[str, Any],
    prefetch: dict[str, Any] | None = None,
    hook_instance: str = HOOK_INSTANCE,
) -> dict[str, Any]:
    """An order-sign request as an EHR sends it: the drafts in `context.draftOrders`, the chart in
    `prefetch` (default: just the patient, a 40-year-old woman)."""
    raw: dict[str, Any] = {
        "hook": "order-sign",
        "hookInstance": hook_instance,
        "fhirServer": "https://ehr.example.org/fhir/R4",
        "context": {
            "userId": "PractitionerRole/onc-1",
            "patientId": PATIENT_ID,
            "draftOrders": bundle(*drafts, kind="collection"),
        },
    }
    if prefetch is None:
        prefetch = {"patient": patient(gender="female", birthDate="1985-04-02")}
    raw["prefetch"] = prefetch
    return raw


def unsafe_lenalidomide() -> dict[str, Any]:
    """Brand Revlimid 25 mg for 6 weeks with 2 refills, no authorization number or risk category."""
    return lenalidomide_request(
        medicationCodeableConcept=rxnorm("643722", "Revlimid 25 MG Oral Capsule"),
        dispenseRequest={
            "numberOfRepeatsAllowed": 2,
            "quantity": quantity(42, "capsule", "{capsule}"),
            "expectedSupplyDuration": quantity(6, "wk", "wk"),
        },
    )


def aspirin_request(rid: str = "draft-asa", **fields: Any) -> dict[str, Any]:
    return medication_request(
        rid,
        medicationCodeableConcept=rxnorm("243670", "aspirin 81 MG Oral Tablet"),
        dosageInstruction=[{"text": "81 mg daily"}],
        **fields,
    )


def evaluate(raw: dict[str, Any], now: datetime = NOW, zone: ZoneInfo = CHICAGO) -> dict[str, Any]:
    """The JSON the service answers for a raw request."""
    result: dict[str, Any] = evaluate_request(parse_request(raw), now=now, zone=zone).to_json()
    return result


def codes_of(response: dict[str, Any]) -> list[str]:
    return [c["source"]["topic"]["code"] for c in response["cards"]]


def uuids_of(response: dict[str, Any]) -> list[str]:
    return [c["uuid"] for c in response["cards"]]


@pytest.fixture(autouse=True)
def _clean_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from IMID_REMS_* variables: start every test from none of them."""
    for name in ("IMID_REMS_CLINIC_TZ", "IMID_REMS_CONFIG", "IMID_REMS_MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------
# Cards
# ------------------------------------------------------------------------------------------------


def test_cards_have_the_cds_hooks_card_shape() -> None:
    response = evaluate(order_sign(unsafe_lenalidomide()))
    assert set(response) == {"cards"}
    cards = response["cards"]
    assert {"supply-over-28-days", "refills-not-allowed", "authorization-missing", "risk-category-missing"} <= set(
        codes_of(response)
    )
    for card in cards:
        assert uuid.UUID(card["uuid"])
        assert 0 < len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["source"]["label"]
        topic = card["source"]["topic"]
        assert topic["system"] == RULE_SYSTEM
        assert topic["code"] in RULE_CODES
        assert topic["display"]
        # markdown detail naming the order and the rule
        assert "`MedicationRequest/draft-1`" in card["detail"]
        assert f"`{topic['code']}`" in card["detail"]
    assert len(set(uuids_of(response))) == len(cards)
    json.dumps(response)  # plain JSON all the way down


def test_indicators_by_rule() -> None:
    cards = {c["source"]["topic"]["code"]: c for c in evaluate(order_sign(unsafe_lenalidomide()))["cards"]}
    assert cards["supply-over-28-days"]["indicator"] == "critical"
    assert cards["refills-not-allowed"]["indicator"] == "critical"
    assert cards["generic-preferred"]["indicator"] == "info"  # coverage: never critical


def test_cards_are_most_severe_first() -> None:
    order = {"critical": 0, "warning": 1, "info": 2}
    indicators = [order[c["indicator"]] for c in evaluate(order_sign(unsafe_lenalidomide()))["cards"]]
    assert indicators == sorted(indicators)


def test_same_hook_instance_gives_the_same_card_uuids() -> None:
    first = evaluate(order_sign(unsafe_lenalidomide()))
    retried = evaluate(order_sign(unsafe_lenalidomide()), now=datetime(2025, 6, 18, 10, 0, 5, tzinfo=CHICAGO))
    assert uuids_of(first) == uuids_of(retried)
    assert codes_of(first) == codes_of(retried)


def test_another_hook_instance_gives_other_card_uuids() -> None:
    first = evaluate(order_sign(unsafe_lenalidomide()))
    other = evaluate(order_sign(unsafe_lenalidomide(), hook_instance="5a6b3c1e-0000-4f00-8000-000000000001"))
    assert codes_of(first) == codes_of(other)
    assert set(uuids_of(first)).isdisjoint(uuids_of(other))


def test_clean_order_for_an_adult_male_raises_no_rems_card() -> None:
    draft = lenalidomide_request(
        identifier=[{"system": AUTHORIZATION_SYSTEM, "value": "12345678"}],
        extension=[
            {"url": RISK_CATEGORY_EXTENSION, "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": "adult-male"}}
        ],
    )
    response = evaluate(order_sign(draft, prefetch={"patient": patient(gender="male", birthDate="1960-02-11")}))
    rems_codes = {
        "supply-over-28-days",
        "supply-unknown",
        "refills-not-allowed",
        "risk-category-missing",
        "risk-category-mismatch",
        "authorization-missing",
        "pregnancy-test-missing",
        "pregnancy-test-stale",
        "initiation-tests-incomplete",
        "reproductive-status-unknown",
    }
    assert rems_codes.isdisjoint(codes_of(response))


@pytest.mark.parametrize(
    "drafts",
    [
        [aspirin_request()],
        [
            aspirin_request(),
            medication_request("draft-dex", medicationCodeableConcept={"text": "dexamethasone 4 mg tablet"}),
        ],
        [],
    ],
)
@pytest.mark.parametrize("prefetch", [{}, {"patient": None}])
def test_non_imid_draft_answers_no_cards_without_a_prefetched_patient(
    drafts: list[dict[str, Any]], prefetch: dict[str, Any]
) -> None:
    assert evaluate(order_sign(*drafts, prefetch=prefetch)) == {"cards": []}


def test_imid_draft_in_a_contained_medication_is_checked() -> None:
    draft = medication_request(
        contained=[medication("med", rxnorm("1369734", "pomalidomide 4 MG Oral Capsule"))],
        medicationReference={"reference": "#med"},
        dosageInstruction=[capsule_dose()],
        dispenseRequest={"quantity": quantity(21, "capsule"), "numberOfRepeatsAllowed": 1},
    )
    assert "refills-not-allowed" in codes_of(evaluate(order_sign(draft)))


def test_imid_draft_pointing_at_a_prefetched_medication_is_checked() -> None:
    draft = medication_request(
        medicationReference={"reference": "Medication/med-len"},
        dosageInstruction=[capsule_dose()],
        dispenseRequest={"quantity": quantity(28, "capsule"), "numberOfRepeatsAllowed": 1},
    )
    prefetch = {
        "patient": patient(gender="female", birthDate="1985-04-02"),
        "medications": bundle(medication("med-len", rxnorm("602910", "lenalidomide 10 MG Oral Capsule"))),
    }
    assert "refills-not-allowed" in codes_of(evaluate(order_sign(draft, prefetch=prefetch)))


def test_imid_draft_pointing_at_a_medication_in_the_draft_bundle_is_checked() -> None:
    draft = medication_request(
        medicationReference={"reference": "Medication/med-len"},
        dosageInstruction=[capsule_dose()],
        dispenseRequest={"quantity": quantity(28, "capsule"), "numberOfRepeatsAllowed": 1},
    )
    raw = order_sign(draft, medication("med-len", rxnorm("602910", "lenalidomide 10 MG Oral Capsule")))
    assert "refills-not-allowed" in codes_of(evaluate(raw))


def test_unresolvable_medication_reference_is_never_an_empty_answer() -> None:
    draft = medication_request(
        medicationReference={"reference": "Medication/not-sent"},
        dispenseRequest={"quantity": quantity(28, "capsule")},
    )
    try:
        response = evaluate(order_sign(draft))
    except InvalidInput as exc:
        assert exc.status == 412
        assert "medicationReference" in exc.path or exc.path.startswith("prefetch")
    else:
        assert response["cards"] != []


# ------------------------------------------------------------------------------------------------
# The clinic zone decides the day a test was taken
# ------------------------------------------------------------------------------------------------


def _zone_request() -> dict[str, Any]:
    """Fiona (FRP, 40) renewing lenalidomide: last fill 25 days ago, one negative urine hCG collected
    Tuesday 10 June 23:30 in Chicago (= Wednesday 11 June 13:30 in Tokyo)."""
    draft = lenalidomide_request(
        identifier=[{"system": AUTHORIZATION_SYSTEM, "value": "12345678"}],
        extension=[
            {"url": RISK_CATEGORY_EXTENSION, "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": "adult-female-rp"}}
        ],
    )
    dispense = {
        "resourceType": "MedicationDispense",
        "id": "disp-1",
        "status": "completed",
        "subject": {"reference": PATIENT_REF},
        "medicationCodeableConcept": rxnorm("602910", "lenalidomide 10 MG Oral Capsule"),
        "quantity": quantity(28, "capsule"),
        "daysSupply": {"value": 28, "unit": "day", "system": UCUM, "code": "d"},
        "whenHandedOver": "2025-05-24T11:00:00-05:00",
    }
    hcg = observation(
        "hcg-1",
        code=loinc("2106-3", "Choriogonadotropin (pregnancy test) [Presence] in Urine"),
        valueCodeableConcept=snomed("260385009", "Negative"),
        effectiveDateTime="2025-06-10T23:30:00-05:00",
    )
    return order_sign(
        draft,
        prefetch={
            "patient": patient(gender="female", birthDate="1985-04-02"),
            "dispenses": bundle(dispense),
            "observations": bundle(hcg),
        },
    )


@pytest.mark.parametrize(("zone", "stale"), [("America/Chicago", True), ("Asia/Tokyo", False)])
def test_clinic_zone_from_tz_decides_whether_the_test_is_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], zone: str, stale: bool
) -> None:
    """Now is Wednesday 18 June 09:00 in Chicago (23:00 in Tokyo). Collected on clinic day 10 June
    (Chicago) the test was good through 17 June; on 11 June (Tokyo), through 18 June."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps(complete(_zone_request())), encoding="utf-8")
    assert main(["evaluate", str(path), "--now", "2025-06-18T09:00:00-05:00", "--tz", zone]) == 0
    codes = codes_of(json.loads(capsys.readouterr().out))
    assert ("pregnancy-test-stale" in codes) is stale
    assert "pregnancy-test-missing" not in codes
    assert "initiation-tests-incomplete" not in codes


# ------------------------------------------------------------------------------------------------
# Bad input through the service: InvalidInput naming the field, with the HTTP status
# ------------------------------------------------------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def change(raw: dict[str, Any]) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


DRAFT = ("context", "draftOrders", "entry", 0, "resource")
OBSERVATIONS = bundle(observation("hcg-1", code=loinc("2106-3"), valueString="Negative"))
OTHER_PATIENT_OBS = bundle(
    observation("hcg-9", code=loinc("2106-3"), valueString="Negative", subject={"reference": "Patient/pat-2"})
)
BAD_DECIMAL_OBS = bundle(observation("cr-1", code=loinc("2160-0"), valueQuantity={"value": "abc", "unit": "mg/dL"}))
OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "timeout", "diagnostics": "Observation search timed out"}],
}


@pytest.mark.parametrize(
    ("change", "path", "status"),
    [
        pytest.param(_set(("hook",), "medication-prescribe"), "hook", 400, id="unknown-hook"),
        pytest.param(_delete(("hookInstance",)), "hookInstance", 400, id="no-hookInstance"),
        pytest.param(_delete(("context", "draftOrders")), "context.draftOrders", 400, id="no-draftOrders"),
        pytest.param(_delete(("context", "patientId")), "context.patientId", 400, id="no-patientId"),
        pytest.param(
            _set(("context", "draftOrders"), lenalidomide_request()),
            "context.draftOrders",
            400,
            id="draftOrders-not-bundle",
        ),
        pytest.param(
            _set(("context", "draftOrders"), [lenalidomide_request()]),
            "context.draftOrders",
            400,
            id="draftOrders-list",
        ),
        pytest.param(
            _set(DRAFT, {"resourceType": "MedicationOrder", "id": "x"}),
            "context.draftOrders.entry[0].resource.resourceType",
            422,
            id="unknown-resourceType",
        ),
        pytest.param(
            _set((*DRAFT, "authoredOn"), "2025-06-18T09:15:00"),
            "context.draftOrders.entry[0].resource.authoredOn",
            422,
            id="dateTime-without-offset",
        ),
        pytest.param(
            _set(("prefetch", "labs"), BAD_DECIMAL_OBS),
            "prefetch.labs.entry[0].resource.valueQuantity.value",
            422,
            id="decimal-abc",
        ),
        pytest.param(_delete(("prefetch", "patient")), "prefetch.patient", 412, id="patient-not-prefetched"),
        pytest.param(_set(("prefetch", "patient"), None), "prefetch.patient", 412, id="patient-null"),
        pytest.param(
            _set(("prefetch", "patient", "id"), "pat-2"), "prefetch.patient.id", 400, id="patient-id-mismatch"
        ),
        pytest.param(
            _set(("prefetch", "observations"), OTHER_PATIENT_OBS),
            "prefetch.observations.entry[0].resource.subject.reference",
            422,
            id="observation-other-patient",
        ),
        pytest.param(_set(("prefetch", "observations"), OUTCOME), "prefetch.observations", 412, id="operation-outcome"),
        pytest.param(
            _set(("prefetch", "patient"), OUTCOME),
            "prefetch.patient",
            412,
            id="operation-outcome-for-patient",
        ),
        pytest.param(
            _set((*DRAFT, "subject"), {"reference": "Patient/pat-2"}),
            "context.draftOrders.entry[0].resource.subject.reference",
            422,
            id="draft-other-patient",
        ),
    ],
)
def test_bad_request_names_the_field(change: Callable[[dict[str, Any]], None], path: str, status: int) -> None:
    raw = copy.deepcopy(
        order_sign(unsafe_lenalidomide(), prefetch={"patient": patient(gender="female"), "observations": OBSERVATIONS})
    )
    change(raw)
    with pytest.raises(InvalidInput) as caught:
        evaluate(raw)
    assert (caught.value.path, caught.value.status) == (path, status)
    assert caught.value.message


@pytest.mark.parametrize("body", [[], "order-sign", 42, None])
def test_body_that_is_not_a_json_object(body: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_request(body)
    assert (caught.value.path, caught.value.status) == ("(body)", 400)


def test_non_imid_draft_is_still_validated() -> None:
    """No cards to give is no excuse for accepting an invalid order."""
    raw = order_sign(aspirin_request(authoredOn="2025-06-18T09:15:00"), prefetch={})
    with pytest.raises(InvalidInput) as caught:
        evaluate(raw)
    assert (caught.value.path, caught.value.status) == ("context.draftOrders.entry[0].resource.authoredOn", 422)


def test_medication_refill_accepts_only_medication_requests() -> None:
    raw = {
        "hook": "medication-refill",
        "hookInstance": HOOK_INSTANCE,
        "context": {"patientId": PATIENT_ID, "medications": bundle(observation(), unsafe_lenalidomide())},
        "prefetch": {"patient": patient(gender="female")},
    }
    with pytest.raises(InvalidInput) as caught:
        evaluate(raw)
    assert (caught.value.path, caught.value.status) == ("context.medications.entry[0].resource.resourceType", 422)


def test_quoted_bad_value_in_the_message() -> None:
    raw = order_sign(unsafe_lenalidomide())
    raw["context"]["draftOrders"]["entry"][0]["resource"]["authoredOn"] = "2025-06-18T09:15:00"
    with pytest.raises(InvalidInput) as caught:
        evaluate(raw)
    assert "2025-06-18T09:15:00" in caught.value.message


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def complete(raw: dict[str, Any]) -> dict[str, Any]:
    """The request with every prefetch key the service declares: those the test leaves out are sent
    as ``null`` ("no data"), as an EHR does. An *absent* key makes the CLI answer 412 like the service."""
    out = json.loads(json.dumps(raw))
    service = BY_HOOK.get(out.get("hook"))
    if service is not None and isinstance(out.get("prefetch"), dict):
        for key in service.prefetch_keys:
            out["prefetch"].setdefault(key, None)
    return out


def _write(tmp_path: Path, content: Any, name: str = "request.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(complete(content)), encoding="utf-8")
    return path


def test_cli_answers_412_for_a_prefetch_key_neither_sent_nor_fetchable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = complete(order_sign(unsafe_lenalidomide()))
    del raw["prefetch"]["observations"]
    path = tmp_path / "request.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    code, out, err = _cli(
        ["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00", "--tz", "America/Chicago"], capsys
    )
    assert (code, out) == (2, "")
    assert "prefetch.observations" in err and "not prefetched" in err
    with pytest.raises(InvalidInput) as caught:
        cmd_evaluate(
            build_parser().parse_args(["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00"]), get_settings()
        )
    assert (caught.value.path, caught.value.status) == ("prefetch.observations", 412)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_same_json_as_the_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = order_sign(unsafe_lenalidomide())
    path = _write(tmp_path, raw)
    code, out, err = _cli(
        ["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00", "--tz", "America/Chicago"], capsys
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == evaluate(raw, NOW, CHICAGO)


def test_cli_reads_the_clinic_zone_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, _zone_request())
    monkeypatch.setenv("IMID_REMS_CLINIC_TZ", "Asia/Tokyo")
    code, out, _ = _cli(["evaluate", str(path), "--now", "2025-06-18T09:00:00-05:00"], capsys)
    assert code == 0
    assert "pregnancy-test-stale" not in codes_of(json.loads(out))
    # --tz wins over the environment
    code, out, _ = _cli(
        ["evaluate", str(path), "--now", "2025-06-18T09:00:00-05:00", "--tz", "America/Chicago"], capsys
    )
    assert code == 0
    assert "pregnancy-test-stale" in codes_of(json.loads(out))


@pytest.mark.parametrize(
    ("content", "mentions"),
    [
        ('{"hook": "order-sign", "context": {', "malformed JSON"),
        ("[]", "(body)"),
        ('"order-sign"', "(body)"),
        (json.dumps({**order_sign(unsafe_lenalidomide()), "hook": "medication-prescribe"}), "hook"),
        (json.dumps(order_sign(unsafe_lenalidomide(), prefetch={})), "prefetch.patient"),
    ],
)
def test_cli_bad_request_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, mentions: str
) -> None:
    path = _write(tmp_path, content)
    code, out, err = _cli(
        ["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00", "--tz", "America/Chicago"], capsys
    )
    assert code == 2
    assert out == ""  # never an empty answer for a request it could not read
    assert mentions in err


def test_cli_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["evaluate", str(tmp_path / "nope.json"), "--now", "2025-06-18T10:00:00-05:00"], capsys)
    assert (code, out) == (2, "")
    assert "nope.json" in err


def test_cli_refuses_a_file_over_the_size_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, order_sign(unsafe_lenalidomide()))
    size = path.stat().st_size
    args = ["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00", "--tz", "America/Chicago"]

    monkeypatch.setenv("IMID_REMS_MAX_BODY_BYTES", str(size - 1))
    code, out, err = _cli(args, capsys)
    assert (code, out) == (2, "")
    assert str(path) in err and str(size) in err
    with pytest.raises(InvalidInput) as caught:
        cmd_evaluate(build_parser().parse_args(args), get_settings())
    assert (caught.value.path, caught.value.status) == (str(path), 413)

    monkeypatch.setenv("IMID_REMS_MAX_BODY_BYTES", str(size))  # exactly at the limit is accepted
    code, out, _ = _cli(args, capsys)
    assert code == 0 and json.loads(out)["cards"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--now", "2025-06-18T10:00:00"),  # no UTC offset
        ("--now", "2025-06-18"),  # a date is not a clock
        ("--now", "next tuesday"),
        ("--tz", "America/Gotham"),
        ("--tz", "../../etc/passwd"),
    ],
)
def test_cli_bad_option_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    path = _write(tmp_path, order_sign(unsafe_lenalidomide()))
    args = {"--now": "2025-06-18T10:00:00-05:00", "--tz": "America/Chicago"} | {option: value}
    argv = ["evaluate", str(path), "--now", args["--now"], "--tz", args["--tz"]]
    code, out, err = _cli(argv, capsys)
    assert (code, out) == (2, "")
    assert option in err and value in err
    with pytest.raises(InvalidInput) as caught:
        cmd_evaluate(build_parser().parse_args(argv), get_settings())
    assert (caught.value.path, caught.value.status) == (option, 400)


def test_cli_unknown_clinic_zone_in_the_environment_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, order_sign(unsafe_lenalidomide()))
    monkeypatch.setenv("IMID_REMS_CLINIC_TZ", "Mars/Olympus_Mons")
    code, out, err = _cli(["evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00"], capsys)
    assert (code, out) == (2, "")
    assert "Mars/Olympus_Mons" in err


def test_installed_console_script(tmp_path: Path) -> None:
    """`imid-rems` as installed by pip (the [project.scripts] entry point), in a fresh process."""
    script = Path(sys.executable).with_name("imid-rems")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    path = _write(tmp_path, order_sign(unsafe_lenalidomide()))
    env = {"PATH": str(script.parent), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [str(script), "evaluate", str(path), "--now", "2025-06-18T10:00:00-05:00", "--tz", "America/Chicago"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)
    assert response == evaluate(order_sign(unsafe_lenalidomide()), NOW, CHICAGO)
    assert "supply-over-28-days" in codes_of(response)

    bad = subprocess.run(
        [str(script), "evaluate", str(path), "--now", "2025-06-18T10:00:00", "--tz", "America/Chicago"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "--now" in bad.stderr


def test_tokyo_now_is_accepted_with_its_own_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same instant written with a +09:00 offset gives the same answer as with -05:00."""
    path = _write(tmp_path, _zone_request())
    code, out_tokyo, _ = _cli(
        ["evaluate", str(path), "--now", "2025-06-18T23:00:00+09:00", "--tz", "America/Chicago"], capsys
    )
    assert code == 0
    assert json.loads(out_tokyo) == evaluate(_zone_request(), datetime(2025, 6, 18, 9, 0, tzinfo=CHICAGO), CHICAGO)


def test_service_counts_days_in_the_zone_it_is_given() -> None:
    """`evaluate_request(zone=...)` is what the CLI's --tz feeds: same request, same instant, two zones."""
    now = datetime(2025, 6, 18, 9, 0, tzinfo=CHICAGO)
    assert "pregnancy-test-stale" in codes_of(evaluate(_zone_request(), now, CHICAGO))
    assert "pregnancy-test-stale" not in codes_of(evaluate(_zone_request(), now, TOKYO))
