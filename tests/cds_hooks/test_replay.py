"""The shared jti replay cache: a token id is accepted once across processes sharing the database."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from cds_hooks.replay import SharedReplayCache
from cds_hooks.store import FeedbackStore
from tests.cds_hooks.test_store import store_url  # noqa: F401  (SQLite and PostgreSQL)

NOW = 1_741_608_000.0
KEY = ("https://sandbox.cds-hooks.org", "0b8a6c3e-jti")


@pytest.fixture
def two_workers(store_url: str) -> Iterator[tuple[SharedReplayCache, SharedReplayCache, list[float]]]:  # noqa: F811
    """Two caches over two engines on one database, as two gunicorn workers have, with a shared fake clock."""
    clock = [NOW]
    stores = [FeedbackStore(store_url), FeedbackStore(store_url)]
    stores[0].create_schema()
    yield (SharedReplayCache(stores[0], clock=lambda: clock[0]),
           SharedReplayCache(stores[1], clock=lambda: clock[0]), clock)
    for store in stores:
        store.dispose()


def test_a_jti_is_accepted_once_across_workers(two_workers: tuple[SharedReplayCache, SharedReplayCache,
                                                                  list[float]]) -> None:
    first, second, _ = two_workers
    assert first.add_if_new(KEY, NOW + 300) is True
    assert second.add_if_new(KEY, NOW + 300) is False
    assert first.add_if_new(KEY, NOW + 300) is False
    assert second.add_if_new((KEY[0], "another-jti"), NOW + 300) is True
    assert first.add_if_new(("https://other-issuer", KEY[1]), NOW + 300) is True


def test_an_expired_jti_may_be_seen_again(two_workers: tuple[SharedReplayCache, SharedReplayCache,
                                                             list[float]]) -> None:
    first, second, clock = two_workers
    assert first.add_if_new(KEY, NOW + 300) is True
    clock[0] = NOW + 301
    assert second.add_if_new(KEY, NOW + 601) is True
    assert first.add_if_new(KEY, NOW + 601) is False


def test_database_down_falls_back_to_the_process_cache(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: every connection is refused, as when PostgreSQL is down.
    store = FeedbackStore("postgresql+psycopg://cds:pw@127.0.0.1:1/cds", connect_timeout=1)
    cache = SharedReplayCache(store, clock=lambda: NOW)
    caplog.set_level(logging.ERROR)
    try:
        assert cache.add_if_new(KEY, NOW + 300) is True
        assert cache.add_if_new(KEY, NOW + 300) is False
        assert "replay store unavailable" in caplog.text
    finally:
        store.dispose()
