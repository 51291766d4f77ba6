"""The `neutropenia-patient-view` CDS Service: its discovery entry, prefetch templates, the references it follows
(an order's `medicationReference`: its Medication, read by `Medication?_id=` from fhirServer) and handler."""

from __future__ import annotations

from cds_hooks.models import ServiceResponse
from cds_hooks.registry import Handler, HookCall, ServiceDefinition
from service.assessment import assess, assessment_extension
from service.cards import DEFAULT_CARD_SETTINGS, CardSettings, render
from service.thresholds import DEFAULT_POLICY, ClinicalPolicy

SERVICE_ID = "neutropenia-patient-view"
EXTENSION_KEY = "org.neutropenia-cds.assessment"

_LOINC = "http://loinc.org"
#: Lab codes the `labs` template asks for: absolute neutrophils, segs and bands, neutrophil/band %, WBC.
_LAB_CODES = ("751-8", "753-4", "26499-4", "30451-9", "768-2", "26507-4", "763-3", "30229-9", "770-8",
              "26511-6", "23761-0", "769-0", "26505-8", "32200-8", "764-1", "26508-2", "35332-6", "71676-1",
              "6690-2", "26464-8", "804-5", "33256-9")
#: Body-temperature codes and the vital-signs panel for the `vitals` template.
_VITAL_CODES = ("8310-5", "8331-1", "8332-9", "8328-7", "8333-7", "76011-6", "8329-5", "8334-5", "61008-9",
                "60836-4", "60838-0", "76278-1", "75539-7", "8311-3", "8312-1", "8313-9", "8314-7", "8315-4",
                "85353-1")


def _codes(codes: tuple[str, ...]) -> str:
    return ",".join(f"{_LOINC}|{code}" for code in codes)


#: CDS Hooks 2.0 tokens only (no `today()`): the date window is applied when evaluating, not in the query.
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "labs": f"Observation?patient={{{{context.patientId}}}}&code={_codes(_LAB_CODES)}&_sort=-date&_count=200",
    "vitals": f"Observation?patient={{{{context.patientId}}}}&code={_codes(_VITAL_CODES)}&_sort=-date&_count=200",
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active,recurrence,relapse",
    # Ended orders too: a G-CSF or chemotherapy order completed or stopped within its look-back still marks recent
    # chemotherapy (service.records), and a one-off pegfilgrastim dose is usually a completed order. Pages of 200,
    # as for the labs: a long treatment history then fits in the fetch's page limit.
    "medications": "MedicationRequest?patient={{context.patientId}}&status=active,on-hold,completed,stopped&_count=200",
}

#: References followed on fhirServer (the query subset has no `_include`): an order that names its medicine by
#: `medicationReference` ("Medication/abc", as Epic sends them) is unknown until its Medication is read; a G-CSF or
#: chemotherapy order missed that way silently drops the context of presumed febrile neutropenia (R2).
FOLLOW_REFERENCES = {"medications": {"medicationReference": "Medication"}}

DESCRIPTION = (
    "Grades neutropenia from the absolute neutrophil count (measured, or computed from the white cell "
    "count and differential), flags febrile neutropenia as an emergency, and gives infection-prevention "
    "guidance to hand on to the patient. Returns the assessment as the response extension "
    f"'{EXTENSION_KEY}'."
)


def make_handler(policy: ClinicalPolicy, card_settings: CardSettings) -> Handler:
    """The hook handler: assess the patient's resources and render the cards (pure apart from ``call``)."""
    if card_settings.febrile_neutropenia_anc_below != policy.fn_anc_cutoff:
        # The cards quote the cut-off the rules apply (brief §1.2; a deployment may set it): never another number.
        raise ValueError(f"the cards' febrile-neutropenia cut-off ({card_settings.febrile_neutropenia_anc_below}/uL) "
                         f"differs from the rules' ({policy.fn_anc_cutoff}/uL)")

    def handle(call: HookCall) -> ServiceResponse:
        # Keys that yielded only part of their data (Bundle entries that were not resources, a `next` link not
        # followed) are reported like unavailable ones: silently assessing on part of the labs could call an
        # incomplete picture normal.
        missing = {**call.data.incomplete(), **call.data.unavailable()}
        assessment = assess(call.data.resources(), now=call.now, policy=policy, unavailable=missing)
        cards = render(assessment, settings=card_settings, patient_id=call.request.context.get("patientId"))
        return ServiceResponse(cards=cards, extension={EXTENSION_KEY: assessment_extension(assessment)})

    return handle


def neutropenia_service(policy: ClinicalPolicy = DEFAULT_POLICY,
                        card_settings: CardSettings = DEFAULT_CARD_SETTINGS) -> ServiceDefinition:
    """The service definition registered in discovery."""
    return ServiceDefinition(
        id=SERVICE_ID,
        hook="patient-view",
        title="Neutropenia and febrile neutropenia",
        description=DESCRIPTION,
        prefetch=PREFETCH,
        required_prefetch=frozenset({"labs", "vitals"}),
        required_context=frozenset({"patientId", "userId"}),
        follow_references=FOLLOW_REFERENCES,
        handler=make_handler(policy, card_settings),
    )
