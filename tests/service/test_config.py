"""Configuration: defaults, environment, overrides, and a clear error for every bad value."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from service.config import OPTIONS, ConfigError, Settings, load_settings, warn_if_insecure

LOCAL = {"CDS_AUTH": "disabled"}


def test_options_and_settings_fields_match() -> None:
    assert [o.name.lower() for o in OPTIONS] == [f.name for f in fields(Settings)]


def test_auth_is_required_by_default() -> None:
    with pytest.raises(ConfigError, match="CDS_PUBLIC_BASE_URL is required"):
        load_settings({})


def test_local_defaults() -> None:
    settings = load_settings(LOCAL)
    assert not settings.auth_enabled
    assert settings.database_url == "sqlite:///var/feedback.sqlite3"
    assert settings.max_body_bytes == 16 * 1024 * 1024
    assert settings.fhir_deadline_seconds == 2.0
    assert settings.fhir_allowed_bases == ()
    assert settings.cors_origins == ()
    assert settings.jwt_algorithms == ("ES384", "RS384")


def test_environment_then_overrides() -> None:
    settings = load_settings({**LOCAL, "CDS_MAX_BODY_BYTES": "1024", "CDS_CORS_ORIGINS": "https://a.example, https://b.example/"},
                             {"fhir_deadline_seconds": 0.5, "FHIR_ALLOW_ANONYMOUS": True})
    assert settings.max_body_bytes == 1024
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert settings.fhir_deadline_seconds == 0.5
    assert settings.fhir_allow_anonymous is True


@pytest.mark.parametrize("name, value", [
    ("CDS_AUTH", "off"),
    ("CDS_MAX_BODY_BYTES", "lots"),
    ("CDS_MAX_BODY_BYTES", "0"),
    ("CDS_FHIR_DEADLINE_SECONDS", "-1"),
    ("CDS_FHIR_DEADLINE_SECONDS", "nan"),
    ("CDS_FHIR_ALLOW_ANONYMOUS", "maybe"),
    ("CDS_CORS_ORIGINS", "*,https://a.example"),
    ("CDS_CORS_ORIGINS", "a.example"),
    ("CDS_FHIR_ALLOWED_BASES", "ehr.example.org/fhir"),
    ("CDS_PUBLIC_BASE_URL", "https://cds.example.org/?x=1"),
    ("CDS_LOG_LEVEL", "LOUD"),
    ("CDS_DATABASE_URL", "feedback.db"),
    ("CDS_JWT_CLOCK_SKEW_SECONDS", "-5"),
    ("CDS_BIND", "nonsense"),
    ("CDS_BIND", "127.0.0.1:http"),
    ("CDS_BIND", ":8080"),
], ids=["auth-off", "body-not-number", "body-zero", "deadline-negative", "deadline-nan", "anonymous-maybe",
        "cors-star-mixed", "cors-no-scheme", "fhir-base-no-scheme", "public-url-with-query", "log-level",
        "database-not-url", "skew-negative", "bind-no-port", "bind-port-not-number", "bind-no-host"])
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({**LOCAL, name: value})


@pytest.mark.parametrize("value, expected", [
    ("https://cds.example.org/", "https://cds.example.org"),
    (" https://cds.example.org/cds/ ", "https://cds.example.org/cds"),
], ids=["trailing-slash", "prefix-and-spaces"])
def test_public_base_url_is_the_audience_prefix_without_a_trailing_slash(value: str, expected: str) -> None:
    # The JWT aud must equal this plus the path called ("/cds-services"): kept as written, a trailing slash
    # made it ".org//cds-services", which no client sends, so every token was refused.
    assert load_settings({**LOCAL, "CDS_PUBLIC_BASE_URL": value}).public_base_url == expected


@pytest.mark.parametrize("value, origins", [
    ("https://EHR.Example.org", ("https://ehr.example.org",)),
    ("HTTPS://ehr.example.org:443, http://localhost:80", ("https://ehr.example.org", "http://localhost")),
    ("https://ehr.example.org:8443", ("https://ehr.example.org:8443",)),
], ids=["host-case", "default-port", "other-port"])
def test_cors_origins_are_written_as_browsers_send_them(value: str, origins: tuple[str, ...]) -> None:
    # A browser's Origin header is the serialised origin (RFC 6454 §6.1): lower-case scheme and host, no default
    # port. An origin configured otherwise never matched it, and the browser refused every answer.
    assert load_settings({**LOCAL, "CDS_CORS_ORIGINS": value}).cors_origins == origins


@pytest.mark.parametrize("value", [
    "https://ehr.example.org/app", "https://user@ehr.example.org",
], ids=["path", "userinfo"])
def test_a_cors_origin_that_no_browser_can_send_stops_the_start(value: str) -> None:
    with pytest.raises(ConfigError, match="CDS_CORS_ORIGINS"):
        load_settings({**LOCAL, "CDS_CORS_ORIGINS": value})


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(LOCAL, {"NOT_A_SETTING": 1})


def test_auth_on_needs_an_issuer_file_that_exists(tmp_path: Path) -> None:
    env = {"CDS_PUBLIC_BASE_URL": "https://cds.example.org"}
    with pytest.raises(ConfigError, match="CDS_TRUSTED_ISSUERS_FILE is required"):
        load_settings(env)
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings({**env, "CDS_TRUSTED_ISSUERS_FILE": str(tmp_path / "missing.json")})


def _gunicorn_config(env: dict[str, str], script: str = "runpy.run_path('gunicorn.conf.py')",
                     ) -> subprocess.CompletedProcess[str]:
    """Read gunicorn.conf.py as gunicorn does, in a fresh interpreter with only ``env`` (and auth off)."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", f"import runpy; {script}"], cwd=root,
                          env={"CDS_AUTH": "disabled", "PATH": "", **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, message", [
    ({"CDS_WORKERS": "many"}, "CDS_WORKERS='many' is invalid"),
    ({"CDS_DATABASE_URL": "foo://x"}, "CDS_DATABASE_URL is invalid: unsupported feedback store backend 'foo'"),
], ids=["bad-workers", "bad-database-url"])
def test_gunicorn_config_exits_non_zero_with_a_clear_message(env: dict[str, str], message: str) -> None:
    result = _gunicorn_config(env)
    assert result.returncode == 2
    assert f"configuration error: {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, value", [
    ("CDS_DATABASE_URL", "mysql://cds@db/cds"),
    ("CDS_DATABASE_URL", "not a url://"),
    ("CDS_JWT_ALGORITHMS", "HS256"),
    ("CDS_JWT_ALGORITHMS", "none"),
    ("CDS_JWT_ALGORITHMS", ","),
], ids=["database-backend", "database-garbage", "jwt-hmac", "jwt-none", "jwt-empty"])
def test_values_the_app_would_refuse_stop_the_start_naming_the_variable(name: str, value: str,
                                                                       tmp_path: Path) -> None:
    # They were checked first when a worker built the app: each worker logged a traceback, and the message
    # (e.g. "algorithms: 'HS256' not allowed") did not name the variable. Auth on: only then is the list used.
    issuers = tmp_path / "issuers.json"
    issuers.write_text('{"issuers": [{"iss": "https://ehr.example.org", "jku": ["https://ehr.example.org/jwks"]}]}',
                       encoding="utf-8")
    env = {"CDS_PUBLIC_BASE_URL": "https://cds.example.org", "CDS_TRUSTED_ISSUERS_FILE": str(issuers)}
    with pytest.raises(ConfigError, match=name):
        load_settings({**env, name: value})


@pytest.mark.parametrize("value", ["", ",", "HS256"])
def test_jwt_algorithms_are_not_checked_with_auth_disabled(value: str) -> None:
    # With CDS_AUTH=disabled the app builds no AuthPolicy and never reads the list: a deployment that left
    # CDS_JWT_ALGORITHMS empty (an unset compose variable) started before the start-time check, then was refused.
    assert load_settings({**LOCAL, "CDS_JWT_ALGORITHMS": value}).auth_enabled is False


def test_an_invalid_trusted_issuers_file_stops_the_start(tmp_path: Path) -> None:
    issuers = tmp_path / "issuers.json"
    issuers.write_text('{"issuers": [}', encoding="utf-8")
    env = {"CDS_PUBLIC_BASE_URL": "https://cds.example.org", "CDS_TRUSTED_ISSUERS_FILE": str(issuers)}
    with pytest.raises(ConfigError, match="CDS_TRUSTED_ISSUERS_FILE is invalid: .*not valid JSON"):
        load_settings(env)
    issuers.write_text('{"issuers": []}', encoding="utf-8")
    with pytest.raises(ConfigError, match="CDS_TRUSTED_ISSUERS_FILE is invalid: .*no client could authenticate"):
        load_settings(env)


@pytest.mark.parametrize("value", ["127.0.0.1:8080", "0.0.0.0:0", "[::1]:9000", "localhost:80", "unix:/run/cds.sock"])
def test_bind_addresses_gunicorn_takes(value: str) -> None:
    assert load_settings({**LOCAL, "CDS_BIND": value}).bind == value


def test_gunicorn_logs_at_cds_log_level() -> None:
    # gunicorn's own level was fixed at info: with CDS_LOG_LEVEL=ERROR its INFO lines were still written.
    result = _gunicorn_config({"CDS_LOG_LEVEL": "ERROR"}, "print(runpy.run_path('gunicorn.conf.py')['loglevel'])")
    assert result.stdout.strip() == "error", result.stderr


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
def test_switched_off_protections_are_logged_at_every_log_level(level: str, caplog: pytest.LogCaptureFixture) -> None:
    # Under CDS_LOG_LEVEL=ERROR a WARNING was dropped: a service running without authentication said so nowhere.
    settings = load_settings({}, {"AUTH": "disabled", "FHIR_ALLOW_ANONYMOUS": "true", "CORS_ORIGINS": "*",
                                  "LOG_LEVEL": level})
    logger = logging.getLogger("tests.insecure")
    logger.setLevel(settings.log_level)
    with caplog.at_level(settings.log_level, logger="tests.insecure"):
        warn_if_insecure(settings, logger)
    assert "AUTHENTICATION IS DISABLED" in caplog.text
    assert "CDS_FHIR_ALLOW_ANONYMOUS" in caplog.text and "CDS_CORS_ORIGINS" in caplog.text
