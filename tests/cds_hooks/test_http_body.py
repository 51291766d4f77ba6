"""Reading a response body by a deadline and up to a size (the FHIR client and the JWK Set fetcher share it)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cds_hooks.http_body import BodyTooLarge, bounded_chunks


class _Raw:
    """A body that yields ``chunks``, one per read, each after ``delay`` seconds."""

    def __init__(self, chunks: list[bytes], delay: float = 0.0) -> None:
        self.chunks, self.delay, self.connection = list(chunks), delay, None

    def read1(self, size: int, decode_content: bool = True) -> bytes:
        time.sleep(self.delay)
        return self.chunks.pop(0) if self.chunks else b""


class _Response:
    def __init__(self, chunks: list[bytes], *, delay: float = 0.0, length: str = "") -> None:
        self.raw = _Raw(chunks, delay)
        self.headers = {"Content-Length": length} if length else {}


def read(response: Any, **limits: Any) -> bytes:
    return b"".join(bounded_chunks(response, **{"deadline": time.monotonic() + 5, "max_bytes": 100, **limits}))


def test_the_body_is_read_whole_within_its_limits() -> None:
    assert read(_Response([b"ab", b"cd"])) == b"abcd"


def test_a_body_of_exactly_the_size_is_read() -> None:
    assert read(_Response([b"x" * 60, b"x" * 40], length="100")) == b"x" * 100


def test_a_body_is_read_with_less_than_a_second_left() -> None:
    assert read(_Response([b"ab", b"cd"]), deadline=time.monotonic() + 0.5) == b"abcd"


class _Socket:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def settimeout(self, seconds: float) -> None:
        self.timeouts.append(seconds)


def test_each_socket_read_waits_at_most_the_time_left() -> None:
    # requests' read timeout is set once, when the exchange begins: a server that sends a little and then stalls
    # would hold the thread that long past the deadline unless each read is given only what is left.
    response = _Response([b"ab", b"cd"])
    sock = _Socket()
    response.raw.connection = type("Connection", (), {"sock": sock})()
    assert read(response, deadline=time.monotonic() + 2) == b"abcd"
    assert len(sock.timeouts) == 3 and all(0 < t <= 2 for t in sock.timeouts)
    assert sock.timeouts == sorted(sock.timeouts, reverse=True)


@pytest.mark.parametrize("response", [
    pytest.param(_Response([b"x"], length="101"), id="declared-over"),
    pytest.param(_Response([b"x" * 60, b"x" * 41]), id="sent-over"),
])
def test_a_body_over_the_size_is_refused(response: _Response) -> None:
    with pytest.raises(BodyTooLarge):
        read(response)


def test_a_body_still_arriving_at_the_deadline_is_cut_off() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read(_Response([b"x"] * 50, delay=0.05), deadline=time.monotonic() + 0.2)
    assert time.monotonic() - started < 1.0
