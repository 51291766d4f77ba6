"""The process's cyclic garbage collector: start-up objects frozen, collections paused while requests run.

Reference counting frees almost everything a request makes, the moment the request ends: its body is JSON parsed
into dicts and lists, a tree without cycles. The cyclic collector, though, is triggered by the count of objects
allocated, and a large request allocates hundreds of thousands: it ran some forty times for a request of 20,000
Observations, three of them full collections walking the whole live request, about 100 of its 380 ms. Pausing the
collector while requests are running costs nothing in memory except the rare reference cycles they make, which are
collected when the last running request ends, and at the latest every :data:`MAX_PAUSE_SECONDS` when requests
overlap without a break.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable

#: The longest the collector stays paused while requests keep overlapping (gthread workers run several at once).
MAX_PAUSE_SECONDS = 2.0

_frozen = False


def freeze_startup_heap() -> None:
    """Exempt the objects alive after the process's first app is made from garbage collection (once per process).

    The start leaves some 100,000 long-lived objects (modules, the fhir.resources models and their pydantic
    schemas), and every full collection walked them all again: about 45 ms each, which a large request (thousands of
    Observations parsed from JSON) triggers about once and one typical request in twenty. Frozen objects are never
    walked but are still freed when no longer referenced; only a reference cycle among them would never be
    collected, so the start's garbage is collected first, and later apps (tests make many) are not frozen.
    """
    global _frozen
    if _frozen:
        return
    gc.collect()
    gc.freeze()
    _frozen = True


class CollectorPause:
    """Counts the running requests; the collector is paused from the first one's start to the last one's end.

    The collector is only ever re-enabled by the pause that disabled it: if something else turned it off, it stays
    off.
    """

    def __init__(self, max_pause_seconds: float = MAX_PAUSE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_pause, self._clock = max_pause_seconds, clock
        self._lock = threading.Lock()
        self._running = 0
        self._paused_since: float | None = None  # set while this pause holds the collector disabled

    @property
    def paused(self) -> bool:
        """Whether this pause holds the collector disabled."""
        return self._paused_since is not None

    def begin(self) -> None:
        """A request starts: pause the collector unless it is paused (or disabled elsewhere) already."""
        with self._lock:
            self._running += 1
            if self._paused_since is None and gc.isenabled():
                gc.disable()
                self._paused_since = self._clock()

    def end(self) -> None:
        """A request ends: resume the collector if it was the last one; collect if paused too long."""
        collect = False
        with self._lock:
            self._running = max(self._running - 1, 0)
            if self._paused_since is None:
                return
            if self._running == 0:
                gc.enable()
                self._paused_since = None
            elif self._clock() - self._paused_since >= self._max_pause:
                collect, self._paused_since = True, self._clock()
        if collect:
            gc.collect()  # outside the lock: the other requests' begin and end need not wait for it


#: This process's pause, shared by every app in it (the collector is per process).
PAUSE = CollectorPause()
