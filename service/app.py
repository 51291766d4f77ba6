"""The app factory: settings, logging, feedback store, token verifier and the CDS Hooks blueprint.

gunicorn runs ``service.app:create_app()``; tests call ``create_app({...})`` with overrides.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from flask import Flask, g

from cds_hooks.auth import AuthPolicy, TokenVerifier, load_trusted_issuers
from cds_hooks.blueprint import ProtocolOptions, create_blueprint
from cds_hooks.fhir_client import FhirFetcher
from cds_hooks.prefetch import FetchPolicy
from cds_hooks.registry import ServiceRegistry
from cds_hooks.replay import SharedReplayCache
from cds_hooks.store import FeedbackStore
from service import heap
from service.config import Settings, load_settings, warn_if_insecure
from service.definition import neutropenia_service
from service.logs import configure_logging

log = logging.getLogger("service.app")


def create_app(config: Mapping[str, Any] | None = None, *,
               environ: Mapping[str, str] | None = None,
               clock: Callable[[], datetime] | None = None,
               new_uuid: Callable[[], Any] = uuid.uuid4) -> Flask:
    """Create the Flask app from defaults < ``CDS_*`` environment < ``config`` overrides."""
    settings = load_settings(environ, config)
    configure_logging(settings.log_level)
    warn_if_insecure(settings, log)

    store = FeedbackStore(settings.database_url)
    # Not fatal when the database is down: a worker that gunicorn boots (or re-boots after a crash) during a
    # database outage must still serve cards; feedback answers 503 and /readyz fails until the database is back.
    store.create_schema(defer_if_unavailable=True)
    fetch_policy = FetchPolicy(
        allowed_bases=settings.fhir_allowed_bases,
        deadline_seconds=settings.fhir_deadline_seconds,
        max_pages=settings.fhir_max_pages,
        max_resources=settings.fhir_max_resources,
        max_page_bytes=settings.fhir_max_page_bytes,
        allow_anonymous=settings.fhir_allow_anonymous,
        operation_outcome_refetch=settings.fhir_refetch_operation_outcome,
    )
    options = ProtocolOptions(public_base_url=settings.public_base_url, max_body_bytes=settings.max_body_bytes,
                              cors_origins=settings.cors_origins, fetch_policy=fetch_policy)
    blueprint_kwargs: dict[str, Any] = {"new_uuid": new_uuid}
    if clock is not None:
        blueprint_kwargs["clock"] = clock

    app = Flask(__name__)
    # One byte over the limit: werkzeug truncates a body without Content-Length at this length instead of
    # refusing it, and the blueprint then sees more than the limit and answers 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.url_map.strict_slashes = False
    app.register_blueprint(create_blueprint(
        ServiceRegistry([neutropenia_service(settings.clinical_policy(), settings.card_settings())]),
        options=options,
        store=store,
        verifier=_verifier(settings, store),
        fetcher=FhirFetcher(),
        **blueprint_kwargs,
    ))
    app.extensions["neutropenia_cds"] = {"settings": settings, "store": store}
    pause_collector_during_requests(app)
    log.info("neutropenia-cds ready", extra={"service_id": "neutropenia-patient-view"})
    heap.freeze_startup_heap()
    return app


def _verifier(settings: Settings, store: FeedbackStore) -> TokenVerifier | None:
    if not settings.auth_enabled:
        return None
    policy = AuthPolicy(
        issuers=load_trusted_issuers(settings.trusted_issuers_file),
        algorithms=settings.jwt_algorithms,
        clock_skew_seconds=settings.jwt_clock_skew_seconds,
        max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
    )
    return TokenVerifier(policy, replay_cache=SharedReplayCache(store))


def pause_collector_during_requests(app: Flask, pause: heap.CollectorPause = heap.PAUSE) -> None:
    """Pause the cyclic collector from the start of each of ``app``'s requests to its teardown."""

    @app.before_request
    def _pause() -> None:
        pause.begin()
        g.collector_paused = True

    @app.teardown_request
    def _resume(_error: BaseException | None) -> None:
        # Teardown runs even when an earlier before-request hook answered first, and _pause never ran.
        if g.pop("collector_paused", False):
            pause.end()
