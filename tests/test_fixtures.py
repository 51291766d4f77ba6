"""Every fixture request, moved to "now", gives its expected status, findings and most urgent indicator."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from cds_hooks.testing.fixtures import FIXTURE_BASE, main, shift_times, to_now
from service.definition import EXTENSION_KEY, SERVICE_ID

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REQUESTS = sorted(FIXTURES.glob("*.request.json"))


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("request_path", REQUESTS, ids=[p.name.removesuffix(".request.json") for p in REQUESTS])
def test_fixture_gives_its_expected_assessment(client: FlaskClient, request_path: Path) -> None:
    expected = _load(request_path.with_name(request_path.name.replace(".request.", ".expected.")))
    response = client.post(f"/cds-services/{SERVICE_ID}", json=to_now(_load(request_path)))
    assert response.status_code == expected["status"], response.json
    if expected["status"] != 200:
        missing = {issue["expression"][0].removeprefix("prefetch.") for issue in response.json["issue"]}
        assert missing == set(expected["missing"])
        return
    assessment = response.json["extension"][EXTENSION_KEY]
    assert assessment.get("findings", []) == expected["findings"]
    indicators = [card["indicator"] for card in response.json["cards"]]
    assert (indicators[0] if indicators else None) == expected["indicator"]


def test_there_are_fixtures() -> None:
    assert len(REQUESTS) >= 3


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


@pytest.mark.parametrize("argv", [["shift", "/no/such/file.json"], ["shift", str(REQUESTS[0]), "--now", "noon"],
                                  ["shift", str(REQUESTS[0]), "--now", "2025-03-10T12:00:00"], []],
                         ids=["missing-file", "bad-now", "now-without-zone", "no-command"])
def test_shift_command_errors_are_usage_messages(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
