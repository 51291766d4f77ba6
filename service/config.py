"""Configuration: embedded defaults, overlaid by `CDS_`-prefixed environment variables, then by a mapping.

Every value is parsed and checked once, at start; a bad value raises `ConfigError` with a message naming the
variable, and `gunicorn.conf.py` turns that into a clear line on stderr and a non-zero exit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cds_hooks.auth import AuthPolicy, load_trusted_issuers
from cds_hooks.fhir_client import DEFAULT_PORTS, origin
from cds_hooks.store import normalise_url
from service.cards import CardSettings
from service.thresholds import ClinicalPolicy

ENV_PREFIX = "CDS_"
MIB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def _text(value: str) -> str:
    return value.strip()


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _auth_mode(value: str) -> str:
    mode = value.strip().lower()
    if mode not in ("required", "disabled"):
        raise ValueError("must be 'required' or 'disabled'")
    return mode


def _http_url(value: str) -> str:
    url = value.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an absolute http(s) URL without query or fragment")
    return url


def _url_list(value: str) -> tuple[str, ...]:
    return tuple(_http_url(item) for item in _csv(value))


def _origins(value: str) -> tuple[str, ...]:
    items = _csv(value)
    if "*" in items:
        if len(items) > 1:
            raise ValueError("'*' cannot be combined with other origins")
        return items
    return tuple(_origin(item) for item in items)


def _origin(value: str) -> str:
    """A browser origin as browsers send it in ``Origin`` (RFC 6454 §6.1): lower case, no default port, no path.

    The header is compared as a string, so an origin written any other way never matched, and silently.
    """
    url = _http_url(value)
    found = origin(url)
    if urlsplit(url).path or found is None:  # a path, user info or an invalid port
        raise ValueError(f"{value.strip()!r} is not an origin: give scheme://host[:port] only")
    scheme, host, port = found
    host = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
    return f"{scheme}://{host}" + ("" if port == DEFAULT_PORTS[scheme] else f":{port}")


def _bind(value: str) -> str:
    """A gunicorn bind address with its port: gunicorn read "nonsense" as host "nonsense", port 8000, retried
    five times and failed with "Can't connect to ('nonsense', 8000)", naming neither the variable nor the value."""
    bind = value.strip()
    if bind.startswith(("unix:", "fd://")):
        return bind
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080), unix:PATH or fd://FD")
    return bind


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _optional_url(value: str) -> str:
    return _http_url(value) if value.strip() else ""


def _database_url(value: str) -> str:
    url = value.strip()
    if "://" not in url:
        raise ValueError("must be an SQLAlchemy URL such as sqlite:///var/feedback.sqlite3")
    return url


@dataclass(frozen=True)
class Option:
    """One setting: its environment name (without prefix), parser, default and documentation."""

    name: str
    parse: Callable[[str], Any]
    default: str
    doc: str


#: Every setting, in the order the README's configuration table lists them.
OPTIONS: tuple[Option, ...] = (
    Option("AUTH", _auth_mode, "required",
           "`required` (default): every discovery, invoke and feedback call needs a client JWT; "
           "`disabled`: local use only, a warning is logged at every start."),
    # Parsed, not just checked: a trailing slash kept made the audience "https://cds.example.org//cds-services",
    # and every client's token was refused.
    Option("PUBLIC_BASE_URL", _optional_url, "",
           "The public URL clients call, e.g. `https://cds.example.org`; JWT `aud` must equal it plus the "
           "path called. Required when auth is on."),
    Option("TRUSTED_ISSUERS_FILE", _text, "",
           "JSON file of trusted client issuers (pinned JWKS and/or allowlisted `jku`, audiences, tenants). "
           "Required when auth is on."),
    Option("JWT_ALGORITHMS", _csv, "ES384,RS384", "Accepted JWT algorithms (asymmetric only)."),
    Option("JWT_CLOCK_SKEW_SECONDS", _non_negative_int, "60", "Clock skew allowed on `exp`, `nbf`, `iat`."),
    Option("JWT_MAX_LIFETIME_SECONDS", _positive_int, "3600", "Largest accepted `exp - iat`."),
    Option("DATABASE_URL", _database_url, "sqlite:///var/feedback.sqlite3",
           "Feedback store (SQLAlchemy URL): SQLite file, or `postgresql+psycopg://...` for several replicas."),
    Option("MAX_BODY_BYTES", _positive_int, str(16 * MIB), "Largest accepted request body; larger gets 413."),
    Option("CORS_ORIGINS", _origins, "",
           "Comma-separated browser origins allowed to call the service, or `*`. Empty: no cross-origin access."),
    Option("FHIR_ALLOWED_BASES", _url_list, "",
           "Comma-separated `fhirServer` base URLs the fallback fetch may call (SSRF guard). Empty: never fetch."),
    Option("FHIR_ALLOW_ANONYMOUS", _boolean, "false",
           "Fetch from `fhirServer` without `fhirAuthorization` (open test servers, the Sandbox). Dev only."),
    Option("FHIR_DEADLINE_SECONDS", _positive_float, "2.0", "One overall deadline for all fallback fetches."),
    Option("FHIR_MAX_PAGES", _positive_int, "10",
           "Bundle `next` pages followed per prefetch key; also the most `_id` searches (50 ids each) for the "
           "references of one type."),
    Option("FHIR_MAX_RESOURCES", _positive_int, "5000",
           "Resources accepted per prefetch key; also caps the references of one type followed per request."),
    Option("FHIR_MAX_PAGE_BYTES", _positive_int, str(8 * MIB), "Largest FHIR response page read."),
    Option("FHIR_REFETCH_OPERATION_OUTCOME", _boolean, "false",
           "Treat an OperationOutcome prefetch value as absent and fetch the key (default: unavailable)."),
    Option("ANC_CURRENT_DAYS", _positive_int, "7",
           "An ANC older than this many days is stale: reported, not graded (clinical brief §2, DESIGN)."),
    Option("TEMPERATURE_WINDOW_HOURS", _positive_int, "24",
           "Temperatures from the last this many hours are considered (clinical brief §2, DESIGN)."),
    Option("FN_ANC_CUTOFF", _positive_int, "1000",
           "Fever with an ANC below this (cells/uL, at most 1500) is febrile neutropenia (brief §0; CTCAE v5)."),
    Option("CARD_SOURCE_URL", _optional_url, "", "Card `source.url` (default: the project page)."),
    Option("CARD_FEBRILE_NEUTROPENIA_GUIDELINE_URL", _optional_url, "",
           "Link on the febrile-neutropenia card (default: the IDSA guideline)."),
    Option("CARD_NEUTROPENIC_SEPSIS_GUIDELINE_URL", _optional_url, "",
           "Link on the presumed febrile-neutropenia card (default: NICE CG151)."),
    Option("CARD_CTCAE_URL", _optional_url, "", "Link to the CTCAE grading (default: NCI CTEP)."),
    Option("CARD_INFECTION_PREVENTION_URL", _optional_url, "",
           "Link on the infection-prevention card (default: CDC patient page)."),
    Option("LOG_LEVEL", _log_level, "INFO", "Log level; no level logs tokens or patient data."),
    Option("BIND", _bind, "127.0.0.1:8080", "gunicorn bind address (the Docker image binds 0.0.0.0:8080)."),
    Option("WORKERS", _positive_int, "2", "gunicorn worker processes."),
)


@dataclass(frozen=True)
class Settings:
    """All parsed settings. Field names are the option names in lower case."""

    auth: str
    public_base_url: str
    trusted_issuers_file: str
    jwt_algorithms: tuple[str, ...]
    jwt_clock_skew_seconds: int
    jwt_max_lifetime_seconds: int
    database_url: str
    max_body_bytes: int
    cors_origins: tuple[str, ...]
    fhir_allowed_bases: tuple[str, ...]
    fhir_allow_anonymous: bool
    fhir_deadline_seconds: float
    fhir_max_pages: int
    fhir_max_resources: int
    fhir_max_page_bytes: int
    fhir_refetch_operation_outcome: bool
    anc_current_days: int
    temperature_window_hours: int
    fn_anc_cutoff: int
    card_source_url: str
    card_febrile_neutropenia_guideline_url: str
    card_neutropenic_sepsis_guideline_url: str
    card_ctcae_url: str
    card_infection_prevention_url: str
    log_level: str
    bind: str
    workers: int

    @property
    def auth_enabled(self) -> bool:
        """True unless auth was explicitly disabled."""
        return self.auth != "disabled"

    def clinical_policy(self) -> ClinicalPolicy:
        """The clinical numbers a deployment may set (windows and the febrile-neutropenia ANC cut-off)."""
        return ClinicalPolicy(anc_current_window=timedelta(days=self.anc_current_days),
                              temperature_window=timedelta(hours=self.temperature_window_hours),
                              fn_anc_cutoff=Decimal(self.fn_anc_cutoff))

    def card_settings(self) -> CardSettings:
        """Card source and link URLs; the cards quote the same febrile-neutropenia cut-off as the rules."""
        overrides: dict[str, Any] = {name: getattr(self, f"card_{name}") for name in _CARD_URLS
                                     if getattr(self, f"card_{name}")}
        return CardSettings.from_mapping({**overrides, "febrile_neutropenia_anc_below": Decimal(self.fn_anc_cutoff)})


_CARD_URLS = ("source_url", "febrile_neutropenia_guideline_url", "neutropenic_sepsis_guideline_url", "ctcae_url",
              "infection_prevention_url")



def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Parse defaults < ``CDS_*`` environment < ``overrides`` (keys as option names) into Settings."""
    environ = os.environ if environ is None else environ
    overrides = {k.upper().removeprefix(ENV_PREFIX): v for k, v in (overrides or {}).items()}
    unknown = set(overrides) - {o.name for o in OPTIONS}
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        env_name = ENV_PREFIX + option.name
        raw: Any = environ.get(env_name, option.default)
        if option.name in overrides:
            raw = overrides[option.name]
        values[option.name.lower()] = _parse(option, env_name, raw)
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _parse(option: Option, env_name: str, raw: Any) -> Any:
    if not isinstance(raw, str):
        # A test mapping may give typed values; render them as the environment would.
        raw = ",".join(raw) if isinstance(raw, (list, tuple)) else str(raw).lower() if isinstance(raw, bool) else str(raw)
    try:
        return option.parse(raw)
    except ValueError as error:
        raise ConfigError(f"{env_name}={raw!r} is invalid: {error}") from None


def _check_consistency(settings: Settings) -> None:
    if settings.auth_enabled:
        if not settings.public_base_url:
            raise ConfigError("CDS_PUBLIC_BASE_URL is required when CDS_AUTH=required (it is the JWT audience)")
        if not settings.trusted_issuers_file:
            raise ConfigError("CDS_TRUSTED_ISSUERS_FILE is required when CDS_AUTH=required")
        if not Path(settings.trusted_issuers_file).is_file():
            raise ConfigError(f"CDS_TRUSTED_ISSUERS_FILE={settings.trusted_issuers_file!r} is not a readable file")
        try:
            load_trusted_issuers(settings.trusted_issuers_file)
        except ValueError as error:
            raise ConfigError(f"CDS_TRUSTED_ISSUERS_FILE is invalid: {error}") from None
        # Only with auth on: the app builds no AuthPolicy without it, so the list is unused and may be anything.
        try:
            AuthPolicy(issuers={}, algorithms=settings.jwt_algorithms)
        except ValueError as error:
            raise ConfigError(f"CDS_JWT_ALGORITHMS={','.join(settings.jwt_algorithms)!r} is invalid: {error}") from None
    # Checked here, not first when a worker builds the app: there a bad value was a traceback per worker.
    try:
        normalise_url(settings.database_url)
    except ValueError as error:  # the URL itself is not repeated: it may hold a password
        raise ConfigError(f"CDS_DATABASE_URL is invalid: {error}") from None
    try:
        settings.clinical_policy()
    except ValueError as error:
        raise ConfigError(f"CDS_FN_ANC_CUTOFF={settings.fn_anc_cutoff} is invalid: {error}") from None
    if settings.public_base_url:
        try:
            _http_url(settings.public_base_url)
        except ValueError as error:
            raise ConfigError(f"CDS_PUBLIC_BASE_URL={settings.public_base_url!r} is invalid: {error}") from None


def warn_if_insecure(settings: Settings, logger: logging.Logger) -> None:
    """Log loudly when a deployment has switched off a protection, whatever the log level.

    A warning at WARNING was dropped under ``CDS_LOG_LEVEL=ERROR``, so a deployment running without authentication
    said so nowhere; design.md has it said on every start. Under a stricter level the warning is written at it.
    """
    level = max(logging.WARNING, logger.getEffectiveLevel())
    if not settings.auth_enabled:
        logger.log(level, "AUTHENTICATION IS DISABLED (CDS_AUTH=disabled): any caller can invoke this service "
                          "and send feedback. Use this only on a developer machine.")
    if settings.fhir_allow_anonymous:
        logger.log(level, "CDS_FHIR_ALLOW_ANONYMOUS=true: the FHIR fallback fetch runs without an access token.")
    if settings.cors_origins == ("*",):
        logger.log(level, "CDS_CORS_ORIGINS='*': any web origin may call this service.")
