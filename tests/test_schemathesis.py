"""Property-based contract test: schemathesis generates requests from openapi.yaml and sends them to the app.

Every operation of the document (discovery, invoke, feedback, the probes and the CORS preflights) gets positive and
negative examples, the document's own examples and schemathesis' coverage cases, sent in process to the WSGI app
(auth off, SQLite in a temporary directory). Each response must be no 5xx, have a documented status code and
content type, and match the documented schema.

Reproducible: Hypothesis is derandomized and keeps no example database, so a failure repeats on every run; the
report prints the failing request as a curl command. `CDS_FUZZ_MAX_EXAMPLES` raises the number of generated
examples per operation for a longer local run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"

#: Generated examples per operation (the examples and coverage phases add their own cases on top).
MAX_EXAMPLES = int(os.environ.get("CDS_FUZZ_MAX_EXAMPLES", "200"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_path(OPENAPI_PATH)

# A hard ceiling per operation, far above the expected few seconds: a hang fails instead of stalling CI.
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def wsgi_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """One app for the whole run (auth off, SQLite in a temporary directory), as a client-facing process is."""
    directory = tmp_path_factory.mktemp("schemathesis")
    app = create_app({"AUTH": "disabled", "DATABASE_URL": f"sqlite:///{directory}/f.db"}, environ={})
    yield app
    app.extensions["neutropenia_cds"]["store"].dispose()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
def test_every_operation_conforms_to_the_document(case: schemathesis.Case[Any], wsgi_app: Flask) -> None:
    case.call_and_validate(app=wsgi_app, checks=CHECKS)
