"""The ``neutropenia-cds`` console script: call a CDS service as an EHR would, send feedback, make dev keys.

``invoke`` fetches discovery, fills the service's prefetch templates from a FHIR server (or sends a fixture's
prefetch, shifted to now), signs a JWT with a local key, calls the hook and prints the cards; ``feedback``
accepts suggestions or overrides a card; ``keys`` writes a development key pair and the trusted-issuer file
the service needs; ``fhir-server`` serves the fixture patients. The EHR behaviour is ``SandboxClient``'s and the
rendering is ``cds_hooks.testing.console``'s: this module parses arguments and reports errors in one line.

Exit codes: 0 success; 1 the call failed (service or FHIR server unreachable, a non-200 answer, a bad key or
fixture file); 2 bad arguments (argparse's usage message).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import requests
from cryptography.exceptions import UnsupportedAlgorithm

from cds_hooks.testing import console
from cds_hooks.testing.client import SandboxClient
from cds_hooks.testing.fixtures import birth_date_relative, move_birth_dates, to_now
from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config

PROG = "neutropenia-cds"
#: This project's service (service.definition.SERVICE_ID; not imported, so the client never loads the engine).
DEFAULT_SERVICE = "neutropenia-patient-view"
#: The issuer ``keys`` registers and ``invoke`` signs as by default: a URI that names no real EHR.
DEV_ISS = "urn:neutropenia-cds:dev-client"
#: The Sandbox's default user (cds-hooks/sandbox main-view.jsx).
DEFAULT_USER = "Practitioner/COREPRACTITIONER1"
KEY_FILE, JWKS_FILE, ISSUERS_FILE = "client-key.pem", "client-jwks.json", "issuers.json"
T = TypeVar("T")


class CliError(Exception):
    """A failure reported as one line on stderr and exit status 1; ``details`` are printed under it."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; see the module docstring for exit codes."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(arguments).parse_args(arguments)
    try:
        result: int = args.run(args)
        return result
    except CliError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        for line in error.details:
            print(f"  {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; the fixture FHIR server's module is imported only when ``argv`` asks for it."""
    parser = argparse.ArgumentParser(prog=PROG, description="Neutropenia CDS: a command-line CDS client, "
                                     "development keys and the fixture FHIR server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    invoke = commands.add_parser("invoke", help="call a CDS service for a fixture or a patient and print the cards",
                                 description="Call a CDS service as an EHR would: discovery, prefetch filled from "
                                 "the FHIR server (or the fixture's, shifted to now), a signed JWT, the hook call.")
    _service_arguments(invoke, f"service id (default: {DEFAULT_SERVICE}, else the only patient-view service)")
    target = invoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--fixture", type=Path, metavar="FILE", help="a patient-view request file from fixtures/")
    target.add_argument("--patient", metavar="ID", help="a Patient id on --fhir-server")
    invoke.add_argument("--fhir-server", type=_http_url, metavar="URL", help="FHIR base URL (sent as fhirServer)")
    invoke.add_argument("--user", metavar="REF", help=f"context.userId (default: the fixture's, else {DEFAULT_USER})")
    invoke.add_argument("--no-prefetch", action="store_true",
                        help="send no prefetch: the service fetches from --fhir-server itself")
    invoke.add_argument("--fhir-token", metavar="TOKEN",
                        help="FHIR access token: used for prefetch and sent as fhirAuthorization")
    invoke.add_argument("--json", action="store_true", help="print the raw JSON response instead of the cards")
    invoke.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the cards (auto: on a terminal unless NO_COLOR is set)")
    invoke.set_defaults(run=run_invoke, parser=invoke)

    feedback = commands.add_parser("feedback", help="accept suggestions of a card, or override it",
                                   description="Send CDS Hooks feedback for one card, as the Sandbox does.")
    _service_arguments(feedback, f"service id (default: {DEFAULT_SERVICE})")
    feedback.add_argument("--card", required=True, metavar="UUID", help="the card's uuid")
    outcome = feedback.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--accept", nargs="+", metavar="SUGGESTION_UUID", help="accept these suggestions")
    outcome.add_argument("--override", action="store_true", help="dismiss the card")
    feedback.add_argument("--reason-system", metavar="S", help="override reason Coding system (with --reason-code)")
    feedback.add_argument("--reason-code", metavar="C", help="override reason code, from the card's overrideReasons")
    feedback.add_argument("--comment", metavar="TEXT", help="override userComment")
    feedback.set_defaults(run=run_feedback, parser=feedback)

    keys = commands.add_parser("keys", help="generate a development key pair and the service's trusted-issuer file",
                               description="Write a private key (mode 0600), its public JWK Set and an "
                               "issuers.json that pins it, and print the CDS_* settings to use.")
    keys.add_argument("--alg", choices=("ES384", "RS384"), default="ES384", help="signing algorithm (default ES384)")
    keys.add_argument("--out-dir", type=Path, default=Path("var/dev-keys"), metavar="DIR",
                      help="default: var/dev-keys (git-ignored)")
    keys.add_argument("--iss", default=DEV_ISS, help=f"the client's issuer (default {DEV_ISS})")
    keys.add_argument("--jku", type=_http_url, metavar="URL", help="where the JWK Set will be published, if anywhere")
    keys.add_argument("--service-url", type=_http_url, default="http://127.0.0.1:8080", metavar="URL",
                      help="the service's public base URL, for the printed settings")
    keys.add_argument("--force", action="store_true", help="overwrite existing files")
    keys.set_defaults(run=run_keys, parser=keys)

    fhir = commands.add_parser("fhir-server", help="serve the fixture patients as a read-only FHIR R4 server")
    if "fhir-server" in argv:
        try:
            module = importlib.import_module("cds_hooks.testing.fhir_server")
        except ImportError as error:
            fhir.set_defaults(run=_missing(f"the fixture FHIR server is not available: {error}"))
        else:
            module.add_arguments(fhir)
            fhir.set_defaults(run=lambda args: _exit_code(module.run(args)))
    return parser


def _service_arguments(parser: argparse.ArgumentParser, service_help: str) -> None:
    parser.add_argument("--service-url", type=_http_url, required=True, metavar="URL",
                        help="the service's base URL, before /cds-services (the JWT aud is built from it)")
    parser.add_argument("--service", metavar="ID", help=service_help)
    parser.add_argument("--key", type=Path, metavar="PEM", help="sign a JWT with this private key (ES384/RS384)")
    parser.add_argument("--iss", help=f"the JWT issuer (default {DEV_ISS})")
    parser.add_argument("--kid", help="the JWT kid (default: the key's RFC 7638 thumbprint)")
    parser.add_argument("--jku", type=_http_url, metavar="URL", help="the JWT jku header")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS", help="per request (default 10)")


def _seconds(value: str) -> float:
    # requests refuses 0 and below with a ValueError, and NaN or infinity fail deeper: a traceback, not a usage line.
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {value!r}")
    return seconds


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def run_invoke(args: argparse.Namespace) -> int:
    """``invoke``: discovery, prefetch, the hook call, the cards."""
    fixture = _load_fixture(args.fixture) if args.fixture else {}
    fhir_server: str | None = args.fhir_server or fixture.get("fhirServer")
    if args.patient and not args.fhir_server:
        args.parser.error("--patient needs --fhir-server")
    if (args.no_prefetch or args.fhir_token) and not fhir_server:
        args.parser.error("--no-prefetch and --fhir-token need --fhir-server")
    client = _client(args)
    service = _pick_service(client, args.service)
    context = {**fixture.get("context", {}), **({"patientId": args.patient} if args.patient else {})}
    context["userId"] = args.user or context.get("userId") or DEFAULT_USER
    prefetch = None if args.no_prefetch else fixture.get("prefetch") if args.fixture else _prefetch(
        client, service, args.fhir_server, context, args.fhir_token)
    authorization = fixture.get("fhirAuthorization")
    if args.fhir_token:
        authorization = {"access_token": args.fhir_token, "token_type": "Bearer", "expires_in": 300,
                         "scope": "patient/*.read", "subject": PROG, "patient": context.get("patientId")}
    started = time.monotonic()
    response = _call("the CDS service", args.service_url, lambda: client.invoke(
        service["id"], context, hook=fixture.get("hook") or service.get("hook") or "patient-view",
        prefetch=prefetch or None, fhir_server=fhir_server, fhir_authorization=authorization))
    elapsed = (time.monotonic() - started) * 1000
    body = _body(response, "the CDS service", print_json=args.json)
    if args.json:
        return 0
    style = console.Styler(console.use_colour(sys.stdout, mode=args.color))
    sent = sorted(prefetch or {})
    omitted = [key for key in service.get("prefetch") or {} if key not in sent]
    about = [f"{service['id']} at {args.service_url}: {response.status_code} in {elapsed:.0f} ms",
             f"patient {context.get('patientId')}, user {context.get('userId')}",
             "prefetch: " + (", ".join(sent) or "none") + (f" (not sent: {', '.join(omitted)})" if omitted else ""),
             f"fhirServer: {fhir_server or 'none'}",
             f"JWT: {client.signer.key.alg} as {client.signer.iss}" if client.signer else "JWT: none"]
    print("\n".join(style(line, console.DIM) for line in about) + "\n")
    sys.stdout.write(console.render_response(body, style=style, width=console.terminal_width()))
    if any(card.get("uuid") for card in body.get("cards") or []):
        print("\n" + style(f"Feedback: {PROG} feedback --service-url {args.service_url} --card CARD_UUID "
                           "(--accept SUGGESTION_UUID | --override [--reason-system S --reason-code C]) "
                           "[same --key/--iss]", console.DIM))
    return 0


def _prefetch(client: SandboxClient, service: Mapping[str, Any], fhir_server: str, context: Mapping[str, Any],
              token: str | None) -> dict[str, Any]:
    """The service's templates filled from ``fhir_server``, as the Sandbox does (after checking it answers)."""
    headers = {"Accept": "application/fhir+json", **({"Authorization": f"Bearer {token}"} if token else {})}
    _call("the FHIR server", fhir_server, lambda: client.session.get(f"{fhir_server}/metadata", headers=headers,
                                                                      timeout=client.timeout))
    return client.prefetch_from(service, fhir_server, context, headers=headers)


def run_feedback(args: argparse.Namespace) -> int:
    """``feedback``: one accepted or overridden report for one card."""
    if bool(args.reason_system) != bool(args.reason_code):
        args.parser.error("--reason-system and --reason-code go together")
    if args.accept and (args.reason_code or args.comment):
        args.parser.error("--reason-system/--reason-code/--comment need --override")
    item: dict[str, Any] = {"card": args.card, "outcome": "accepted" if args.accept else "overridden",
                            "outcomeTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if args.accept:
        item["acceptedSuggestions"] = [{"id": suggestion} for suggestion in args.accept]
    reason: dict[str, Any] = {}
    if args.reason_code:
        reason["reason"] = {"system": args.reason_system, "code": args.reason_code}
    if args.comment:
        reason["userComment"] = args.comment
    if reason:
        item["overrideReason"] = reason
    client = _client(args)
    service_id = args.service or DEFAULT_SERVICE
    response = _call("the CDS service", args.service_url, lambda: client.feedback(service_id, [item]))
    _body(response, "the CDS service")
    what = f"accepted {', '.join(args.accept)}" if args.accept else "overridden" + (
        f" ({args.reason_system}|{args.reason_code})" if args.reason_code else "")
    print(f"Feedback stored by {service_id}: card {args.card} {what}.")
    return 0


def run_keys(args: argparse.Namespace) -> int:
    """``keys``: a private key (0600), its JWK Set, and an issuers.json pinning it; then the settings to use."""
    out_dir: Path = args.out_dir
    paths = {name: out_dir / name for name in (KEY_FILE, JWKS_FILE, ISSUERS_FILE)}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not args.force:
        raise CliError(f"will not overwrite {', '.join(existing)} (use --force, or another --out-dir)")
    signer = TokenSigner(ClientKey.generate(args.alg), iss=args.iss, jku=args.jku)
    entry = signer.issuer_entry()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_private(paths[KEY_FILE], signer.key.private_pem(), force=args.force)
        paths[JWKS_FILE].write_text(json.dumps(signer.jwks(), indent=2) + "\n", encoding="utf-8")
        write_issuer_config(paths[ISSUERS_FILE], [entry])
    except OSError as error:
        raise CliError(f"cannot write the keys to {out_dir}: {error.strerror or error}") from None
    key, jwks, issuers = (paths[name].resolve() for name in (KEY_FILE, JWKS_FILE, ISSUERS_FILE))
    print(f"A development {args.alg} key for issuer {args.iss} (kid {signer.key.kid}). Never use it in production.\n"
          f"  {key}  private key, mode 0600: keep it secret, do not commit it\n"
          f"  {jwks}  public JWK Set: publish it at --jku, or keep it pinned\n"
          f"  {issuers}  trusted-issuer file for the service\n\n"
          f"Trusted-issuer entry (add it to an existing file's \"issuers\" list instead, if you have one):\n"
          f"{json.dumps(entry, indent=2)}\n\n"
          f"Service settings (CDS_PUBLIC_BASE_URL must be the exact base URL clients call; the JWT aud is it "
          f"plus the path):\n"
          f"  CDS_AUTH=required\n  CDS_TRUSTED_ISSUERS_FILE={issuers}\n  CDS_PUBLIC_BASE_URL={args.service_url}\n\n"
          f"Call it:\n  {PROG} invoke --service-url {args.service_url} --key {key} --iss {args.iss}"
          + (f" --jku {args.jku}" if args.jku else "")
          + " --fixture fixtures/patient-view.febrile-neutropenia.request.json")
    return 0


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    """Create ``path`` with mode 0600 from the first byte; never replace a file unless ``force``."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL), 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(descriptor, 0o600)
        handle.write(data)


def _client(args: argparse.Namespace) -> SandboxClient:
    if args.key is None:
        if args.iss or args.kid or args.jku:
            args.parser.error("--iss, --kid and --jku need --key")
        return SandboxClient(args.service_url, timeout=args.timeout)
    try:
        key = ClientKey.load(args.key, kid=args.kid)
    except OSError as error:
        raise CliError(f"cannot read the key file {args.key}: {error.strerror or error}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        reason = str(error.args[0] if error.args else error).split(". ")[0].rstrip(".")
        raise CliError(f"cannot use the key file {args.key}: not a usable unencrypted PEM private key ({reason})") \
            from None
    if key.alg not in ("ES384", "RS384"):
        print(f"{PROG}: warning: the key signs {key.alg}; CDS services expect ES384 or RS384", file=sys.stderr)
    return SandboxClient(args.service_url, TokenSigner(key, iss=args.iss or DEV_ISS, jku=args.jku),
                         timeout=args.timeout)


def _pick_service(client: SandboxClient, wanted: str | None) -> Mapping[str, Any]:
    body = _body(_call("the CDS service", client.base_url, client.discover), "the CDS service (discovery)")
    services = [s for s in body.get("services") or [] if isinstance(s, Mapping) and s.get("id")]
    ids = ", ".join(str(s["id"]) for s in services) or "none"
    if wanted:
        for service in services:
            if service["id"] == wanted:
                return service
        raise CliError(f"discovery at {client.discovery_url} has no service {wanted!r} (it offers: {ids})")
    by_id = {s["id"]: s for s in services}
    patient_view = [s for s in services if s.get("hook") == "patient-view"]
    if DEFAULT_SERVICE in by_id:
        return by_id[DEFAULT_SERVICE]
    if len(patient_view) == 1:
        return patient_view[0]
    raise CliError(f"choose a service with --service (discovery at {client.discovery_url} offers: {ids})")


def _load_fixture(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CliError(f"cannot read the fixture {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise CliError(f"the fixture {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("context"), dict):
        raise CliError(f"the fixture {path} is not a CDS Hooks request (no 'context' object)")
    now = datetime.now(timezone.utc)
    shifted: dict[str, Any] = to_now(data, now)
    # The same clock as the fixture FHIR server and the tests: a marked infant keeps its age.
    return move_birth_dates(shifted, now) if birth_date_relative(path) else shifted


def _call(what: str, url: str, send: Callable[[], T]) -> T:
    """Run ``send``; a network failure becomes a one-line CliError naming ``what`` and ``url``."""
    try:
        return send()
    except requests.Timeout:
        reason = "no answer in time (see --timeout)"
    except requests.exceptions.SSLError:
        reason = "TLS handshake failed"
    except requests.ConnectionError as error:
        text = str(error)
        reason = ("connection refused" if "refused" in text.lower() else
                  "host name not found" if "resolve" in text or "Name or service" in text else
                  "connection closed without an answer" if "aborted" in text or "reset" in text.lower() else
                  "connection failed")
    except requests.RequestException as error:
        reason = type(error).__name__
    raise CliError(f"cannot reach {what} at {url}: {reason}")


def _body(response: requests.Response, what: str, *, print_json: bool = False) -> dict[str, Any]:
    """The JSON object of a 200 response; otherwise a CliError with the OperationOutcome's diagnostics."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if print_json and body is not None:
        print(json.dumps(body, indent=2, ensure_ascii=False))
    if response.status_code == 200 and isinstance(body, dict):
        return body
    method = response.request.method if response.request else "?"
    if response.status_code == 200:
        raise CliError(f"{what} answered {method} {response.url} with 200 but not a JSON object")
    details = console.outcome_lines(body) or ([response.text.strip()[:300]] if response.text.strip() else [])
    if response.status_code in (404, 405) and "/cds-services/cds-services" in response.url:
        details.append("hint: --service-url is the base URL before /cds-services, e.g. http://127.0.0.1:8080")
    if response.status_code == 401:
        details.append("hint: check --key/--iss against the service's trusted issuers, and that --service-url is "
                       "exactly its CDS_PUBLIC_BASE_URL (the JWT aud is the URL called)"
                       if response.request and response.request.headers.get("Authorization")
                       else "hint: the service requires a signed JWT: pass --key and --iss "
                            f"(make one with `{PROG} keys`)")
    raise CliError(f"{what} answered {response.status_code} {_phrase(response.status_code)} to {method} "
                   f"{response.url}", details)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _missing(message: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise CliError(message)
    return run


def _exit_code(result: Any) -> int:
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
