"""Code tables as data: (system, code) pairs by role, matched by set membership, never by display text.

Every code here is VERIFIED in clinical-brief.md §3 or was confirmed in a public terminology source before use:

- ATC: A07EC01, J01CE01, J01CE02, J01EE01, J05AF01, L04AX01, N02BA01, N03AF01, N05AH02, H03BA02, H03BB01,
  H03BB02, N02BB02 (metamizole), J04BA02 (dapsone), C01BA02 (procainamide), the classes L01, L03AA, J01C, J01D,
  H03B and L03AA09 (sargramostim): a complete public WHO ATC index (SubjectRaw/SubjectRaw subject/data/eng/atc.md);
  B01AC05 (ticlopidine) and V03AC02 (deferiprone): several public drug tables and ATC maps.
- RxNorm 68442 filgrastim, 338036 pegfilgrastim and the other G-CSF ingredients/products below: CIBMTR reporting
  IG value set "med-mobilizing-agents-vs" (nmdp-ig/cibmtr-reporting-ig).
- RxNorm chemotherapy ingredients beyond the brief's: 3041 cytarabine, 4179 etoposide, 24698 fludarabine, 5657
  ifosfamide, 1251 azacitidine, 15657 decitabine: the same CIBMTR IG (build/input/fsh/terminology/medications/,
  per-drug and Form 2400 value sets); 4492 fluorouracil, 3995 epirubicin, 194000 capecitabine, 32592 oxaliplatin
  (and 4179, 2555, 6851, 12574 again): CPIC's drug table (cpicpgx/cpic-schema, drug.sql). Daunorubicin,
  idarubicin, vincristine, vinblastine, bleomycin, hydroxyurea and temozolomide could not be confirmed: the ATC
  class L01 covers them when the EHR sends ATC.
- ICD-10-CM D51.x, D52.x, E53.8, E61.0, D72.819 and D70.x names: medtrack-io/icd_code (ICD-10-CM tables); D70 and
  P61.5 as brief §3.3 states them. The acute leukaemias C91.0x, C92.0x/4x/5x/6x/Ax, C93.0x, C94.0x, C94.2x and
  C95.0x: the same tables (lib/codes/codes_c91.ex to codes_c95.ex).
- SNOMED 91857003 Acute lymphoid leukemia: a public UMLS-to-SNOMED CT table (C0023449) and public ICD-10 maps
  (C91.0); one synthetic-patient module mislabels it as AML, and either reading is an acute leukaemia.
- LOINC 8311-3/8312-1/8313-9/8314-7/8315-4 (1/8/10/12/24 h maximum temperature): OHDSI PhenotypeLibrary
  inst/cohorts/208.json; 33256-9 name: several public LOINC maps.
- Code-system OIDs (urn:oid:2.16.840.1.113883.6.1/.96/.88/.90): public FHIR CodeSystem resources and OID maps.
- SNOMED 91855006: public sources disagree on its name (acute leukaemia / ALL / AML); every reading is an acute
  leukaemia, which is the role it has here.

Medicine tables live in ``service.drugs``; the verification notes for them are here.

LEFT OUT, because they could not be confirmed: RxNorm 6835 (methimazole) and 8794 (propylthiouracil) and any
RxNorm code for carbimazole (the ATC class H03B covers all three); RxNorm codes for procainamide, ticlopidine and
deferiprone (public sources disagree; their ATC codes are listed); ATC L01FA01 (rituximab; the public index lists
rituximab as L01XC02, an older code - the L01 class covers both); any SNOMED CT code for cyclic neutropenia
(ICD-10-CM D70.4 is used), for Duffy-null associated neutrophil count / benign ethnic neutropenia (so the DANC
rule of brief §1.5 cannot be applied), and for vitamin B12, folate or copper deficiency (ICD-10-CM codes used);
the ATC OID. RxNorm product-level codes for chemotherapy are not listed: chemotherapy is matched by RxNorm
ingredient or ATC class only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"

#: Other spellings of the same code systems: HL7 OIDs, and the canonical URL with https or a trailing slash (not
#: the canonical form, but no other system is meant by it: read as something else, a fever was dropped unnoticed).
SYSTEM_ALIASES: Mapping[str, str] = {
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    **{
        f"{scheme}{url.removeprefix('http')}{slash}": url
        for url in (LOINC, SNOMED, ICD10CM, RXNORM, ATC)
        for scheme in ("http", "https")
        for slash in ("", "/")
        if (scheme, slash) != ("http", "")
    },
}

Code = tuple[str, str]

#: An ICD-10-CM code written without its dot ("D701"), as claims files and many EHR exports write them; the code
#: system's form, and the tables', has the dot after the third character ("D70.1", brief §3.3). Read as something
#: else, a chemotherapy-induced agranulocytosis lost the high-risk context and a presumed febrile neutropenia
#: (critical, R2) became a fever without ANC (warning, R5).
_ICD10CM_UNDOTTED = re.compile(r"[A-Z][0-9][0-9A-Z][0-9A-Z]{1,4}")


def canonical(system: object, code: object) -> Code | None:
    """The (system, code) pair of a coding, system aliases resolved, ICD-10-CM dots restored; None unless strings."""
    if not isinstance(system, str) or not isinstance(code, str):
        return None
    system, code = SYSTEM_ALIASES.get(system.strip(), system.strip()), code.strip()
    if system == ICD10CM and _ICD10CM_UNDOTTED.fullmatch(code):
        code = f"{code[:3]}.{code[3:]}"
    return (system, code)


def rows(system: str, text: str) -> dict[Code, str]:
    """A code table from "code|display" lines."""
    table: dict[Code, str] = {}
    for line in text.strip().splitlines():
        code, _, display = line.partition("|")
        table[(system, code.strip())] = display.strip()
    return table


# --- Observations (brief §3.1) ----------------------------------------------------------------------------------


class LabRole(str, Enum):
    """What a lab code measures, for the ANC computation (brief §2)."""

    ANC = "anc"  # absolute neutrophils
    SEGS_ABS = "segs-abs"  # absolute segmented neutrophils
    BANDS_ABS = "bands-abs"  # absolute band neutrophils
    TOTAL_PCT = "total-pct"  # neutrophils / 100 leukocytes (automated totals include bands)
    SEGS_PCT = "segs-pct"  # segmented neutrophils / 100 leukocytes
    BANDS_PCT = "bands-pct"  # band neutrophils / 100 leukocytes
    FRACTION = "fraction"  # neutrophils / leukocytes, pure number 0-1
    WBC = "wbc"  # leukocytes


LAB_ROLES: Mapping[Code, LabRole] = {
    **{(LOINC, c): LabRole.ANC for c in ("751-8", "753-4", "26499-4")},
    **{(LOINC, c): LabRole.SEGS_ABS for c in ("30451-9", "768-2")},
    **{(LOINC, c): LabRole.BANDS_ABS for c in ("26507-4", "763-3", "30229-9")},
    **{(LOINC, c): LabRole.TOTAL_PCT for c in ("770-8", "26511-6", "23761-0")},
    **{(LOINC, c): LabRole.SEGS_PCT for c in ("769-0", "26505-8", "32200-8")},
    **{(LOINC, c): LabRole.BANDS_PCT for c in ("764-1", "26508-2", "35332-6")},
    (LOINC, "71676-1"): LabRole.FRACTION,
    **{(LOINC, c): LabRole.WBC for c in ("6690-2", "26464-8", "804-5", "33256-9")},
}

#: Body temperature maxima over 1/8/10/12/24 h (OHDSI FN cohort): brief §3.1 counts each as a single reading only.
#: The maximum was reached at some unknown moment of its period, not at the effective time, so it cannot place a
#: reading in a sequence: two rolling 24 h maxima an hour apart may be one spike of 38.1 °C, not a sustained fever.
TEMPERATURE_MAXIMUM: frozenset[Code] = frozenset(
    (LOINC, c) for c in ("8311-3", "8312-1", "8313-9", "8314-7", "8315-4")
)
#: Body temperature codes (FHIR bodytemp, OHDSI FN cohort), the maxima included.
TEMPERATURE: frozenset[Code] = frozenset(
    (LOINC, c)
    for c in (
        "8310-5", "8331-1", "8332-9", "8328-7", "8333-7", "76011-6", "8329-5", "8334-5", "61008-9",
        "60836-4", "60838-0", "76278-1", "75539-7",
    )
) | TEMPERATURE_MAXIMUM  # fmt: skip

#: Every Observation code the engine reads; anything else is dropped before validation.
OBSERVATION_CODES: frozenset[Code] = frozenset(LAB_ROLES) | TEMPERATURE

# --- Conditions (brief §3.2, §3.3) ------------------------------------------------------------------------------


class ConditionRole(str, Enum):
    """Why a condition matters to the rules."""

    RISK_FACTOR = "risk-factor"  # R12: a seed risk factor (brief §0) or documented neutropenia
    CHEMOTHERAPY_CONTEXT = "chemotherapy-context"  # R2: chemotherapy / high-risk context
    DRUG_INDUCED = "drug-induced"  # R15: drug-induced neutropenia


_NEUTROPENIA_SCT = rows(SNOMED, """
165517008|Neutropenia
303011007|Neutropenic disorder
17182001|Agranulocytosis
89655007|Congenital neutropenia
721303001|Refractory neutropenia
703148008|Periodontitis associated with chronic familial neutropenia
84828003|Leukopenia
127034005|Pancytopenia
""")
_DRUG_INDUCED_SCT = rows(SNOMED, """
47318007|Drug-induced neutropenia
56918001|Dose-related drug-induced neutropenia
3902000|Non dose-related drug-induced neutropenia
276628009|Chloramphenicol-induced neutropenia
32092008|Toxic neutropenia
""")
_CHEMO_CONTEXT_SCT = rows(SNOMED, """
425229001|Chemotherapy-induced neutropenia
328301000119102|Pancytopenia due to antineoplastic chemotherapy
409089005|Febrile neutropenia
91855006|Acute leukemia
91861009|Acute myeloid leukemia
91857003|Acute lymphoid leukemia
234336002|Hemopoietic stem cell transplant
367336001|Chemotherapy
""")
_SEED_RISK_SCT = rows(SNOMED, """
306058006|Aplastic anemia
93143009|Leukemia
109995007|Myelodysplastic syndrome
127035006|Bone marrow disorder
55464009|Systemic lupus erythematosus
69896004|Rheumatoid arthritis
34486009|Hyperthyroidism
353295004|Graves' disease
86406008|HIV infection
40468003|Viral hepatitis, type A
66071002|Type B viral hepatitis
6142004|Influenza
28944009|Cytomegalovirus infection
55735004|Respiratory syncytial virus infection
271558008|Infectious mononucleosis
57160007|Felty's syndrome
363346000|Malignant neoplastic disease
108290001|Radiation oncology AND/OR radiotherapy
""")
_NEUTROPENIA_ICD = rows(ICD10CM, """
D70|Neutropenia
D70.0|Congenital agranulocytosis
D70.3|Neutropenia due to infection
D70.4|Cyclic neutropenia
D70.8|Other neutropenia
D70.9|Neutropenia, unspecified
P61.5|Transient neonatal neutropenia
D72.819|Decreased white blood cell count, unspecified
""")
_DRUG_INDUCED_ICD = rows(ICD10CM, "D70.2|Other drug-induced agranulocytosis")
#: The acute leukaemias of R2's context (brief §4: "acute leukaemia"), whatever their remission state: in remission
#: is when consolidation and maintenance chemotherapy are given. Without them a child with acute lymphoblastic
#: leukaemia coded in ICD-10-CM, febrile and without a count, was a fever without ANC (warning), not a presumed
#: febrile neutropenia (critical).
_ACUTE_LEUKAEMIA_ICD = rows(ICD10CM, """
C91.00|Acute lymphoblastic leukemia, not having achieved remission
C91.01|Acute lymphoblastic leukemia, in remission
C91.02|Acute lymphoblastic leukemia, in relapse
C92.00|Acute myeloblastic leukemia, not having achieved remission
C92.01|Acute myeloblastic leukemia, in remission
C92.02|Acute myeloblastic leukemia, in relapse
C92.40|Acute promyelocytic leukemia, not having achieved remission
C92.41|Acute promyelocytic leukemia, in remission
C92.42|Acute promyelocytic leukemia, in relapse
C92.50|Acute myelomonocytic leukemia, not having achieved remission
C92.51|Acute myelomonocytic leukemia, in remission
C92.52|Acute myelomonocytic leukemia, in relapse
C92.60|Acute myeloid leukemia with 11q23-abnormality, not having achieved remission
C92.61|Acute myeloid leukemia with 11q23-abnormality, in remission
C92.62|Acute myeloid leukemia with 11q23-abnormality, in relapse
C92.A0|Acute myeloid leukemia with multilineage dysplasia, not having achieved remission
C92.A1|Acute myeloid leukemia with multilineage dysplasia, in remission
C92.A2|Acute myeloid leukemia with multilineage dysplasia, in relapse
C93.00|Acute monoblastic/monocytic leukemia, not having achieved remission
C93.01|Acute monoblastic/monocytic leukemia, in remission
C93.02|Acute monoblastic/monocytic leukemia, in relapse
C94.00|Acute erythroid leukemia, not having achieved remission
C94.01|Acute erythroid leukemia, in remission
C94.02|Acute erythroid leukemia, in relapse
C94.20|Acute megakaryoblastic leukemia, not having achieved remission
C94.21|Acute megakaryoblastic leukemia, in remission
C94.22|Acute megakaryoblastic leukemia, in relapse
C95.00|Acute leukemia of unspecified cell type, not having achieved remission
C95.01|Acute leukemia of unspecified cell type, in remission
C95.02|Acute leukemia of unspecified cell type, in relapse
""")
_CHEMO_CONTEXT_ICD = {**rows(ICD10CM, "D70.1|Agranulocytosis secondary to cancer chemotherapy"),
                      **_ACUTE_LEUKAEMIA_ICD}
_DEFICIENCY_ICD = rows(ICD10CM, """
D51.0|Vitamin B12 deficiency anemia due to intrinsic factor deficiency
D51.1|Vitamin B12 deficiency anemia due to selective vitamin B12 malabsorption with proteinuria
D51.2|Transcobalamin II deficiency
D51.3|Other dietary vitamin B12 deficiency anemia
D51.8|Other vitamin B12 deficiency anemias
D51.9|Vitamin B12 deficiency anemia, unspecified
D52.0|Dietary folate deficiency anemia
D52.1|Drug-induced folate deficiency anemia
D52.8|Other folate deficiency anemias
D52.9|Folate deficiency anemia, unspecified
E53.8|Deficiency of other specified B group vitamins
E61.0|Copper deficiency
""")


def _roles(*parts: tuple[Mapping[Code, str], Iterable[ConditionRole]]) -> dict[Code, frozenset[ConditionRole]]:
    merged: dict[Code, frozenset[ConditionRole]] = {}
    for table, roles in parts:
        for code in table:
            merged[code] = merged.get(code, frozenset()) | frozenset(roles)
    return merged


_RISK = (ConditionRole.RISK_FACTOR,)
CONDITION_ROLES: Mapping[Code, frozenset[ConditionRole]] = _roles(
    (_NEUTROPENIA_SCT, _RISK),
    (_NEUTROPENIA_ICD, _RISK),
    (_SEED_RISK_SCT, _RISK),
    (_DEFICIENCY_ICD, _RISK),
    (_DRUG_INDUCED_SCT, (*_RISK, ConditionRole.DRUG_INDUCED)),
    (_DRUG_INDUCED_ICD, (*_RISK, ConditionRole.DRUG_INDUCED)),
    (_CHEMO_CONTEXT_SCT, (*_RISK, ConditionRole.CHEMOTHERAPY_CONTEXT)),
    (_CHEMO_CONTEXT_ICD, (*_RISK, ConditionRole.CHEMOTHERAPY_CONTEXT)),
)
#: Our display for each condition code (used when the record has none).
CONDITION_DISPLAY: Mapping[Code, str] = {
    **_NEUTROPENIA_SCT, **_DRUG_INDUCED_SCT, **_CHEMO_CONTEXT_SCT, **_SEED_RISK_SCT,
    **_NEUTROPENIA_ICD, **_DRUG_INDUCED_ICD, **_CHEMO_CONTEXT_ICD, **_DEFICIENCY_ICD,
}  # fmt: skip
