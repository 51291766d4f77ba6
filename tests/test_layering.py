"""Architecture rules: the protocol never imports the domain, and Flask stays at the edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLASK_ALLOWED = {"cds_hooks/blueprint.py", "service/app.py"}
# Test tools (fixture servers) are an edge of their own.
FLASK_ALLOWED_DIRS = ("cds_hooks/testing/",)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("cds_hooks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_never_imports_the_domain(path: Path) -> None:
    assert "service" not in _imports(path)


@pytest.mark.parametrize("path", _modules("cds_hooks") + _modules("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_flask_only_at_the_edge(path: Path) -> None:
    relative = path.relative_to(ROOT).as_posix()
    if relative in FLASK_ALLOWED or relative.startswith(FLASK_ALLOWED_DIRS):
        return
    assert not {"flask", "werkzeug"} & _imports(path), f"{relative} imports Flask"
