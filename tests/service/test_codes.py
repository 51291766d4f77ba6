"""Code tables: every code of brief §3 by role, matched by (system, code) only."""

from __future__ import annotations

import pytest

from service.codes import (
    ATC,
    CONDITION_ROLES,
    ICD10CM,
    LAB_ROLES,
    LOINC,
    RXNORM,
    SNOMED,
    TEMPERATURE,
    ConditionRole,
    LabRole,
    canonical,
)
from service.drugs import MedicationRole, medication_display, medication_role

LAB_TABLE = [
    *[(c, LabRole.ANC) for c in ("751-8", "753-4", "26499-4")],
    *[(c, LabRole.SEGS_ABS) for c in ("30451-9", "768-2")],
    *[(c, LabRole.BANDS_ABS) for c in ("26507-4", "763-3", "30229-9")],
    *[(c, LabRole.TOTAL_PCT) for c in ("770-8", "26511-6", "23761-0")],
    *[(c, LabRole.SEGS_PCT) for c in ("769-0", "26505-8", "32200-8")],
    *[(c, LabRole.BANDS_PCT) for c in ("764-1", "26508-2", "35332-6")],
    ("71676-1", LabRole.FRACTION),
    *[(c, LabRole.WBC) for c in ("6690-2", "26464-8", "804-5", "33256-9")],
]


@pytest.mark.parametrize(("code", "role"), LAB_TABLE, ids=[c for c, _ in LAB_TABLE])
def test_lab_code_roles(code: str, role: LabRole) -> None:
    assert LAB_ROLES[(LOINC, code)] is role


def test_lab_table_is_exactly_the_brief() -> None:
    assert set(LAB_ROLES) == {(LOINC, c) for c, _ in LAB_TABLE}


@pytest.mark.parametrize(
    "code",
    ["8310-5", "8331-1", "8332-9", "8328-7", "8333-7", "76011-6", "8329-5", "8334-5", "61008-9", "60836-4",
     "60838-0", "76278-1", "75539-7", "8311-3", "8312-1", "8313-9", "8314-7", "8315-4"],
)
def test_temperature_codes(code: str) -> None:
    assert (LOINC, code) in TEMPERATURE


@pytest.mark.parametrize(
    ("code", "roles"),
    [
        ((SNOMED, "165517008"), {ConditionRole.RISK_FACTOR}),
        ((SNOMED, "425229001"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((SNOMED, "328301000119102"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((ICD10CM, "D70.1"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((SNOMED, "234336002"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((SNOMED, "91861009"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((SNOMED, "91857003"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((ICD10CM, "C91.00"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((ICD10CM, "C94.22"), {ConditionRole.RISK_FACTOR, ConditionRole.CHEMOTHERAPY_CONTEXT}),
        ((SNOMED, "47318007"), {ConditionRole.RISK_FACTOR, ConditionRole.DRUG_INDUCED}),
        ((ICD10CM, "D70.2"), {ConditionRole.RISK_FACTOR, ConditionRole.DRUG_INDUCED}),
        ((SNOMED, "55464009"), {ConditionRole.RISK_FACTOR}),
        ((ICD10CM, "E61.0"), {ConditionRole.RISK_FACTOR}),
        ((ICD10CM, "D70"), {ConditionRole.RISK_FACTOR}),  # the category code itself (brief §3.3)
        ((ICD10CM, "P61.5"), {ConditionRole.RISK_FACTOR}),  # neonatal: coded outside D70
    ],
    ids=lambda v: str(v),
)
def test_condition_roles(code: tuple[str, str], roles: set[ConditionRole]) -> None:
    assert CONDITION_ROLES[code] == roles


@pytest.mark.parametrize(
    ("code", "role"),
    [
        ((RXNORM, "68442"), MedicationRole.GCSF),
        ((RXNORM, "338036"), MedicationRole.GCSF),
        ((RXNORM, "727539"), MedicationRole.GCSF),
        ((ATC, "L03AA02"), MedicationRole.GCSF),
        ((ATC, "L03AA13"), MedicationRole.GCSF),
        ((RXNORM, "3002"), MedicationRole.CHEMOTHERAPY),
        ((RXNORM, "3041"), MedicationRole.CHEMOTHERAPY),  # cytarabine: AML induction
        ((RXNORM, "1251"), MedicationRole.CHEMOTHERAPY),  # azacitidine
        ((RXNORM, "4492"), MedicationRole.CHEMOTHERAPY),  # fluorouracil
        ((ATC, "L01XA02"), MedicationRole.CHEMOTHERAPY),
        ((ATC, "L01FA01"), MedicationRole.CHEMOTHERAPY),
        ((RXNORM, "2626"), MedicationRole.CAUSE),
        ((ATC, "N05AH02"), MedicationRole.CAUSE),
        ((ATC, "H03BB02"), MedicationRole.CAUSE),
        ((ATC, "H03BA02"), MedicationRole.CAUSE),
        ((ATC, "J01CA04"), MedicationRole.CAUSE),
        ((ATC, "J01DD04"), MedicationRole.CAUSE),
        # The rest of brief §3.4's most-implicated drugs (Andersohn 2007): they were missing, so R12/R15 missed them.
        ((ATC, "C01BA02"), MedicationRole.CAUSE),  # procainamide
        ((ATC, "B01AC05"), MedicationRole.CAUSE),  # ticlopidine
        ((ATC, "V03AC02"), MedicationRole.CAUSE),  # deferiprone
        ((ATC, "J01"), None),
        ((ATC, "N05AH03"), None),
        ((RXNORM, "6835"), None),  # methimazole RxNorm: unverified, left out (ATC H03BB02 covers it)
        ((SNOMED, "68442"), None),  # right code, wrong system
    ],
    ids=lambda v: str(v),
)
def test_medication_roles(code: tuple[str, str], role: MedicationRole | None) -> None:
    assert medication_role(code) is role


def test_medication_display_for_class_and_code() -> None:
    assert medication_display((ATC, "L01XA02")) == "antineoplastic agent"
    assert medication_display((RXNORM, "338036")) == "pegfilgrastim"
    assert medication_display((ATC, "Z99")) is None


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        ("http://loinc.org", "751-8", (LOINC, "751-8")),
        ("urn:oid:2.16.840.1.113883.6.1", "751-8", (LOINC, "751-8")),
        ("urn:oid:2.16.840.1.113883.6.96", "165517008", (SNOMED, "165517008")),
        ("urn:oid:2.16.840.1.113883.6.88", "68442", (RXNORM, "68442")),
        ("urn:oid:2.16.840.1.113883.6.90", "D70.1", (ICD10CM, "D70.1")),
        (" http://loinc.org ", " 751-8 ", (LOINC, "751-8")),
        ("http://loinc.org/", "8310-5", (LOINC, "8310-5")),
        ("https://loinc.org", "8310-5", (LOINC, "8310-5")),
        ("https://snomed.info/sct/", "165517008", (SNOMED, "165517008")),
        ("http://example.org/loinc.org", "751-8", ("http://example.org/loinc.org", "751-8")),
        (None, "751-8", None),
        ("http://loinc.org", 751, None),
        # ICD-10-CM written without its dot, as claims and many EHR exports do (brief §3.3 "D70.1").
        (ICD10CM, "D701", (ICD10CM, "D70.1")),
        (ICD10CM, " D702 ", (ICD10CM, "D70.2")),
        ("urn:oid:2.16.840.1.113883.6.90", "D72819", (ICD10CM, "D72.819")),
        (ICD10CM, "D70", (ICD10CM, "D70")),
        (ICD10CM, "D70.1", (ICD10CM, "D70.1")),
        # Only ICD-10-CM: a code of another system is never changed.
        ("http://hl7.org/fhir/sid/icd-10", "D701", ("http://hl7.org/fhir/sid/icd-10", "D701")),
        (SNOMED, "D701", (SNOMED, "D701")),
    ],
    ids=["loinc", "loinc-oid", "snomed-oid", "rxnorm-oid", "icd-oid", "spaces", "trailing-slash", "https",
         "https-and-slash", "other-system", "no-system", "numeric-code", "icd-undotted", "icd-undotted-spaces",
         "icd-oid-undotted", "icd-category", "icd-dotted", "who-icd-10-unchanged", "other-system-unchanged"],
)
def test_canonical(system: object, code: object, expected: tuple[str, str] | None) -> None:
    assert canonical(system, code) == expected


@pytest.mark.parametrize(
    ("code", "display"),
    [("N05AH02", "clozapine"), ("J01EE01", "sulfamethoxazole and trimethoprim"),
     ("L03AA13", "colony stimulating factor"), ("J01CE01", "beta-lactam antibacterial, penicillin"),
     ("H03BB01", "antithyroid preparation (thionamide)"), ("L01", "antineoplastic agent"), ("N05AH03", None)],
    ids=lambda v: str(v),
)
def test_medication_display_takes_the_longest_atc_match(code: str, display: str | None) -> None:
    # A 7-character ATC code names one substance: the card says "clozapine", not a class or nothing.
    assert medication_display((ATC, code)) == display
