"""Load and faults on loopback: gunicorn with several workers and PostgreSQL under mixed invoke and feedback traffic.

Promises checked (issue 6, item 5): no 5xx under load; a worker killed with SIGKILL mid-run loses no feedback that
was acknowledged (a request in flight on the dead worker may fail at the connection level, never silently); the
PostgreSQL server stopped mid-run makes feedback answer 503 (OperationOutcome, Retry-After) while invoke keeps
answering 200 with cards and /readyz answers 503, and when it is back feedback recovers within seconds and every
acknowledged report is in the database. Each scenario is bounded (about 10-15 s of traffic) and stays on loopback.

Authentication is on, as in production: every request carries a freshly signed JWT, so the shared `jti` replay
store (in the same database) is under load and through the outage too.

Run with ``-s`` to see the figures each scenario prints.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from cds_hooks.store import FeedbackStore, feedback_table
from cds_hooks.testing.processes import child_pids
from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config
from tests.support.gunicorn import GunicornServer
from tests.support.load import (
    FEEDBACK,
    INVOKE,
    Exchange,
    LoadGenerator,
    feedback_report,
    figures,
    fixture_requests,
    wait_for,
)
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.gunicorn, pytest.mark.postgres]

WORKERS = 3
LOAD_THREADS = 6
#: How long the store waits for the database in one operation (FeedbackStore's default for PostgreSQL).
STORE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner(ClientKey.generate("ES384"))


@pytest.fixture(scope="module")
def invoke_bodies() -> list[dict[str, Any]]:
    return fixture_requests()


def _env(tmp_path: Path, signer: TokenSigner, database_url: str, workers: int = WORKERS) -> dict[str, str]:
    issuers = write_issuer_config(tmp_path / "issuers.json", [signer.issuer_entry()])
    return {"CDS_AUTH": "required", "CDS_PUBLIC_BASE_URL": "{base_url}", "CDS_TRUSTED_ISSUERS_FILE": str(issuers),
            "CDS_DATABASE_URL": database_url, "CDS_WORKERS": str(workers), "CDS_LOG_LEVEL": "WARNING"}


def _load(server: GunicornServer, signer: TokenSigner, bodies: list[dict[str, Any]]) -> LoadGenerator:
    return LoadGenerator(server.base_url, bodies, threads=LOAD_THREADS, token=signer.sign)


def _stored_cards(database_url: str) -> list[str]:
    """The card uuid of every feedback row in the database (one per report: every report names a new card)."""
    store = FeedbackStore(database_url)
    try:
        with store.engine.connect() as conn:
            return list(conn.scalars(select(feedback_table.c.card_uuid)))
    finally:
        store.dispose()


def _kill_a_worker(server: GunicornServer) -> int:
    """SIGKILL one worker; return its pid once gunicorn has replaced it (the count is back to WORKERS)."""
    before = server.worker_pids()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == len(before), 15)
    return victim


def _post(server: GunicornServer, signer: TokenSigner, path: str, body: Any) -> requests.Response:
    url = f"{server.base_url}{path}"
    return requests.post(url, json=body, headers={"Authorization": f"Bearer {signer.sign(url)}"}, timeout=15)


def _feedback(server: GunicornServer, signer: TokenSigner, card: str) -> requests.Response:
    return _post(server, signer, "/cds-services/neutropenia-patient-view/feedback",
                 {"feedback": [feedback_report(card)]})


def _invoke(server: GunicornServer, signer: TokenSigner, body: dict[str, Any]) -> requests.Response:
    return _post(server, signer, "/cds-services/neutropenia-patient-view", body)


def _is_outcome_503(response: requests.Response) -> bool:
    return (response.status_code == 503 and response.json().get("resourceType") == "OperationOutcome"
            and response.headers.get("Retry-After", "").isdigit())


def _print_figures(title: str, exchanges: list[Exchange], acknowledged: set[str], rows: list[str],
                   **extra: Any) -> int:
    """Print the run's figures; return the number of acknowledged reports missing from the database."""
    totals = figures(exchanges)
    lost = len(acknowledged - set(rows))
    fivexx = sum(1 for e in exchanges if e.status is not None and e.status >= 500)
    oks = sum(1 for e in exchanges if e.status == 200)
    print(f"\n[{title}] {totals}")
    print(f"[{title}] 200s={oks} 5xx={fivexx} " + " ".join(f"{k}={v}" for k, v in extra.items()))
    print(f"[{title}] acknowledged feedback reports={len(acknowledged)} rows found={len(rows)} "
          f"(of them acknowledged={len(acknowledged & set(rows))}) rows lost={lost}")
    return lost


def test_mixed_load_with_workers_killed_loses_no_acknowledged_feedback(
        tmp_path: Path, gunicorn_factory: Any, postgres_server: PostgresServer, signer: TokenSigner,
        invoke_bodies: list[dict[str, Any]]) -> None:
    with postgres_server.fresh_schema() as url:
        server = gunicorn_factory(_env(tmp_path, signer, url))
        assert len(server.worker_pids()) == WORKERS
        killed: list[int] = []
        kill_times: list[float] = []
        with _load(server, signer, invoke_bodies) as load:
            time.sleep(3)
            for _ in range(2):
                kill_times.append(time.monotonic())
                killed.append(_kill_a_worker(server))
                time.sleep(2.5)
            time.sleep(1.5)
        exchanges = load.exchanges
        rows = _stored_cards(url)

    totals = figures(exchanges)
    acknowledged = set(totals.acknowledged)
    lost = _print_figures("workers killed", exchanges, acknowledged, rows, workers_killed=len(killed),
                          connection_errors_while_workers_died=totals.connection_errors)
    assert server.process.poll() is None, "the gunicorn arbiter died"
    assert not set(killed) & set(server.worker_pids()) and len(server.worker_pids()) == WORKERS
    assert [e for e in exchanges if e.status is not None and e.status >= 500] == []
    # Everything that got an answer got a 200: connection-level failures are the only casualties of a kill.
    assert {e.status for e in exchanges} <= {200, None}, totals
    assert totals.by_kind[INVOKE] > 50 and totals.by_kind[FEEDBACK] > 50, totals
    assert any(e.status == 200 and e.started > kill_times[-1] + 1 for e in exchanges), "no traffic after the kill"
    assert lost == 0
    assert len(rows) == len(set(rows)), "a report was stored twice"


def test_postgres_outage_feedback_503_invoke_200_then_recovers_with_nothing_lost(
        tmp_path: Path, gunicorn_factory: Any, postgres_server: PostgresServer, signer: TokenSigner,
        invoke_bodies: list[dict[str, Any]]) -> None:
    probe_body = invoke_bodies[0]
    with postgres_server.fresh_schema() as url:
        server = gunicorn_factory(_env(tmp_path, signer, url))
        with _load(server, signer, invoke_bodies) as load:
            time.sleep(3)
            outage_started = time.monotonic()
            try:
                postgres_server.stop()
                down_at = time.monotonic()
                time.sleep(0.5)
                readyz = requests.get(server.base_url + "/readyz", timeout=5)
                feedback = _feedback(server, signer, "probe-during-outage")
                invoke = _invoke(server, signer, probe_body)
                # A worker that gunicorn boots while the database is down must come up and serve cards.
                replaced = _kill_a_worker(server)
                wait_for(lambda: requests.get(server.base_url + "/healthz", timeout=5).status_code == 200, 10)
                invokes_after_kill = [_invoke(server, signer, probe_body).status_code for _ in range(2 * WORKERS)]
                time.sleep(max(0.0, down_at + 4 - time.monotonic()))
            finally:
                back_at = time.monotonic()
                postgres_server.start()
            recovery = wait_for(lambda: _feedback(server, signer, f"probe-{time.monotonic()}").status_code == 200,
                                10, interval=0.05)
            recovered_at = time.monotonic()
            ready_after = requests.get(server.base_url + "/readyz", timeout=5).status_code
            time.sleep(3)
        exchanges = load.exchanges
        rows = _stored_cards(url)

    during = [e for e in exchanges if e.started >= down_at and e.finished <= back_at]
    fivexx = [e for e in exchanges if e.status is not None and e.status >= 500]
    expected_503 = [e for e in fivexx if e.kind == FEEDBACK and e.status == 503
                    and e.finished >= outage_started and e.started <= recovered_at]
    acknowledged = set(figures(exchanges).acknowledged)
    lost = _print_figures(
        "postgres outage", exchanges, acknowledged, rows,
        feedback_503_during_outage=len(expected_503),
        invoke_200_during_outage=sum(e.kind == INVOKE and e.status == 200 for e in during),
        outage_seconds=round(back_at - down_at, 1), recovery_seconds=round(recovery, 2),
        unexpected_5xx=len(fivexx) - len(expected_503))

    assert readyz.status_code == 503 and _is_outcome_503(readyz)
    assert _is_outcome_503(feedback), feedback.text
    assert invoke.status_code == 200 and invoke.json()["cards"], invoke.text
    assert replaced not in server.worker_pids() and server.process.poll() is None
    assert invokes_after_kill == [200] * (2 * WORKERS)
    assert ready_after == 200
    assert recovery < 5
    # While the database was down: feedback 503 every time, invoke 200 every time.
    assert {e.status for e in during if e.kind == FEEDBACK} <= {503, None}  # None: on the worker killed
    assert sum(e.kind == FEEDBACK and e.status == 503 for e in during) > 10
    assert {e.status for e in during if e.kind == INVOKE} <= {200, None}
    assert sum(e.kind == INVOKE and e.status == 200 for e in during) > 10
    assert all(e.outcome and e.retry_after for e in expected_503)
    # The only 5xx are those 503s; nothing acknowledged was lost.
    assert fivexx == expected_503
    assert lost == 0


def test_service_starts_while_postgres_is_down_and_recovers_when_it_is_back(
        tmp_path: Path, gunicorn_factory: Any, postgres_server: PostgresServer, signer: TokenSigner,
        invoke_bodies: list[dict[str, Any]]) -> None:
    """Regression: create_schema at start raised StoreUnavailable, the worker failed to boot and gunicorn quit."""
    with postgres_server.fresh_schema() as url:
        postgres_server.stop()
        try:
            server = gunicorn_factory(_env(tmp_path, signer, url, workers=2))
            assert requests.get(server.base_url + "/healthz", timeout=5).status_code == 200
            assert _is_outcome_503(requests.get(server.base_url + "/readyz", timeout=5))
            invoke = _invoke(server, signer, invoke_bodies[0])
            assert invoke.status_code == 200 and invoke.json()["cards"]
            assert _is_outcome_503(_feedback(server, signer, "while-down"))
        finally:
            postgres_server.start()
        # The empty schema is created by the first request that reaches the database.
        wait_for(lambda: _feedback(server, signer, "after-start").status_code == 200, 10, interval=0.05)
        assert requests.get(server.base_url + "/readyz", timeout=5).status_code == 200
        assert "after-start" in _stored_cards(url)
        assert server.process.poll() is None


@contextmanager
def _frozen(postgres_server: PostgresServer) -> Iterator[None]:
    """PostgreSQL hung rather than down: its processes stopped (SIGSTOP), its port still accepting connections."""
    postmaster = int((postgres_server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster, *child_pids(postmaster)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_postgres_hung_invoke_still_answers_with_cards_and_feedback_503(
        tmp_path: Path, gunicorn_factory: Any, postgres_server: PostgresServer, signer: TokenSigner,
        invoke_bodies: list[dict[str, Any]]) -> None:
    """Regression: psycopg has no client-side query timeout, so a database that hangs (here: stopped with
    SIGSTOP) held every request that touched it for ever, and invoke touches it twice before answering (the
    token id, then the cards): no cards at all. Each store operation now waits at most STORE_TIMEOUT."""
    body = invoke_bodies[0]
    with postgres_server.fresh_schema() as url:
        server = gunicorn_factory(_env(tmp_path, signer, url, workers=2))
        assert _invoke(server, signer, body).status_code == 200
        assert _feedback(server, signer, "before-the-hang").status_code == 200
        with _frozen(postgres_server), ThreadPoolExecutor(max_workers=3) as pool:
            invoke = pool.submit(_timed, lambda: _invoke(server, signer, body))
            feedback = pool.submit(_timed, lambda: _feedback(server, signer, "during-the-hang"))
            readyz = pool.submit(_timed, lambda: requests.get(server.base_url + "/readyz", timeout=15))
            (invoked, invoke_s), (fed, feedback_s), (ready, readyz_s) = (
                invoke.result(), feedback.result(), readyz.result())
        print(f"\n[postgres hung] invoke {invoked.status_code} in {invoke_s:.2f} s, feedback {fed.status_code} in "
              f"{feedback_s:.2f} s, readyz {ready.status_code} in {readyz_s:.2f} s")
        assert invoked.status_code == 200 and invoked.json()["cards"], invoked.text
        assert _is_outcome_503(fed) and _is_outcome_503(ready)
        # Two store operations on the way (token id, then cards or feedback), each bounded.
        assert invoke_s < 2 * STORE_TIMEOUT + 1.5 and feedback_s < 2 * STORE_TIMEOUT + 1.5
        assert readyz_s < STORE_TIMEOUT + 1.5
        wait_for(lambda: _feedback(server, signer, "after-the-hang").status_code == 200, 10, interval=0.05)
        cards = _stored_cards(url)
        assert {"before-the-hang", "after-the-hang"} <= set(cards)
        assert server.process.poll() is None


def test_sqlite_store_first_connections_at_once_never_fail() -> None:
    """Regression: gunicorn workers opening a new SQLite file at once got "database is locked" from
    ``PRAGMA journal_mode=WAL`` (SQLite answers SQLITE_BUSY there without waiting), so a worker failed to boot.
    One round in about twenty failed before the fix; 150 rounds of six connections make a miss very unlikely."""
    rounds, per_round = 150, 6
    failures: list[BaseException] = []
    with tempfile.TemporaryDirectory() as directory:
        for index in range(rounds):
            stores = [FeedbackStore(f"sqlite:///{directory}/{index}.sqlite3") for _ in range(per_round)]
            barrier = threading.Barrier(per_round)

            def connect(store: FeedbackStore) -> None:
                try:
                    barrier.wait()
                    with store.engine.connect():
                        pass
                except BaseException as error:  # collected for the assertion below
                    failures.append(error)

            threads = [threading.Thread(target=connect, args=(store,)) for store in stores]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for store in stores:
                store.dispose()
    assert failures == []


@pytest.fixture(autouse=True)
def _postgres_always_restarted(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever a scenario does, leave PostgreSQL running for the tests after it."""
    yield
    if "postgres_server" in request.fixturenames:
        request.getfixturevalue("postgres_server").start()


def test_a_body_sent_slowly_is_cut_off_at_the_timeout(tmp_path: Path, gunicorn_factory: Any) -> None:
    """A client trickling its body held a worker thread for as long as it kept sending (76 s measured; gunicorn's
    ``timeout`` never fires in a gthread worker whose main loop runs): 8 such clients took every thread of 2 workers.
    The body must arrive within ``timeout`` of the headers, or the answer is a 400 OperationOutcome."""
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3",
                               "GUNICORN_CMD_ARGS": "--timeout 1"})
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as client:
        client.sendall(b"POST /cds-services/neutropenia-patient-view HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        started, answer, closed = time.monotonic(), b"", False
        while time.monotonic() - started < 4 and not closed:
            try:
                if not answer:
                    client.sendall(b" ")
                received = client.recv(65536)
                answer, closed = answer + received, not received
            except TimeoutError:
                pass
    assert closed and time.monotonic() - started < 2.5
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"resourceType":"OperationOutcome"' in answer
    assert b"not received in time" in answer


def test_a_disabled_timeout_puts_no_deadline_on_bodies(tmp_path: Path, gunicorn_factory: Any) -> None:
    """gunicorn's ``--timeout 0`` disables its timeout; as a body deadline it was "now": every body not already read
    with the headers (here 200 kB) got a 400 'not received in time', so no request reached the service."""
    server = gunicorn_factory({"CDS_AUTH": "disabled", "CDS_DATABASE_URL": f"sqlite:///{tmp_path}/f.sqlite3",
                               "GUNICORN_CMD_ARGS": "--timeout 0"})
    body = b'{"hook": "patient-view", "padding": "' + b"a" * 200_000 + b'"}'
    answer = requests.post(server.base_url + "/cds-services/neutropenia-patient-view", data=body,
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 400 and "not received in time" not in answer.text
    assert "hookInstance" in answer.text  # the body was read and validated
