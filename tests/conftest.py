"""Shared fixtures: the app with local settings, its test client, and the real servers tests start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from tests.support.fhir_stub_server import fhir_stub, make_fhir_stub  # noqa: F401
from tests.support.gunicorn import gunicorn_factory  # noqa: F401
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401


def local_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Settings for an in-process app: auth off, SQLite in ``tmp_path``."""
    return {"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{tmp_path}/feedback.sqlite3", **overrides}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """The app with local settings and no environment."""
    application = create_app(local_config(tmp_path), environ={})
    yield application
    application.extensions["neutropenia_cds"]["store"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A Flask test client for ``app``."""
    return app.test_client()
