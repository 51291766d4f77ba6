"""The README stays true: every setting is documented, and the two commands and CI agree."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from service.config import OPTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"CDS_{o.name}" for o in OPTIONS if f"| `CDS_{o.name}` |" not in readme]
    assert missing == []


def test_quick_start_commands_exist_and_ci_calls_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "make run" in readme and "make test" in readme
    assert "\nrun:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_fixture_count_is_the_number_of_fixture_patients() -> None:
    readme = (ROOT / "README.md").read_text()
    count = len(list((ROOT / "fixtures").glob("patient-view.*.request.json")))
    assert f"`fixtures/` holds {count} synthetic patients" in readme


def test_make_run_lets_every_exported_cds_variable_win(tmp_path: Path) -> None:
    # README: "Set PORT=9000 to serve elsewhere; any CDS_* variable you export wins over these defaults".
    # CDS_BIND was set from PORT unconditionally, so an exported CDS_BIND was silently ignored.
    fake = tmp_path / "gunicorn"
    fake.write_text("#!/bin/sh\necho \"bind=$CDS_BIND auth=$CDS_AUTH\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CDS_")}

    def run(**extra: str) -> str:
        result = subprocess.run(["make", "-s", "run", "STAMP=", f"BIN={tmp_path}", "PORT=9123"], cwd=ROOT,
                                env={**env, **extra}, capture_output=True, text=True, timeout=60, check=True)
        return result.stdout

    assert "bind=127.0.0.1:9123 auth=disabled" in run()
    assert "bind=0.0.0.0:9555 auth=required" in run(CDS_BIND="0.0.0.0:9555", CDS_AUTH="required")
