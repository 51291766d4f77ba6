"""The durable feedback store: the cards the service returned and the feedback clients sent about them.

SQLAlchemy Core over SQLite (one file, several gunicorn workers: WAL and a busy timeout) or PostgreSQL
(several replicas). No patient data is ever stored: a card is its uuid, service, hook instance, kind and
indicator. Duplicate feedback reports are idempotent through a unique ``dedupe_key``; feedback for a card
we never returned is kept and flagged. https://cds-hooks.hl7.org/2.0/#feedback
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cds_hooks.errors import ServiceUnavailable
from cds_hooks.schemas import Feedback, OverrideReason

logger = logging.getLogger(__name__)

#: A file under ``var/`` relative to the working directory, as ``make run`` uses.
DEFAULT_URL = "sqlite:///var/feedback.sqlite3"

#: Execution option naming a connection that writes; on SQLite it takes the write lock at BEGIN.
_WRITES = "cds_store_writes"
#: Every this many token ids recorded, all expired ones are purged (otherwise only the one being recorded).
_JTI_PURGE_EVERY = 500
#: Arbitrary constant key of the PostgreSQL advisory lock that serialises concurrent ``create_schema``.
_SCHEMA_LOCK_KEY = 0x6364_735F_6662  # "cds_fb"
#: Longest a request waits for one PostgreSQL operation (pool checkout included); see FeedbackStore._bounded.
DEFAULT_OPERATION_TIMEOUT = 2.0
#: SQLSTATE read_only_sql_transaction: a hot standby (after a failover) or default_transaction_read_only refuses a
#: write. psycopg raises it as InternalError, not OperationalError, but it is an outage of the store all the same.
_READ_ONLY_SQLSTATE = "25006"
#: Card uuids looked up per statement: psycopg binds at most 65535 parameters, many SQLite builds 32766.
_LOOKUP_CHUNK = 1000

_T = TypeVar("_T")

#: SQLite: how long the transaction this thread begins may still wait for the file, once its turn came (_bounded).
_SQLITE_FILE_WAIT: contextvars.ContextVar[float | None] = contextvars.ContextVar("cds_store_sqlite_file_wait",
                                                                                 default=None)


class StoreUnavailable(ServiceUnavailable):
    """503: the feedback store cannot be reached. The message is generic; ``reason`` is for the log."""

    def __init__(self, reason: str = "") -> None:
        super().__init__("the feedback store is unavailable; retry later")
        #: What failed, with the password scrubbed; for the log only.
        self.reason = reason


@dataclass(frozen=True)
class CardRecord:
    """A card the service returned: its uuid, its kind (``source.topic.code``) and its indicator."""

    uuid: str
    kind: str | None
    indicator: str


@dataclass(frozen=True)
class FeedbackReceipt:
    """What ``save_feedback`` did: rows stored, reports already stored, card uuids we never returned."""

    stored: int
    duplicates: int
    unknown_cards: tuple[str, ...]


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no offset, so naive UTC is stored there)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; store UTC."""
        if value is None:
            return None
        utc = _as_utc(value)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


metadata = MetaData()

card_table = Table(
    "cds_card",
    metadata,
    Column("uuid", String, primary_key=True),
    Column("service_id", String, nullable=False),
    Column("hook_instance", String, nullable=False),
    Column("kind", String, nullable=True),
    Column("indicator", String, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
)

feedback_table = Table(
    "cds_feedback",
    metadata,
    # BIGINT is not an alias of ROWID on SQLite, so it would not autoincrement there.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("service_id", String, nullable=False),
    Column("card_uuid", String, nullable=False, index=True),
    Column("outcome", String, nullable=False),
    Column("accepted_suggestions", JSON, nullable=False),
    Column("override_system", String, nullable=True),
    Column("override_code", String, nullable=True),
    Column("override_display", String, nullable=True),
    Column("user_comment", String, nullable=True),
    Column("outcome_timestamp", UtcDateTime, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Column("unknown_card", Boolean, nullable=False),
    Column("dedupe_key", String(64), nullable=False, unique=True),
)

#: Client-token ids already accepted (CDS Hooks §Trusting CDS Clients: a `jti` is used once), shared by every
#: worker and replica that uses this database. Rows are kept until the token expires, then purged.
jti_table = Table(
    "cds_jti",
    metadata,
    Column("iss", String, primary_key=True),
    Column("jti", String, primary_key=True),
    Column("expires_at", BigInteger, nullable=False, index=True),
)

#: Dialect-specific INSERT constructs that know ``ON CONFLICT DO NOTHING``.
_INSERTS: dict[str, Callable[[Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def dedupe_key(service_id: str, item: Feedback) -> str:
    """The sha256 of a canonical JSON of everything that makes a feedback report distinct."""
    reason = item.override_reason or OverrideReason()
    canonical = {
        "service": service_id,
        "card": item.card,
        "outcome": item.outcome,
        "outcomeTimestamp": _as_utc(item.outcome_timestamp).isoformat(),
        "acceptedSuggestions": sorted(item.accepted_suggestions),
        "reason": {"system": reason.system, "code": reason.code, "display": reason.display},
        "userComment": reason.user_comment,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalise_url(url: str) -> URL:
    """Parse a database URL; bare ``postgres://`` and ``postgresql://`` get the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError("the feedback store URL is not a valid SQLAlchemy database URL") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in _INSERTS:
        raise ValueError(f"unsupported feedback store backend {parsed.get_backend_name()!r}; "
                         "use sqlite or postgresql")
    return parsed


class FeedbackStore:
    """Cards returned and feedback received, in SQLite or PostgreSQL; safe across threads and processes."""

    def __init__(self, url: str = DEFAULT_URL, *, pool_size: int = 5, max_overflow: int = 10,
                 pool_timeout: float = 10.0, pool_recycle: int = 1800, connect_timeout: int = 5,
                 busy_timeout: float = DEFAULT_OPERATION_TIMEOUT,
                 operation_timeout: float | None = DEFAULT_OPERATION_TIMEOUT,
                 echo: bool = False) -> None:
        self._url = normalise_url(url)
        self._dialect = self._url.get_backend_name()
        # A server can hang outright; SQLite's waits are already bounded by its busy timeout.
        self._operation_timeout = operation_timeout if self._dialect == "postgresql" else None
        self._runner_size = pool_size + max_overflow
        self._runner: concurrent.futures.ThreadPoolExecutor | None = None
        self._runner_pid = 0
        self._runner_lock = threading.Lock()
        #: SQLite: this process's threads take turns at the database here (see _bounded), waiting at most this long.
        self._sqlite_turn = threading.RLock() if self._dialect == "sqlite" else None
        self._busy_timeout = busy_timeout
        connect_args: dict[str, Any]
        if self._dialect == "sqlite":
            _make_parent_directory(self._url)
            # sqlite3's busy timeout, in seconds: how long an operation waits for another connection's lock. It was
            # 30 s, and a SQLite file locked by another process (a backup, an operator's `sqlite3` shell) held every
            # invoke that long before its cards were recorded and returned: an EHR gives up well before. Writes
            # here take milliseconds, so the PostgreSQL operation timeout is wait enough for the workers' own turns.
            connect_args = {"timeout": busy_timeout}
        else:
            connect_args = {"connect_timeout": connect_timeout}
        self._engine = create_engine(
            self._url, pool_pre_ping=True, pool_size=pool_size, max_overflow=max_overflow,
            pool_timeout=pool_timeout, pool_recycle=pool_recycle, connect_args=connect_args,
            hide_parameters=True,  # user comments are free text: keep them out of errors and logs
            echo=echo,
        )
        if self._dialect == "sqlite":
            event.listen(self._engine, "connect", functools.partial(_sqlite_on_connect, busy_timeout=busy_timeout))
            event.listen(self._engine, "begin", functools.partial(_sqlite_on_begin, busy_timeout=busy_timeout))
        self._writer = self._engine.execution_options(**{_WRITES: True})
        self._jti_writes = 0
        #: True while a schema creation deferred at start (database down) has not happened yet.
        self._schema_pending = False
        self._schema_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and operational tooling)."""
        return self._engine

    @property
    def redacted_url(self) -> str:
        """The database URL with the password masked, fit for logs."""
        return self._url.render_as_string(hide_password=True)

    def create_schema(self, *, defer_if_unavailable: bool = False) -> None:
        """Create the tables and indexes that are missing; safe when several workers start at once.

        With ``defer_if_unavailable`` a database that cannot be reached is not an error: the schema is created by
        the first operation that reaches the database. The app starts this way, so that a worker booting during
        a database outage still serves cards (its feedback answers 503 until the database is back) instead of
        failing to boot, which makes gunicorn shut the whole service down.
        """
        def create() -> None:
            with self._guard("create schema"), self._writer.begin() as conn:
                if self._dialect == "postgresql":
                    # Two concurrent CREATE TABLEs race on the catalog even with IF NOT EXISTS; a transaction-scoped
                    # advisory lock makes the others wait, then find the tables (PostgreSQL DDL is transactional).
                    conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
                metadata.create_all(conn, checkfirst=True)

        try:
            self._bounded("create schema", create)
        except StoreUnavailable as error:
            if not defer_if_unavailable:
                raise
            logger.warning("feedback store %s unavailable at start (%s); the schema will be created when it "
                           "answers", self.redacted_url, error.reason)
            self._schema_pending = True
            return
        self._schema_pending = False

    def _ensure_schema(self) -> None:
        """Create the schema now if its creation was deferred; StoreUnavailable while the database is down."""
        if not self._schema_pending:
            return
        with self._schema_lock:
            if self._schema_pending:
                self.create_schema()

    def record_cards(self, service_id: str, hook_instance: str, cards: Sequence[CardRecord],
                     at: datetime) -> None:
        """Record the cards of one response, in one transaction; a uuid already recorded is left as is."""
        if not cards:
            return
        rows = [{"uuid": c.uuid, "service_id": service_id, "hook_instance": hook_instance, "kind": c.kind,
                 "indicator": c.indicator, "created_at": at} for c in cards]
        statement = _INSERTS[self._dialect](card_table).on_conflict_do_nothing(index_elements=["uuid"])

        def write() -> None:
            with self._guard("record cards"), self._writer.begin() as conn:
                conn.execute(statement, rows)

        self._ensure_schema()
        self._bounded("record cards", write)

    def save_feedback(self, service_id: str, items: Sequence[Feedback], received_at: datetime) -> FeedbackReceipt:
        """Store a feedback batch in one transaction and return after commit; repeats are not stored twice."""
        # A report already stored inserts nothing, so RETURNING yields no row (rowcount is not reliable here).
        insert = (_INSERTS[self._dialect](feedback_table).on_conflict_do_nothing(index_elements=["dedupe_key"])
                  .returning(feedback_table.c.id))
        uuids = sorted({item.card for item in items})

        def write() -> tuple[int, set[str]]:
            with self._guard("save feedback"), self._writer.begin() as conn:
                known = {uuid for start in range(0, len(uuids), _LOOKUP_CHUNK) for uuid in conn.scalars(
                    select(card_table.c.uuid).where(card_table.c.uuid.in_(uuids[start:start + _LOOKUP_CHUNK])))}
                rows = [_feedback_row(service_id, item, received_at, item.card not in known) for item in items]
                # One multi-row INSERT per batch of rows (SQLAlchemy's "insertmanyvalues"), not one per report: on
                # PostgreSQL a statement each took 10,000 reports past the operation timeout, a 503 for a batch
                # that was stored. RETURNING still yields one row per report inserted.
                return len(conn.execute(insert, rows).all()) if rows else 0, known

        self._ensure_schema()
        stored, known = self._bounded("save feedback", write)
        unknown = tuple(dict.fromkeys(item.card for item in items if item.card not in known))
        return FeedbackReceipt(stored=stored, duplicates=len(items) - stored, unknown_cards=unknown)

    def remember_jti(self, iss: str, jti: str, expires_at: float, now: float) -> bool:
        """Record a token id; True if it was new (or its earlier use has expired), False if it is a replay."""
        insert = (_INSERTS[self._dialect](jti_table).on_conflict_do_nothing(index_elements=["iss", "jti"])
                  .returning(jti_table.c.jti))
        self._jti_writes += 1
        purge_all = self._jti_writes % _JTI_PURGE_EVERY == 0

        def write() -> bool:
            with self._guard("remember jti"), self._writer.begin() as conn:
                expired = jti_table.c.expires_at < int(now)
                if purge_all:
                    conn.execute(delete(jti_table).where(expired))
                else:
                    conn.execute(delete(jti_table).where(jti_table.c.iss == iss, jti_table.c.jti == jti, expired))
                row = {"iss": iss, "jti": jti, "expires_at": int(math.ceil(expires_at))}
                return conn.execute(insert, row).first() is not None

        self._ensure_schema()
        return self._bounded("remember jti", write)

    def ping(self) -> bool:
        """True when the database answers ``SELECT 1`` (and holds the schema); for readiness probes."""
        def select_one() -> None:
            with self._guard("ping"), self._engine.connect() as conn:
                conn.execute(select(1))

        try:
            self._ensure_schema()
            # A read: in WAL mode it never waits for a writer, so it takes no turn (readiness would fail while a
            # large feedback batch of this process is written).
            self._bounded("ping", select_one, turn=False)
        except StoreUnavailable:
            return False
        return True

    def count_feedback(self) -> int:
        """How many feedback rows are stored."""
        return self._scalar(select(func.count()).select_from(feedback_table))

    def count_cards(self) -> int:
        """How many card rows are stored."""
        return self._scalar(select(func.count()).select_from(card_table))

    def feedback_for_card(self, uuid: str) -> list[dict[str, Any]]:
        """Every feedback row about one card, oldest first."""
        query = select(feedback_table).where(feedback_table.c.card_uuid == uuid).order_by(feedback_table.c.id)
        with self._guard("read feedback"), self._engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def card(self, uuid: str) -> dict[str, Any] | None:
        """The card row with this uuid, or None."""
        with self._guard("read card"), self._engine.connect() as conn:
            row = conn.execute(select(card_table).where(card_table.c.uuid == uuid)).mappings().first()
        return dict(row) if row is not None else None

    def dispose(self, *, close: bool = True) -> None:
        """Drop pooled connections: ``close=True`` at shutdown, ``close=False`` in a child after fork."""
        self._engine.dispose(close=close)
        with self._runner_lock:
            runner, self._runner = self._runner, None
        if runner is not None and close:
            runner.shutdown(wait=False, cancel_futures=True)

    def _bounded(self, action: str, operation: Callable[[], _T], *, turn: bool = True) -> _T:
        """Run one database operation, waiting for it at most the operation timeout (PostgreSQL), or for its turn
        among this process's threads at most the busy timeout (SQLite).

        psycopg has no client-side query timeout: a server that hangs rather than refuses (frozen, a lock never
        released, a network path that drops packets) held the request for ever, and every invoke writes the
        token id and its cards before answering, so no cards came at all. The operation runs on one of the
        store's threads; past the timeout the caller gets StoreUnavailable (feedback 503, cards still served)
        while the operation finishes or fails on its own. A late commit is harmless: reports are idempotent,
        cards and token ids insert-if-absent. An operation still waiting for a thread is dropped.
        """
        if self._sqlite_turn is not None and turn:
            # One writer at a time per SQLite file: a thread that finds the file locked by another thread of this
            # process polls under SQLite's busy handler, whose sleeps grow to 100 ms, so a gthread worker's
            # concurrent invokes waited hundreds of milliseconds to record their cards (p99 about 500 ms against a
            # 20 ms median). A lock of this process wakes the next thread as soon as the turn is free; the busy
            # timeout still bounds waits for other processes (gunicorn's other workers).
            # The busy timeout bounds the whole wait: the turn, then the file for what is left of it (waiting the
            # full timeout at each made a write wait up to twice as long when another process held the file).
            started = time.monotonic()
            if not self._sqlite_turn.acquire(timeout=self._busy_timeout):
                reason = f"{action} failed: no turn at the database within {self._busy_timeout:g} s"
                logger.warning("feedback store %s unavailable: %s", self.redacted_url, reason)
                raise StoreUnavailable(reason)
            left = _SQLITE_FILE_WAIT.set(max(self._busy_timeout - (time.monotonic() - started), 0.0))
            try:
                return operation()
            finally:
                _SQLITE_FILE_WAIT.reset(left)
                self._sqlite_turn.release()
        if self._operation_timeout is None:
            return operation()
        future = self._runner_here().submit(contextvars.copy_context().run, operation)
        try:
            return future.result(timeout=self._operation_timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # it finished just now, or the operation itself raised TimeoutError
                return future.result()
            future.cancel()
            reason = f"{action} failed: no answer within {self._operation_timeout:g} s"
            logger.warning("feedback store %s unavailable: %s", self.redacted_url, reason)
            raise StoreUnavailable(reason) from None

    def _runner_here(self) -> concurrent.futures.ThreadPoolExecutor:
        """This process's threads for `_bounded` (threads do not survive a fork: a child makes its own)."""
        with self._runner_lock:
            if self._runner is None or self._runner_pid != os.getpid():
                self._runner = concurrent.futures.ThreadPoolExecutor(max_workers=self._runner_size,
                                                                     thread_name_prefix="cds-store")
                self._runner_pid = os.getpid()
            return self._runner

    def _scalar(self, query: Any) -> int:
        with self._guard("count"), self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn connection-type database failures into StoreUnavailable; let everything else through."""
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeoutError) as error:
            raise self._unavailable(action, error) from error
        except DBAPIError as error:
            if not error.connection_invalidated and getattr(error.orig, "sqlstate", None) != _READ_ONLY_SQLSTATE:
                raise
            raise self._unavailable(action, error) from error

    def _unavailable(self, action: str, error: Exception) -> StoreUnavailable:
        cause = getattr(error, "orig", None) or error
        detail = (str(cause).strip().splitlines() or [""])[0]
        if self._url.password:
            detail = detail.replace(str(self._url.password), "***")
        reason = f"{action} failed: {type(cause).__name__}: {detail}"
        logger.warning("feedback store %s unavailable: %s", self.redacted_url, reason)
        return StoreUnavailable(reason)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("feedback store timestamps must be timezone-aware")
    return value.astimezone(timezone.utc)


def _feedback_row(service_id: str, item: Feedback, received_at: datetime, unknown: bool) -> dict[str, Any]:
    reason = item.override_reason or OverrideReason()
    return {
        "service_id": service_id,
        "card_uuid": item.card,
        "outcome": item.outcome,
        "accepted_suggestions": list(item.accepted_suggestions),
        "override_system": reason.system,
        "override_code": reason.code,
        "override_display": reason.display,
        "user_comment": reason.user_comment,
        "outcome_timestamp": item.outcome_timestamp,
        "received_at": received_at,
        "unknown_card": unknown,
        "dedupe_key": dedupe_key(service_id, item),
    }


def _make_parent_directory(url: URL) -> None:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any, *, busy_timeout: float) -> None:
    # SQLAlchemy's documented recipe: sqlite3 stops emitting BEGIN itself (it skips it for SELECT and DDL),
    # and _sqlite_on_begin emits it. WAL lets readers run beside the one writer; the mode is kept in the file.
    dbapi_connection.isolation_level = None
    give_up = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            # Switching a new file to WAL takes an exclusive lock. When several connections switch it at once
            # (gunicorn workers starting together), SQLite answers SQLITE_BUSY at once rather than calling the
            # busy handler (waiting could deadlock), so the busy timeout never applies and a worker failed to
            # start with "database is locked". Wait and retry for as long as the busy timeout would have.
            busy = getattr(error, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() + pause > give_up:
                raise
        finally:
            cursor.close()
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _sqlite_on_begin(conn: Connection, *, busy_timeout: float) -> None:
    # What is left of the busy timeout after the wait for this process's turn (_bounded), else all of it.
    wait = _SQLITE_FILE_WAIT.get()
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {int((busy_timeout if wait is None else wait) * 1000)}")
    # A writer takes the write lock at BEGIN: a deferred transaction that reads, then writes, gets SQLITE_BUSY
    # at once when another worker committed in between, and the busy timeout cannot help it.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITES) else "BEGIN")
