"""The README stays true: every setting is documented, and the two commands and CI agree."""

from __future__ import annotations

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
