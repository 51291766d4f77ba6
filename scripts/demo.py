"""``make demo``: the fixture FHIR server, the service with auth on, and the command-line client, end to end.

1. ``neutropenia-cds keys`` writes a throwaway ES384 key and an issuers.json pinning it, in a temporary directory.
2. The fixture FHIR server starts on a free port and must answer ``GET /metadata``.
3. The service starts under gunicorn (auth on, that issuer trusted, the fixture server the only allowed
   ``fhirServer``, anonymous fetch allowed for it) and must answer ``/healthz``.
4. The client calls it for the febrile-neutropenia patient with prefetch filled from the FHIR server, then
   5. without prefetch, so that the service fetches from the FHIR server itself. Both print the cards.

Everything started here is stopped on exit, on failure, on Ctrl-C and on SIGTERM (and dies with this process
if it is killed). Ports are free ones chosen at run time, or ``DEMO_FHIR_PORT`` / ``DEMO_CDS_PORT``. Any failed
step makes the exit status non-zero, after the server logs are shown. ``--hold`` (``DEMO_HOLD=1``) keeps both
servers up after the calls until Ctrl-C, to explore them with the client, curl or the Sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import requests

from cds_hooks.testing.processes import die_with_parent, free_port
from service.cli import DEV_ISS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FIXTURE = ROOT / "fixtures" / "patient-view.febrile-neutropenia.request.json"


class StepFailed(Exception):
    """A demo step failed; the message says which and why."""




def cli() -> list[str]:
    """The console script next to this interpreter, else ``python -m service.cli``."""
    script = BIN / "neutropenia-cds"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def say(text: str) -> None:
    """A step heading, bold on a terminal."""
    bold = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(f"\n\x1b[1m{text}\x1b[0m" if bold else f"\n{text}", flush=True)


class Servers:
    """The background processes this demo started, each in its own process group, with its log file."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str],
              shown: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` in a new session, output to ``{name}.log``; print it (as ``shown``) with its CDS_*."""
        settings = [f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith("CDS_")]
        print("$ " + " ".join([*settings, shlex.join(shown or command)]), flush=True)
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(list(command), cwd=ROOT, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=die_with_parent)
        self.processes[name] = process
        return process

    def wait_until_healthy(self, name: str, url: str, timeout: float) -> None:
        """Poll ``url`` until it answers 200; fail if the process exits or ``timeout`` passes."""
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StepFailed(f"the {name} exited with status {process.returncode} while starting")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    print(f"  {name} is up: {url}", flush=True)
                    return
            except requests.RequestException:
                pass  # not listening yet
            time.sleep(0.2)
        raise StepFailed(f"the {name} did not answer {url} within {timeout:g} s")

    def logs(self, lines: int = 30) -> str:
        """The last ``lines`` of every server log."""
        out = []
        for name in self.processes:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- last lines of the {name} log ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM each process group we started, then SIGKILL what is left after 10 s."""
        for process in self.processes.values():
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=5)
            else:
                _signal_group(process, signal.SIGKILL)  # stragglers in the group (none expected)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)  # start_new_session: the group id is the child's pid
    except ProcessLookupError:
        pass


@contextmanager
def servers(log_dir: Path) -> Iterator[Servers]:
    """Servers that are stopped however the block ends (exception, Ctrl-C, SIGTERM, SIGHUP)."""

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    started = Servers(log_dir)
    try:
        yield started
    finally:
        started.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_client(arguments: Sequence[str]) -> None:
    """Run ``neutropenia-cds ARGUMENTS`` in the foreground; a non-zero exit fails the step."""
    command = [*cli(), *arguments]
    print("$ neutropenia-cds " + shlex.join(arguments), flush=True)
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        raise StepFailed(f"neutropenia-cds {arguments[0]} exited with status {result.returncode}")


def demo(args: argparse.Namespace, work: Path, started: Servers) -> None:
    """The five steps; raises StepFailed on the first failure."""
    fhir_url = f"http://127.0.0.1:{args.fhir_port or free_port()}"
    cds_url = f"http://127.0.0.1:{args.cds_port or free_port()}"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    keys = work / "keys"

    say("1/5  A throwaway development key, trusted by the service through issuers.json")
    run_client(["keys", "--out-dir", str(keys), "--service-url", cds_url])

    say("2/5  The fixture FHIR server")
    port = fhir_url.rsplit(":", 1)[1]
    arguments = ["fhir-server", "fixtures", "--host", "127.0.0.1", "--port", port]
    started.start("fixture FHIR server", [*cli(), *arguments], base_env, shown=["neutropenia-cds", *arguments])
    started.wait_until_healthy("fixture FHIR server", f"{fhir_url}/metadata", args.timeout)

    say("3/5  The CDS service under gunicorn, auth required")
    service_env = {**base_env,
                   "CDS_AUTH": "required",
                   "CDS_PUBLIC_BASE_URL": cds_url,
                   "CDS_TRUSTED_ISSUERS_FILE": str(keys / "issuers.json"),
                   "CDS_DATABASE_URL": f"sqlite:///{work / 'feedback.sqlite3'}",
                   "CDS_FHIR_ALLOWED_BASES": fhir_url,
                   "CDS_FHIR_ALLOW_ANONYMOUS": "true",
                   "CDS_BIND": cds_url.removeprefix("http://"),
                   "CDS_WORKERS": "2",
                   "CDS_LOG_LEVEL": "WARNING"}
    gunicorn = ["gunicorn", "-c", "gunicorn.conf.py", "service.app:create_app()"]
    started.start("CDS service", [str(BIN / "gunicorn"), *gunicorn[1:]], service_env, shown=gunicorn)
    started.wait_until_healthy("CDS service", f"{cds_url}/healthz", args.timeout)

    common = ["--service-url", cds_url, "--key", str(keys / "client-key.pem"), "--fhir-server", fhir_url,
              "--patient", args.patient]
    say(f"4/5  Patient {args.patient}, prefetch filled by the client from the FHIR server (as the Sandbox does)")
    run_client(["invoke", *common])
    say(f"5/5  Patient {args.patient}, no prefetch: the service fetches from the FHIR server itself")
    run_client(["invoke", *common, "--no-prefetch"])
    if args.hold:
        say("Both servers stay up until Ctrl-C; try the client, curl or the Sandbox against them:")
        print(f"  FHIR server:  {fhir_url}\n  CDS service:  {cds_url}/cds-services\n"
              f"  client key:   {keys / 'client-key.pem'} (--iss {DEV_ISS})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(flush=True)  # Ctrl-C is how a held demo ends: not a failure


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when every step passed."""
    default_patient = json.loads(FIXTURE.read_text(encoding="utf-8"))["context"]["patientId"]
    parser = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.splitlines()[0])
    parser.add_argument("--fhir-port", type=int, default=int(os.environ.get("DEMO_FHIR_PORT") or 0))
    parser.add_argument("--cds-port", type=int, default=int(os.environ.get("DEMO_CDS_PORT") or 0))
    parser.add_argument("--patient", default=os.environ.get("DEMO_PATIENT") or default_patient)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each server")
    parser.add_argument("--hold", action="store_true", default=bool(os.environ.get("DEMO_HOLD")),
                        help="keep the servers up after the calls, until Ctrl-C (env DEMO_HOLD=1)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neutropenia-cds-demo-") as tmp, servers(Path(tmp)) as started:
        try:
            demo(args, Path(tmp), started)
        except StepFailed as error:
            print(f"\ndemo failed: {error}", file=sys.stderr)
            print(started.logs(), file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ndemo interrupted; stopping the servers", file=sys.stderr)
            return 130
        say("Done: both calls returned cards. Stopping the servers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
