"""CDS Hooks 2.0 wire models: one pydantic model per spec object.

Spec: https://cds-hooks.hl7.org/2.0/ ; hook contexts from the CDS Hooks library
(order-select, order-sign, patient-view, medication-refill). FHIR resources inside stay raw JSON here:
`fhir_mappings` reads them (plain JSON, each field checked where it is used), so errors can name the exact path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
HookName = Literal["order-select", "order-sign", "patient-view", "medication-refill"]


class _Open(BaseModel):
    """Spec objects may carry extensions: unknown fields are allowed and ignored."""

    model_config = ConfigDict(extra="allow", frozen=True)


class FhirAuthorization(_Open):
    """https://cds-hooks.hl7.org/2.0/#passing-the-access-token-to-the-cds-service"""

    access_token: NonEmpty
    token_type: Literal["Bearer"]
    expires_in: int
    scope: NonEmpty
    subject: NonEmpty
    patient: str | None = None


class PatientViewContext(_Open):
    """https://cds-hooks.hl7.org/hooks/patient-view/"""

    userId: NonEmpty
    patientId: NonEmpty
    encounterId: str | None = None


class OrderSignContext(_Open):
    """https://cds-hooks.hl7.org/hooks/order-sign/ — `draftOrders` is a Bundle of draft orders."""

    userId: NonEmpty
    patientId: NonEmpty
    encounterId: str | None = None
    draftOrders: dict[str, Any]


class OrderSelectContext(OrderSignContext):
    """https://cds-hooks.hl7.org/hooks/order-select/ — `selections` are ``Type/id`` of the orders just
    selected; the other draft orders are context."""

    selections: list[NonEmpty]


class MedicationRefillContext(_Open):
    """https://cds-hooks.hl7.org/hooks/medication-refill/ — `medications` is a Bundle of draft
    MedicationRequests for the refill; there may be no user in context."""

    userId: str | None = None
    patientId: NonEmpty
    encounterId: str | None = None
    medications: dict[str, Any]


CONTEXT_MODELS: dict[str, type[_Open]] = {
    "order-select": OrderSelectContext,
    "order-sign": OrderSignContext,
    "patient-view": PatientViewContext,
    "medication-refill": MedicationRefillContext,
}


class HookRequest(_Open):
    """https://cds-hooks.hl7.org/2.0/#http-request-1 — `context` is validated against the hook's own
    context model by `cds_hooks.service`, so the error names ``context.draftOrders``."""

    hook: NonEmpty
    hookInstance: NonEmpty
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None


class Coding(_Open):
    """https://cds-hooks.hl7.org/2.0/#coding"""

    system: str
    code: str
    display: str | None = None


class Source(_Open):
    """https://cds-hooks.hl7.org/2.0/#source"""

    label: NonEmpty
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Card(_Open):
    """https://cds-hooks.hl7.org/2.0/#card-attributes"""

    uuid: str | None = None
    summary: Annotated[str, StringConstraints(min_length=1, max_length=139)]
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[dict[str, Any]] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None
    links: list[dict[str, Any]] | None = None


class CdsResponse(_Open):
    """https://cds-hooks.hl7.org/2.0/#cds-service-response"""

    cards: list[Card] = Field(default_factory=list)
    systemActions: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
