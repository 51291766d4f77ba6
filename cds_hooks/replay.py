"""A `jti` replay cache shared through the feedback store's database, so a token is accepted once across every
gunicorn worker and every replica (CDS Hooks best practice: "jti is unseen").

Each process still keeps its own in-memory cache in front: a replay to the same process is refused without a
database round trip, and if the database is down the per-process cache keeps refusing what it has seen
(the outage is logged) rather than refusing every call, which would hide emergency cards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from cds_hooks.auth import ReplayCache
from cds_hooks.store import FeedbackStore, StoreUnavailable

logger = logging.getLogger("cds_hooks.replay")


class SharedReplayCache:
    """A `JtiStore` backed by the database, with a per-process cache in front and as the fallback."""

    def __init__(self, store: FeedbackStore, *, local: ReplayCache | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._local = local or ReplayCache(clock=clock)
        self._clock = clock

    def add_if_new(self, key: tuple[str, str], expires_at: float) -> bool:
        """True the first time (iss, jti) is seen by any process sharing the database."""
        if not self._local.add_if_new(key, expires_at):
            return False
        try:
            return self._store.remember_jti(key[0], key[1], expires_at, self._clock())
        except StoreUnavailable:
            logger.error("jti replay store unavailable; only this process's cache checked replays")
            return True
