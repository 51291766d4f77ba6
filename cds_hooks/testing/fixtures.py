"""Fixture time shifting: fixtures are written at a fixed base time and moved to "now" when used.

Every fixture's clinical times are written relative to ``FIXTURE_BASE`` (2025-03-10T12:00:00Z). Before a
fixture request is sent, every FHIR dateTime/instant that carries a time of day is moved by
``now - FIXTURE_BASE``, so "two hours before the base" becomes "two hours ago". Plain dates (`birthDate`)
are left alone, so ages do not drift by more than the calendar does.

Command line: ``python -m cds_hooks.testing.fixtures shift FILE [--now RFC3339]`` prints the shifted JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta, timezone
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
    json.dump(to_now(fixture, now), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
