"""gunicorn settings, read from the same `CDS_*` environment as the app; a bad value stops the start."""

import json
import socket
import sys
import time
import uuid

from gunicorn import glogging, util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from cds_hooks.request_context import REQUEST_ID
from service.config import ConfigError, load_settings
from service.logs import JsonFormatter

try:
    _settings = load_settings()
except ConfigError as error:
    sys.stderr.write(f"neutropenia-cds: configuration error: {error}\n")
    sys.exit(2)

#: How gunicorn answers a request it cannot parse: (error, status, reason phrase, FHIR issue code, diagnostics).
#: First match wins; the statuses are gunicorn's own (gunicorn/workers/base.py handle_error).
_PARSE_ERRORS = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "too-costly", "the request line is too long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "too-costly",
     "the request header fields are too large or too many"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "not-supported",
     "the transfer coding is not supported"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden", "the request is forbidden"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "not-supported", "the Expect header is not supported"),
    (http_errors.ParseException, 400, "Bad Request", "invalid", "the HTTP request is malformed"),
)


class JsonErrorWorker(ThreadWorker):
    """gunicorn's threaded worker, answering a request it cannot parse with a JSON OperationOutcome.

    gunicorn itself answers such requests (a header over ``limit_request_field_size``, a request line over
    ``limit_request_line``, a header line without a colon) with an HTML page, and logs the offending line
    verbatim: a header line "Bearer <jwt>" put the client's JWT in the log. This answers like the app does
    (every non-2xx an OperationOutcome, never HTML) and logs the error class only, never request content.
    """

    def handle_request(self, req, conn):
        """Serve one request, its body read within ``timeout`` seconds of its headers (``_ReadDeadline``).

        ``timeout`` 0 disables gunicorn's timeout, and so this deadline (as a deadline it was "now": every body not
        read with the headers got a 400).
        """
        if self.cfg.timeout <= 0:
            return super().handle_request(req, conn)
        unreader = conn.parser.unreader
        sock = unreader.sock
        unreader.sock = _ReadDeadline(sock, time.monotonic() + self.cfg.timeout, req)
        try:
            return super().handle_request(req, conn)
        finally:
            unreader.sock = sock

    def handle_error(self, req, client, addr, exc):
        """Answer a parse error with an OperationOutcome; anything else as gunicorn does."""
        match = next((row for row in _PARSE_ERRORS if isinstance(exc, row[0])), None)
        if match is None or isinstance(exc, http_errors.ConfigurationProblem):
            super().handle_error(req, client, addr, exc)
            return
        _, status, reason, code, diagnostics = match
        # Like every answer of the app (openapi.yaml): a request id, the same in the answer and the log line.
        request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        try:
            self.log.warning("invalid request from ip=%s refused with %d (%s)", (addr or ("",))[0], status,
                             type(exc).__name__)
        finally:
            REQUEST_ID.reset(token)
        body = json.dumps({"resourceType": "OperationOutcome",
                           "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]},
                          separators=(",", ":"))
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\nCache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\n\r\n")
        try:
            util.write_nonblock(client, (head + body).encode("ascii"))
        except Exception:  # noqa: BLE001 - the client may be gone; as gunicorn does
            self.log.debug("Failed to send error message.")


class _ReadDeadline:
    """The client socket as the request parser reads it: every ``recv`` ends by one deadline for the request.

    gthread reads a body from a blocking socket with no timeout, and gunicorn's ``timeout`` never fires while the
    worker's main loop runs: a client trickling its body a byte every few seconds held a thread for as long as it
    liked (76 s measured; 8 such clients took every thread of 2 workers). A read past the deadline raises
    ``socket.timeout``, which the app answers with a 400, and closes the connection (where the next request would
    start is unknown; draining the rest would hold the thread again).
    """

    def __init__(self, sock, deadline, req):
        self._sock, self._deadline, self._req = sock, deadline, req

    def recv(self, size, *flags):
        """``sock.recv``, bounded by the time left before the deadline."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self._req.must_close = True
            raise socket.timeout("the request was not received in time")
        prior = self._sock.gettimeout()
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size, *flags)
        except socket.timeout:
            self._req.must_close = True
            raise
        finally:
            self._sock.settimeout(prior)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class JsonLogger(glogging.Logger):
    """gunicorn's own log lines (start, workers booted and lost, parse errors) as JSON lines, like the app's."""

    def setup(self, cfg):
        """Set gunicorn's handlers up, then give them the app's JSON formatter."""
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


bind = _settings.bind
workers = _settings.workers
worker_class = JsonErrorWorker
threads = 4
timeout = 30
graceful_timeout = 10
# Our own access log line (route template, status, duration) replaces gunicorn's, which would print the
# full URL with its query string.
accesslog = None
errorlog = "-"
logger_class = JsonLogger
# gunicorn's own lines (start, workers booted and lost) follow CDS_LOG_LEVEL like the app's, but never below info:
# gunicorn's DEBUG lines carry request bytes ("Ignored premature client disconnection. No more data after:
# b'...Authorization: Bearer <jwt>...'"), and no level may log a token.
loglevel = "info" if _settings.log_level == "DEBUG" else _settings.log_level.lower()
# Room for a JWT of up to CDS's 16 KiB token limit, so an oversized token is refused by the app with a 401.
# A header field beyond this is refused by gunicorn before the app sees it: 431, as an OperationOutcome
# (JsonErrorWorker). A limit must stay: gunicorn buffers every header in memory.
limit_request_field_size = 32768
forwarded_allow_ips = "127.0.0.1"
# gunicorn >= 25.1 opens a control socket under $XDG_RUNTIME_DIR or $HOME by default, through which a local
# process can change the worker count or stop the service; operators manage it with signals and their process
# supervisor instead, and a read-only home (the container) must not stop the start.
control_socket_disable = True
