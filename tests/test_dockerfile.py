"""The production image, as far as this machine can check it without a Docker engine.

The Dockerfile is read, not guessed at: its ``COPY`` instructions are replayed into an empty directory that stands
for ``/app``, its ``ENV`` defaults are set (paths under ``/app`` and ``/config`` moved into the test's directory,
the bind address onto a free loopback port), and its ``CMD`` is started there. A probe imports every module of
the two packages from that directory and names any that came from elsewhere; so a module the image does not copy,
a default the configuration refuses, or a command that does not start fails here. Then the ``HEALTHCHECK``
command is run against the running service, and a signed call is made, as an orchestrator and an EHR would.
(Installing the dependencies, the ``RUN pip install`` step, needs the package index and a Docker engine; the test
uses the project's virtual environment, pinned from the same constraints file.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cds_hooks.testing.processes import die_with_parent, free_port, stop
from cds_hooks.testing.tokens import ClientKey, TokenSigner, write_issuer_config
from tests.support.gunicorn import ROOT

DOCKERFILE = ROOT / "Dockerfile"
SERVICE = "/cds-services/neutropenia-patient-view"


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments): continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


STEPS = instructions(DOCKERFILE.read_text(encoding="utf-8"))


def arguments_of(keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction, in order."""
    return [arguments for found, arguments in STEPS if found == keyword]


def image_env() -> dict[str, str]:
    """The ``ENV`` defaults of the image (``KEY=value`` pairs, as this Dockerfile writes them)."""
    env: dict[str, str] = {}
    for arguments in arguments_of("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) ``CMD``."""
    command = json.loads(arguments)
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def test_the_image_runs_as_a_user_other_than_root_with_authentication_on() -> None:
    users = arguments_of("USER")
    assert users and users[-1] not in {"root", "0"}
    assert image_env()["CDS_AUTH"] == "required"
    base = arguments_of("FROM")[0].split()[0]
    assert base.startswith("python:3.11"), base  # the version the project is built and tested with


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An empty directory with what the Dockerfile's ``COPY`` instructions put under its ``WORKDIR``."""
    assert arguments_of("WORKDIR") == ["/app"]
    app = tmp_path / "app"
    app.mkdir()
    for arguments in arguments_of("COPY"):
        parts = arguments.split()
        assert not any(part.startswith("--") for part in parts), "COPY options are not replayed here"
        *sources, destination = parts
        for source in sources:
            origin = ROOT / source
            target = app / destination / origin.name if destination.endswith("/") else app / destination
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    (app / "var").mkdir(exist_ok=True)  # made by the RUN step
    return app


@pytest.fixture
def running_image(image_root: Path, tmp_path: Path) -> Iterator[tuple[str, TokenSigner, dict[str, str]]]:
    """The image's CMD started in ``image_root`` with its ENV defaults: (base URL, a trusted signer, env)."""
    signer = TokenSigner(ClientKey.generate("ES384"), iss="https://ehr.example.org")
    config = tmp_path / "config"
    config.mkdir()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {name: value.replace("/app/", f"{image_root}/").replace("/config/", f"{config}/")
           for name, value in image_env().items()}
    write_issuer_config(env["CDS_TRUSTED_ISSUERS_FILE"], [signer.issuer_entry()])
    env.update({
        "CDS_BIND": f"127.0.0.1:{port}",  # the image binds 0.0.0.0:8080; a test takes a free loopback port
        "CDS_PUBLIC_BASE_URL": base_url,  # the one setting the deployment must give (the Dockerfile says so)
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(image_root),  # the image's /app, not this checkout
    })
    command = exec_form(arguments_of("CMD")[-1])
    log_path = tmp_path / "image.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=image_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
    try:
        _wait_until_answering(base_url, process, log_path)
        yield base_url, signer, env
    finally:
        stop(process)


def _wait_until_answering(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the image's CMD exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            requests.get(base_url + "/healthz", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.1)
    pytest.fail(f"the image's CMD did not answer in 30 s:\n{log_path.read_text(errors='replace')}")


#: Imports every module of the two packages and names those loaded from anywhere but the working directory.
_PROBE = """
import importlib, os, pkgutil, sys
import cds_hooks, service
for package in (cds_hooks, service):
    for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(found.name)
root = os.getcwd() + os.sep
print([name for name, module in sys.modules.items() if name.split(".")[0] in ("cds_hooks", "service")
       and not (getattr(module, "__file__", None) or "").startswith(root)])
"""


def test_the_copied_tree_alone_holds_the_service(image_root: Path) -> None:
    # Every module imported from the image's /app: one outside what COPY brings in would come from elsewhere.
    probe = subprocess.run([sys.executable, "-c", _PROBE], cwd=image_root, capture_output=True, text=True,
                           env={"PYTHONPATH": str(image_root), "PATH": os.environ.get("PATH", "")}, check=False)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_the_image_command_serves_and_passes_its_own_healthcheck(
        running_image: tuple[str, TokenSigner, dict[str, str]], image_root: Path) -> None:
    base_url, signer, env = running_image
    check = arguments_of("HEALTHCHECK")[-1]
    command = shlex.split(check[check.index("CMD ") + len("CMD "):])
    # Run as written: it must probe the port CDS_BIND names (here a free one), not the image default 8080.
    assert command[0] == "python"
    healthcheck = subprocess.run([sys.executable, *command[1:]], cwd=image_root, env=env, timeout=10, check=False)
    assert healthcheck.returncode == 0

    # Authentication is on by default: unsigned calls are refused, a trusted client's signed call is served.
    assert requests.get(base_url + "/cds-services", timeout=5).status_code == 401
    discovery = requests.get(base_url + "/cds-services", timeout=5,
                             headers={"Authorization": f"Bearer {signer.sign(base_url + '/cds-services')}"})
    assert discovery.status_code == 200
    assert [service["id"] for service in discovery.json()["services"]] == ["neutropenia-patient-view"]

    # The feedback store is the image's SQLite file under /app/var, created at start.
    assert requests.get(base_url + "/readyz", timeout=5).status_code == 200
    database = env["CDS_DATABASE_URL"].removeprefix("sqlite:///")
    assert Path(database).is_file() and Path(database).is_relative_to(image_root)
