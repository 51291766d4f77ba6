"""Fixture time shifting: fixtures are written at a fixed base time and moved to "now" when used.

Every fixture's clinical times are written relative to ``FIXTURE_BASE`` (2025-03-10T12:00:00Z). Before a
fixture request is sent, every FHIR dateTime/instant that carries a time of day is moved by
``now - FIXTURE_BASE``, so "two hours before the base" becomes "two hours ago". Plain dates (`birthDate`)
are left alone, so ages do not drift by more than the calendar does, except for the patients a fixture marks
``"birthDateRelative": true`` in its expected file (an infant whose age-specific cut-off must not drift): their
``birthDate`` moves by whole days (:func:`move_birth_dates`).

Command line: ``python -m cds_hooks.testing.fixtures shift FILE [--now RFC3339]`` prints the shifted JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Collection
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

FIXTURE_BASE = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
#: A FHIR dateTime or instant with a time of day and a zone (the only kind a fixture uses for clinical times).
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$")


def shift_times(value: Any, delta: timedelta) -> Any:
    """A copy of ``value`` with every zoned FHIR dateTime string moved by ``delta``."""
    if isinstance(value, dict):
        return {key: shift_times(item, delta) for key, item in value.items()}
    if isinstance(value, list):
        return [shift_times(item, delta) for item in value]
    if isinstance(value, str) and _DATETIME.match(value):
        moved = datetime.fromisoformat(value.replace("Z", "+00:00")) + delta
        return moved.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def to_now(fixture: Any, now: datetime | None = None) -> Any:
    """``fixture`` with its times moved so that ``FIXTURE_BASE`` becomes ``now`` (default: the clock)."""
    return shift_times(fixture, (now or datetime.now(timezone.utc)) - FIXTURE_BASE)


def move_birth_dates(value: Any, now: datetime, patient_ids: Collection[str] | None = None) -> Any:
    """A copy of ``value`` with the birthDate of every Patient (of those in ``patient_ids``, when given) moved by
    the whole days from ``FIXTURE_BASE`` to ``now``; a birthDate that is not a full date is left as it is."""
    if isinstance(value, list):
        return [move_birth_dates(item, now, patient_ids) for item in value]
    if not isinstance(value, dict):
        return value
    moved = {key: move_birth_dates(item, now, patient_ids) for key, item in value.items()}
    born = value.get("birthDate")
    if (value.get("resourceType") == "Patient" and isinstance(born, str)
            and (patient_ids is None or value.get("id") in patient_ids)):
        try:
            moved["birthDate"] = (date.fromisoformat(born) + (now.date() - FIXTURE_BASE.date())).isoformat()
        except ValueError:
            pass
    return moved


def birth_date_relative(path: Path) -> bool:
    """Whether the fixture at ``path`` (``patient-view.<name>.request.json`` or ``<name>.bundle.json``) is marked
    ``birthDateRelative`` in its ``patient-view.<name>.expected.json``."""
    name = path.name
    if name.startswith("patient-view.") and name.endswith(".request.json"):
        expected_path = path.with_name(name.removesuffix(".request.json") + ".expected.json")
    elif name.endswith(".bundle.json"):
        expected_path = path.with_name(f"patient-view.{name.removesuffix('.bundle.json')}.expected.json")
    else:
        return False
    try:
        expected = json.loads(expected_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(expected, dict) and expected.get("birthDateRelative") is True


def main(argv: list[str] | None = None) -> int:
    """Print a fixture file shifted to now (or ``--now``)."""
    parser = argparse.ArgumentParser(prog="python -m cds_hooks.testing.fixtures")
    commands = parser.add_subparsers(dest="command", required=True)
    shift = commands.add_parser("shift", help="print FILE with its times moved from the fixture base to now")
    shift.add_argument("file", type=Path)
    shift.add_argument("--now", help="RFC 3339 time to shift to (default: the current time)")
    args = parser.parse_args(argv)
    try:
        fixture = json.loads(args.file.read_text(encoding="utf-8"))
        now = datetime.fromisoformat(args.now.replace("Z", "+00:00")) if args.now else None
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if now is not None and now.tzinfo is None:
        parser.exit(2, f"{parser.prog}: error: --now needs a time zone, e.g. 2025-03-10T12:00:00Z\n")
    now = now or datetime.now(timezone.utc)
    shifted = to_now(fixture, now)
    if birth_date_relative(args.file):
        shifted = move_birth_dates(shifted, now)
    try:
        json.dump(shifted, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
