"""The app factory: settings, logging, feedback store, token verifier and the CDS Hooks blueprint.

gunicorn runs ``service.app:create_app()``; tests call ``create_app({...})`` with overrides.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from flask import Flask

from cds_hooks.auth import AuthPolicy, TokenVerifier, load_trusted_issuers
from cds_hooks.blueprint import ProtocolOptions, create_blueprint
from cds_hooks.fhir_client import FhirFetcher
from cds_hooks.prefetch import FetchPolicy
from cds_hooks.registry import ServiceRegistry
from cds_hooks.replay import SharedReplayCache
from cds_hooks.store import FeedbackStore
from service.config import Settings, load_settings, warn_if_insecure
from service.definition import neutropenia_service
from service.logs import configure_logging

log = logging.getLogger("service.app")

#: Whether this process's start-up objects were moved to the collector's permanent generation (once per process).
_startup_heap_frozen = False


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
    log.info("neutropenia-cds ready", extra={"service_id": "neutropenia-patient-view"})
    _freeze_startup_heap()
    return app


def _freeze_startup_heap() -> None:
    """Exempt the objects alive after the process's first app is made from garbage collection (once per process).

    The start leaves some 100,000 long-lived objects (modules, the fhir.resources models and their pydantic
    schemas), and every full collection walked them all again: about 45 ms each, which a large request (thousands of
    Observations parsed from JSON) triggers about once and one typical request in twenty. Frozen objects are never
    walked but are still freed when no longer referenced; only a reference cycle among them would never be
    collected, so the start's garbage is collected first, and later apps (tests make many) are not frozen.
    """
    global _startup_heap_frozen
    if _startup_heap_frozen:
        return
    gc.collect()
    gc.freeze()
    _startup_heap_frozen = True


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
