"""SMART 2.2 scopes (sandbox.scopes): parsing, narrowing and matching, as the sandbox grants and enforces them."""

from __future__ import annotations

import pytest

from sandbox.scopes import ResourceScope, Scopes, ScopeSyntaxError, narrow, parse_resource_scope, within


@pytest.mark.parametrize(
    ("text", "context", "resource_type", "letters"),
    [
        ("patient/Observation.rs", "patient", "Observation", "rs"),
        ("user/*.cruds", "user", "*", "cruds"),
        ("system/MedicationRequest.c", "system", "MedicationRequest", "c"),
        ("patient/Patient.r", "patient", "Patient", "r"),
        ("user/Encounter.ud", "user", "Encounter", "ud"),
        # v1 spellings carry their v2 meaning
        ("patient/Observation.read", "patient", "Observation", "rs"),
        ("user/MedicationRequest.write", "user", "MedicationRequest", "cud"),
        ("system/*.*", "system", "*", "cruds"),
    ],
)
def test_clinical_scopes_parse_to_context_type_and_interactions(
    text: str, context: str, resource_type: str, letters: str
) -> None:
    scope = parse_resource_scope(text)
    assert scope is not None
    assert (scope.context, scope.resource_type, scope.interactions) == (context, resource_type, frozenset(letters))
    assert scope.text == text  # v1 scopes keep their spelling, v2 their canonical order


@pytest.mark.parametrize("word", ["openid", "fhirUser", "launch", "launch/patient", "offline_access", "online_access"])
def test_non_clinical_words_are_not_resource_scopes(word: str) -> None:
    assert parse_resource_scope(word) is None
    assert Scopes.parse(word).other == (word,)


@pytest.mark.parametrize(
    "text",
    [
        "patient/Observation.sr",  # out of order
        "patient/Observation.dus",  # undefined order (must never read as r+d)
        "patient/Observation.x",
        "patient/Observation.",
        "patient/observation.rs",  # not a resource type
        "patient/Observation",
        "patient/Observation.rs?",
        "patient/Observation.rs?category",
        "patient/Observation.rsq",
    ],
)
def test_malformed_clinical_scopes_are_refused(text: str) -> None:
    with pytest.raises(ScopeSyntaxError):
        parse_resource_scope(text)
    parsed = Scopes.parse(f"openid {text}")
    assert parsed.invalid == (text,) and parsed.resource == () and parsed.other == ("openid",)


def test_constraint_suffix_is_kept_and_only_matches_searches_carrying_it() -> None:
    text = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
    scopes = Scopes.parse(text)
    (scope,) = scopes.resource
    assert scope.constraints == (("category", "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"),)
    assert scope.text == text
    lab = [("patient", "1"), scope.constraints[0]]
    assert scopes.matching("s", "Observation", lab) == (scope,)
    assert scopes.matching("s", "Observation", [("patient", "1")]) == ()
    assert scopes.matching("r", "Observation") == ()  # a read cannot prove the constraint


def test_matching_by_interaction_type_and_wildcard() -> None:
    scopes = Scopes.parse("patient/Observation.rs user/*.r system/MedicationRequest.c")
    assert [s.text for s in scopes.matching("s", "Observation")] == ["patient/Observation.rs"]
    assert [s.text for s in scopes.matching("r", "Observation")] == ["patient/Observation.rs", "user/*.r"]
    assert [s.text for s in scopes.matching("r", "Patient")] == ["user/*.r"]
    assert scopes.matching("s", "Patient") == ()
    assert [s.text for s in scopes.matching("c", "MedicationRequest")] == ["system/MedicationRequest.c"]
    assert scopes.matching("d", "MedicationRequest") == ()
    # system-level interactions (type "*") need a wildcard scope
    assert scopes.matching("s", "*") == ()
    assert [s.text for s in Scopes.parse("system/*.s").matching("s", "*")] == ["system/*.s"]


@pytest.mark.parametrize(
    ("requested", "allowed", "granted"),
    [
        ("patient/Observation.rs", "patient/*.rs", "patient/Observation.rs"),
        ("patient/*.cruds", "patient/*.rs", "patient/*.rs"),
        ("patient/*.rs", "patient/Observation.rs patient/Patient.r", "patient/Observation.rs patient/Patient.r"),
        ("patient/Observation.read", "patient/*.rs", "patient/Observation.read"),  # granted whole: v1 kept
        ("patient/Observation.read", "patient/Observation.r", "patient/Observation.r"),  # narrowed: v2
        ("user/Observation.rs", "patient/*.rs", ""),  # another context is not a narrowing
        ("patient/MedicationRequest.c", "patient/*.rs", ""),
        ("launch openid fhirUser offline_access", "launch openid fhirUser", "launch openid fhirUser"),
        ("patient/*.rs patient/Observation.r", "patient/*.rs", "patient/*.rs"),  # no redundant scope
        ("patient/Observation.rs?category=laboratory", "patient/*.r", "patient/Observation.r?category=laboratory"),
        ("patient/Observation.rs", "patient/*.rs?category=laboratory", "patient/Observation.rs?category=laboratory"),
        ("patient/Observation.xyz openid", "patient/*.rs openid", "openid"),  # malformed requests are dropped
    ],
)
def test_narrow_grants_what_both_allow(requested: str, allowed: str, granted: str) -> None:
    assert narrow(Scopes.parse(requested), Scopes.parse(allowed)).text == granted


@pytest.mark.parametrize(
    ("requested", "granted", "ok"),
    [
        ("patient/Observation.rs", "patient/*.rs offline_access", True),
        ("patient/Observation.r", "patient/Observation.rs", True),
        ("", "patient/Observation.rs", True),
        ("patient/Observation.rs offline_access", "patient/Observation.rs", False),
        ("patient/Observation.cruds", "patient/Observation.rs", False),
        ("patient/*.rs", "patient/Observation.rs", False),
        ("user/Observation.rs", "patient/Observation.rs", False),
        ("patient/Observation.rs", "patient/Observation.rs?category=laboratory", False),
        ("patient/Observation.rs?category=laboratory", "patient/Observation.rs", True),
        ("patient/Observation.dus", "patient/*.cruds", False),
    ],
)
def test_within_says_whether_a_request_only_narrows(requested: str, granted: str, ok: bool) -> None:
    assert within(Scopes.parse(requested), Scopes.parse(granted)) is ok


def test_scopes_filter_by_context_and_keep_order() -> None:
    scopes = Scopes.parse("launch patient/Observation.rs user/Patient.r system/*.rs openid patient/Observation.rs")
    assert scopes.text == "patient/Observation.rs user/Patient.r system/*.rs launch openid"
    assert scopes.without_context("patient").text == "user/Patient.r system/*.rs launch openid"
    assert scopes.only_contexts(["system"]).only_resource().text == "system/*.rs"
    assert scopes.contexts() == {"patient", "user", "system"}
    assert scopes.has("launch") and not scopes.has("fhirUser")


def test_within_scope_relation() -> None:
    narrow_scope = ResourceScope("patient", "Observation", frozenset("r"))
    wide = ResourceScope("patient", "*", frozenset("rs"))
    assert narrow_scope.within(wide) and not wide.within(narrow_scope)
    assert narrow_scope.intersect(ResourceScope("user", "*", frozenset("rs"))) is None
