"""The ``neutropenia-cds`` command line: argument errors, unreachable servers, ``keys``, and ``invoke`` and
``feedback`` against the real service under gunicorn (auth on, the key made by ``keys`` trusted)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_hooks.auth import load_trusted_issuers
from cds_hooks.registry import fill_template
from cds_hooks.store import FeedbackStore
from cds_hooks.testing.client import SandboxClient
from cds_hooks.testing.fixtures import to_now
from cds_hooks.testing.tokens import ClientKey
from service import cli
from service.definition import PREFETCH, SERVICE_ID
from tests.support.fhir_stub_server import FhirStub
from tests.support.gunicorn import GunicornServer, free_port, start_gunicorn

ROOT = Path(__file__).resolve().parents[1]
FEBRILE = ROOT / "fixtures" / "patient-view.febrile-neutropenia.request.json"
NO_PREFETCH = ROOT / "fixtures" / "patient-view.no-prefetch.request.json"
FHIR_TOKEN = "demo-fhir-token-7a3c"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)``: (exit status, stdout, stderr); argparse's SystemExit is turned into its status."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("NO_COLOR", raising=False)


def test_default_service_is_the_projects_service() -> None:
    assert cli.DEFAULT_SERVICE == SERVICE_ID


# --- argument errors: argparse's usage and exit status 2, before any network call -----------------------------

URL = "http://127.0.0.1:9"  # the discard port: nothing is ever sent in these cases


@pytest.mark.parametrize(
    ("argv", "message"),
    (
        ((), "the following arguments are required: COMMAND"),
        (("bogus",), "invalid choice: 'bogus'"),
        (("invoke", "--fixture", str(FEBRILE)), "the following arguments are required: --service-url"),
        (("invoke", "--service-url", "ftp://x", "--fixture", str(FEBRILE)), "not an http(s) URL"),
        (("invoke", "--service-url", URL), "one of the arguments --fixture --patient is required"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--patient", "p"), "not allowed with"),
        (("invoke", "--service-url", URL, "--patient", "p"), "--patient needs --fhir-server"),
        (("invoke", "--service-url", URL, "--fixture", str(NO_PREFETCH), "--no-prefetch"),
         "--no-prefetch and --fhir-token need --fhir-server"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--fhir-token", "t"),
         "--no-prefetch and --fhir-token need --fhir-server"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--iss", "x"), "need --key"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--timeout", "soon"), "not a number"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--timeout", "0"), "above 0"),
        (("feedback", "--service-url", URL, "--card", "c", "--override", "--timeout", "-1"), "above 0"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--timeout", "nan"), "above 0"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--timeout", "inf"), "above 0"),
        (("invoke", "--service-url", URL, "--fixture", str(FEBRILE), "--color", "pink"), "invalid choice"),
        (("feedback", "--service-url", URL, "--card", "c"), "one of the arguments --accept --override is required"),
        (("feedback", "--service-url", URL, "--override"), "the following arguments are required: --card"),
        (("feedback", "--service-url", URL, "--card", "c", "--accept", "s", "--override"), "not allowed with"),
        (("feedback", "--service-url", URL, "--card", "c", "--override", "--reason-code", "x"), "go together"),
        (("feedback", "--service-url", URL, "--card", "c", "--accept", "s", "--comment", "x"), "need --override"),
        (("keys", "--alg", "HS256"), "invalid choice: 'HS256'"),
        (("fhir-server", "fixtures", "--no-shift", "--now", "2025-03-10T12:00:00Z"), "not allowed with"),
    ),
    ids=["no-command", "unknown-command", "invoke-no-url", "invoke-bad-url", "invoke-no-target",
         "invoke-two-targets", "patient-without-fhir", "no-prefetch-without-fhir", "token-without-fhir",
         "iss-without-key",
         "bad-timeout", "zero-timeout", "negative-timeout", "nan-timeout", "infinite-timeout", "bad-color", "feedback-no-outcome", "feedback-no-card", "feedback-two-outcomes",
         "reason-code-alone", "comment-with-accept", "keys-bad-alg", "fhir-server-now-and-no-shift"],
)
def test_argument_errors_print_usage_and_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...],
                                                message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert err.startswith("usage: neutropenia-cds") and message in err
    assert out == "" and "Traceback" not in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for command in ("invoke", "feedback", "keys", "fhir-server"):
        assert command in out


# --- servers that are down, and files that cannot be used: one line, exit 1, no traceback ----------------------

def _closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    "argv",
    (
        ("invoke", "--fixture", str(FEBRILE)),
        ("invoke", "--fixture", str(FEBRILE), "--json"),
        ("invoke", "--patient", "p", "--fhir-server", "http://127.0.0.1:9/fhir"),
        ("feedback", "--card", "c", "--override"),
        ("feedback", "--card", "c", "--accept", "s1", "s2"),
    ),
    ids=["invoke-fixture", "invoke-json", "invoke-patient", "feedback-override", "feedback-accept"],
)
def test_service_down_gives_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str],
                                                      argv: tuple[str, ...]) -> None:
    url = _closed_url()
    status, out, err = run(capsys, argv[0], "--service-url", url, *argv[1:])
    assert status == 1
    assert err == f"neutropenia-cds: cannot reach the CDS service at {url}: connection refused\n"
    assert out == ""


def test_service_that_never_answers_times_out_with_a_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:  # accepts connections (the kernel does) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        status, _, err = run(capsys, "invoke", "--service-url", url, "--fixture", str(FEBRILE), "--timeout", "0.3")
    assert status == 1
    assert err == f"neutropenia-cds: cannot reach the CDS service at {url}: no answer in time (see --timeout)\n"


def test_service_down_from_the_console_script_has_no_traceback() -> None:
    url = _closed_url()
    result = subprocess.run([sys.executable, "-m", "service.cli", "invoke", "--service-url", url,
                             "--fixture", str(FEBRILE)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == f"neutropenia-cds: cannot reach the CDS service at {url}: connection refused\n"


@pytest.mark.parametrize(
    ("content", "message"),
    (
        (None, "cannot read the key file {path}: No such file or directory"),
        (b"not a key\n", "cannot use the key file {path}: not a usable unencrypted PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
         "cannot use the key file {path}: not a usable unencrypted PEM private key"),
        (ClientKey.generate("ES384").private_pem(b"secret"),
         "cannot use the key file {path}: not a usable unencrypted PEM private key"),
    ),
    ids=["missing", "not-pem", "bad-der", "encrypted"],
)
def test_bad_key_file_gives_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      content: bytes | None, message: str) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    status, out, err = run(capsys, "invoke", "--service-url", _closed_url(), "--key", str(path),
                           "--fixture", str(FEBRILE))
    assert status == 1 and out == ""
    assert err.startswith("neutropenia-cds: " + message.format(path=path)) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    ((None, "cannot read the fixture"), ("{", "is not valid JSON"), ('{"hook": "patient-view"}', "no 'context'")),
    ids=["missing", "not-json", "not-a-request"],
)
def test_bad_fixture_file_gives_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          content: str | None, message: str) -> None:
    path = tmp_path / "fixture.json"
    if content is not None:
        path.write_text(content)
    status, _, err = run(capsys, "invoke", "--service-url", _closed_url(), "--fixture", str(path))
    assert status == 1 and message in err and "Traceback" not in err


# --- keys --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("alg", "kty"), (("ES384", "EC"), ("RS384", "RSA")), ids=["ES384", "RS384"])
def test_keys_writes_a_private_key_0600_and_an_issuer_file_the_service_accepts(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, alg: str, kty: str) -> None:
    out_dir = tmp_path / "keys"
    old_umask = os.umask(0)  # the key must be 0600 whatever the umask
    try:
        status, out, _ = run(capsys, "keys", "--alg", alg, "--out-dir", str(out_dir), "--iss", "https://ehr.test",
                             "--jku", "https://ehr.test/jwks.json", "--service-url", "http://127.0.0.1:8080")
    finally:
        os.umask(old_umask)
    assert status == 0
    key_path = out_dir / cli.KEY_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = ClientKey.load(key_path)
    assert key.alg == alg
    issuers = load_trusted_issuers(out_dir / cli.ISSUERS_FILE)
    issuer = issuers["https://ehr.test"]
    assert issuer.jku_allowlist == ("https://ehr.test/jwks.json",)
    assert issuer.pinned_keys[key.kid]["kty"] == kty  # the kid invoke will sign with is pinned
    assert json.loads((out_dir / cli.JWKS_FILE).read_text()) == key.jwks()
    assert f"CDS_TRUSTED_ISSUERS_FILE={(out_dir / cli.ISSUERS_FILE).resolve()}" in out
    assert "CDS_PUBLIC_BASE_URL=http://127.0.0.1:8080" in out and "CDS_AUTH=required" in out
    assert '"iss": "https://ehr.test"' in out and "BEGIN" not in out  # the entry is printed, the key never


def test_keys_never_overwrites_unless_forced(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "keys", "--out-dir", str(tmp_path))[0] == 0
    first = (tmp_path / cli.KEY_FILE).read_bytes()
    status, _, err = run(capsys, "keys", "--out-dir", str(tmp_path))
    assert status == 1 and "will not overwrite" in err and "--force" in err
    assert (tmp_path / cli.KEY_FILE).read_bytes() == first
    (tmp_path / cli.KEY_FILE).chmod(0o644)
    assert run(capsys, "keys", "--out-dir", str(tmp_path), "--force")[0] == 0
    assert (tmp_path / cli.KEY_FILE).read_bytes() != first
    assert stat.S_IMODE((tmp_path / cli.KEY_FILE).stat().st_mode) == 0o600


# --- invoke and feedback against the real service -----------------------------------------------------------

@dataclass
class Deployment:
    """The service under gunicorn, its key and store, and a FHIR stub serving the febrile fixture patient."""

    server: GunicornServer
    key: Path
    iss: str
    database_url: str
    fhir: FhirStub
    patient: str

    @property
    def url(self) -> str:
        return self.server.base_url

    def signed(self) -> list[str]:
        return ["--service-url", self.url, "--key", str(self.key), "--iss", self.iss]


def _serve_fixture_patient(stub: FhirStub, fixture: dict[str, Any]) -> str:
    """Serve the fixture's prefetch at the URLs its templates fill to, like a FHIR server holding the patient."""
    context = fixture["context"]
    stub.add("/fhir/metadata", {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                                "fhirVersion": "4.0.1", "format": ["json"]})
    for key, template in PREFETCH.items():
        relative = fill_template(template, context)
        assert relative is not None
        path, _, query = relative.partition("?")
        empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
        stub.add(f"/fhir/{path}", fixture["prefetch"].get(key) or empty, query=query or None)
    return str(context["patientId"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("cli")
    iss = "https://cli-test.example.org"
    assert cli.main(["keys", "--out-dir", str(work / "keys"), "--iss", iss]) == 0
    database_url = f"sqlite:///{work}/feedback.sqlite3"
    with FhirStub() as stub:
        patient = _serve_fixture_patient(stub, to_now(json.loads(FEBRILE.read_text())))
        server = start_gunicorn({
            "CDS_AUTH": "required",
            "CDS_PUBLIC_BASE_URL": "{base_url}",
            "CDS_TRUSTED_ISSUERS_FILE": str(work / "keys" / cli.ISSUERS_FILE),
            "CDS_DATABASE_URL": database_url,
            "CDS_FHIR_ALLOWED_BASES": stub.url("/fhir"),
            "CDS_FHIR_ALLOW_ANONYMOUS": "true",
        }, work / "gunicorn.log")
        try:
            yield Deployment(server, work / "keys" / cli.KEY_FILE, iss, database_url, stub, patient)
        finally:
            server.stop()


gunicorn = pytest.mark.gunicorn


@gunicorn
def test_invoke_fixture_prints_the_critical_card(capsys: pytest.CaptureFixture[str],
                                                 deployment: Deployment) -> None:
    status, out, err = run(capsys, "invoke", *deployment.signed(), "--fixture", str(FEBRILE))
    assert status == 0, err
    assert "[CRITICAL] Febrile neutropenia: ANC 400/uL" in out
    assert "Suggestions (select any):" in out and "card uuid: " in out
    assert "prefetch: conditions, labs, medications, patient, vitals" in out
    assert f"JWT: ES384 as {deployment.iss}" in out
    assert "\x1b[" not in out  # not a terminal: no colour


@gunicorn
def test_invoke_colour_always_colours_the_critical_badge_red(capsys: pytest.CaptureFixture[str],
                                                             deployment: Deployment) -> None:
    status, out, _ = run(capsys, "invoke", *deployment.signed(), "--fixture", str(FEBRILE), "--color", "always")
    assert status == 0 and "\x1b[1;31m[CRITICAL]\x1b[0m" in out


@gunicorn
def test_invoke_json_prints_the_raw_response(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    status, out, _ = run(capsys, "invoke", *deployment.signed(), "--fixture", str(FEBRILE), "--json")
    assert status == 0
    body = json.loads(out)
    assert body["cards"][0]["indicator"] == "critical" and all(card["uuid"] for card in body["cards"])


@gunicorn
def test_invoke_fixture_keeps_a_marked_infants_age(capsys: pytest.CaptureFixture[str],
                                                   deployment: Deployment) -> None:
    # Regression: the CLI moved the fixture's times to now but not the birthDate the fixture marks relative, so
    # the infant grew older with the calendar and was graded on a child's cut-offs.
    request = ROOT / "fixtures" / "patient-view.paediatric-infant-anc-1200.request.json"
    expected = json.loads(request.with_name(request.name.replace(".request.", ".expected.")).read_text())
    assert expected["birthDateRelative"] is True
    status, out, _ = run(capsys, "invoke", *deployment.signed(), "--fixture", str(request), "--json")
    assert status == 0
    assert json.loads(out)["extension"]["org.neutropenia-cds.assessment"].get("findings", []) == expected["findings"]


@gunicorn
@pytest.mark.parametrize("no_prefetch", (False, True), ids=["prefetch-from-fhir", "service-fetches"])
def test_invoke_patient_on_a_fhir_server(capsys: pytest.CaptureFixture[str], deployment: Deployment,
                                         no_prefetch: bool) -> None:
    deployment.fhir.clear_requests()
    status, out, err = run(capsys, "invoke", *deployment.signed(), "--patient", deployment.patient,
                           "--fhir-server", deployment.fhir.url("/fhir"), "--fhir-token", FHIR_TOKEN,
                           *(["--no-prefetch"] if no_prefetch else []))
    assert status == 0, err
    assert "[CRITICAL] Febrile neutropenia" in out
    assert ("prefetch: none" in out) is no_prefetch
    observations = deployment.fhir.requests_for("/fhir/Observation")
    assert len(observations) == 2  # labs and vitals: by the client, or by the service from fhirServer
    # The FHIR token goes to the FHIR server (by the client, or as fhirAuthorization for the service).
    assert {r.authorization for r in observations} == {f"Bearer {FHIR_TOKEN}"}
    # The client checks the FHIR server answers before it prefetches; with --no-prefetch it never calls it.
    assert bool(deployment.fhir.requests_for("/fhir/metadata")) is not no_prefetch


@gunicorn
def test_invoke_fhir_server_down_gives_one_clear_line(capsys: pytest.CaptureFixture[str],
                                                      deployment: Deployment) -> None:
    fhir = _closed_url() + "/fhir"
    status, out, err = run(capsys, "invoke", *deployment.signed(), "--patient", deployment.patient,
                           "--fhir-server", fhir)
    assert status == 1 and out == ""
    assert err == f"neutropenia-cds: cannot reach the FHIR server at {fhir}: connection refused\n"


@gunicorn
@pytest.mark.parametrize(
    ("extra", "expected"),
    (
        ((), ["answered 401 Unauthorized to GET", "pass --key and --iss"]),
        (("--iss", "https://not-trusted.example.org"), ["answered 401 Unauthorized", "trusted issuers"]),
    ),
    ids=["no-token", "untrusted-issuer"],
)
def test_invoke_refused_token_explains_401(capsys: pytest.CaptureFixture[str], deployment: Deployment,
                                           extra: tuple[str, ...], expected: list[str]) -> None:
    key = ("--key", str(deployment.key)) if extra else ()
    status, out, err = run(capsys, "invoke", "--service-url", deployment.url, *key, *extra, "--fixture", str(FEBRILE))
    assert status == 1 and out == "" and "Traceback" not in err
    for text in expected:
        assert text in err


@gunicorn
def test_invoke_wrong_audience_host_is_refused(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    # localhost and 127.0.0.1 are different audiences (cds-clients.md): the JWT aud is the URL called.
    other = deployment.url.replace("127.0.0.1", "localhost")
    status, _, err = run(capsys, "invoke", "--service-url", other, "--key", str(deployment.key),
                         "--iss", deployment.iss, "--fixture", str(FEBRILE))
    assert status == 1 and "401" in err and "CDS_PUBLIC_BASE_URL" in err


@gunicorn
def test_invoke_412_prints_the_operation_outcome_diagnostics(capsys: pytest.CaptureFixture[str],
                                                             deployment: Deployment) -> None:
    status, out, err = run(capsys, "invoke", *deployment.signed(), "--fixture", str(NO_PREFETCH))
    assert status == 1 and out == ""
    assert "answered 412 Precondition Failed to POST" in err
    assert "prefetch key 'labs' was not provided" in err and "[prefetch.labs]" in err


@gunicorn
@pytest.mark.parametrize("command", ("invoke", "feedback"))
def test_service_url_ending_in_cds_services_gets_a_hint(capsys: pytest.CaptureFixture[str],
                                                        deployment: Deployment, command: str) -> None:
    # The service URL is the base before /cds-services; with it, the answer was a bare 405 (or 404) for
    # ".../cds-services/cds-services", which did not say what to change.
    signed = ["--service-url", deployment.url + "/cds-services", *deployment.signed()[2:]]
    target = ["--fixture", str(FEBRILE)] if command == "invoke" else ["--card", "c", "--override"]
    status, _, err = run(capsys, command, *signed, *target)
    assert status == 1 and "/cds-services/cds-services" in err
    assert "hint: --service-url is the base URL before /cds-services" in err


@gunicorn
def test_invoke_unknown_service_lists_what_discovery_offers(capsys: pytest.CaptureFixture[str],
                                                            deployment: Deployment) -> None:
    status, _, err = run(capsys, "invoke", *deployment.signed(), "--service", "nope", "--fixture", str(FEBRILE))
    assert status == 1 and f"has no service 'nope' (it offers: {SERVICE_ID})" in err


@gunicorn
@pytest.mark.parametrize("outcome", ("override", "accept"))
def test_feedback_is_stored(capsys: pytest.CaptureFixture[str], deployment: Deployment, outcome: str) -> None:
    status, out, _ = run(capsys, "invoke", *deployment.signed(), "--fixture", str(FEBRILE), "--json")
    assert status == 0
    card = json.loads(out)["cards"][0]
    if outcome == "override":
        reason = card["overrideReasons"][0]
        argv = ["--override", "--reason-system", reason["system"], "--reason-code", reason["code"],
                "--comment", "seen by the CLI test"]
    else:
        argv = ["--accept", *(s["uuid"] for s in card["suggestions"])]
    status, out, err = run(capsys, "feedback", *deployment.signed(), "--card", card["uuid"], *argv)
    assert status == 0, err
    assert f"card {card['uuid']}" in out
    store = FeedbackStore(deployment.database_url)
    try:
        rows = store.feedback_for_card(card["uuid"])
    finally:
        store.dispose()
    assert len(rows) == 1 and rows[0]["unknown_card"] is False
    if outcome == "override":
        assert rows[0]["outcome"] == "overridden" and rows[0]["override_code"] == card["overrideReasons"][0]["code"]
        assert rows[0]["user_comment"] == "seen by the CLI test"
    else:
        assert rows[0]["outcome"] == "accepted"
        assert rows[0]["accepted_suggestions"] == [s["uuid"] for s in card["suggestions"]]


@gunicorn
def test_feedback_for_unknown_service_prints_the_404_diagnostics(capsys: pytest.CaptureFixture[str],
                                                                 deployment: Deployment) -> None:
    status, _, err = run(capsys, "feedback", *deployment.signed(), "--service", "nope", "--card", "c", "--override")
    assert status == 1 and "answered 404 Not Found" in err and "no CDS service with id 'nope'" in err


# --- make demo: scripts/demo.py end to end (about 3 s) ------------------------------------------------------

DEMO = ROOT / "scripts" / "demo.py"
UP = re.compile(r"is up: (http://127\.0\.0\.1:\d+)/")


def _demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDS_", "DEMO_"))}
    return {**env, "NO_COLOR": "1", "COLUMNS": "100", **extra}


def _refuses(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.ConnectionError:
        return True
    return False


@pytest.fixture
def demo_prerequisites() -> None:
    pytest.importorskip("cds_hooks.testing.fhir_server", reason="the fixture FHIR server is not in this tree")


@gunicorn
@pytest.mark.usefixtures("demo_prerequisites")
def test_demo_runs_both_calls_and_stops_everything() -> None:
    result = subprocess.run([sys.executable, str(DEMO)], cwd=ROOT, env=_demo_env(), capture_output=True, text=True,
                            timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("[CRITICAL] Febrile neutropenia") == 2
    assert "prefetch: conditions, labs, medications, patient, vitals" in out and "prefetch: none" in out
    assert out.count("JWT: ES384 as urn:neutropenia-cds:dev-client") == 2 and "Traceback" not in result.stderr
    urls = UP.findall(out)
    assert len(urls) == 2 and all(_refuses(url) for url in urls)  # both servers are gone


@gunicorn
@pytest.mark.usefixtures("demo_prerequisites")
@pytest.mark.parametrize(("sig", "status"), ((signal.SIGINT, 0), (signal.SIGTERM, 143)), ids=["ctrl-c", "sigterm"])
def test_demo_hold_keeps_the_servers_up_then_stops_them_on_a_signal(sig: signal.Signals, status: int) -> None:
    # Its own process group, signalled as a whole as a terminal does on Ctrl-C; SIGINT restored in case this
    # test runs where it is ignored (a background job). Ctrl-C is how a held demo ends, so it exits 0.
    process = subprocess.Popen([sys.executable, str(DEMO), "--hold"], cwd=ROOT, env=_demo_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    urls: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            urls += UP.findall(line)
            if "client key:" in line:
                assert len(urls) == 2 and not any(_refuses(url) for url in urls)  # held: both still up
                os.killpg(process.pid, sig)
                break
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == status
    assert len(urls) == 2 and all(_refuses(url) for url in urls)


@gunicorn
@pytest.mark.usefixtures("demo_prerequisites")
def test_demo_fails_non_zero_when_a_server_cannot_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(DEMO)], cwd=ROOT, env=_demo_env(DEMO_FHIR_PORT=str(port)),
                                capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "demo failed: the fixture FHIR server exited with status 1 while starting" in result.stderr
    assert "cannot listen" in result.stderr  # the server's log is shown
    assert "CDS service" not in result.stdout  # nothing after the failed step ran


def test_prefetch_from_sends_headers_and_omits_failed_or_malformed_keys() -> None:
    """What ``invoke`` relies on in ``SandboxClient.prefetch_from``."""
    service = {"prefetch": {"patient": "Patient/{{context.patientId}}",
                            "labs": "Observation?patient={{context.patientId}}",
                            "missing": "Condition?patient={{context.patientId}}",
                            "encounter": "Encounter/{{context.encounterId}}"}}
    with FhirStub() as stub:
        stub.add("/fhir/Patient/p1", {"resourceType": "Patient", "id": "p1"})
        stub.add("/fhir/Observation", "{not json", query={"patient": "p1"})
        stub.add("/fhir/Condition", status=500)
        prefetch = SandboxClient("http://127.0.0.1:9").prefetch_from(
            service, stub.url("/fhir"), {"patientId": "p1"}, headers={"Authorization": "Bearer t0ken"})
        requests_seen = stub.requests
    assert prefetch == {"patient": {"resourceType": "Patient", "id": "p1"}}  # malformed, 500, unfillable: omitted
    assert len(requests_seen) == 3 and {r.authorization for r in requests_seen} == {"Bearer t0ken"}
