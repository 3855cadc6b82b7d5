"""``--home DIR`` holds all state: a whole enroll + OTP + verify on swtpm and on
the software FIDO2 authenticator writes nothing outside DIR. HOME and every
XDG_* dir point at a sentinel directory that must stay empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import code_file

from hsm_auth.config import Paths
from hsm_auth.testing.swtpm import running_swtpm, swtpm_available

XDG = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR")


def _env(sentinel: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSM_AUTH_", "XDG_")) and k not in ("SOFTHSM2_CONF", "TPM2TOOLS_TCTI")
    }
    env["HOME"] = str(sentinel)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ from this run either
    for name in XDG:
        env[name] = str(sentinel / name.lower())
    return env


def _cli(home: Path, env: dict[str, str], *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _flow(home: Path, env: dict[str, str], method: str) -> None:
    _cli(home, env, "verifier", "init", "--name", "Home test")
    offer = _cli(
        home, env, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method
    )
    response = _cli(home, env, "enroll", *code_file(home), "--method", method, stdin=offer)
    _cli(home, env, "verifier", "enroll", stdin=response)
    session = json.loads(
        _cli(home, env, "--json", "verifier", "session", "--user", "alice", "--context", "Hi")
    )
    otp = _cli(home, env, "finish", "--method", method, session["data"])
    assert "accepted" in _cli(
        home, env, "verifier", "verify", "--session", session["session"], stdin=otp + "\n"
    )


def _everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_paths_under_home(tmp_path):
    paths = Paths(tmp_path)
    for p in (paths.config_file, paths.state_dir, paths.verifier_dir, paths.authenticator_dir):
        assert p.is_relative_to(tmp_path)


@pytest.mark.swtpm
def test_tpm2_state_stays_under_home(tmp_path):
    reason = swtpm_available()
    if reason:
        pytest.skip(reason)
    sentinel, home = tmp_path / "sentinel", tmp_path / "home"
    sentinel.mkdir()
    home.mkdir(mode=0o700)
    (tmp_path / "tpm").mkdir()
    with running_swtpm(tmp_path / "tpm") as tpm:
        (home / "config.toml").write_text(
            f'[methods.device]\nbackend = "tpm2"\ntcti = "{tpm.tcti}"\n'
        )
        _flow(home, _env(sentinel), "device")
    assert _everything_under(sentinel) == []
    blobs = list((home / "state" / "tpm2").glob("*.json"))
    assert blobs, _everything_under(home)
    recorded = json.loads((home / "authenticator" / "credentials.json").read_text())
    assert recorded["methods"][0]["settings"]["state_dir"] == str(home / "state" / "tpm2")


@pytest.mark.fido2
def test_fido2_state_stays_under_home(tmp_path):
    soft = pytest.importorskip("hsm_auth.testing.soft_fido2")
    sentinel, home = tmp_path / "sentinel", tmp_path / "home"
    sentinel.mkdir()
    home.mkdir(mode=0o700)
    device = soft.SoftAuthenticator.create(
        home / "soft-fido2.json", uv_modality=soft.UvModality.FINGERPRINT
    )
    (home / "config.toml").write_text(
        "[methods.biometric]\n"
        'backend = "fido2"\n'
        f'device = "soft:{device.path}"\n'
        "prompts = false\n"
        "allow_software_authenticator = true\n"
    )
    from hsm_auth.testing.fido2 import write_soft_policy

    write_soft_policy(Paths(home).verifier_dir, [device])  # it names the soft authenticator
    _flow(home, _env(sentinel), "biometric")
    assert _everything_under(sentinel) == []
    assert list((home / "state" / "fido2").iterdir()), _everything_under(home)
