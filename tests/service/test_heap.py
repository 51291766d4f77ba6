"""The collector pause: disabled while requests run, back on after the last, never kept off too long."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import pause_collector_during_requests
from service.heap import CollectorPause


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture(autouse=True)
def collector_enabled() -> Iterator[None]:
    gc.enable()
    yield
    gc.enable()


def test_paused_from_the_first_begin_to_the_last_end() -> None:
    pause = CollectorPause()
    pause.begin()
    pause.begin()
    assert not gc.isenabled() and pause.paused
    pause.end()
    assert not gc.isenabled(), "one request still running"
    pause.end()
    assert gc.isenabled() and not pause.paused


def test_a_collector_disabled_elsewhere_stays_disabled() -> None:
    gc.disable()
    pause = CollectorPause()
    pause.begin()
    pause.end()
    assert not gc.isenabled()
    assert not pause.paused


def test_an_unmatched_end_changes_nothing() -> None:
    pause = CollectorPause()
    pause.end()
    assert gc.isenabled()
    pause.begin()
    assert not gc.isenabled()
    pause.end()
    assert gc.isenabled()


@pytest.mark.parametrize(("paused_for", "collected"), [(1.99, False), (2.0, True), (2.01, True)],
                         ids=["just-below-limit", "at-limit", "just-above-limit"])
def test_overlapping_requests_collect_once_the_pause_is_too_long(paused_for: float, collected: bool) -> None:
    clock = FakeClock()
    pause = CollectorPause(max_pause_seconds=2.0, clock=clock)
    pause.begin()
    pause.begin()
    garbage = weakref.ref(Cycle())
    clock.now = paused_for
    pause.end()  # the other request still runs
    assert (garbage() is None) is collected
    assert not gc.isenabled(), "still paused for the running request"
    pause.end()
    assert gc.isenabled()


def test_after_a_collection_the_pause_clock_restarts() -> None:
    clock = FakeClock()
    pause = CollectorPause(max_pause_seconds=2.0, clock=clock)
    pause.begin()
    pause.begin()
    clock.now = 2.5
    pause.end()  # collects, restarts the clock at 2.5
    pause.begin()
    garbage = weakref.ref(Cycle())
    clock.now = 4.0
    pause.end()
    assert garbage() is not None, "1.5 s since the last collection"


@pytest.fixture
def recording_app() -> Flask:
    app = Flask(__name__)
    pause = CollectorPause()
    pause_collector_during_requests(app, pause)
    app.config["seen"] = []

    @app.get("/enabled")
    def enabled() -> str:
        app.config["seen"].append(gc.isenabled())
        return "ok"

    @app.get("/fails")
    def fails() -> str:
        app.config["seen"].append(gc.isenabled())
        raise RuntimeError("boom")

    return app


@pytest.fixture
def recording_client(recording_app: Flask) -> FlaskClient:
    return recording_app.test_client()


def test_a_request_runs_with_the_collector_paused(recording_app: Flask, recording_client: FlaskClient) -> None:
    assert recording_client.get("/enabled").status_code == 200
    assert recording_app.config["seen"] == [False]
    assert gc.isenabled()


def test_a_failing_request_still_resumes_the_collector(recording_app: Flask, recording_client: FlaskClient) -> None:
    assert recording_client.get("/fails").status_code == 500
    assert recording_app.config["seen"] == [False]
    assert gc.isenabled()


def test_a_request_answered_before_the_pause_leaves_the_collector_alone() -> None:
    app = Flask(__name__)

    @app.before_request
    def refuse() -> tuple[str, int]:
        return "no", 403

    pause = CollectorPause()
    pause_collector_during_requests(app, pause)
    pause.begin()  # another request is running
    assert app.test_client().get("/").status_code == 403
    assert not gc.isenabled(), "the running request's pause was kept"
    pause.end()
    assert gc.isenabled()


def test_the_service_pauses_the_collector_during_an_invocation(client: FlaskClient) -> None:
    seen: list[bool] = []

    @client.application.before_request
    def record() -> None:
        seen.append(gc.isenabled())

    response = client.get("/cds-services")
    assert response.status_code == 200
    assert seen == [False]
    assert gc.isenabled()
