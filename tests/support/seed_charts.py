"""CDS Hooks calls about the seeded population (`sandbox.seed`), built the way an EHR builds them.

    charts = charts_of(generate(50, seed=7, today=TODAY))          # the generated data, by patient
    request = order_sign(p, prefetch_of(p, charts), now)           # renewal of p's active order
    assert rule_codes(evaluate(request, now, zone)) == sorted(p.expected_rules)

The renewal is what the pharmacist or prescriber signs next month: a copy of the active order with a
new id, status draft, signed now, `priorPrescription` → the active order, same prescriber. The prefetch
keys are the service's (`cds_hooks.services.chart_templates`): the user is the prescriber's Practitioner,
so `practitionerRoles` holds that practitioner's roles.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, tzinfo
from typing import Any

from cds_hooks.cards import RULE_SYSTEM, topic_of_card
from cds_hooks.models import CdsResponse
from cds_hooks.service import evaluate_request, parse_request
from sandbox.seed import PatientPlan

Json = dict[str, Any]

CHART_KEYS = {
    "MedicationRequest": "medications",
    "MedicationDispense": "dispenses",
    "Observation": "observations",
    "Condition": "conditions",
    "Procedure": "procedures",
}


class Charts:
    """The generated resources by patient id (and by type), plus the clinic's PractitionerRoles."""

    def __init__(self) -> None:
        self.by_patient: dict[str, dict[str, list[Json]]] = defaultdict(lambda: defaultdict(list))
        self.roles: dict[str, Json] = {}

    def patient(self, patient_id: str) -> Json:
        return self.by_patient[patient_id]["Patient"][0]

    def of(self, patient_id: str, resource_type: str) -> list[Json]:
        return self.by_patient[patient_id][resource_type]


def charts_of(bundles: Iterable[Json]) -> Charts:
    charts = Charts()
    for bundle in bundles:
        for entry in bundle["entry"]:
            r = entry["resource"]
            rtype = r["resourceType"]
            if rtype == "PractitionerRole":
                charts.roles[r["id"]] = r
            elif rtype == "Patient":
                charts.by_patient[r["id"]]["Patient"].append(r)
            else:
                target = (r.get("subject") or {}).get("reference") or ""
                if target.startswith("Patient/"):
                    charts.by_patient[target.removeprefix("Patient/")][rtype].append(r)
                else:
                    for participant in r.get("participant") or []:
                        ref = participant.get("actor", {}).get("reference", "")
                        if ref.startswith("Patient/"):
                            charts.by_patient[ref.removeprefix("Patient/")][rtype].append(r)
    return charts


def searchset(resources: Iterable[Json]) -> Json:
    entries = [{"resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def prefetch_of(plan: PatientPlan, charts: Charts) -> Json:
    """The prefetch an EHR sends for this patient, from the generated data."""
    out: Json = {"patient": charts.patient(plan.patient_id)}
    for rtype, key in CHART_KEYS.items():
        out[key] = searchset(charts.of(plan.patient_id, rtype))
    roles = [r for r in charts.roles.values() if r["practitioner"]["reference"] == f"Practitioner/{plan.prescriber}"]
    out["practitionerRoles"] = searchset(roles)
    return out


def active_order(plan: PatientPlan, medications: Json) -> Json:
    found = [e["resource"] for e in medications["entry"] if e["resource"]["id"] == plan.active_order]
    assert len(found) == 1, f"{plan.active_order} not in the prefetched MedicationRequests"
    order: Json = found[0]
    return order


def renewal_draft(active: Json, now: datetime) -> Json:
    draft = copy.deepcopy(active)
    draft["id"] = f"{active['id']}-renewal"
    draft["status"] = "draft"
    draft["authoredOn"] = now.isoformat()
    draft["priorPrescription"] = {"reference": f"MedicationRequest/{active['id']}"}
    return draft


def context(plan: PatientPlan) -> Json:
    return {"userId": f"Practitioner/{plan.prescriber}", "patientId": plan.patient_id}


def order_sign(plan: PatientPlan, prefetch: Json, now: datetime) -> Json:
    """order-sign of a renewal of the active order, signed `now` by the same prescriber."""
    draft = renewal_draft(active_order(plan, prefetch["medications"]), now)
    return {
        "hook": "order-sign",
        "hookInstance": f"seed-{plan.patient_id}-sign",
        "context": {
            **context(plan),
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]},
        },
        "prefetch": prefetch,
    }


def medication_refill(plan: PatientPlan, prefetch: Json) -> Json:
    """medication-refill for the active order (the pharmacist's renewal)."""
    order = active_order(plan, prefetch["medications"])
    return {
        "hook": "medication-refill",
        "hookInstance": f"seed-{plan.patient_id}-refill",
        "context": {
            **context(plan),
            "medications": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]},
        },
        "prefetch": prefetch,
    }


def evaluate(request: Json, now: datetime, zone: tzinfo) -> CdsResponse:
    return evaluate_request(parse_request(request), now=now, zone=zone)


def rule_codes(response: CdsResponse) -> list[str]:
    """Sorted rule codes of the answer's cards (`source.topic` in the rule system). Each card's uuid
    carries the same topic (`topic_of_card`), checked here too."""
    codes = []
    for card in response.cards:
        topic = card.source.topic
        assert topic is not None
        assert card.uuid is not None and topic_of_card(card.uuid) == topic.code, card.uuid
        if topic.system == RULE_SYSTEM:
            codes.append(topic.code)
    return sorted(codes)


def other_topics(response: CdsResponse) -> list[str]:
    return sorted(
        c.source.topic.code for c in response.cards if c.source.topic and c.source.topic.system != RULE_SYSTEM
    )
