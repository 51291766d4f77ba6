"""The feedback store, against a SQLite file and a real PostgreSQL server.

The ``postgres_server`` fixture (tests.support.postgres) is registered in tests/conftest.py.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from cds_hooks.errors import ServiceUnavailable
from cds_hooks.schemas import Feedback, OverrideReason
from cds_hooks.store import DEFAULT_OPERATION_TIMEOUT, CardRecord, FeedbackReceipt, FeedbackStore, StoreUnavailable
from tests.support.postgres import PostgresServer

SERVICE = "neutropenia-patient-view"
HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)
CARD = "card-neutropenia"
SNOMED = "http://snomed.info/sct"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file (its folder not yet created), or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'var' / 'feedback.sqlite3'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with server.fresh_schema() as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    """A store with its schema created, disposed after the test."""
    feedback_store = FeedbackStore(store_url)
    feedback_store.create_schema()
    yield feedback_store
    feedback_store.dispose()


def feedback(card: str = CARD, *, outcome: str = "overridden", at: datetime = NOW,
             accepted: tuple[str, ...] = (), reason: OverrideReason | None = None) -> Feedback:
    """A feedback report, overridden without a reason unless told otherwise."""
    return Feedback(card=card, outcome=outcome, outcome_timestamp=at, accepted_suggestions=accepted,
                    override_reason=reason)


def record(store: FeedbackStore, *uuids: str) -> None:
    """Record cards with these uuids as returned by one hook call."""
    store.record_cards(SERVICE, HOOK_INSTANCE, [CardRecord(u, "neutropenia", "warning") for u in uuids], NOW)


def test_store_record_cards_round_trip(store: FeedbackStore) -> None:
    store.record_cards(SERVICE, HOOK_INSTANCE, [CardRecord("c1", "febrile-neutropenia", "critical"),
                                                CardRecord("c2", None, "info")], NOW)

    assert store.count_cards() == 2
    assert store.card("c1") == {"uuid": "c1", "service_id": SERVICE, "hook_instance": HOOK_INSTANCE,
                                "kind": "febrile-neutropenia", "indicator": "critical", "created_at": NOW}
    assert store.card("c2")["kind"] is None  # type: ignore[index]
    assert store.card("c2")["created_at"].tzinfo == timezone.utc  # type: ignore[index]
    assert store.card("missing") is None


def test_store_record_cards_again_is_harmless(store: FeedbackStore) -> None:
    record(store, "c1")
    record(store, "c1", "c2")

    assert store.count_cards() == 2


@pytest.mark.parametrize(
    ("table", "columns"),
    (
        ("cds_card", {"uuid", "service_id", "hook_instance", "kind", "indicator", "created_at"}),
        ("cds_feedback", {"id", "service_id", "card_uuid", "outcome", "accepted_suggestions", "override_system",
                          "override_code", "override_display", "user_comment", "outcome_timestamp",
                          "received_at", "unknown_card", "dedupe_key"}),
    ),
    ids=("cds_card", "cds_feedback"),
)
def test_store_tables_hold_no_patient_data(store: FeedbackStore, table: str, columns: set[str]) -> None:
    assert {column["name"] for column in inspect(store.engine).get_columns(table)} == columns


def test_store_create_schema_is_idempotent(store: FeedbackStore) -> None:
    record(store, "c1")
    store.create_schema()

    assert store.count_cards() == 1


@pytest.mark.parametrize(
    ("report", "expected"),
    (
        (feedback(outcome="accepted", accepted=("s-cbc", "s-cultures")),
         {"outcome": "accepted", "accepted_suggestions": ["s-cbc", "s-cultures"], "override_system": None,
          "override_code": None, "override_display": None, "user_comment": None}),
        (feedback(reason=OverrideReason(SNOMED, "183944003", "Procedure refused", "patient declined")),
         {"outcome": "overridden", "accepted_suggestions": [], "override_system": SNOMED,
          "override_code": "183944003", "override_display": "Procedure refused",
          "user_comment": "patient declined"}),
        (feedback(reason=OverrideReason(user_comment="already treated")),
         {"outcome": "overridden", "accepted_suggestions": [], "override_system": None, "override_code": None,
          "override_display": None, "user_comment": "already treated"}),
        (feedback(),
         {"outcome": "overridden", "accepted_suggestions": [], "override_system": None, "override_code": None,
          "override_display": None, "user_comment": None}),
    ),
    ids=("accepted", "overridden-with-reason", "overridden-comment-only", "overridden-without-reason"),
)
def test_store_save_feedback(store: FeedbackStore, report: Feedback, expected: dict[str, Any]) -> None:
    record(store, CARD)

    receipt = store.save_feedback(SERVICE, [report], NOW + timedelta(seconds=5))

    assert receipt == FeedbackReceipt(stored=1, duplicates=0, unknown_cards=())
    [row] = store.feedback_for_card(CARD)
    assert {key: row[key] for key in expected} == expected
    assert row["service_id"] == SERVICE
    assert row["outcome_timestamp"] == NOW
    assert row["received_at"] == NOW + timedelta(seconds=5)
    assert row["unknown_card"] is False
    assert len(row["dedupe_key"]) == 64


def test_store_timestamps_come_back_as_utc(store: FeedbackStore) -> None:
    paris = timezone(timedelta(hours=2))
    store.save_feedback(SERVICE, [feedback(at=datetime(2025, 3, 10, 14, 0, tzinfo=paris))], NOW)

    [row] = store.feedback_for_card(CARD)
    assert row["outcome_timestamp"] == NOW
    assert row["outcome_timestamp"].tzinfo == timezone.utc


def test_store_refuses_naive_timestamps(store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.save_feedback(SERVICE, [feedback(at=datetime(2025, 3, 10, 12, 0))], NOW)
    assert store.count_feedback() == 0


@pytest.mark.parametrize(
    ("first", "again"),
    (
        (feedback(), feedback()),
        (feedback(outcome="accepted", accepted=("a", "b")), feedback(outcome="accepted", accepted=("b", "a"))),
        (feedback(), feedback(at=NOW.astimezone(timezone(timedelta(hours=-5))))),
        (feedback(reason=OverrideReason(SNOMED, "1", "x", "why")),
         feedback(reason=OverrideReason(SNOMED, "1", "x", "why"))),
    ),
    ids=("identical", "suggestions-reordered", "same-instant-other-offset", "identical-with-reason"),
)
def test_store_duplicate_report_is_idempotent(store: FeedbackStore, first: Feedback, again: Feedback) -> None:
    record(store, CARD)
    store.save_feedback(SERVICE, [first], NOW)

    receipt = store.save_feedback(SERVICE, [again], NOW + timedelta(minutes=1))

    assert receipt == FeedbackReceipt(stored=0, duplicates=1, unknown_cards=())
    assert store.count_feedback() == 1
    assert store.feedback_for_card(CARD)[0]["received_at"] == NOW


def test_store_duplicate_within_one_batch(store: FeedbackStore) -> None:
    receipt = store.save_feedback(SERVICE, [feedback(), feedback()], NOW)

    assert (receipt.stored, receipt.duplicates) == (1, 1)
    assert store.count_feedback() == 1


@pytest.mark.parametrize(
    "later",
    (
        feedback(at=NOW + timedelta(seconds=1)),
        feedback(at=NOW + timedelta(microseconds=1)),
        feedback(reason=OverrideReason(user_comment="another comment")),
        feedback(outcome="accepted", accepted=("s1",)),
        feedback(reason=OverrideReason(SNOMED, "2")),
    ),
    ids=("later-outcome-time", "microsecond-later", "with-comment", "other-outcome", "with-reason"),
)
def test_store_distinct_report_is_a_new_row(store: FeedbackStore, later: Feedback) -> None:
    store.save_feedback(SERVICE, [feedback()], NOW)

    receipt = store.save_feedback(SERVICE, [later], NOW)

    assert (receipt.stored, receipt.duplicates) == (1, 0)
    assert store.count_feedback() == 2


def test_store_same_report_to_another_service_is_a_new_row(store: FeedbackStore) -> None:
    store.save_feedback(SERVICE, [feedback()], NOW)

    assert store.save_feedback("other-service", [feedback()], NOW).stored == 1


def test_store_unknown_card_is_kept_and_flagged(store: FeedbackStore) -> None:
    record(store, "known")

    receipt = store.save_feedback(SERVICE, [feedback("known"), feedback("ghost"),
                                            feedback("ghost", at=NOW + timedelta(seconds=1))], NOW)

    assert receipt == FeedbackReceipt(stored=3, duplicates=0, unknown_cards=("ghost",))
    assert [row["unknown_card"] for row in store.feedback_for_card("ghost")] == [True, True]
    assert store.feedback_for_card("known")[0]["unknown_card"] is False
    assert store.card("ghost") is None


def test_store_batch_is_atomic(store: FeedbackStore) -> None:
    batch = [feedback(f"c{n}") for n in range(2500)]  # reports are inserted a thousand to a statement
    inserts = []

    def fail_on_second_insert(*args: Any) -> None:
        if args[2].startswith("INSERT INTO cds_feedback"):
            inserts.append(args[2])
            if len(inserts) == 2:
                raise RuntimeError("disk on fire")

    event.listen(store.engine, "before_cursor_execute", fail_on_second_insert)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.save_feedback(SERVICE, batch, NOW)
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_on_second_insert)

    assert len(inserts) == 2  # the first insert ran inside the transaction and was rolled back
    assert store.count_feedback() == 0
    assert store.save_feedback(SERVICE, batch, NOW).stored == 2500


def test_store_other_database_errors_are_not_unavailability(store: FeedbackStore) -> None:
    with pytest.raises(IntegrityError):
        store.record_cards(SERVICE, HOOK_INSTANCE, [CardRecord("c1", None, None)], NOW)  # type: ignore[arg-type]


def test_store_concurrent_writers_lose_nothing(store: FeedbackStore, store_url: str) -> None:
    # Two engines on one database, as two gunicorn workers would have, each used by several threads.
    other = FeedbackStore(store_url)
    threads, batches = 8, 20
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def write(worker: int) -> None:
        target = store if worker % 2 else other
        try:
            start.wait()
            for n in range(batches):
                uuid = f"w{worker}-{n}"
                target.record_cards(SERVICE, f"hook-{worker}", [CardRecord(uuid, None, "info")], NOW)
                target.save_feedback(SERVICE, [feedback(uuid), feedback(CARD, at=NOW + timedelta(
                    seconds=worker * batches + n))], NOW)
        except BaseException as error:  # collected, so the assertion below names it
            errors.append(error)

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    finally:
        other.dispose()

    assert errors == []
    assert store.count_cards() == threads * batches
    assert store.count_feedback() == 2 * threads * batches


def test_store_concurrent_create_schema(store_url: str) -> None:
    # Several workers starting at once against an empty database.
    stores = [FeedbackStore(store_url) for _ in range(6)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def create(target: FeedbackStore) -> None:
        try:
            start.wait()
            target.create_schema()
        except BaseException as error:  # collected, so the assertion below names it
            errors.append(error)

    workers = [threading.Thread(target=create, args=(s,)) for s in stores]
    try:
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        assert errors == []
        assert stores[0].save_feedback(SERVICE, [feedback()], NOW).stored == 1
    finally:
        for target in stores:
            target.dispose()


def test_store_ping(store: FeedbackStore) -> None:
    assert store.ping() is True


def test_store_sqlite_file_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "var" / "feedback.sqlite3"
    store = FeedbackStore(f"sqlite:///{path}")
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2000
    finally:
        store.dispose()
    assert path.is_file()


def test_store_sqlite_locked_by_another_process_is_unavailable_within_the_operation_timeout(tmp_path: Path) -> None:
    # A backup or an operator's `sqlite3` shell holding the write lock made every write wait 30 s (the busy
    # timeout), so an invoke returned its cards only after the EHR had given up. Now the wait is the PostgreSQL
    # operation timeout, the caller gets StoreUnavailable (cards still served, feedback 503), and the store
    # works again once the lock is released.
    path = tmp_path / "feedback.sqlite3"
    store = FeedbackStore(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        store.create_schema()
        other.execute("BEGIN IMMEDIATE")
        for write in (lambda: store.record_cards(SERVICE, "hook-1", [CardRecord("u1", "finding", "critical")], NOW),
                      lambda: store.save_feedback(SERVICE, [feedback()], NOW)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                write()
            assert DEFAULT_OPERATION_TIMEOUT - 0.1 <= time.monotonic() - started < DEFAULT_OPERATION_TIMEOUT + 3
        other.execute("ROLLBACK")
        store.record_cards(SERVICE, "hook-1", [CardRecord("u1", "finding", "critical")], NOW)
        assert store.count_cards() == 1
    finally:
        other.close()
        store.dispose()


def test_store_sqlite_threads_of_one_process_take_turns_at_the_database(tmp_path: Path) -> None:
    # Threads of one gthread worker writing at once met SQLite's lock and polled under its busy handler, whose sleeps
    # grow to 100 ms: card records waited hundreds of milliseconds (HTTP p99 ~500 ms against a 20 ms median). They
    # now take turns in the process: no transaction begins while another thread's is open.
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.sqlite3'}")
    events: list[tuple[str, str]] = []

    def watch(*args: Any) -> None:
        if args[2].startswith("BEGIN"):  # before SQLite is asked for its lock: a thread polling at it comes here too
            events.append(("begin", threading.current_thread().name))
        if args[2].startswith("INSERT"):
            time.sleep(0.05)  # a slow disk: the other threads arrive while this transaction is open

    try:
        store.create_schema()
        event.listen(store.engine, "before_cursor_execute", watch)
        event.listen(store.engine, "commit", lambda conn: events.append(("commit", threading.current_thread().name)))
        writers = [threading.Thread(name=f"w{n}", target=store.record_cards,
                                    args=(SERVICE, f"hook-{n}", [CardRecord(f"u{n}", "finding", "info")], NOW))
                   for n in range(4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        writes = list(events)
        assert [kind for kind, _ in writes] == ["begin", "commit"] * 4
        assert all(writes[n][1] == writes[n + 1][1] for n in range(0, 8, 2))
        assert store.count_cards() == 4
    finally:
        store.dispose()


@contextmanager
def _write_held(store: FeedbackStore, write: Callable[[], object]) -> Iterator[None]:
    """A thread running ``write`` on ``store``, held inside its INSERT until the block ends (then joined)."""
    inside, release = threading.Event(), threading.Event()

    def hold(*args: Any) -> None:
        if args[2].startswith("INSERT") and threading.current_thread().name == "holder":
            inside.set()
            release.wait(5)

    event.listen(store.engine, "before_cursor_execute", hold)
    holder = threading.Thread(name="holder", target=write)
    holder.start()
    try:
        assert inside.wait(5)
        yield
    finally:
        release.set()
        holder.join()
        event.remove(store.engine, "before_cursor_execute", hold)


def test_store_sqlite_turn_not_given_within_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.sqlite3'}", busy_timeout=0.2)
    try:
        store.create_schema()
        with _write_held(store, lambda: store.record_cards(SERVICE, "hook-1", [CardRecord("u1", "finding", "info")],
                                                           NOW)):
            with pytest.raises(StoreUnavailable):
                store.save_feedback(SERVICE, [feedback()], NOW)
        assert store.save_feedback(SERVICE, [feedback()], NOW).stored == 1
    finally:
        store.dispose()


def test_store_sqlite_write_waits_at_most_the_busy_timeout_for_turn_and_file_together(tmp_path: Path) -> None:
    # Another process holds the file (a backup, an operator's sqlite3 shell). A thread that waited for its turn
    # behind one waiting at the file then waited the full busy timeout at the file too: twice the bound.
    path = tmp_path / "f.sqlite3"
    store = FeedbackStore(f"sqlite:///{path}", busy_timeout=1.0)
    other = sqlite3.connect(path, isolation_level=None)
    elapsed: dict[str, float] = {}

    def write(name: str) -> None:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.record_cards(SERVICE, name, [CardRecord(name, "finding", "info")], NOW)
        elapsed[name] = time.monotonic() - started

    try:
        store.create_schema()
        other.execute("BEGIN IMMEDIATE")
        first = threading.Thread(target=write, args=("first",))
        first.start()
        time.sleep(0.5)  # the first holds the turn, waiting at the file
        write("second")
        first.join()
        assert elapsed["first"] < 1.3
        assert elapsed["second"] < 1.3  # it got its turn after 0.5 s: 0.5 s left for the file, not 1 s more
    finally:
        other.close()
        store.dispose()


def test_store_sqlite_ping_does_not_wait_for_a_writers_turn(tmp_path: Path) -> None:
    # A WAL read never waits for a writer: /readyz must not report a healthy store unavailable (503) while a
    # thread of the same worker writes a large feedback batch for longer than the busy timeout.
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.sqlite3'}", busy_timeout=0.2)
    try:
        store.create_schema()
        with _write_held(store, lambda: store.save_feedback(SERVICE, [feedback()], NOW)):
            assert store.ping() is True
        assert store.count_feedback() == 1
    finally:
        store.dispose()


def test_store_sqlite_unopenable_is_unavailable(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path}")  # a directory, not a file
    try:
        assert store.ping() is False
        with pytest.raises(StoreUnavailable):
            store.create_schema()
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("url", "redacted"),
    (
        ("postgres://cds:s3cret@db:5432/cds", "postgresql+psycopg://cds:***@db:5432/cds"),
        ("postgresql://cds:s3cret@db/cds", "postgresql+psycopg://cds:***@db/cds"),
        ("postgresql+psycopg://cds:s3cret@db/cds", "postgresql+psycopg://cds:***@db/cds"),
        ("sqlite:///var/feedback.sqlite3", "sqlite:///var/feedback.sqlite3"),
    ),
    ids=("postgres-scheme", "postgresql-scheme", "psycopg-driver", "sqlite-relative"),
)
def test_store_url_normalised_and_redacted(url: str, redacted: str, monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the relative SQLite default creates var/ in the working directory
    store = FeedbackStore(url)  # no connection is made until the store is used
    try:
        assert store.redacted_url == redacted
        assert "s3cret" not in store.redacted_url
    finally:
        store.dispose()


@pytest.mark.parametrize("url", ("mysql://u:p@h/db", "not a url"), ids=("unsupported-backend", "garbage"))
def test_store_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        FeedbackStore(url)
    assert "u:p" not in str(raised.value)


@pytest.mark.postgres
def test_store_survives_postgres_restart(postgres_server: PostgresServer,
                                         caplog: pytest.LogCaptureFixture) -> None:
    password = postgres_server.password
    with postgres_server.fresh_schema() as url:
        assert password in url
        store = FeedbackStore(url, connect_timeout=2)
        try:
            store.create_schema()
            record(store, CARD)
            assert store.save_feedback(SERVICE, [feedback()], NOW).stored == 1

            postgres_server.stop()
            try:
                assert store.ping() is False
                with caplog.at_level(logging.WARNING, logger="cds_hooks.store"), \
                        pytest.raises(StoreUnavailable) as raised:
                    store.save_feedback(SERVICE, [feedback(at=NOW + timedelta(seconds=1))], NOW)
                with pytest.raises(StoreUnavailable):
                    store.count_feedback()
            finally:
                postgres_server.start()

            error = raised.value
            assert isinstance(error, ServiceUnavailable) and error.status_code == 503
            assert error.reason
            for text in (str(error), error.reason, str(error.__cause__), store.redacted_url, caplog.text):
                assert password not in text
            assert "***" in store.redacted_url

            assert store.ping() is True
            assert store.save_feedback(SERVICE, [feedback(at=NOW + timedelta(seconds=1))], NOW).stored == 1
            assert store.count_feedback() == 2
            assert [row["outcome_timestamp"] for row in store.feedback_for_card(CARD)] == [
                NOW, NOW + timedelta(seconds=1)]
            assert store.card(CARD) is not None
        finally:
            store.dispose()


@pytest.mark.postgres
def test_store_read_only_postgres_is_unavailable(postgres_server: PostgresServer) -> None:
    # A hot standby after a failover (or default_transaction_read_only) refuses writes with SQLSTATE 25006, which
    # psycopg raises as InternalError: it went through as a 500 on feedback and on invoke (no cards at all), and a
    # worker booting against an empty read-only database failed to start.
    with postgres_server.fresh_schema() as url:
        parsed = make_url(url)
        read_only = parsed.update_query_dict(
            {"options": f"{parsed.query['options']} -cdefault_transaction_read_only=on"}).render_as_string(
            hide_password=False)
        store = FeedbackStore(read_only)
        try:
            store.create_schema(defer_if_unavailable=True)
            assert store.ping() is False
            with pytest.raises(StoreUnavailable):
                record(store, CARD)
            with pytest.raises(StoreUnavailable):
                store.save_feedback(SERVICE, [feedback()], NOW)
            with pytest.raises(StoreUnavailable):
                store.remember_jti("https://ehr.example.org", "jti-1", 2e9, 1e9)
        finally:
            store.dispose()


def test_store_batch_is_inserted_in_few_statements(store: FeedbackStore) -> None:
    # One INSERT per report took a 10,000-report batch (what a 1 MB body holds) 2.4 s on PostgreSQL, past the 2 s
    # operation timeout: a 503 for a batch that was stored, retried by the EHR into duplicates. Statements are
    # counted, not timed; reports already stored and repeats inside the batch still count as duplicates.
    record(store, "card-0")
    store.save_feedback(SERVICE, [feedback("card-1")], NOW)
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    items = [feedback(f"card-{i}") for i in range(5000)] + [feedback("card-2")]
    receipt = store.save_feedback(SERVICE, items, NOW)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert 1 <= len(inserts) <= 20
    assert (receipt.stored, receipt.duplicates, len(receipt.unknown_cards)) == (4999, 2, 4999)
    assert store.count_feedback() == 5000


def test_store_batch_on_more_cards_than_a_statement_may_bind(store_url: str) -> None:
    # The known-card lookup bound every distinct card uuid of the batch in one IN (...): past 65535 psycopg
    # refused to send it (OperationalError, so a 503 "retry later" that could never succeed); SQLite builds
    # refuse past 32766 the same way.
    store = FeedbackStore(store_url, operation_timeout=None)  # a batch this large takes seconds
    try:
        store.create_schema()
        record(store, "card-0", "card-65999")
        receipt = store.save_feedback(SERVICE, [feedback(f"card-{i}") for i in range(66_000)], NOW)
        assert (receipt.stored, receipt.duplicates, len(receipt.unknown_cards)) == (66_000, 0, 65_998)
        assert store.feedback_for_card("card-65999")[0]["unknown_card"] is False
    finally:
        store.dispose()
