"""Workstation login through a real PAM stack: pam_wrapper + pamtester drive a
service file whose auth line is ``pam_exec.so expose_authtok`` running
``hsm-auth-pam``, against SoftHSM tokens (and swtpm with the TPM2 backend)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsm_auth.config import Config, MethodConfig
from hsm_auth.login import AuthDir, enroll
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.testing.swtpm import swtpm, swtpm_available  # noqa: F401 - fixture

pytestmark = pytest.mark.pam

PIN = "246810"
PAM_WRAPPER = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
PAM_EXEC = "/lib/x86_64-linux-gnu/security/pam_exec.so"


def _find(name: str, default: str, package: str) -> str:
    if os.path.exists(default):
        return default
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                                 check=False).stdout
    except OSError:
        return default
    return next((p for p in listing.splitlines() if p.endswith("/" + name)), default)


def pam_available() -> str | None:
    if shutil.which("pamtester") is None:
        return "pamtester not found (apt install pamtester)"
    if not os.path.exists(_find("libpam_wrapper.so", PAM_WRAPPER, "libpam-wrapper")):
        return "libpam_wrapper.so not found (apt install libpam-wrapper)"
    if not os.path.exists(_find("pam_exec.so", PAM_EXEC, "libpam-modules")):
        return "pam_exec.so not found (libpam-modules)"
    return None


def helper_command() -> list[str]:
    script = Path(sys.executable).with_name("hsm-auth-pam")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hsm_auth.pam"]


class Rig:
    """A PAM service dir, a helper config and an authfile directory in ``root``."""

    def __init__(self, root: Path, environment: dict[str, str]) -> None:
        self.root = root
        self.services = root / "pam.d"
        self.services.mkdir(mode=0o755)
        self.authdir = root / "login"
        self.authdir.mkdir(mode=0o755)
        self.config = root / "config.toml"
        env = "".join(f'{k} = "{v}"\n' for k, v in environment.items())
        self.config.write_text(f'[environment]\n{env}\n[login]\nauthdir = "{self.authdir}"\n')
        self.config.chmod(0o644)

    def service(self, name: str, *options: str) -> str:
        helper = " ".join([*helper_command(), "--config", str(self.config), *options])
        (self.services / name).write_text(
            f"auth [success=done default=die] {_find('pam_exec.so', PAM_EXEC, 'libpam-modules')}"
            f" quiet expose_authtok stdout {helper}\n"
        )
        return name

    def pamtester(
        self, service: str, user: str, pin: str = PIN, *items: str
    ) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_PRELOAD": _find("libpam_wrapper.so", PAM_WRAPPER, "libpam-wrapper"),
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(self.services),
        }
        args = ["pamtester", "-v", *(a for i in items for a in ("-I", i)), service, user,
                "authenticate"]
        return subprocess.run(args, input=pin + "\n", capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    def counter(self, user: str) -> int:
        data = json.loads((self.authdir / user).read_text())
        return int(data["credentials"][0]["counter"])


def ok(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "successfully authenticated" in result.stdout


def refused(result: subprocess.CompletedProcess[str], reason: str) -> bool:
    """PAM failed, and the helper's log line (shown through pam_exec ``stdout``) says why."""
    return result.returncode != 0 and not ok(result) and reason in result.stdout


@pytest.fixture(scope="module", autouse=True)
def _pam_tools():
    reason = pam_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=["softhsm", pytest.param("swtpm", marks=pytest.mark.swtpm)])
def rig(request, tmp_path):
    """An enrolled user ``alice`` (pin method) on SoftHSM or on swtpm."""
    root = tmp_path / "rig"
    root.mkdir(mode=0o755)
    if request.param == "softhsm":
        env = request.getfixturevalue("softhsm_env")
        token = init_token(unique_label("login"), so_pin="12345678", user_pin=PIN)
        settings = {"uri": token.uri, "allow_unenforced_pin": True}
        config = Config({Method.PIN: MethodConfig("pkcs11", settings)})
        r = Rig(root, {"SOFTHSM2_CONF": str(env.conf)})
    else:
        if swtpm_available():
            pytest.skip(swtpm_available() or "")
        tpm = request.getfixturevalue("swtpm")
        settings = {"tcti": tpm.tcti, "state_dir": str(root / "tpm2-state")}
        config = Config({Method.PIN: MethodConfig("tpm2", settings)})
        r = Rig(root, {})
    with AuthDir(r.authdir) as authdir:
        enroll(authdir, "alice", Method.PIN, config, pin=PIN)
    return r


def test_right_pin_logs_in_and_moves_the_counter(rig):
    before = rig.counter("alice")
    result = rig.pamtester(rig.service("login", "[--cue=Checking your token]"), "alice")
    assert ok(result), result.stderr
    assert "Checking your token" in result.stdout + result.stderr
    assert rig.counter("alice") > before
    again = rig.pamtester("login", "alice")
    assert ok(again) and rig.counter("alice") > before + 1


def test_wrong_pin_fails_and_changes_nothing(rig):
    before = rig.counter("alice")
    result = rig.pamtester(rig.service("login"), "alice", "999999")
    assert refused(result, "wrong PIN")
    assert rig.counter("alice") == before


def test_unenrolled_user_fails_by_default_and_passes_only_when_configured(rig):
    assert refused(rig.pamtester(rig.service("login"), "bob"), "not enrolled")
    assert ok(rig.pamtester(rig.service("lenient", "--unenrolled", "succeed"), "bob"))


def test_unsafe_authfiles_fail(rig):
    service = rig.service("login")
    good = rig.authdir / "alice"
    assert ok(rig.pamtester(service, "alice"))
    # group-writable file
    good.chmod(0o664)
    assert refused(rig.pamtester(service, "alice"), "writable by group or others")
    good.chmod(0o644)
    # symlink to a well-formed file elsewhere
    elsewhere = rig.root / "alice.json"
    good.rename(elsewhere)
    good.symlink_to(elsewhere)
    assert refused(rig.pamtester(service, "alice"), "cannot open the authfile")
    good.unlink()
    elsewhere.rename(good)
    # group-writable directory
    rig.authdir.chmod(0o775)
    assert refused(rig.pamtester(service, "alice"), "writable by group or others")
    rig.authdir.chmod(0o755)
    assert ok(rig.pamtester(service, "alice"))  # and back to normal


def test_remote_session_refused_unless_allowed(rig):
    before = rig.counter("alice")
    result = rig.pamtester(rig.service("login"), "alice", PIN, "rhost=203.0.113.7")
    assert refused(result, "remote session refused")
    assert rig.counter("alice") == before  # refused before the token was used
    allowed = rig.service("remote-ok", "--remote", "allow")
    assert ok(rig.pamtester(allowed, "alice", PIN, "rhost=203.0.113.7"))


def test_empty_pin_cancels_without_touching_the_token(rig):
    before = rig.counter("alice")
    assert refused(rig.pamtester(rig.service("login"), "alice", ""), "cancelled")
    assert rig.counter("alice") == before


def test_bad_options_and_help_fail_closed(rig):
    assert refused(rig.pamtester(rig.service("help", "--help"), "alice"), "bad option")
    assert refused(rig.pamtester(rig.service("bad", "--remote", "maybe"), "alice"), "bad option")


def _helper_env(rig: Rig, user: str = "alice") -> dict[str, str]:
    return {"PAM_TYPE": "auth", "PAM_USER": user, "PAM_SERVICE": "login"}


def test_timeout_kills_the_helper(rig):
    # stdin stays open and empty: the helper waits for the PIN until the alarm kills it
    start = time.monotonic()
    proc = subprocess.Popen(
        [*helper_command(), "--config", str(rig.config), "--timeout", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=_helper_env(rig),
    )
    try:
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stdin is not None
        proc.stdin.close()
    assert code == -signal.SIGALRM
    assert time.monotonic() - start < 15


def test_helper_refuses_outside_the_auth_phase(rig):
    env = _helper_env(rig) | {"PAM_TYPE": "session"}
    result = subprocess.run([*helper_command(), "--config", str(rig.config)], input=PIN,
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode != 0 and "PAM_TYPE" in result.stderr

