"""A small, bounded load generator for black-box tests against the service on loopback.

Threads, each with its own ``requests.Session``, send a mix of patient-view invokes (fixture requests with their
prefetch, moved to now, each with a fresh ``hookInstance``) and feedback batches until told to stop. Every
feedback report names a card uuid never used before (a card an invoke returned, or a made-up one), so each
report is a distinct row in the store and an acknowledged report can be looked up by its card uuid. Every
exchange is recorded (`Exchange`): what it was, when, the status, or the connection-level error.

Nothing here asserts: the tests decide what the figures must be.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from cds_hooks.testing.fixtures import to_now

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
SERVICE = "neutropenia-patient-view"

INVOKE = "invoke"
FEEDBACK = "feedback"


def fixture_requests(fixtures: Path = FIXTURES) -> list[dict[str, Any]]:
    """Every fixture request whose expected status is 200, with its prefetch, its times moved to now."""
    bodies = []
    for path in sorted(fixtures.glob("patient-view.*.request.json")):
        expected = json.loads(path.with_name(path.name.replace(".request.json", ".expected.json")).read_text())
        if expected.get("status") == 200:
            bodies.append(to_now(json.loads(path.read_text())))
    return bodies


@dataclass(frozen=True)
class Exchange:
    """One request: its kind, when it started and finished (``time.monotonic()``), and how it ended.

    ``status`` is None when it failed at the connection level (``error`` says how). ``reports`` are the card
    uuids of a feedback batch; ``cards`` the uuids an invoke returned. ``outcome`` is True when a non-200 body
    was a JSON OperationOutcome; ``retry_after`` is the Retry-After header, if any.
    """

    kind: str
    started: float
    finished: float
    status: int | None
    error: str | None = None
    reports: tuple[str, ...] = ()
    cards: tuple[str, ...] = ()
    outcome: bool = False
    retry_after: str | None = None


@dataclass
class LoadGenerator:
    """Mixed invoke + feedback traffic from ``threads`` threads until ``stop()``; use as a context manager.

    ``token(url)`` returns a bearer token per request (None: no Authorization header). ``feedback_share`` is the
    fraction of requests that are feedback batches of 1 to 3 reports.
    """

    base_url: str
    invoke_bodies: Sequence[Mapping[str, Any]]
    threads: int = 6
    feedback_share: float = 0.5
    token: Callable[[str], str | None] = lambda url: None
    timeout: float = 15.0
    exchanges: list[Exchange] = field(default_factory=list)
    _cards: deque[str] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _failures: list[BaseException] = field(default_factory=list)

    @property
    def invoke_url(self) -> str:
        return f"{self.base_url}/cds-services/{SERVICE}"

    @property
    def feedback_url(self) -> str:
        return f"{self.base_url}/cds-services/{SERVICE}/feedback"

    def start(self) -> LoadGenerator:
        for index in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(index,), name=f"load-{index}", daemon=True)
            self._workers.append(worker)
            worker.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for the requests in flight (each bounded by ``timeout``)."""
        self._stopping.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)
        alive = [w.name for w in self._workers if w.is_alive()]
        if alive:
            raise RuntimeError(f"load threads did not stop: {alive}")
        if self._failures:
            raise RuntimeError("a load thread failed") from self._failures[0]

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def snapshot(self) -> list[Exchange]:
        """The exchanges recorded so far."""
        with self._lock:
            return list(self.exchanges)

    # --- one thread -------------------------------------------------------------------------------------------

    def _loop(self, index: int) -> None:
        rng = random.Random(index)
        try:
            with requests.Session() as session:
                while not self._stopping.is_set():
                    if rng.random() < self.feedback_share:
                        exchange = self.send_feedback(session, rng.randint(1, 3))
                    else:
                        exchange = self.send_invoke(session, rng.choice(self.invoke_bodies))
                    with self._lock:
                        self.exchanges.append(exchange)
                    if exchange.status is None:
                        time.sleep(0.05)  # the worker died under us: let gunicorn replace it
        except BaseException as error:  # reported by stop(); a bug here must not look like a quiet run
            self._failures.append(error)

    def send_invoke(self, session: requests.Session, body: Mapping[str, Any]) -> Exchange:
        """POST one hook request (a fresh hookInstance); the cards it returns feed later feedback."""
        request = {**body, "hookInstance": str(uuid.uuid4())}
        exchange = self._post(session, INVOKE, self.invoke_url, request)
        return exchange

    def send_feedback(self, session: requests.Session, count: int) -> Exchange:
        """POST a batch of ``count`` reports, each about a card uuid never reported on before."""
        cards = []
        with self._lock:
            while self._cards and len(cards) < count:
                cards.append(self._cards.popleft())
        cards += [f"load-{uuid.uuid4()}" for _ in range(count - len(cards))]
        items = [feedback_report(card) for card in cards]
        return self._post(session, FEEDBACK, self.feedback_url, {"feedback": items}, reports=tuple(cards))

    def _post(self, session: requests.Session, kind: str, url: str, body: Any,
              reports: tuple[str, ...] = ()) -> Exchange:
        headers = {"Accept": "application/json"}
        token = self.token(url)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        started = time.monotonic()
        try:
            response = session.post(url, json=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as error:
            return Exchange(kind, started, time.monotonic(), None, type(error).__name__, reports)
        finished = time.monotonic()
        cards: tuple[str, ...] = ()
        outcome = False
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code == 200 and kind == INVOKE and isinstance(payload, dict):
            cards = tuple(card["uuid"] for card in payload.get("cards", []))
            with self._lock:
                self._cards.extend(cards)
        elif isinstance(payload, dict):
            outcome = payload.get("resourceType") == "OperationOutcome"
        return Exchange(kind, started, finished, response.status_code, None, reports, cards, outcome,
                        response.headers.get("Retry-After"))


def feedback_report(card: str) -> dict[str, Any]:
    """A Sandbox-like report on ``card``: overridden, timestamped now (with microseconds)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"card": card, "outcome": "overridden", "outcomeTimestamp": now}


@dataclass(frozen=True)
class Figures:
    """What a run did, for printing and asserting."""

    sent: int
    by_kind: Mapping[str, int]
    statuses: Mapping[str, int]
    connection_errors: int
    acknowledged: frozenset[str]

    def __str__(self) -> str:
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(self.statuses.items()))
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.by_kind.items()))
        return (f"requests sent={self.sent} ({kinds}); statuses: {statuses}; "
                f"connection errors={self.connection_errors}; acknowledged feedback reports={len(self.acknowledged)}")


def figures(exchanges: Iterable[Exchange]) -> Figures:
    """Totals over ``exchanges``; acknowledged = the card uuids of every report in a batch answered 200."""
    items = list(exchanges)
    statuses = Counter(f"{e.kind}:{e.status if e.status is not None else 'conn-error'}" for e in items)
    acknowledged = frozenset(card for e in items if e.kind == FEEDBACK and e.status == 200 for card in e.reports)
    return Figures(sent=len(items), by_kind=Counter(e.kind for e in items), statuses=statuses,
                   connection_errors=sum(e.status is None for e in items), acknowledged=acknowledged)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Poll ``predicate`` until it is true; return the seconds it took, or raise TimeoutError."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)
