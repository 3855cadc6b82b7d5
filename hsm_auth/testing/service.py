"""A real ``hsm-auth serve`` for tests: a subprocess on 127.0.0.1 (port 0: the
service binds a free port and announces it), its stderr captured to a file, ready
once ``/v1/health`` answers, stopped with SIGTERM (then SIGKILL) afterwards.

::

    with running_service(verifier_dir) as service:     # or the pytest fixtures below
        httpx.get(service.url + "/v1/health")
        assert "hsk_" not in service.log()

A PostgreSQL DSN goes to the child in its environment
(``HSM_AUTH_VERIFIER_DATABASE``), never on its command line.

pytest fixtures (import them into a ``conftest.py``): ``service_verifier`` (a
verifier made in a temp dir, SQLite), ``service`` (a running service on it) and
``service_factory`` (``service_factory(verifier_dir, database=None, workers=1,
args=())``: more services, stopped at the end of the test).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunningService", "make_verifier", "running_service"]

_ANNOUNCE = re.compile(rb"hsm-auth: serving on (https?://\S+)")


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    verifier_dir: Path

    def log(self) -> str:
        """Everything the service wrote to stderr so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")


def make_verifier(
    directory: Path, *, database: str | None = None, name: str = "test verifier"
) -> Path:
    """``Verifier.init`` in ``directory`` (closed again); returns the directory."""
    from ..verifier import Verifier

    Verifier.init(directory, name, database=database).close()
    return directory


def _health(url: str, timeout: float, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own URL
            url + "/v1/health", timeout=timeout, context=context
        ) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the service (its process group: workers too), then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def running_service(
    verifier_dir: Path,
    *,
    database: str | None = None,
    workers: int = 1,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float = 30.0,
    ready_context: ssl.SSLContext | None = None,
) -> Iterator[RunningService]:
    """Start ``hsm-auth serve`` on ``verifier_dir``; yield once it answers
    (``ready_context``: the TLS context to check that with, for ``--tls-cert``)."""
    log_path = log_path or verifier_dir.parent / f"service-{os.getpid()}-{time.monotonic_ns()}.log"
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("HSM_AUTH_HOME", str(verifier_dir.parent / "service-home"))
    child_env.pop("HSM_AUTH_VERIFIER_DATABASE", None)
    if database:
        child_env["HSM_AUTH_VERIFIER_DATABASE"] = database
    command = [
        sys.executable, "-m", "hsm_auth", "serve", "--listen", "127.0.0.1:0",
        "--verifier", str(verifier_dir), "--workers", str(workers), *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env,
            start_new_session=True,
        )
    try:
        url = _wait_ready(process, log_path, timeout, ready_context)
        yield RunningService(url, process, log_path, verifier_dir)
    finally:
        stop(process)


def _wait_ready(
    process: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float,
    context: ssl.SSLContext | None,
) -> str:
    deadline = time.monotonic() + timeout
    url: str | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"hsm-auth serve exited with {process.returncode}:\n"
                + log_path.read_bytes().decode("utf-8", "replace")[-4000:]
            )
        if url is None:
            found = _ANNOUNCE.search(log_path.read_bytes())
            url = found.group(1).decode() if found else None
        if url is not None and _health(url, 2.0, context):
            return url
        time.sleep(0.05)
    stop(process)
    raise RuntimeError(
        "hsm-auth serve did not become ready:\n"
        + log_path.read_bytes().decode("utf-8", "replace")[-4000:]
    )


# --- pytest fixtures ----------------------------------------------------------


def _fixtures() -> tuple[Any, Any, Any]:
    import pytest

    @pytest.fixture
    def service_verifier(tmp_path: Path) -> Path:
        """A fresh verifier (SQLite) in a temp dir."""
        return make_verifier(tmp_path / "verifier")

    @pytest.fixture
    def service(service_verifier: Path) -> Iterator[RunningService]:
        """A running ``hsm-auth serve`` on ``service_verifier``."""
        with running_service(service_verifier) as running:
            yield running

    @pytest.fixture
    def service_factory() -> Iterator[Any]:
        """Start more services: ``service_factory(verifier_dir, **running_service_kwargs)``."""
        with contextlib.ExitStack() as stack:

            def start(verifier_dir: Path, **kwargs: Any) -> RunningService:
                return stack.enter_context(running_service(verifier_dir, **kwargs))

            yield start

    return service_verifier, service, service_factory


with contextlib.suppress(ImportError):  # pytest absent: the helpers still work
    service_verifier, service, service_factory = _fixtures()
