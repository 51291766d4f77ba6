"""A real, throwaway PostgreSQL server for the test session, started from the installed binaries.

``postgres_server`` (session scope) runs ``initdb`` into a temporary directory and starts the server on a free
loopback port, its unix socket in that directory; it is stopped (``pg_ctl stop -m immediate``) and deleted at
the end of the session. Tests may ``stop()`` and ``start()`` it again: same port, same data.
``postgres_url`` is its SQLAlchemy URL (``postgresql+psycopg://...@127.0.0.1:PORT/cds_test``), and
``PostgresServer.fresh_schema()`` yields a URL whose ``search_path`` is a new, empty schema.

PostgreSQL refuses to run as root, so as root the commands run as the ``postgres`` user (``runuser``), which
owns the temporary directory. Missing binaries fail the tests that need them (CI installs them); no skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from cds_hooks.testing.processes import free_port

#: Where Debian and Ubuntu (``apt-get install postgresql``) put the server binaries, one folder per version.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
SYSTEM_USER = "postgres"
USER = "cds_test"
DATABASE = "cds_test"

#: Startup speed over durability: the data is thrown away. synchronous_commit stays on, so a committed row
#: survives ``pg_ctl stop -m immediate`` (it reached the kernel), which the restart tests rely on.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "log_min_messages": "warning",
}


def find_bindir() -> Path | None:
    """The newest folder holding initdb, pg_ctl and postgres: Debian's layout first, then PATH."""
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    candidates = [Path(p) for p in sorted(glob.glob(DEBIAN_BINDIRS), key=version, reverse=True)]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in REQUIRED_BINARIES):
            return bindir
    return None


class PostgresServer:
    """One throwaway server: ``initdb`` once, then ``start()``/``stop()`` as often as a test needs."""

    def __init__(self, bindir: Path, base: Path, port: int) -> None:
        self.bindir = bindir
        self.base = base
        self.port = port
        self.password = "pw-" + secrets.token_hex(12)
        self.data = base / "data"
        self.sockets = base / "sockets"
        self.log = base / "postgres.log"
        self.running = False
        #: Seconds from initdb to a database ready for connections (set by start_server).
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the test database, password included."""
        return self._url(DATABASE).render_as_string(hide_password=False)

    def init(self) -> None:
        """Create the cluster (password auth over TCP) and the test database, and start the server."""
        self.sockets.mkdir()
        password_file = self.base / "password"
        password_file.write_text(self.password + "\n")
        self._own()
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}", "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        password_file.unlink()
        self.start()
        with self._admin("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def start(self) -> None:
        """Start the server (same port, same data directory) and wait until it accepts connections."""
        if self.running:
            return
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1",
                   f"-c unix_socket_directories={shlex.quote(str(self.sockets))}"]
        options += [f"-c {name}={value}" for name, value in SERVER_SETTINGS.items()]
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(options))
        self.running = True

    def stop(self) -> None:
        """Stop the server at once, as a crash would (``-m immediate``); committed data survives."""
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60")
        self.running = False

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    @contextmanager
    def fresh_schema(self) -> Iterator[str]:
        """Yield a URL of the test database whose search_path is a new empty schema; drop it afterwards."""
        schema = "t_" + secrets.token_hex(6)
        with self._admin(DATABASE) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield self._url(DATABASE, options=f"-csearch_path={schema}").render_as_string(hide_password=False)
        finally:
            try:
                with self._admin(DATABASE) as conn:
                    conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            except psycopg.OperationalError:
                pass  # the server was left stopped by a failing test; the directory goes at session end

    def _url(self, database: str, **query: str) -> URL:
        return URL.create("postgresql+psycopg", username=USER, password=self.password, host="127.0.0.1",
                          port=self.port, database=database, query=query)

    @contextmanager
    def _admin(self, database: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                             dbname=database, autocommit=True, connect_timeout=10) as conn:
            yield conn

    def _own(self) -> None:
        if os.geteuid() != 0:
            return
        for path in [self.base, *self.base.rglob("*")]:
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(command, cwd=self.base, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {args[0] if args else ''} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}\n{log}")


def start_server() -> PostgresServer:
    """Find the binaries, create a cluster in a temporary directory and start it; fail loudly if impossible."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(f"PostgreSQL server binaries ({', '.join(REQUIRED_BINARIES)}) not found under "
                    f"{DEBIAN_BINDIRS} or on PATH; install them (apt-get install postgresql)", pytrace=False)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            pytest.fail(f"running as root, PostgreSQL needs the '{SYSTEM_USER}' system user, which is missing",
                        pytrace=False)
    started = time.monotonic()
    # Not pytest's tmp_path: as root its parents are private (0700), which the postgres user cannot traverse.
    server = PostgresServer(bindir, Path(tempfile.mkdtemp(prefix="cds-pg-")), free_port())
    try:
        server.init()
    except BaseException:
        server.destroy()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway PostgreSQL server for the session, with ``.url``, ``.stop()`` and ``.start()``."""
    server = start_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The SQLAlchemy URL (``postgresql+psycopg://...@127.0.0.1:PORT/cds_test``) of the session's server."""
    return postgres_server.url
