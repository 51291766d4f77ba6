"""Conditions, medication orders and the Patient, read directly."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from service.codes import ConditionRole
from service.drugs import MedicationRole
from service.model import DataIssue
from service.records import birth, condition_fact, latest_order_date, medication_facts, medication_index
from tests.service.factories import ATC, ICD10CM, NOW, RXNORM, SNOMED, ago, condition, medication_request, patient


def test_condition_fact_uses_our_display() -> None:
    fact, issue = condition_fact(condition("165517008", id="n"))
    assert issue is None and fact is not None and fact.ref.display == "Neutropenia"


@pytest.mark.parametrize(
    "invalid",
    [{"implicitRules": 123},
     {"verificationStatus": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                          "code": "refuted"}]}]},
     {"clinicalStatus": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                      "code": "resolved"}]}]}],
    ids=["implicit-rules", "refuted-sent-as-a-list", "resolved-sent-as-a-list"],
)
def test_malformed_condition_is_an_issue(invalid: dict[str, Any]) -> None:
    # A status sent as a list reads as no status; had it counted as an unread element, a refuted or resolved
    # diagnosis would have become a risk factor.
    fact, issue = condition_fact({**condition("165517008", id="n"), **invalid})
    assert fact is None and issue is not None and (issue.code, issue.source) == ("malformed-resource", "Condition/n")


@pytest.mark.parametrize("clinical", ["actve", "x", "2025-03-10"])
def test_condition_whose_clinical_status_is_no_known_code_is_an_issue(clinical: str) -> None:
    # Read as "not active", a neutropenia or a leukaemia with a clinicalStatus outside its value set was dropped
    # without a word: the risk factor or chemotherapy context vanished unseen.
    fact, issue = condition_fact(condition("165517008", clinical=clinical, id="n"))
    assert fact is None and issue is not None and (issue.code, issue.source) == ("malformed-resource", "Condition/n")


@pytest.mark.parametrize(
    ("abatement", "counts", "issue_code"),
    [({"abatementDateTime": "2024-05-01"}, False, None), ({"abatementString": "in remission"}, False, None),
     ({"abatementDateTime": None}, True, None), ({"abatementDateTime": "unknown"}, False, "malformed-resource"),
     ({"abatementDateTime": 0}, False, "malformed-resource"),
     ({"abatementDateTime": 1732838400.5}, False, "malformed-resource"),
     ({"abatementPeriod": {"start": 1732838400}}, False, "malformed-resource"),
     ({"abatementPeriod": {"start": "2024-05-01"}}, False, None),
     ({"abatementBoolean": False}, True, "invalid-unread-elements"),
     ({"abatementBoolean": True}, True, "invalid-unread-elements")],
    ids=["abated", "abated-as-text", "abatement-null", "abatement-not-a-date", "abatement-a-number",
         "abatement-a-fraction", "abatement-period-start-a-number", "abated-in-a-period",
         "stu3-abatement-boolean-false", "stu3-abatement-boolean-true"],
)
def test_condition_without_clinical_status_and_its_abatement(abatement: dict[str, Any], counts: bool,
                                                             issue_code: str | None) -> None:
    # A null abatement read as "abated", and an invalid one was never validated: either dropped a leukaemia
    # (the chemotherapy context) without a word. So did STU3's abatementBoolean, even false ("not abated"): R4 has
    # no such element, so it is an element not read, reported, and the context is kept.
    fact, issue = condition_fact({**condition("91861009", clinical=None, id="n"), **abatement})
    assert (fact is not None) is counts
    assert (issue.code if issue else None) == issue_code


@pytest.mark.parametrize(
    ("clinical", "abatement"),
    [("active", {"abatementDateTime": 0}), ("relapse", {"abatementDateTime": 1732838400.5}),
     ("recurrence", {"abatementPeriod": {"start": 1732838400}}), ("active", {"abatementPeriod": {"end": 1732838400}})],
    ids=["active-abatement-a-number", "relapse-abatement-a-fraction", "recurrence-period-start-a-number",
         "active-period-end-a-number"],
)
def test_condition_with_an_active_clinical_status_counts_whatever_its_abatement_holds(
        clinical: str, abatement: dict[str, Any]) -> None:
    # The clinical status decides; the abatement is read only without one. A leukaemia marked active whose
    # abatement was a number was dropped as malformed: the chemotherapy context (R2) vanished.
    fact, issue = condition_fact({**condition("91861009", clinical=clinical, id="n"), **abatement})
    assert fact is not None and ConditionRole.CHEMOTHERAPY_CONTEXT in fact.roles
    assert issue is None


@pytest.mark.parametrize(
    "abatement",
    [{"abatementDateTime": "unknown"}, {"abatementPeriod": {"start": "last spring"}}, {"abatementAge": "x"}],
    ids=["abatement-not-a-date", "abatement-period-not-a-date", "abatement-age-not-an-age"],
)
def test_condition_with_an_active_clinical_status_and_an_invalid_abatement_counts_with_the_issue(
        abatement: dict[str, Any]) -> None:
    # Validated as an element the rules read, an invalid abatement dropped a leukaemia marked active, whose status
    # decides: the chemotherapy context (R2) vanished. It is an invalid element the rules do not read here.
    fact, issue = condition_fact({**condition("91861009", clinical="active", id="n"), **abatement})
    assert fact is not None and ConditionRole.CHEMOTHERAPY_CONTEXT in fact.roles
    assert issue is not None and (issue.code, issue.source) == ("invalid-unread-elements", "Condition/n")
    assert issue.detail is not None and issue.detail.startswith("abatement")


@pytest.mark.parametrize("clinical", ["inactive", "remission", "resolved"])
def test_condition_that_is_over_is_ignored_without_an_issue(clinical: str) -> None:
    assert condition_fact(condition("165517008", clinical=clinical, id="n")) == (None, None)


@pytest.mark.parametrize(
    "invalid",
    [{"note": "not a list"}, {"code": {"coding": [{"system": SNOMED, "code": "165517008", "display": ""}]}},
     {"onsetDateTime": "last spring"}, {"participant": [{}]}],
    ids=["note", "empty-display", "onset", "later-fhir-version-element"],
)
def test_condition_invalid_only_where_the_rules_do_not_read_is_used(invalid: dict[str, Any]) -> None:
    fact, issue = condition_fact({**condition("165517008", id="n"), **invalid})
    assert fact is not None and fact.roles == {ConditionRole.RISK_FACTOR}
    assert issue is not None and (issue.code, issue.source) == ("invalid-unread-elements", "Condition/n")


@pytest.mark.parametrize(
    ("invalid", "usable"),
    [({"note": "not a list"}, True), ({"authoredOn": "last week"}, False), ({"doNotPerform": "maybe"}, False),
     ({"dosageInstruction": [{"text": ""}]}, True)],
    ids=["note", "authored-on", "do-not-perform", "dosage-text"],
)
def test_medication_request_invalid_where_read_is_not_used(invalid: dict[str, Any], usable: bool) -> None:
    facts, issue = medication_facts({**medication_request("338036", id="m"), **invalid}, {})
    assert bool(facts) is usable
    assert issue is not None and issue.code == ("invalid-unread-elements" if usable else "malformed-resource")


@pytest.mark.parametrize(
    ("dates", "where"),
    [({"authoredOn": 0}, "authoredOn"), ({"authoredOn": 1741600000.5}, "authoredOn"),
     ({"dispenseRequest": {"validityPeriod": {"end": 1741600000}}}, "dispenseRequest.validityPeriod.end"),
     ({"dosageInstruction": [{"timing": {"event": [1741600000]}}]}, "dosageInstruction[0].timing.event[0]")],
    ids=["authored-on-zero", "authored-on-float", "validity-end", "event"],
)
def test_order_date_sent_as_a_number_is_reported(dates: dict[str, Any], where: str) -> None:
    # fhir.resources reads a number as seconds since 1970, so validation passed; the dates here are strings only,
    # and a completed G-CSF order so dated was dropped as undated without a word (R2's context lost unseen).
    order = medication_request("338036", status="completed", id="m")
    del order["authoredOn"]
    facts, issue = medication_facts({**order, **dates}, {})
    assert facts == frozenset()
    assert issue == DataIssue("malformed-resource", "MedicationRequest/m",
                              f"{where}: a JSON number or boolean, not a dateTime string")


@pytest.mark.parametrize(
    ("dates", "issue_code"),
    [({"authoredOn": "2025-03-40"}, "malformed-resource"),
     ({"dosageInstruction": [{"timing": {"event": ["yesterday"]}}]}, "malformed-resource"),
     ({}, None)],
    ids=["invalid-authored-on", "invalid-event", "no-date"],
)
def test_ended_order_without_a_usable_date_is_dropped_and_an_invalid_date_reported(
    dates: dict[str, Any], issue_code: str | None
) -> None:
    # A completed G-CSF order whose only date was invalid was dropped without a word, like one with no date at
    # all: the high-risk context (R2) was lost and nothing told the clinician that a record could not be read.
    order = medication_request("338036", status="completed", id="m")
    del order["authoredOn"]
    facts, issue = medication_facts({**order, **dates}, {})
    assert facts == frozenset()
    assert (issue.code if issue else None) == issue_code


def test_medication_index_and_reference() -> None:
    index = medication_index([{"resourceType": "Medication", "id": "m", "code": {"coding": [
        {"system": ATC, "code": "L01XA01"}]}}, {"resourceType": "Medication"}])
    order = medication_request("0")
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": "https://ehr/fhir/Medication/m"}
    facts, issue = medication_facts(order, index)
    assert issue is None and {f.role for f in facts} == {MedicationRole.CHEMOTHERAPY}


#: A filgrastim product as EHRs code a Medication: the product (not in the tables) and its ingredient (in them).
_FILGRASTIM_PRODUCT = {"resourceType": "Medication", "id": "gcsf",
                       "code": {"coding": [{"system": RXNORM, "code": "000000", "display": "a filgrastim product"}]},
                       "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "68442"}]},
                                       "isActive": True}]}


@pytest.mark.parametrize(
    ("medication", "roles"),
    [
        (_FILGRASTIM_PRODUCT, {MedicationRole.GCSF}),
        ({**_FILGRASTIM_PRODUCT, "ingredient": [{**_FILGRASTIM_PRODUCT["ingredient"][0], "isActive": False}]}, set()),
        ({k: v for k, v in _FILGRASTIM_PRODUCT.items() if k != "ingredient"}, set()),
    ],
    ids=["active-ingredient", "inactive-ingredient", "product-code-only"],
)
@pytest.mark.parametrize("how", ["referenced", "contained"])
def test_medication_is_known_by_its_ingredients(medication: dict[str, Any], roles: set[MedicationRole],
                                                how: str) -> None:
    # A one-off pegfilgrastim or filgrastim order coded as the product was not recognised: no chemotherapy
    # context, so fever without an ANC was not presumed febrile neutropenia.
    order = medication_request("0")
    del order["medicationCodeableConcept"]
    if how == "contained":
        order["contained"] = [{**medication, "id": "m1"}]
        order["medicationReference"] = {"reference": "#m1"}
        index = {}
    else:
        order["medicationReference"] = {"reference": "Medication/gcsf"}
        index = medication_index([medication])
    facts, _ = medication_facts(order, index)
    assert {f.role for f in facts} == roles


@pytest.mark.parametrize(
    ("contained", "reference", "issue_code"),
    [
        ([], "#m1", "malformed-resource"),
        ([{**_FILGRASTIM_PRODUCT, "id": "m2"}], "#m1", "malformed-resource"),
        ([{"resourceType": "Medication", "id": "m1"}], "#m1", None),  # found, but not a medicine the rules know
        ([], "Medication/unknown", None),  # not sent: reported by the reference following (cds_hooks.prefetch)
    ],
    ids=["nothing-contained", "other-id-contained", "contained-but-unknown", "not-contained"],
)
def test_an_order_whose_contained_medicine_is_missing_says_so(contained: list[dict[str, Any]], reference: str,
                                                              issue_code: str | None) -> None:
    # Its medicine, maybe a G-CSF or chemotherapy, cannot be known: silently skipped, the R2 context could vanish.
    order = medication_request("0")
    del order["medicationCodeableConcept"]
    order["medicationReference"] = {"reference": reference}
    if contained:
        order["contained"] = contained
    facts, issue = medication_facts(order, {})
    assert facts == frozenset()
    assert (issue.code if issue else None) == issue_code


@pytest.mark.parametrize(
    ("medication", "issue"),
    [({"medicationReference": "Medication/gcsf"}, "medicationReference: not a Reference"),
     ({"medicationReference": {"reference": 5}}, "medicationReference: not a Reference"),
     ({"medicationReference": {"reference": "x"}}, "medicationReference: names no Medication ('Medication/<id>' or "
                                                   "'#<id>')"),
     ({"medicationReference": {"reference": "Substance/s"}}, "medicationReference: names no Medication "
                                                             "('Medication/<id>' or '#<id>')"),
     ({"medicationReference": {"reference": "https://ehr/fhir/Medication/x"}}, None),
     ({"medicationCodeableConcept": "pegfilgrastim"}, "medicationCodeableConcept: not a CodeableConcept"),
     ({"medicationCodeableConcept": {"coding": {"code": "338036"}}}, "medicationCodeableConcept: not a CodeableConcept"),
     ({"medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": 338036}]}},
      "medicationCodeableConcept: not a CodeableConcept"),
     ({}, "medication[x]: missing"),
     ({"medicationCodeableConcept": {"text": "paracetamol"}}, None),
     ({"medicationReference": {"display": "paracetamol"}}, None),
     # Null members are absent (serialisers that write every member): valid orders naming no known medicine.
     ({"medicationCodeableConcept": {"coding": None, "text": "paracetamol"}}, None),
     ({"medicationCodeableConcept": {"coding": [{"system": None, "code": "p1", "display": "paracetamol"}]}}, None),
     ({"medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": None, "display": "paracetamol"}]}}, None),
     ({"medicationReference": {"reference": None, "display": "paracetamol"}}, None),
     # medication[x] is a choice of one: with both, the concept named nothing known and the reference was never
     # looked at, though it may name a G-CSF (an order whose concept is known is reported by its validation).
     ({"medicationCodeableConcept": {"text": "filgrastim"}, "medicationReference": {"reference": "Medication/g"}},
      "medication[x]: both medicationCodeableConcept and medicationReference"),
     ({"medicationCodeableConcept": {"text": "filgrastim"}, "medicationReference": {"reference": "#g"}},
      "medication[x]: both medicationCodeableConcept and medicationReference")],
    ids=["reference-a-string", "reference-a-number", "reference-no-type", "reference-to-a-substance",
         "absolute-reference", "concept-a-string", "coding-not-a-list", "code-a-number",
         "missing", "text-only", "display-only", "null-coding", "null-system", "null-code", "null-reference",
         "concept-and-reference", "concept-and-contained-reference"],
)
def test_an_order_whose_medicine_is_unreadable_says_so(medication: dict[str, Any], issue: str | None) -> None:
    # Broken FHIR where the medicine is named was skipped without a word: it may have been a G-CSF or
    # chemotherapy, and the R2 context vanished unseen. Valid orders naming no known medicine stay silent.
    order = medication_request("0", id="m")
    del order["medicationCodeableConcept"]
    facts, found = medication_facts({**order, **medication}, {})
    assert facts == frozenset()
    assert found == (DataIssue("malformed-resource", "MedicationRequest/m", f"{issue}; its medicine cannot be known")
                     if issue else None)


def test_an_order_with_a_null_concept_is_known_by_its_reference() -> None:
    # "medicationCodeableConcept": null hid the medicationReference beside it: a G-CSF order was never read.
    order = {**medication_request("0", id="m"), "medicationCodeableConcept": None,
             "medicationReference": {"reference": "Medication/g"}}
    facts, issue = medication_facts(order, {"Medication/g": frozenset({(RXNORM, "338036")})})
    assert {f.role for f in facts} == {MedicationRole.GCSF} and issue is None


def test_latest_order_date_uses_every_date() -> None:
    order = medication_request("338036", authored=ago(days=10),
                               dispenseRequest={"validityPeriod": {"end": ago(days=4)}},
                               dosageInstruction=[{"timing": {"event": [ago(days=6), ago(days=3)]}}, "junk"])
    assert latest_order_date(order) == NOW.replace(day=7)


TODAY = NOW.date()  # 2025-03-10


@pytest.mark.parametrize(
    ("birth_date", "born"),
    [
        ("2001-02-03", date(2001, 2, 3)),
        ("2001-02", date(2001, 2, 1)),  # a partial date: its first day
        ("2025-03-10", TODAY),  # born today
        ("2025-03-11", date(2025, 3, 11)),  # tomorrow in UTC: today where the local date runs ahead (tolerance)
        (None, None),  # no birthDate: the age is simply unknown, no issue
    ],
    ids=["full", "partial", "today", "tomorrow-within-tolerance", "absent"],
)
def test_birth_usable(birth_date: str | None, born: date | None) -> None:
    assert birth(patient(birth_date), today=TODAY) == ((("Patient/p1", born) if born else None), None)


@pytest.mark.parametrize(
    ("birth_date", "why"),
    [
        ("2025-02-30", "birthDate: not a valid date"),
        ("garbage", "birthDate: not a valid date"),
        ("", "birthDate: not a valid date"),
        (20010203, "birthDate: not a valid date"),
        ("2025-03-12", "birthDate: after the evaluation date"),  # just past the one-day tolerance
        ("2026-01-01", "birthDate: after the evaluation date"),
        ("2026", "birthDate: after the evaluation date"),
    ],
    ids=["february-30", "garbage", "empty", "number", "day-after-tomorrow", "next-year", "next-year-partial"],
)
def test_birth_unusable_is_a_data_issue(birth_date: object, why: str) -> None:
    found, issue = birth(patient(None, birthDate=birth_date), today=TODAY)
    assert found is None
    assert issue == DataIssue("malformed-resource", "Patient/p1", f"{why}; age unknown, adult ANC cut-offs used")


def test_birth_of_an_invalid_patient_is_a_data_issue() -> None:
    found, issue = birth(patient("2001-02-03", implicitRules=5), today=TODAY)
    assert found is None and issue is not None and issue.code == "malformed-resource"
    assert issue.detail is not None and issue.detail.startswith("implicitRules")


def test_birth_of_a_patient_invalid_elsewhere_is_used() -> None:
    found, issue = birth(patient("2001-02-03", id="p", gender=5), today=TODAY)
    assert found == ("Patient/p", date(2001, 2, 3))
    assert issue is not None and issue.code == "invalid-unread-elements" and issue.detail is not None
    assert issue.detail.startswith("gender")


_NOT_A_CODE = "status: not a MedicationRequest status code"


@pytest.mark.parametrize(("status", "detail"),
                         [(None, "status: missing"), (1, _NOT_A_CODE), ("", _NOT_A_CODE), ("actve", _NOT_A_CODE),
                          (" active", _NOT_A_CODE)],
                         ids=["missing", "number", "empty", "typo", "spaces"])
def test_order_for_a_known_medicine_without_a_valid_status_is_reported(status: Any, detail: str) -> None:
    # A G-CSF order whose status was missing or not a code was dropped without a word: the high-risk context (R2)
    # was lost, presumed febrile neutropenia became fever without an ANC, and nothing said a record was unreadable.
    order = medication_request("338036", id="m")
    if status is None:
        del order["status"]
    else:
        order["status"] = status
    facts, issue = medication_facts(order, {})
    assert facts == frozenset()
    assert issue == DataIssue("malformed-resource", "MedicationRequest/m", detail)


@pytest.mark.parametrize("status", ["cancelled", "entered-in-error", "draft", "unknown", "entered-in-error ",
                                    " cancelled"])
def test_order_with_a_status_that_does_not_count_is_ignored_without_an_issue(status: str) -> None:
    assert medication_facts(medication_request("338036", status=status, id="m"), {}) == (frozenset(), None)


# Mutation-testing gaps of the reading layer (each test below pins behaviour a mutant of service/records.py changed
# without any test noticing).


@pytest.mark.parametrize("order", [["D70.9", "D70.1"], ["D70.1", "D70.9"]], ids=["unspecified-first", "chemo-first"])
def test_condition_coded_twice_has_the_roles_of_both_and_cites_its_first_code(order: list[str]) -> None:
    # "Neutropenia, unspecified" beside "Agranulocytosis secondary to cancer chemotherapy": one fact, the
    # chemotherapy context kept, citing the first code in (system, code) order whatever the order of the codings.
    resource = condition(order[0], ICD10CM, id="n")
    resource["code"]["coding"].append({"system": ICD10CM, "code": order[1]})
    fact, issue = condition_fact(resource)
    assert issue is None and fact is not None
    assert fact.roles == {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}
    assert (fact.ref.system, fact.ref.code) == (ICD10CM, "D70.1")


_FILGRASTIM = {"coding": [{"system": RXNORM, "code": "68442"}]}


@pytest.mark.parametrize(
    ("resource", "indexed"),
    [({"resourceType": "Medication", "id": "m", "code": _FILGRASTIM}, True),
     ({"resourceType": "Medication", "code": _FILGRASTIM}, False),
     ({"resourceType": "Medication", "id": 7, "code": _FILGRASTIM}, False),
     ({"resourceType": "Substance", "id": "m", "code": _FILGRASTIM}, False),
     ({"resourceType": "Observation", "id": "m", "code": _FILGRASTIM}, False)],
    ids=["medication", "medication-without-id", "medication-with-a-number-id", "substance", "observation"],
)
def test_medication_index_holds_only_medications_with_an_id(resource: dict[str, Any], indexed: bool) -> None:
    index = medication_index([resource])
    assert index == ({"Medication/m": frozenset({(RXNORM, "68442")})} if indexed else {})


def test_order_naming_a_substance_is_not_read_as_its_medicine() -> None:
    # medicationReference names a Medication (R4): a Substance coded as filgrastim is no G-CSF order, and the
    # reference is reported as naming no Medication.
    substance = {"resourceType": "Substance", "id": "s", "code": _FILGRASTIM}
    order = {k: v for k, v in medication_request("0", id="o").items() if k != "medicationCodeableConcept"}
    order["medicationReference"] = {"reference": "Substance/s"}
    facts, issue = medication_facts(order, medication_index([substance]))
    assert facts == frozenset()
    assert issue == DataIssue("malformed-resource", "MedicationRequest/o", "medicationReference: names no Medication "
                              "('Medication/<id>' or '#<id>'); its medicine cannot be known")


@pytest.mark.parametrize(
    ("timing", "last_days_ago"),
    [({"event": [ago(days=6), ago(days=3)]}, 3),
     ({"repeat": {"boundsPeriod": {"start": ago(days=5), "end": ago(days=2)}}}, 2),
     ({"repeat": {"count": 3}}, None), ({"repeat": {"boundsPeriod": None}}, None), ({"event": None}, None)],
    ids=["events-only", "bounds-only", "repeat-without-bounds", "null-bounds", "null-events"],
)
def test_ended_order_is_placed_by_its_dosage_timing_alone(timing: dict[str, Any], last_days_ago: int | None) -> None:
    # A completed G-CSF order dated only by its dosage events or bounds marks recent chemotherapy (R2); one whose
    # timing holds no date cannot be placed and is dropped, as an ended order without any date is.
    order = {k: v for k, v in medication_request("338036", status="completed", id="m").items() if k != "authoredOn"}
    order["dosageInstruction"] = [{"timing": timing}]
    facts, issue = medication_facts(order, {})
    assert issue is None
    assert [f.last for f in facts] == ([] if last_days_ago is None else [NOW - timedelta(days=last_days_ago)])
