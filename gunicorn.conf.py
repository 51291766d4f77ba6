"""gunicorn settings, read from the same `CDS_*` environment as the app; a bad value stops the start."""

import sys

from service.config import ConfigError, load_settings

try:
    _settings = load_settings()
except ConfigError as error:
    sys.stderr.write(f"neutropenia-cds: configuration error: {error}\n")
    sys.exit(2)

bind = _settings.bind
workers = _settings.workers
worker_class = "gthread"
threads = 4
timeout = 30
graceful_timeout = 10
# Our own access log line (route template, status, duration) replaces gunicorn's, which would print the
# full URL with its query string.
accesslog = None
errorlog = "-"
loglevel = "info"
# Room for a JWT of up to CDS's 16 KiB token limit, so an oversized token is refused by the app with a
# 401 OperationOutcome rather than by gunicorn with an HTML 400.
limit_request_field_size = 32768
forwarded_allow_ips = "127.0.0.1"
