"""The fixture patients (fixtures/README.md): each replays through the service with its prefetch and gives its
hand-derived expected assessment; each Bundle, request and expected file agree; together they cover every
finding code and card kind; regenerating them with fixtures/build.py changes nothing; and the time shift works."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_hooks.testing.fhir_server import FixtureServer, create_fhir_app
from cds_hooks.testing.fixtures import FIXTURE_BASE, main, move_birth_dates, shift_times, to_now
from service.app import create_app
from service.definition import EXTENSION_KEY, PREFETCH, SERVICE_ID

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REQUESTS = sorted(FIXTURES.glob("patient-view.*.request.json"))
NAMES = [p.name.removeprefix("patient-view.").removesuffix(".request.json") for p in REQUESTS]

#: design.md §3: every finding code and every card kind the service can produce.
FINDING_CODES = frozenset({
    "febrile-neutropenia", "presumed-febrile-neutropenia", "temperature-elevated", "fever-mild-neutropenia",
    "fever-no-anc", "fever-normal-anc", "neutropenia-severe", "neutropenia-profound", "neutropenia-moderate",
    "neutropenia-mild", "anc-normal", "anc-stale", "risk-factor-no-anc", "anc-falling", "medication-review",
    "anc-uninterpretable", "anc-not-computable",
})
CARD_KINDS = frozenset({"febrile-neutropenia", "fever-escalation", "neutropenia", "infection-prevention",
                        "medication-review", "lab-follow-up", "data-quality"})
INDICATOR_RANK = {"critical": 3, "warning": 2, "info": 1}

#: Fixtures whose hand-derived expectation the engine does not meet yet: name -> the brief's rule that decides.
#: Each is also marked ``engineDisagrees`` in its expected file and listed in fixtures/README.md.
ENGINE_DISAGREES: Mapping[str, str] = {}


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _request(name: str) -> Any:
    return _load(FIXTURES / f"patient-view.{name}.request.json")


def _expected(name: str) -> Any:
    return _load(FIXTURES / f"patient-view.{name}.expected.json")


def _bundle(name: str) -> Any:
    return _load(FIXTURES / f"{name}.bundle.json")


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fixtures_build", FIXTURES / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _params() -> list[Any]:
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=ENGINE_DISAGREES[name])]
                         if name in ENGINE_DISAGREES else []) for name in NAMES]


def replay_form(document: Any, expected: Mapping[str, Any], now: datetime) -> Any:
    """``document`` moved to ``now``; for ``birthDateRelative`` fixtures the birthDate moves too (whole days)."""
    shifted = to_now(document, now)
    return move_birth_dates(shifted, now) if expected.get("birthDateRelative") else shifted


@pytest.mark.parametrize("name", _params())
def test_fixture_gives_its_expected_assessment(client: FlaskClient, name: str) -> None:
    expected = _expected(name)
    now = datetime.now(timezone.utc)
    response = client.post(f"/cds-services/{SERVICE_ID}", json=replay_form(_request(name), expected, now))
    body: Any = response.json
    assert response.status_code == expected["status"], body
    if expected["status"] != 200:
        missing = {issue["expression"][0].removeprefix("prefetch.") for issue in body["issue"]}
        assert missing == set(expected["missing"])
        return
    assessment = body["extension"][EXTENSION_KEY]
    cards = body["cards"]
    indicators = [card["indicator"] for card in cards]
    assert {
        "findings": assessment.get("findings", []),
        "indicator": indicators[0] if indicators else None,
        "cardKinds": sorted(card["source"]["topic"]["code"] for card in cards),
    } == {key: expected[key] for key in ("findings", "indicator", "cardKinds")}, assessment
    for key in ("anc", "fever"):
        if key in expected:
            assert key in assessment, assessment
            assert {k: assessment[key].get(k) for k in expected[key]} == expected[key]


@pytest.fixture(scope="module")
def fhir_replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Flask, datetime]]:
    """The service wired to the real fixture FHIR server on loopback, both on one pinned clock."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    server = FixtureServer(create_fhir_app(FIXTURES, clock=lambda: now)).start()
    app = create_app({"AUTH": "disabled",
                      "DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('replay')}/feedback.sqlite3",
                      "FHIR_ALLOWED_BASES": server.url, "FHIR_ALLOW_ANONYMOUS": True, "LOG_LEVEL": "WARNING"},
                     environ={}, clock=lambda: now)
    app.config["FHIR_SERVER_URL"] = server.url
    yield app, now
    app.extensions["neutropenia_cds"]["store"].dispose()
    server.stop()


@pytest.mark.parametrize("name", _params())
def test_fixture_gives_its_expected_assessment_without_prefetch(fhir_replay: tuple[Flask, datetime],
                                                                name: str) -> None:
    """The same patient with no prefetch: the service fetches everything from the fixture FHIR server."""
    app, now = fhir_replay
    expected = {**_expected(name), **_expected(name).get("viaFhirServer", {})}
    request = {k: v for k, v in replay_form(_request(name), expected, now).items() if k != "prefetch"}
    request["fhirServer"] = app.config["FHIR_SERVER_URL"]
    response = app.test_client().post(f"/cds-services/{SERVICE_ID}", json=request)
    body: Any = response.json
    assert response.status_code == expected["status"], body
    if expected["status"] != 200:
        return
    assessment = body["extension"][EXTENSION_KEY]
    indicators = [card["indicator"] for card in body["cards"]]
    assert (assessment.get("findings", []), indicators[0] if indicators else None) == \
        (expected["findings"], expected["indicator"]), assessment


def test_xfail_markers_match_the_expected_files() -> None:
    assert set(ENGINE_DISAGREES) == {name for name in NAMES if "engineDisagrees" in _expected(name)}


@pytest.mark.parametrize("name", NAMES)
def test_expected_file_is_consistent(name: str) -> None:
    expected = _expected(name)
    assert expected["story"] and expected["reasoning"]
    if expected["status"] != 200:
        assert expected["missing"]
        return
    assert set(expected["findings"]) <= FINDING_CODES
    assert len(set(expected["findings"])) == len(expected["findings"])
    assert set(expected["cardKinds"]) <= CARD_KINDS
    assert expected["cardKinds"] == sorted(set(expected["cardKinds"]))
    assert (expected["indicator"] is None) == (expected["cardKinds"] == [])
    assert expected["indicator"] in (None, *INDICATOR_RANK)


# --- the Bundle, the request and the FHIR resources agree --------------------------------------------------------


def _codes(concept: Any) -> set[tuple[str, str]]:
    return {(coding.get("system"), coding.get("code")) for coding in (concept or {}).get("coding", [])}


def _template_selects(template: str, resource: dict[str, Any], patient_id: str) -> bool:
    """Whether a FHIR server answering ``template`` (a prefetch template) returns ``resource``."""
    filled = template.replace("{{context.patientId}}", patient_id)
    path, query = urlsplit(filled).path, parse_qs(urlsplit(filled).query)
    if "?" not in filled:
        return f"{resource['resourceType']}/{resource.get('id')}" == path
    if resource["resourceType"] != path:
        return False
    if query["patient"] != [resource.get("subject", {}).get("reference", "").removeprefix("Patient/")]:
        return False
    for value in query.get("code", []):
        wanted = {tuple(code.split("|", 1)) for code in value.split(",")}
        if not _codes(resource.get("code")) & wanted:
            return False
    for value in query.get("clinical-status", []):
        if not {code for _, code in _codes(resource.get("clinicalStatus"))} & set(value.split(",")):
            return False
    for value in query.get("status", []):
        if resource.get("status") not in value.split(","):
            return False
    return True


def _prefetched(value: Any) -> list[dict[str, Any]]:
    """The resources of one prefetch value (null and an empty Bundle hold none)."""
    if value is None:
        return []
    if value.get("resourceType") == "Bundle":
        assert value["type"] == "searchset"
        assert value.get("total", len(value.get("entry", []))) == len(value.get("entry", []))
        return [entry["resource"] for entry in value.get("entry", [])]
    return [value]


@pytest.mark.parametrize("name", NAMES)
def test_bundle_and_prefetch_hold_the_same_resources(name: str) -> None:
    bundle, request = _bundle(name), _request(name)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    resources = [entry["resource"] for entry in bundle["entry"]]
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == 1
    patient_id = patients[0]["id"]
    assert request["context"]["patientId"] == patient_id
    assert request["hook"] == "patient-view"
    if "prefetch" not in request:
        assert _expected(name)["status"] == 412
        return
    assert set(request["prefetch"]) == set(PREFETCH)
    prefetched: list[dict[str, Any]] = []
    for key, template in PREFETCH.items():
        got = _prefetched(request["prefetch"][key])
        wanted = [r for r in resources if _template_selects(template, r, patient_id)]
        assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, wanted)), key
        if "_sort=-date" in template:
            times = [r.get("effectiveDateTime", "") for r in got]
            assert times == sorted(times, reverse=True), key
        prefetched += got
    # Everything prefetched comes from the Bundle, unchanged.
    assert all(resource in resources for resource in prefetched)


@pytest.mark.parametrize("name", NAMES)
def test_every_resource_is_valid_fhir_unless_marked_malformed(name: str) -> None:
    malformed = set(_expected(name).get("malformed", []))
    bundle = _bundle(name)
    seen = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        reference = f"{resource['resourceType']}/{resource['id']}"
        seen.add(reference)
        model = _model(resource["resourceType"])
        if reference in malformed:
            with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
                model.model_validate(resource)
        else:
            model.model_validate(resource)
    assert malformed <= seen
    if not malformed:
        _model("Bundle").model_validate(bundle)
        for value in (_request(name).get("prefetch") or {}).values():
            if value is not None:
                _model(value["resourceType"]).model_validate(value)


def _model(resource_type: str) -> Any:
    module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
    return getattr(module, resource_type)


@pytest.mark.parametrize("name", NAMES)
def test_resources_belong_to_the_patient_and_have_unique_ids(name: str) -> None:
    entries = _bundle(name)["entry"]
    resources = [entry["resource"] for entry in entries]
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    assert len({(r["resourceType"], r["id"]) for r in resources}) == len(resources)
    assert len({entry["fullUrl"] for entry in entries}) == len(entries)
    for resource in resources:
        if resource["resourceType"] not in ("Patient", "Medication"):  # a Medication is nobody's: no subject
            assert resource["subject"] == {"reference": f"Patient/{patient_id}"}


_ZONED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$")


def _strings(value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield key, item
            else:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("name", NAMES)
def test_clinical_times_are_zoned_and_written_relative_to_the_base(name: str) -> None:
    """Every time is a zoned dateTime at or before the base (so ``to_now`` moves it); only birthDate is a date."""
    for document in (_bundle(name), _request(name)):
        for key, text in _strings(document):
            if re.match(r"^\d{4}-\d{2}", text):
                if key == "birthDate":
                    continue
                assert _ZONED.match(text), (key, text)
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
                assert FIXTURE_BASE - timedelta(days=365) <= moment <= FIXTURE_BASE, (key, text)


def test_infant_stays_an_infant_when_replayed() -> None:
    name = "paediatric-infant-anc-1200"
    later = FIXTURE_BASE + timedelta(days=800)
    shifted = replay_form(_request(name), _expected(name), later)
    born = datetime.fromisoformat(shifted["prefetch"]["patient"]["birthDate"]).date()
    assert (later.date() - born).days == 183


# --- coverage -------------------------------------------------------------------------------------------------


def test_there_are_at_least_24_patients() -> None:
    assert len(NAMES) >= 24
    assert len(list(FIXTURES.glob("*.bundle.json"))) == len(NAMES)
    assert len({_request(name)["context"]["patientId"] for name in NAMES}) == len(NAMES)


def test_fixtures_cover_every_finding_code() -> None:
    found = {finding for name in NAMES for finding in _expected(name).get("findings", [])}
    assert found == FINDING_CODES


def test_fixtures_cover_every_card_kind_and_indicator() -> None:
    kinds = {kind for name in NAMES for kind in _expected(name).get("cardKinds", [])}
    assert kinds == CARD_KINDS
    indicators = {_expected(name).get("indicator") for name in NAMES if _expected(name)["status"] == 200}
    assert indicators == {None, *INDICATOR_RANK}
    assert {_expected(name)["status"] for name in NAMES} == {200, 412}


def test_readme_paths_exist() -> None:
    assert (FIXTURES / "patient-view.febrile-neutropenia.request.json").is_file()
    assert (FIXTURES / "patient-view.no-prefetch.request.json").is_file()


# --- generation -----------------------------------------------------------------------------------------------


def test_regenerating_the_fixtures_changes_nothing() -> None:
    generated = _build().render_all()
    on_disk = {path.name for path in FIXTURES.iterdir() if path.is_file() and path.name != "build.py"}
    assert on_disk == set(generated), "run: .venv/bin/python fixtures/build.py"
    changed = [name for name, text in generated.items() if (FIXTURES / name).read_text(encoding="utf-8") != text]
    assert changed == [], "run: .venv/bin/python fixtures/build.py"


def test_build_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    build = _build()
    assert build.main(["--check"]) == 0
    assert build.main(["--bogus"]) == 2
    assert "usage" in capsys.readouterr().err


# --- the time shift -------------------------------------------------------------------------------------------


def test_shift_moves_zoned_datetimes_and_leaves_dates() -> None:
    fixture = {"effectiveDateTime": "2025-03-10T10:00:00Z", "birthDate": "1968-04-02",
               "issued": "2025-03-10T11:00:00.123+01:00", "note": "2025-03-10T10:00:00Z is in text"}
    now = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert to_now(fixture, now) == {"effectiveDateTime": "2026-01-01T10:00:00Z", "birthDate": "1968-04-02",
                                    "issued": "2026-01-01T10:00:00Z", "note": "2025-03-10T10:00:00Z is in text"}
    assert shift_times([fixture], FIXTURE_BASE - FIXTURE_BASE)[0]["effectiveDateTime"] == "2025-03-10T10:00:00Z"


def test_shift_command(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "patient-view.febrile-neutropenia.request.json"
    assert main(["shift", str(path), "--now", "2025-03-11T12:00:00Z"]) == 0
    shifted = json.loads(capsys.readouterr().out)
    observation = shifted["prefetch"]["labs"]["entry"][0]["resource"]
    assert observation["effectiveDateTime"] == "2025-03-11T08:00:00Z"


@pytest.mark.parametrize(("file", "born"), [
    ("paediatric-infant-anc-1200.bundle.json", "2024-09-09"),
    ("patient-view.paediatric-infant-anc-1200.request.json", "2024-09-09"),
    ("febrile-neutropenia.bundle.json", None),
], ids=["marked-bundle", "marked-request", "unmarked"])
def test_shift_command_moves_only_marked_birth_dates(capsys: pytest.CaptureFixture[str], file: str,
                                                     born: str | None) -> None:
    original = {r["id"]: r.get("birthDate") for r in _patients(json.loads((FIXTURES / file).read_text()))}
    assert main(["shift", str(FIXTURES / file), "--now", "2025-03-11T12:00:00Z"]) == 0  # one day later
    shifted = {r["id"]: r.get("birthDate") for r in _patients(json.loads(capsys.readouterr().out))}
    assert set(shifted.values()) == ({born} if born else set(original.values()))


def _patients(document: Any) -> list[dict[str, Any]]:
    """The Patient resources anywhere in ``document``."""
    if isinstance(document, list):
        return [p for item in document for p in _patients(item)]
    if not isinstance(document, dict):
        return []
    found = [document] if document.get("resourceType") == "Patient" else []
    return found + [p for value in document.values() for p in _patients(value)]


@pytest.mark.parametrize("argv", [["shift", "/no/such/file.json"], ["shift", str(REQUESTS[0]), "--now", "noon"],
                                  ["shift", str(REQUESTS[0]), "--now", "2025-03-10T12:00:00"], []],
                         ids=["missing-file", "bad-now", "now-without-zone", "no-command"])
def test_shift_command_errors_are_usage_messages(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_shift_command_piped_into_a_reader_that_stops_early_has_no_traceback() -> None:
    # `... shift FILE | head`: the reader goes away before the fixture is written, as the CLI's commands allow.
    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-m", "cds_hooks.testing.fixtures", "shift", str(REQUESTS[0])],
                             cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.close()
    _, err = child.communicate(timeout=60)
    assert child.returncode == 1
    assert err == b""
