"""Reading an HTTP response body that a server may send slowly or without end: by a deadline, up to a size.

Shared by the FHIR client and the JWK Set fetcher. requests' ``timeout`` bounds each socket operation, set once
when the request begins, not the exchange; ``iter_content(n)`` blocks until ``n`` bytes arrive. A server trickling
a byte at a time could so hold a thread far past any deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import requests


class BodyTooLarge(ValueError):
    """The body is (or says it is) larger than allowed."""


def bounded_chunks(response: requests.Response, *, deadline: float, max_bytes: int,
                   chunk_size: int = 65536) -> Iterator[bytes]:
    """The chunks of a streamed ``response`` body, all by ``deadline`` (``time.monotonic()``), in ``max_bytes``.

    Raises BodyTooLarge past ``max_bytes`` (also when ``Content-Length`` says so, before reading), and TimeoutError
    when the deadline passes; a socket read that waits out the time left raises urllib3's ReadTimeoutError.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"larger than {max_bytes} bytes")
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the body was not received by the deadline")
        # Each read may only wait for what is left now, and read1 returns what one socket read yields.
        _limit_socket_wait(response, left)
        chunk = response.raw.read1(chunk_size, decode_content=True)
        if not chunk:
            return
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"larger than {max_bytes} bytes")
        yield chunk


def _limit_socket_wait(response: requests.Response, seconds: float) -> None:
    """Make the next socket read of ``response`` wait at most ``seconds`` (the connection's socket, if any)."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)
