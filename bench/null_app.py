"""The do-nothing endpoint: receives the same body as the service and answers ``{"cards": []}``.

Served by gunicorn with the service's own ``gunicorn.conf.py`` (``bench.null_app:app``), it is the floor the
service's HTTP throughput is compared with: what HTTP, gunicorn and Flask cost before any work is done.
"""

from __future__ import annotations

from flask import Flask, Response, request

from service.definition import SERVICE_ID

app = Flask(__name__)


@app.post(f"/cds-services/{SERVICE_ID}")
def invoke() -> Response:
    """Read the whole body, do nothing with it, answer no cards."""
    request.get_data()
    return Response('{"cards":[]}', status=200, mimetype="application/json")


@app.get("/healthz")
def healthz() -> Response:
    """Liveness, as the service answers it."""
    return Response('{"status":"ok"}', status=200, mimetype="application/json")
