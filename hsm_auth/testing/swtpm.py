"""swtpm for tests: start a software TPM 2.0 in a temp dir, hand out its TCTI, stop it.

Reusable by anyone who wants to run their own CI on swtpm::

    from hsm_auth.testing.swtpm import running_swtpm, set_da_parameters

    with running_swtpm() as tpm:
        set_da_parameters(tpm.tcti, max_tries=3, recovery_time=2)
        ...  # use tpm.tcti, e.g. "swtpm:path=/tmp/x/tpm.sock"

or, with pytest, the fixtures ``swtpm`` (one fresh TPM per test) and
``swtpm_tcti`` (its TCTI string); import them into a ``conftest.py``::

    from hsm_auth.testing.swtpm import swtpm, swtpm_tcti  # noqa: F401

swtpm listens on a UNIX socket (no ports, safe in parallel), with the control
socket at ``<socket>.ctrl`` where libtss2 3.2 looks for it. Its output goes to
a log file in the state dir: an orphaned swtpm holding the test runner's pipe
open would hang the shell that started it. Teardown asks it to shut down
through the control channel, then terminates and finally kills it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

_SOCKET = "tpm.sock"
_LOG = "swtpm.log"


def swtpm_available() -> str | None:
    """``None`` when swtpm and tpm2-pytss can run here, else the reason why not."""
    for binary in ("swtpm", "swtpm_ioctl"):
        if shutil.which(binary) is None:
            return f"{binary} not found on PATH (install swtpm and swtpm-tools)"
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as e:
        return f"tpm2-pytss is not importable: {e}"
    return None


@dataclass
class SwtpmProcess:
    """One running swtpm. ``tcti`` is what TCTILdr / ``TPM2TOOLS_TCTI`` take."""

    state_dir: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> Path:
        return self.state_dir / _SOCKET

    @property
    def ctrl_socket(self) -> Path:
        return self.state_dir / f"{_SOCKET}.ctrl"

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start swtpm on the state dir (a no-op when it runs already)."""
        if self.running:
            return
        for stale in (self.socket, self.ctrl_socket):
            stale.unlink(missing_ok=True)
        self._log = open(self.state_dir / _LOG, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=unixio,path={self.socket}",
                "--ctrl",
                f"type=unixio,path={self.ctrl_socket}",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not (_accepts(self.ctrl_socket) and _accepts(self.socket)):
            if self._proc.poll() is not None:
                self._close_log()
                raise RuntimeError(f"swtpm exited with {self._proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"swtpm did not come up within {timeout} s: {self.log_tail()}")
            time.sleep(0.002)

    def stop(self, timeout: float = 5.0) -> None:
        """Orderly stop: shutdown through the control socket, then terminate, then kill."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None and self.ctrl_socket.exists():
            request_shutdown(self.ctrl_socket, timeout)
        self._reap(proc, timeout)

    def kill(self) -> None:
        """Crash it (SIGKILL, no shutdown): what a power cut looks like to the TPM."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        self._reap(proc, 5.0)

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or crash) and start again on the same state dir."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def log_tail(self, limit: int = 400) -> str:
        try:
            text = (self.state_dir / _LOG).read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:].strip()

    def _reap(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def request_shutdown(ctrl_socket: Path, timeout: float = 5.0) -> None:
    """Ask the swtpm behind ``ctrl_socket`` to shut down (``swtpm_ioctl -s``)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["swtpm_ioctl", "--unix", str(ctrl_socket), "-s"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )


def socket_accepts(path: Path) -> bool:
    """True once a server listens on the UNIX socket ``path``."""
    return _accepts(path)


def _accepts(path: Path) -> bool:
    """True once a server listens on the UNIX socket (the file exists before listen())."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def running_swtpm(state_dir: str | os.PathLike[str] | None = None) -> Iterator[SwtpmProcess]:
    """Start swtpm (in a fresh temp dir unless ``state_dir`` is given); stop it on exit."""
    reason = swtpm_available()
    if reason is not None:
        raise RuntimeError(reason)
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="swtpm-"))
        tpm = SwtpmProcess(Path(state_dir))
        tpm.start()
        try:
            yield tpm
        finally:
            tpm.stop()


def set_da_parameters(
    tcti: str,
    *,
    max_tries: int = 3,
    recovery_time: int = 2,
    lockout_recovery: int = 2,
    lockout_auth: bytes = b"",
) -> None:
    """TPM2_DictionaryAttackParameters (with lockout auth), and reset the failure count.

    ``recovery_time`` is the seconds after which one failure is forgotten;
    ``lockout_recovery`` is the wait after a failed lockout-auth attempt.
    """
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti) as ectx:
        ectx.tr_set_auth(ESYS_TR.LOCKOUT, lockout_auth)
        ectx.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)
        ectx.dictionary_attack_parameters(
            max_tries, recovery_time, lockout_recovery, ESYS_TR.LOCKOUT
        )


# --- a TPM with an EK certificate from a test CA --------------------------------


@dataclass(frozen=True)
class TestCa:
    """A local TPM manufacturer CA made by ``swtpm_localca`` in ``directory``.

    ``roots_file`` holds its root and its issuing (intermediate) certificate, as
    a verifier's policy names them (``[methods.device] roots = [...]``)."""

    directory: Path

    @property
    def roots_file(self) -> Path:
        return self.directory / "roots.pem"


def manufacturing_available() -> str | None:
    """``None`` when swtpm_setup and swtpm_localca can run here, else why not."""
    for binary in ("swtpm_setup", "swtpm_localca"):
        if shutil.which(binary) is None:
            return f"{binary} not found on PATH (install swtpm-tools)"
    return swtpm_available()


def manufacture(state_dir: Path, ca_dir: Path) -> TestCa:
    """Make a TPM state in ``state_dir`` as a manufacturer would: ``swtpm_setup
    --tpm2 --create-ek-cert --create-platform-cert`` with the CA in ``ca_dir``
    (made by ``swtpm_localca`` on first use). Every configuration file is written
    in ``ca_dir``; nothing system-wide is read or written. About 0.8 s."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    localca = ca_dir / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\n"
        f"certserial = {ca_dir}/certserial\n"
    )
    options = ca_dir / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer hsm-auth-test\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup = ca_dir / "swtpm_setup.conf"
    setup.write_text(
        f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    log = ca_dir / "swtpm_setup.log"
    result = subprocess.run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(state_dir), "--create-ek-cert",
            "--create-platform-cert", "--config", str(setup), "--logfile", str(log),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(ca_dir)},
    )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
        raise RuntimeError(f"swtpm_setup failed with {result.returncode}: {tail}")
    ca = TestCa(ca_dir)
    pems = [ca_dir / "swtpm-localca-rootca-cert.pem", ca_dir / "issuercert.pem"]
    ca.roots_file.write_bytes(b"".join(p.read_bytes() for p in pems))
    return ca


# --- pytest fixtures ----------------------------------------------------------
# pytest is only a test dependency: import it lazily so this module imports without it.


def _fixtures() -> tuple[Any, Any, Any, Any, Any]:
    import pytest

    @pytest.fixture
    def swtpm(tmp_path: Path) -> Iterator[SwtpmProcess]:
        """A fresh swtpm per test (state in ``tmp_path/tpm``), DA set to 3 tries / 2 s."""
        reason = swtpm_available()
        if reason is not None:
            pytest.skip(reason)
        state = tmp_path / "tpm"
        state.mkdir()
        with running_swtpm(state) as tpm:
            set_da_parameters(tpm.tcti, max_tries=3, recovery_time=2, lockout_recovery=2)
            yield tpm

    @pytest.fixture
    def swtpm_tcti(swtpm: SwtpmProcess) -> str:
        """The TCTI string of the ``swtpm`` fixture."""
        return swtpm.tcti

    @pytest.fixture(scope="session")
    def swtpm_manufactured(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Callable[[str, str], tuple[Path, TestCa]]:
        """``make(name, ca)``: the state of a TPM called ``name`` (made once per
        session) with an EK certificate by the test CA called ``ca``."""
        reason = manufacturing_available()
        if reason is not None:
            pytest.skip(reason)
        base = tmp_path_factory.mktemp("manufactured")
        made: dict[tuple[str, str], tuple[Path, TestCa]] = {}

        def make(name: str, ca: str = "ca") -> tuple[Path, TestCa]:
            if (name, ca) not in made:
                made[name, ca] = (base / name, manufacture(base / name, base / ca))
            return made[name, ca]

        return make

    @pytest.fixture
    def swtpm_ek_factory(
        tmp_path: Path, swtpm_manufactured: Callable[[str, str], tuple[Path, TestCa]]
    ) -> Iterator[Callable[..., tuple[SwtpmProcess, TestCa]]]:
        """``start(name="tpm", ca="ca")``: a running copy of the manufactured TPM
        ``name`` (its EK certificate by the test CA ``ca``), DA set to 3 tries / 2 s."""
        with contextlib.ExitStack() as stack:

            def start(name: str = "tpm", ca: str = "ca") -> tuple[SwtpmProcess, TestCa]:
                template, test_ca = swtpm_manufactured(name, ca)
                state = tmp_path / f"tpm-{name}-{ca}"
                shutil.copytree(template, state)
                tpm = stack.enter_context(running_swtpm(state))
                set_da_parameters(tpm.tcti, max_tries=3, recovery_time=2, lockout_recovery=2)
                return tpm, test_ca

            yield start

    @pytest.fixture
    def swtpm_ek(
        swtpm_ek_factory: Callable[..., tuple[SwtpmProcess, TestCa]],
    ) -> tuple[SwtpmProcess, TestCa]:
        """A swtpm with an RSA EK certificate by the session's test CA, and that CA."""
        return swtpm_ek_factory()

    return swtpm, swtpm_tcti, swtpm_manufactured, swtpm_ek_factory, swtpm_ek


with contextlib.suppress(ImportError):  # without pytest the helpers still work
    swtpm, swtpm_tcti, swtpm_manufactured, swtpm_ek_factory, swtpm_ek = _fixtures()
