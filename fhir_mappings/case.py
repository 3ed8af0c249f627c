"""Build a `rems.Case` from FHIR: the patient, the draft orders under review, and the chart.

The chart is every resource the caller has (prefetch or FHIR searches), already parsed into a
`ResourceIndex`; this module sorts them into facts. Resources about another patient are refused:
mixing two patients' data in a safety check is worse than no answer.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

from fhir_mappings import medication as med
from fhir_mappings import observations as obs
from fhir_mappings.access import Concept, Json, code, concepts, reference
from fhir_mappings.codes import Codes, default_codes
from fhir_mappings.common import read_condition, ref
from fhir_mappings.errors import InvalidInput
from fhir_mappings.patient import patient_facts
from fhir_mappings.practitioner import prescribers
from fhir_mappings.r4_types import PATIENT_REFERENCE_TYPES, SUBJECT_REFERENCE_TYPES
from fhir_mappings.resources import ResourceIndex
from rems.config import Config, default_config
from rems.model import Case, Chart, ImidOrder, Indication, OtherMedication
from rems.timing import age_in_years, local_day

ORDER_STATUSES_DROPPED = frozenset({"entered-in-error"})
ANTITHROMBOTIC_STATUSES = frozenset({"active"})


def _check_subject(resource: Json, patient_ref: str, path: str) -> None:
    """A resource about another patient is refused (422). Only the types whose `subject` / `patient` is
    one Reference are looked at (an Account's list of subjects is not about one patient)."""
    rtype = resource["resourceType"]
    for name, types in (("subject", SUBJECT_REFERENCE_TYPES), ("patient", PATIENT_REFERENCE_TYPES)):
        if rtype not in types or resource.get(name) is None:
            continue
        target = reference(resource, name, path)
        if target and target.startswith("Patient/") and target != patient_ref:
            raise InvalidInput(
                f"{path}.{name}.reference", f"{target!r} is not the patient in context ({patient_ref!r})", 422
            )


_SUBJECT_NAMES: dict[str, tuple[str, ...]] = {
    rtype: tuple(
        name
        for name, types in (("subject", SUBJECT_REFERENCE_TYPES), ("patient", PATIENT_REFERENCE_TYPES))
        if rtype in types
    )
    for rtype in SUBJECT_REFERENCE_TYPES | PATIENT_REFERENCE_TYPES
}
"""The single-Reference elements `_check_subject` looks at, by resource type."""


def check_drafts(drafts: list[tuple[str, Json]]) -> None:
    """Read every draft MedicationRequest whole (`medication.check_order`), for a caller that answers
    without building a case (no IMiD in the drafts): a malformed order is an error, never "no cards"."""
    for path, draft in drafts:
        if draft["resourceType"] == "MedicationRequest":
            med.check_order(draft, path)


def build_case(
    *,
    patient: Json,
    drafts: list[Json],
    chart: ResourceIndex,
    draft_paths: list[str] | None = None,
    patient_path: str = "patient",
    now: datetime,
    zone: tzinfo,
    user: str | None = None,
    codes: Codes | None = None,
    config: Config | None = None,
) -> Case:
    """`drafts` are the orders under review (draftOrders / medications); only IMiD ones are judged,
    the others may still matter (an anticoagulant in the same draft counts as prophylaxis).
    `draft_paths` name each draft in the request, `patient_path` the Patient, for error messages.
    Every resource is plain FHIR JSON checked by `parse_resource`; each field is checked when read.

    A draft whose medicationReference we cannot resolve (and which has no display to read) raises a
    412 `InvalidInput`: we cannot tell whether it is an IMiD, and "no cards" would be a silent pass."""
    codes = codes or default_codes()
    config = config or default_config()
    if now.tzinfo is None:
        raise InvalidInput("now", "must carry a UTC offset")
    facts = patient_facts(patient, patient_path)
    patient_ref = facts.reference
    paths_of = chart.paths
    for rtype, resources in chart.by_type.items():
        if rtype == "Patient":
            continue
        names = _SUBJECT_NAMES.get(rtype)
        if names is None:
            continue
        for r in resources:
            for name in names:  # the common case inline: a Reference to the patient in context
                v = r.get(name)
                if v is not None and not (type(v) is dict and v.get("reference") == patient_ref):
                    _check_subject(r, patient_ref, paths_of[id(r)])
                    break
    paths = draft_paths or [f"drafts[{i}]" for i in range(len(drafts))]
    for d, path in zip(drafts, paths, strict=True):
        _check_subject(d, patient_ref, path)
    today = local_day(now, zone)
    adult = age_in_years(facts.birth_date, today) >= config.rems.adult_age_years if facts.birth_date else None

    draft_refs = {ref(d) for d in drafts}
    orders: list[ImidOrder] = []
    antithrombotics: list[OtherMedication] = []
    diagnoses: list[Concept | None] = []
    for d, path in zip(drafts, paths, strict=True):
        if d["resourceType"] != "MedicationRequest":
            continue
        try:
            medication = med.medication_of(d, path, chart)
        except med.UnresolvedMedication as exc:
            raise InvalidInput(
                f"{path}.medicationReference",
                f"{exc.reference!r} was not sent (prefetch or the same Bundle): cannot tell if it is an IMiD",
                412,
            ) from None
        order = med.imid_order(d, path, chart, codes, zone, adult, medication)
        if order is not None:
            orders.append(order)
        else:
            med.check_order(d, path)
            at = med.antithrombotic(d, path, medication, codes)
            if at is not None:
                antithrombotics.append(at)
        diagnoses.extend(concepts(d, "reasonCode", path))

    chart_orders: list[ImidOrder] = []
    unreadable_orders: list[str] = []
    for mr, path in chart.located("MedicationRequest"):
        mr_ref = ref(mr)
        if mr_ref in draft_refs:
            continue
        status = code(mr, "status", path, required=True)
        if status in ORDER_STATUSES_DROPPED:
            continue
        try:
            medication = med.medication_of(mr, path, chart)
        except med.UnresolvedMedication as exc:
            unreadable_orders.append(f"{mr_ref}: medication {exc.reference!r} not available")
            continue
        order = med.chart_imid_order(mr, path, chart, codes, zone, adult, medication, status, mr_ref)
        if order is not None:
            chart_orders.append(order)
        elif status in ANTITHROMBOTIC_STATUSES:
            at = med.antithrombotic(mr, path, medication, codes)
            if at is not None:
                antithrombotics.append(at)

    dispenses = [
        x
        for md, path in chart.located("MedicationDispense")
        if (x := med.imid_dispense(md, path, chart, codes)) is not None
    ]
    observations = [obs.read_observation(o, path, codes) for o, path in chart.located("Observation")]
    conditions = [read_condition(c, path) for c, path in chart.located("Condition")]
    tests, unreadable_tests = obs.pregnancy_tests(observations, codes, config.rems)
    lab_values, unreadable_labs = obs.labs(observations, codes)
    in_effect = [c for c in conditions if c.in_effect]
    indications = med.condition_indications(in_effect, codes)
    diagnoses = [c.code for c in in_effect] + diagnoses
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
                obs.nrp_evidence(chart.located("Procedure"), conditions, observations, codes, facts.birth_date)
            ),
            labs=tuple(lab_values),
            antithrombotics=tuple(antithrombotics),
            indications=tuple(indications),
            prescribers=tuple(prescribers(chart.located("PractitionerRole"), chart.located("Practitioner"), codes)),
            regular_cycles=obs.regular_cycles(observations, conditions, codes),
            unreadable=tuple(unreadable_orders + unreadable_labs),
            unreadable_pregnancy_tests=tuple(unreadable_tests),
        ),
        prescriber_reference=user,
    )
