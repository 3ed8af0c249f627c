"""Build a `rems.Case` from FHIR: the patient, the draft orders under review, and the chart.

The chart is every resource the caller has (prefetch or FHIR searches), already parsed into a
`ResourceIndex`; this module sorts them into facts. Resources about another patient are refused:
mixing two patients' data in a safety check is worse than no answer.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

from fhir.resources.R4B.resource import Resource

from fhir_mappings import medication as med
from fhir_mappings import observations as obs
from fhir_mappings.codes import Codes, default_codes
from fhir_mappings.common import condition_in_effect, ref, reference_of
from fhir_mappings.errors import InvalidInput
from fhir_mappings.patient import patient_facts
from fhir_mappings.practitioner import prescribers
from fhir_mappings.resources import ResourceIndex
from rems.config import Config, default_config
from rems.model import Case, Chart, ImidOrder, Indication, OtherMedication
from rems.timing import age_in_years, local_day

_SUBJECT_FIELDS = ("subject", "patient")
ORDER_STATUSES_DROPPED = frozenset({"entered-in-error"})
ANTITHROMBOTIC_STATUSES = frozenset({"active"})


def _check_subject(resource: Resource, patient_ref: str, path: str) -> None:
    for name in _SUBJECT_FIELDS:
        target = reference_of(getattr(resource, name, None))
        if target and target.startswith("Patient/") and target != patient_ref:
            raise InvalidInput(
                f"{path}.{name}.reference", f"{target!r} is not the patient in context ({patient_ref!r})", 422
            )


def build_case(
    *,
    patient: Resource,
    drafts: list[Resource],
    chart: ResourceIndex,
    draft_paths: list[str] | None = None,
    now: datetime,
    zone: tzinfo,
    user: str | None = None,
    codes: Codes | None = None,
    config: Config | None = None,
) -> Case:
    """`drafts` are the orders under review (draftOrders / medications); only IMiD ones are judged,
    the others may still matter (an anticoagulant in the same draft counts as prophylaxis).
    `draft_paths` name each draft in the request, for error messages.

    A draft whose medicationReference we cannot resolve (and which has no display to read) raises a
    412 `InvalidInput`: we cannot tell whether it is an IMiD, and "no cards" would be a silent pass."""
    codes = codes or default_codes()
    config = config or default_config()
    if now.tzinfo is None:
        raise InvalidInput("now", "must carry a UTC offset")
    facts = patient_facts(patient)
    patient_ref = facts.reference
    for rtype, resources in chart.by_type.items():
        if rtype == "Patient":
            continue
        for r in resources:
            _check_subject(r, patient_ref, chart.path_of(r))
    paths = draft_paths or [f"drafts[{i}]" for i in range(len(drafts))]
    for d, path in zip(drafts, paths, strict=True):
        _check_subject(d, patient_ref, path)
    today = local_day(now, zone)
    adult = age_in_years(facts.birth_date, today) >= config.rems.adult_age_years if facts.birth_date else None

    draft_refs = {ref(d) for d in drafts}
    orders: list[ImidOrder] = []
    antithrombotics: list[OtherMedication] = []
    for d, path in zip(drafts, paths, strict=True):
        if d.get_resource_type() != "MedicationRequest":
            continue
        try:
            order = med.imid_order(d, chart, codes, zone, adult)
        except med.UnresolvedMedication as exc:
            raise InvalidInput(
                f"{path}.medicationReference",
                f"{exc.reference!r} was not sent (prefetch or the same Bundle): cannot tell if it is an IMiD",
                412,
            ) from None
        if order is not None:
            orders.append(order)
        else:
            at = med.antithrombotic(d, chart, codes)
            if at is not None:
                antithrombotics.append(at)

    chart_orders: list[ImidOrder] = []
    unreadable_orders: list[str] = []
    for mr in chart.of("MedicationRequest"):
        if ref(mr) in draft_refs or mr.status in ORDER_STATUSES_DROPPED:
            continue
        try:
            order = med.imid_order(mr, chart, codes, zone, adult)
        except med.UnresolvedMedication as exc:
            unreadable_orders.append(f"{ref(mr)}: medication {exc.reference!r} not available")
            continue
        if order is not None:
            chart_orders.append(order)
        elif mr.status in ANTITHROMBOTIC_STATUSES:
            at = med.antithrombotic(mr, chart, codes)
            if at is not None:
                antithrombotics.append(at)

    dispenses = [x for md in chart.of("MedicationDispense") if (x := med.imid_dispense(md, chart, codes)) is not None]
    observations = chart.of("Observation")
    conditions = chart.of("Condition")
    tests, unreadable_tests = obs.pregnancy_tests(observations, codes, config.rems)
    lab_values, unreadable_labs = obs.labs(observations, codes)
    in_effect = [c for c in conditions if condition_in_effect(c)]
    indications = med.condition_indications(in_effect, codes)
    diagnoses = [c.code for c in in_effect]
    diagnoses += [rc for d in drafts if d.get_resource_type() == "MedicationRequest" for rc in d.reasonCode or []]
    if med.kaposi_with_hiv(diagnoses, codes):
        indications.append(Indication("kaposi-sarcoma-hiv", "Condition (Kaposi sarcoma + HIV)"))
    return Case(
        now=now,
        clinic_zone=zone,
        patient=facts,
        orders=tuple(orders),
        chart=Chart(
            imid_orders=tuple(chart_orders),
            dispenses=tuple(dispenses),
            pregnancy_tests=tuple(tests),
            pregnancy_statuses=tuple(obs.pregnancy_statuses(observations, codes)),
            nrp_evidence=tuple(
                obs.nrp_evidence(chart.of("Procedure"), conditions, observations, codes, facts.birth_date)
            ),
            labs=tuple(lab_values),
            antithrombotics=tuple(antithrombotics),
            indications=tuple(indications),
            prescribers=tuple(prescribers(chart.of("PractitionerRole"), chart.of("Practitioner"), codes)),
            regular_cycles=obs.regular_cycles(observations, conditions, codes),
            unreadable=tuple(unreadable_orders + unreadable_labs),
            unreadable_pregnancy_tests=tuple(unreadable_tests),
        ),
        prescriber_reference=user,
    )
