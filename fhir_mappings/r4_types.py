"""FHIR R4 names the readers need, as data: resource types, which types carry a single ``subject`` or
``patient`` Reference, and the data types an Extension's ``value[x]`` may take.

Generated once (then committed; regenerate only for a new FHIR version): the R4 (4.0.1) resource types
from the HL7 resource list (as in the `@smile-cdr/fhirts` FHIR-R4 `FHIRResourceType`), the R4B (4.3.0)
additions and the Reference fields from the `fhir.resources.R4B` models. `tests/contract/test_access.py`
checks these against `fhir.resources.R4B`.
"""

from __future__ import annotations


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


R4_RESOURCE_TYPES: frozenset[str] = _names(
    """
    Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse AuditEvent Basic
    Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry
    ChargeItem ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication
    CommunicationRequest CompartmentDefinition Composition ConceptMap Condition Consent Contract Coverage
    CoverageEligibilityRequest CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric
    DeviceRequest DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
    Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
    EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group
    GuidanceResponse HealthcareService ImagingStudy Immunization ImmunizationEvaluation
    ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice Library Linkage List Location Measure
    MeasureReport Media Medication MedicationAdministration MedicationDispense MedicationKnowledge
    MedicationRequest MedicationStatement MedicinalProduct MedicinalProductAuthorization
    MedicinalProductContraindication MedicinalProductIndication MedicinalProductIngredient
    MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged
    MedicinalProductPharmaceutical MedicinalProductUndesirableEffect MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionOrder Observation ObservationDefinition OperationDefinition
    OperationOutcome Organization OrganizationAffiliation Parameters Patient PaymentNotice PaymentReconciliation
    Person PlanDefinition Practitioner PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse
    RelatedPerson RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
    RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
    SpecimenDefinition StructureDefinition StructureMap Subscription Substance SubstanceNucleicAcid
    SubstancePolymer SubstanceProtein SubstanceReferenceInformation SubstanceSourceMaterial
    SubstanceSpecification SupplyDelivery SupplyRequest Task TerminologyCapabilities TestReport TestScript
    ValueSet VerificationResult VisionPrescription
    """
)
"""The 146 resource types of FHIR R4 4.0.1."""

R4B_ADDED_RESOURCE_TYPES: frozenset[str] = _names(
    """
    AdministrableProductDefinition Citation ClinicalUseDefinition EvidenceReport Ingredient
    ManufacturedItemDefinition MedicinalProductDefinition NutritionProduct PackagedProductDefinition
    RegulatedAuthorization SubscriptionStatus SubscriptionTopic SubstanceDefinition
    """
)
"""Added by R4B 4.3.0; accepted too (`fhir.resources.R4B`, which the readers used before, accepted them)."""

RESOURCE_TYPES: frozenset[str] = R4_RESOURCE_TYPES | R4B_ADDED_RESOURCE_TYPES
"""Every `resourceType` the readers accept; anything else is refused (422)."""

SUBJECT_REFERENCE_TYPES: frozenset[str] = _names(
    """
    AdverseEvent Basic CarePlan CareTeam ChargeItem ClinicalImpression Communication CommunicationRequest
    Composition Condition DeviceRequest DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference
    Encounter Flag Goal GuidanceResponse ImagingStudy Invoice List MeasureReport Media MedicationAdministration
    MedicationDispense MedicationRequest MedicationStatement Observation Procedure QuestionnaireResponse
    RequestGroup RiskAssessment ServiceRequest Specimen
    """
)
"""Resource types whose `subject` is one Reference (others have none, or a list about products)."""

PATIENT_REFERENCE_TYPES: frozenset[str] = _names(
    """
    AllergyIntolerance BodyStructure Claim ClaimResponse Consent CoverageEligibilityRequest
    CoverageEligibilityResponse DetectedIssue Device EpisodeOfCare ExplanationOfBenefit FamilyMemberHistory
    Immunization ImmunizationEvaluation ImmunizationRecommendation MolecularSequence NutritionOrder
    RelatedPerson SupplyDelivery VisionPrescription
    """
)
"""Resource types whose `patient` is one Reference."""

EXTENSION_VALUE_TYPES: frozenset[str] = _names(
    """
    Address Age Annotation Attachment Base64Binary Boolean Canonical Code CodeableConcept CodeableReference
    Coding ContactDetail ContactPoint Contributor Count DataRequirement Date DateTime Decimal Distance Dosage
    Duration Expression HumanName Id Identifier Instant Integer Markdown Money Oid ParameterDefinition Period
    PositiveInt Quantity Range Ratio RatioRange Reference RelatedArtifact SampledData Signature String Time
    Timing TriggerDefinition UnsignedInt Uri Url UsageContext Uuid
    """
)
"""The suffixes of `Extension.value[x]` (``valueCode``, ``valueCoding``...): at most one may be present."""
