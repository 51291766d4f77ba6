"""``patient-view`` request bodies for the benchmark tiers: an ICU stay of a patient in AML induction.

Each request is CDS Hooks 2.0 JSON with the five prefetch keys of `service.definition.PREFETCH`: the Patient,
``labs`` and ``vitals`` searchset Bundles (newest first, as ``_sort=-date`` returns them), active Conditions and
active MedicationRequests. Lab results come in draws of three (ANC 751-8, WBC 6690-2, neutrophils % 770-8);
temperatures (8310-5, ``Cel``) are charted every 15 minutes. The ANC follows 21-day chemotherapy cycles with
today at the nadir (0.4 10*3/uL) and the newest temperature is 38.4 °C, so the typical tier is febrile
neutropenia and answers with cards. The heavy and extreme tiers spread their observations over weeks and
months, so most of them fall outside the ANC and temperature windows, as in a real long stay.

Content is deterministic for a seed; only the times move with ``now``.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"

PATIENT_ID = "bench-0001"
USER_ID = "Practitioner/bench-clinician"
DEFAULT_SEED = 20250310

#: The codes of one lab draw, in the order they are reported: (LOINC code, display, UCUM unit).
LAB_PANEL = (
    ("751-8", "Neutrophils [#/volume] in Blood by Automated count", "10*3/uL"),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL"),
    ("770-8", "Neutrophils/100 leukocytes in Blood by Automated count", "%"),
)
TEMPERATURE = ("8310-5", "Body temperature", "Cel")

#: Active problems: AML and leukopenia are in `service.codes`; the rest are common comorbidities it ignores.
CONDITIONS = (
    ("91861009", "Acute myeloid leukemia"),
    ("84828003", "Leukopenia"),
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Diabetes mellitus type 2"),
    ("55822004", "Hyperlipidemia"),
    ("40930008", "Hypothyroidism"),
    ("35489007", "Depressive disorder"),
    ("235595009", "Gastroesophageal reflux disease"),
    ("49436004", "Atrial fibrillation"),
    ("709044004", "Chronic kidney disease"),
    ("195967001", "Asthma"),
    ("13645005", "Chronic obstructive lung disease"),
    ("233604007", "Pneumonia"),
    ("271737000", "Anemia"),
    ("62315008", "Diarrhea"),
)
#: Active medicines: (RxNorm code, name, ATC code or None). Filgrastim and cytarabine matter to the rules.
MEDICATIONS = (
    ("68442", "filgrastim", "L03AA02"),
    ("3041", "cytarabine", "L01BC01"),
    ("4450", "fluconazole", None),
    ("281", "acyclovir", None),
    ("26225", "ondansetron", None),
    ("7646", "omeprazole", None),
    ("29046", "lisinopril", None),
    ("6809", "metformin", None),
    ("83367", "atorvastatin", None),
    ("161", "acetaminophen", None),
)

CYCLE = timedelta(days=21)  # one chemotherapy cycle: nadir today, and every 21 days before
RECOVERY = timedelta(days=7)  # the ANC was normal until this long before each nadir
NADIR_ANC, NORMAL_ANC = 0.4, 4.0  # 10*3/uL
#: The newest temperatures, newest first; older ones scatter around 36.9 °C.
RECENT_FEVER = (38.4, 38.1)


@dataclass(frozen=True)
class Tier:
    """A payload size: how many temperatures and lab results, and how far apart they are charted."""

    name: str
    temperatures: int
    temperature_every: timedelta
    lab_results: int
    lab_every: timedelta
    conditions: int = len(CONDITIONS)
    medications: int = len(MEDICATIONS)

    @property
    def observations(self) -> int:
        """Observations in the request (temperatures and lab results)."""
        return self.temperatures + self.lab_results

    @property
    def resources(self) -> int:
        """Every resource in the request: the Patient, Observations, Conditions and MedicationRequests."""
        return 1 + self.observations + self.conditions + self.medications

    def resized(self, observations: int) -> Tier:
        """This tier with ``observations`` in total, in the same proportion and spacing (for quick runs)."""
        temperatures = round(observations * self.temperatures / self.observations)
        return replace(self, temperatures=temperatures, lab_results=observations - temperatures)


TIERS: Mapping[str, Tier] = {
    # A day in the ICU: 18 h of temperatures every 15 min, and five days of blood counts every 6 h.
    "typical": Tier("typical", temperatures=72, temperature_every=timedelta(minutes=15),
                    lab_results=60, lab_every=timedelta(hours=6)),
    # Six weeks: temperatures every 15 min, blood counts every 3 h.
    "heavy": Tier("heavy", temperatures=4000, temperature_every=timedelta(minutes=15),
                  lab_results=1000, lab_every=timedelta(hours=3)),
    # Five and a half months, same charting.
    "extreme": Tier("extreme", temperatures=16000, temperature_every=timedelta(minutes=15),
                    lab_results=4000, lab_every=timedelta(hours=3)),
}


def build_request(tier: Tier, *, now: datetime | None = None, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """A ``patient-view`` request for ``tier``, its times counted back from ``now`` (default: the clock)."""
    now = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    rng = random.Random(seed)
    return {
        "hook": "patient-view",
        "hookInstance": str(_uuid(rng)),
        "context": {"userId": USER_ID, "patientId": PATIENT_ID},
        "prefetch": {
            "patient": _patient(),
            "labs": _searchset(rng, _lab_results(tier, now, rng)),
            "vitals": _searchset(rng, _temperatures(tier, now, rng)),
            "conditions": _searchset(rng, [_condition(i, code, display, now)
                                           for i, (code, display) in enumerate(CONDITIONS[:tier.conditions])]),
            "medications": _searchset(rng, [_medication(i, medicine, now)
                                            for i, medicine in enumerate(MEDICATIONS[:tier.medications])]),
        },
    }


def request_body(request: Mapping[str, Any]) -> bytes:
    """The request as compact UTF-8 JSON, as an EHR sends it."""
    return json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def anc_at(age: timedelta) -> float:
    """The patient's ANC (10*3/uL) ``age`` ago: at the nadir now and every cycle before, falling the week before."""
    into_fall = RECOVERY - (age % CYCLE)
    if into_fall <= timedelta(0):
        return NORMAL_ANC
    return NADIR_ANC + (NORMAL_ANC - NADIR_ANC) * (1 - into_fall / RECOVERY)


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _instant(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _searchset(rng: random.Random, resources: list[dict[str, Any]]) -> dict[str, Any]:
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(resources)}
    if resources:
        bundle["entry"] = [{"fullUrl": f"urn:uuid:{_uuid(rng)}", "resource": resource, "search": {"mode": "match"}}
                           for resource in resources]
    return bundle


def _patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "id": PATIENT_ID,
            "name": [{"use": "official", "family": "Benchmark", "given": ["Robin"]}],
            "gender": "female", "birthDate": "1961-07-14"}


def _observation(resource_id: str, category: str, code: tuple[str, str, str], value: float,
                 effective: datetime, issued: datetime) -> dict[str, Any]:
    loinc, display, unit = code
    return {
        "resourceType": "Observation", "id": resource_id, "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": _instant(effective), "issued": _instant(issued),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }


def _lab_results(tier: Tier, now: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """``tier.lab_results`` results, newest draw first: the first draw two hours ago, then every ``lab_every``."""
    results: list[dict[str, Any]] = []
    for draw in range(math.ceil(tier.lab_results / len(LAB_PANEL))):
        drawn = now - timedelta(hours=2) - draw * tier.lab_every
        anc = anc_at(now - drawn) * rng.uniform(0.92, 1.08)
        percent = 20 + 45 * min(anc / NORMAL_ANC, 1.0)
        values = (round(anc, 2), round(anc / (percent / 100), 1), round(percent, 1))
        for index, (code, value) in enumerate(zip(LAB_PANEL, values)):
            if len(results) == tier.lab_results:
                break
            results.append(_observation(f"{PATIENT_ID}-lab-{draw}-{index}", "laboratory", code, value,
                                        drawn, drawn + timedelta(minutes=45)))
    return results


def _temperatures(tier: Tier, now: datetime, rng: random.Random) -> list[dict[str, Any]]:
    """``tier.temperatures`` readings, newest first: 10 minutes ago, then every ``temperature_every``."""
    readings: list[dict[str, Any]] = []
    for index in range(tier.temperatures):
        taken = now - timedelta(minutes=10) - index * tier.temperature_every
        if index < len(RECENT_FEVER):
            celsius = RECENT_FEVER[index]
        else:
            celsius = round(min(max(rng.gauss(36.9, 0.25), 36.0), 37.7), 1)
        readings.append(_observation(f"{PATIENT_ID}-temp-{index}", "vital-signs", TEMPERATURE, celsius,
                                     taken, taken))
    return readings


def _condition(index: int, code: str, display: str, now: datetime) -> dict[str, Any]:
    return {
        "resourceType": "Condition", "id": f"{PATIENT_ID}-cond-{index}",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category",
                                  "code": "problem-list-item"}]}],
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "recordedDate": _instant(now - timedelta(days=30 + 45 * index)),
    }


def _medication(index: int, medicine: tuple[str, str, str | None], now: datetime) -> dict[str, Any]:
    rxnorm, name, atc = medicine
    coding = [{"system": RXNORM, "code": rxnorm, "display": name}]
    if atc is not None:
        coding.append({"system": ATC, "code": atc, "display": name})
    return {
        "resourceType": "MedicationRequest", "id": f"{PATIENT_ID}-med-{index}", "status": "active",
        "intent": "order", "medicationCodeableConcept": {"coding": coding, "text": name},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": _instant(now - timedelta(days=3 + 2 * index)),
    }
