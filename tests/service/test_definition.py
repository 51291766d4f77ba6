"""The neutropenia service's hook handler: what it hands the engine besides the resources."""

from __future__ import annotations

from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pytest

from cds_hooks.prefetch import KeyResult, KeyState, PrefetchResult
from cds_hooks.registry import HookCall
from cds_hooks.schemas import HookRequest
from service.definition import EXTENSION_KEY, neutropenia_service

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
ANC = {"resourceType": "Observation", "id": "anc-1", "status": "final",
       "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
       "effectiveDateTime": "2025-03-10T08:00:00Z",
       "valueQuantity": {"value": 2500, "unit": "/uL", "system": "http://unitsofmeasure.org", "code": "/uL"}}


def _call(labs: KeyResult) -> HookCall:
    keys = {"labs": labs, "vitals": KeyResult("vitals", KeyState.EMPTY, origin="prefetch")}
    request = HookRequest(hook="patient-view", hook_instance="hi",
                          context={"patientId": "p", "userId": "Practitioner/u"})
    return HookCall(service_id="neutropenia-patient-view", request=request,
                    data=PrefetchResult(MappingProxyType(keys)), now=NOW)


def _issues(call: HookCall) -> list[dict[str, Any]]:
    response = neutropenia_service().handler(call)
    return list(response.extension[EXTENSION_KEY].get("dataIssues", []))


@pytest.mark.parametrize("reason", ["3 Bundle entries without a resource were dropped",
                                    "its next link was not followed: no fhirServer in the request"],
                         ids=["dropped-entries", "next-link-not-followed"])
def test_incomplete_prefetch_keys_become_data_issues(reason: str) -> None:
    # Regression: only unavailable keys reached the engine; a key that delivered part of its data (entries that
    # were not resources, pagination stopped) was assessed silently, so "ANC normal" could rest on half the labs.
    labs = KeyResult("labs", KeyState.DATA, (ANC,), origin="prefetch", reason=reason)
    assert {"code": "data-unavailable", "detail": f"labs: {reason}"} in _issues(_call(labs))


def test_complete_prefetch_keys_add_no_issue() -> None:
    assert _issues(_call(KeyResult("labs", KeyState.DATA, (ANC,), origin="prefetch"))) == []
