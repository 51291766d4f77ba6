"""Medicines as data (brief §3.4): RxNorm codes and ATC codes/classes by role.

RxNorm matches by exact code; ATC also by class, because ATC is hierarchical ("L01" covers every antineoplastic
agent). Sources of the codes that the brief marks UNVERIFIED are listed in ``service.codes``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from service.codes import ATC, RXNORM, Code, rows

# --- Medicines (brief §3.4) -------------------------------------------------------------------------------------


class MedicationRole(str, Enum):
    """Why a medicine matters to the rules."""

    CHEMOTHERAPY = "chemotherapy"  # myelosuppressive chemotherapy: context for R2, and a cause
    CAUSE = "cause"  # a non-chemotherapy medicine that can cause neutropenia (R15 review list)
    GCSF = "g-csf"  # colony-stimulating factor: recent chemotherapy context (R2), not a cause


_CHEMO_RXN = rows(RXNORM, """
6851|methotrexate
3002|cyclophosphamide
40048|carboplatin
2555|cisplatin
72962|docetaxel
56946|paclitaxel
3639|doxorubicin
12574|gemcitabine
3041|cytarabine
4179|etoposide
24698|fludarabine
5657|ifosfamide
1251|azacitidine
15657|decitabine
4492|fluorouracil
3995|epirubicin
194000|capecitabine
32592|oxaliplatin
""")
_CAUSE_RXN = rows(RXNORM, """
2626|clozapine
9524|sulfasalazine
10180|sulfamethoxazole
10829|trimethoprim
7980|penicillin G
7984|penicillin V
1191|aspirin
121191|rituximab
2002|carbamazepine
40254|valproate
11413|zidovudine
1256|azathioprine
""")
_GCSF_RXN = rows(RXNORM, """
68442|filgrastim
338036|pegfilgrastim
70167|lenograstim
1440046|lipegfilgrastim
1433764|tbo-filgrastim
1605064|filgrastim-sndz
2057198|filgrastim-aafi
2595942|filgrastim-ayow
2048018|pegfilgrastim-jmdb
2102692|pegfilgrastim-cbqv
2260702|pegfilgrastim-bmez
2469333|pegfilgrastim-apgf
2602779|pegfilgrastim-pbbk
227304|Neupogen
353501|Neulasta
1442677|Granix
1605067|Zarxio
2048021|Fulphila
2057201|Nivestym
2102695|Udenyca
2260705|Ziextenzo
2469336|Nyvepria
2595946|Releuko
2602783|Fylnetra
1159651|filgrastim Injectable Product
1161380|pegfilgrastim Injectable Product
1162571|lenograstim Injectable Product
1182279|Neulasta Injectable Product
1182281|Neupogen Injectable Product
315932|filgrastim 0.3 MG/ML
331527|filgrastim 0.6 MG/ML
350977|pegfilgrastim 10 MG/ML
567845|filgrastim 0.3 MG/ML [Neupogen]
574887|filgrastim 0.6 MG/ML [Neupogen]
575870|pegfilgrastim 10 MG/ML [Neulasta]
727534|filgrastim Prefilled Syringe
727535|0.5 ML filgrastim 0.6 MG/ML Prefilled Syringe
727536|filgrastim Prefilled Syringe [Neupogen]
727537|0.5 ML filgrastim 0.6 MG/ML Prefilled Syringe [Neupogen]
727538|pegfilgrastim Prefilled Syringe
727539|0.6 ML pegfilgrastim 10 MG/ML Prefilled Syringe
727541|pegfilgrastim Prefilled Syringe [Neulasta]
727542|0.6 ML pegfilgrastim 10 MG/ML Prefilled Syringe [Neulasta]
727544|0.8 ML filgrastim 0.6 MG/ML Prefilled Syringe
727545|0.8 ML filgrastim 0.6 MG/ML Prefilled Syringe [Neupogen]
1649943|filgrastim Injection
1649944|1 ML filgrastim 0.3 MG/ML Injection
1649945|filgrastim Injection [Neupogen]
1649946|1 ML filgrastim 0.3 MG/ML Injection [Neupogen]
1649963|1.6 ML filgrastim 0.3 MG/ML Injection
1649964|1.6 ML filgrastim 0.3 MG/ML Injection [Neupogen]
2549330|pegfilgrastim Injection
2549331|0.6 ML pegfilgrastim 10 MG/ML Injection
2549332|pegfilgrastim Injection [Neulasta]
2549333|0.6 ML pegfilgrastim 10 MG/ML Injection [Neulasta]
""")
#: ATC codes and classes; a code matches when it equals a key or starts with a class key (ATC is hierarchical).
_ATC_ROLES: Mapping[str, tuple[MedicationRole, str]] = {
    "L01": (MedicationRole.CHEMOTHERAPY, "antineoplastic agent"),
    "L03AA": (MedicationRole.GCSF, "colony stimulating factor"),
    "N05AH02": (MedicationRole.CAUSE, "clozapine"),
    "A07EC01": (MedicationRole.CAUSE, "sulfasalazine"),
    "J01EE01": (MedicationRole.CAUSE, "sulfamethoxazole and trimethoprim"),
    "J01C": (MedicationRole.CAUSE, "beta-lactam antibacterial, penicillin"),
    "J01D": (MedicationRole.CAUSE, "other beta-lactam antibacterial"),
    "N02BA01": (MedicationRole.CAUSE, "acetylsalicylic acid"),
    "N02BB02": (MedicationRole.CAUSE, "metamizole sodium"),
    "N03AF01": (MedicationRole.CAUSE, "carbamazepine"),
    "N03AG01": (MedicationRole.CAUSE, "valproic acid"),
    "J05AF01": (MedicationRole.CAUSE, "zidovudine"),
    "L04AX01": (MedicationRole.CAUSE, "azathioprine"),
    "H03B": (MedicationRole.CAUSE, "antithyroid preparation (thionamide)"),
    "J04BA02": (MedicationRole.CAUSE, "dapsone"),
    # Three more of the most-implicated drugs of brief §3.4 (Andersohn 2007 [S16]); left out of the list before.
    "C01BA02": (MedicationRole.CAUSE, "procainamide"),
    "B01AC05": (MedicationRole.CAUSE, "ticlopidine"),
    "V03AC02": (MedicationRole.CAUSE, "deferiprone"),
}
_RXNORM_ROLES: Mapping[Code, MedicationRole] = {
    **{code: MedicationRole.CHEMOTHERAPY for code in _CHEMO_RXN},
    **{code: MedicationRole.CAUSE for code in _CAUSE_RXN},
    **{code: MedicationRole.GCSF for code in _GCSF_RXN},
}
MEDICATION_DISPLAY: Mapping[Code, str] = {**_CHEMO_RXN, **_CAUSE_RXN, **_GCSF_RXN}


def medication_role(code: Code) -> MedicationRole | None:
    """The role of a medication code: RxNorm by exact code, ATC by code or class prefix."""
    system, value = code
    if system == ATC:
        for length in (7, 5, 4, 3):
            hit = _ATC_ROLES.get(value[:length]) if len(value) >= length else None
            if hit is not None:
                return hit[0]
        return None
    return _RXNORM_ROLES.get(code)


def medication_display(code: Code) -> str | None:
    """Our display for a medication code, if we have one."""
    system, value = code
    if system == ATC:
        for length in (7, 5, 4, 3):
            hit = _ATC_ROLES.get(value[:length]) if len(value) >= length else None
            if hit is not None:
                return hit[1]
        return None
    return MEDICATION_DISPLAY.get(code)

