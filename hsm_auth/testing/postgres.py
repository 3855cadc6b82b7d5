"""A throw-away PostgreSQL server for tests: ``initdb`` and ``postgres`` in a temp
dir, reached through a UNIX socket in that dir (no TCP port), stopped afterwards.

Uses the server binaries of the machine (Debian's ``postgresql`` package puts
them in ``/usr/lib/postgresql/<version>/bin``; ``HSM_AUTH_PG_BINDIR`` overrides).
PostgreSQL refuses to run as root, so when the tests run as root (CI does) the
data dir is handed to the ``postgres`` system user and the server runs as that
user; the client (this process) connects over the socket with ``trust`` auth.

::

    with postgres_server() as server:          # or the pytest fixtures below
        dsn = server.create_schema("t1")      # a fresh schema, via search_path
        ...

pytest fixtures (import them into a ``conftest.py``): ``postgres_server``
(session-scoped, skips with a reason when PostgreSQL is missing) and
``postgres_dsn`` (a DSN with a fresh, empty schema per test).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

BINDIR_ENV = "HSM_AUTH_PG_BINDIR"
_SUPERUSER = "hsm_auth"
_DATABASE = "hsm_auth"
_counter = itertools.count(1)


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir() -> Path | None:
    """The directory with ``initdb`` and ``postgres``, newest version first."""
    env = os.environ.get(BINDIR_ENV)
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def postgres_available() -> str | None:
    """``None`` when a test server can run here, else the reason why not."""
    bindir = find_bindir()
    if bindir is None or not (bindir / "postgres").exists():
        return "PostgreSQL server binaries not found (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        return f"psycopg is not importable ({e}); pip install 'hsm-auth[postgres]'"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


@dataclass
class PostgresServer:
    """A running server. ``socket_dir`` and ``port`` name its UNIX socket."""

    directory: Path
    socket_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    bindir: Path
    run_as: tuple[int, int] | None

    def dsn(self, database: str = _DATABASE, *, schema: str | None = None) -> str:
        dsn = (
            f"postgresql://{_SUPERUSER}@/{database}"
            f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}"
        )
        if schema is not None:
            dsn += "&options=" + quote(f"-csearch_path={schema}", safe="")
        return dsn

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.encode())

    def create_schema(self, name: str | None = None) -> str:
        """Create an empty schema and return a DSN whose search_path is that schema."""
        import psycopg

        name = name or f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"'.encode())
        return self.dsn(schema=name)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL if it does not stop in 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def start(self, timeout: float = 30.0) -> None:
        """(Re)start the server on the same data dir and socket."""
        if self.running:
            return
        self.process = _spawn_postgres(
            self.bindir, self.directory, self.socket_dir, self.port, self.run_as
        )
        _wait_ready(self, timeout)


def _demote(run_as: tuple[int, int] | None) -> dict[str, Any]:
    if run_as is None:
        return {}
    uid, gid = run_as
    return {"user": uid, "group": gid, "extra_groups": []}


def _spawn_postgres(
    bindir: Path, directory: Path, socket_dir: Path, port: int, run_as: tuple[int, int] | None
) -> subprocess.Popen[bytes]:
    log = open(directory / "server.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D", str(directory / "data"),
                "-k", str(socket_dir),
                "-p", str(port),
                "-c", "listen_addresses=",
                "-c", "max_connections=200",
                "-c", "shared_buffers=32MB",
                "-c", "fsync=on",
                "-c", "synchronous_commit=on",
                "-c", "log_min_messages=warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
            start_new_session=True,
            **_demote(run_as),
        )
    finally:
        log.close()


def _wait_ready(server: PostgresServer, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            log = (server.directory / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"postgres exited with {server.process.returncode}: {log}")
        try:
            with psycopg.connect(server.dsn("postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("postgres did not accept connections in time") from None
            time.sleep(0.05)


@contextlib.contextmanager
def postgres_server(port: int = 5432) -> Iterator[PostgresServer]:
    """Run ``initdb`` + ``postgres`` in a new temp dir; stop and delete it on exit."""
    reason = postgres_available()
    if reason is not None:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    run_as: tuple[int, int] | None = None
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        run_as = (entry.pw_uid, entry.pw_gid)
    directory = Path(tempfile.mkdtemp(prefix="hsm-auth-pg-"))
    try:
        if run_as is not None:
            os.chown(directory, *run_as)
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D", str(directory / "data"),
                "-U", _SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            cwd=directory,
            timeout=120,
            check=False,
            **_demote(run_as),
        )
        if result.returncode != 0:
            message = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise RuntimeError(f"initdb failed: {message[-500:]}")
        server = PostgresServer(
            directory,
            directory,
            port,
            _spawn_postgres(bindir, directory, directory, port, run_as),
            bindir,
            run_as,
        )
        try:
            _wait_ready(server, 60)
            server.execute(f"CREATE DATABASE {_DATABASE}")
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- pytest fixtures ----------------------------------------------------------


def _fixtures() -> tuple[Any, Any]:
    import pytest

    @pytest.fixture(scope="session", name="postgres_server")
    def postgres_server_fixture() -> Iterator[PostgresServer]:
        """One PostgreSQL server for the test session; skips when PostgreSQL is missing."""
        reason = postgres_available()
        if reason is not None:
            pytest.skip(reason)
        with postgres_server() as server:
            yield server

    @pytest.fixture
    def postgres_dsn(postgres_server: PostgresServer) -> str:
        """A DSN on the session's server with a fresh, empty schema."""
        return postgres_server.create_schema()

    return postgres_server_fixture, postgres_dsn


with contextlib.suppress(ImportError):  # pytest absent: the helpers still work
    postgres_server_fixture, postgres_dsn = _fixtures()
