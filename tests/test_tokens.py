"""``hsm-auth token``: a SoftHSM token or a swtpm made for a method, its table
written into the config without touching anything else, and the methods then
enroll and make OTPs on them."""

from __future__ import annotations

import json
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from _cli import cli_ok, code_file, run_cli

from hsm_auth import tokens
from hsm_auth.config import Paths
from hsm_auth.errors import ConfigError, InvalidInput
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import softhsm_available
from hsm_auth.testing.swtpm import socket_accepts, swtpm_available


def flow(home: Path, method: str, *pin: str) -> str:
    offer = cli_ok(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method
    )
    response = cli_ok(home, "enroll", *code_file(home), "--method", method, *pin, stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)
    session = json.loads(
        cli_ok(home, "--json", "verifier", "session", "--user", "alice", "--context", "c")
    )
    otp = cli_ok(home, "finish", "--method", method, *pin, session["data"])
    return cli_ok(home, "verifier", "verify", "--session", session["session"], stdin=otp + "\n")


# --- the config file edit --------------------------------------------------------

EXISTING = """\
# my settings
[methods.device]   # the old one
backend = "pkcs11"
uri = "pkcs11:token=old"

[methods.biometric]
backend = "fido2"
device = "hid:/dev/hidraw3"  # keep me

[verifier]
database = "postgresql://v@db/x"
"""


def test_update_config_replaces_one_table_and_keeps_the_rest(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(EXISTING)
    tokens.update_config(
        path,
        {"methods.device": {"backend": "tpm2", "tcti": 'swtpm:path=/t/"q"\\x'}},
        environment={"SOFTHSM2_CONF": "/s.conf"},
    )
    text = path.read_text()
    data = tomllib.loads(text)
    assert data["methods"]["device"] == {"backend": "tpm2", "tcti": 'swtpm:path=/t/"q"\\x'}
    assert data["methods"]["biometric"] == {"backend": "fido2", "device": "hid:/dev/hidraw3"}
    assert data["verifier"] == {"database": "postgresql://v@db/x"}
    assert data["environment"] == {"SOFTHSM2_CONF": "/s.conf"}
    assert "# my settings" in text and "# keep me" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # environment: merged into an existing table, other keys kept
    tokens.update_config(path, {}, environment={"OTHER": "1"})
    tokens.update_config(path, {}, environment={"SOFTHSM2_CONF": "/t.conf"})
    assert tomllib.loads(path.read_text())["environment"] == {
        "SOFTHSM2_CONF": "/t.conf",
        "OTHER": "1",
    }


def test_update_config_refuses_what_it_cannot_edit_safely(tmp_path):
    path = tmp_path / "config.toml"
    inline = 'methods = { device = { backend = "pkcs11" } }\n'
    path.write_text(inline)
    with pytest.raises(ConfigError, match="edit it by hand"):
        tokens.update_config(path, {"methods.device": {"backend": "tpm2"}})
    assert path.read_text() == inline  # untouched
    path.write_text("not = [toml\n")
    with pytest.raises(ConfigError):
        tokens.update_config(path, {"methods.device": {"backend": "tpm2"}})


def test_toml_values_round_trip():
    for value in ("plain", 'q"uote', "back\\slash", "tab\there\nnl\x7f", "é ü"):
        assert tomllib.loads(f"v = {tokens.toml_value(value)}")["v"] == value
    assert tokens.toml_value(True) == "true" and tokens.toml_value(3) == "3"


# --- SoftHSM -------------------------------------------------------------------------


@pytest.fixture
def softhsm_home(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text('# mine\n[methods.face]\nbackend = "fido2"\n')
    return home


@pytest.mark.softhsm
def test_softhsm_device_token_pins_never_on_a_command_line(softhsm_home, monkeypatch):
    seen: list[list[str]] = []
    real = subprocess.Popen

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, args, *a, **kw):
            seen.append([str(x) for x in args])
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", Spy)
    monkeypatch.delenv("SOFTHSM2_CONF", raising=False)
    result = tokens.init_softhsm(Paths(softhsm_home), "dev-token", Method.DEVICE)
    pin_file = softhsm_home / "softhsm" / "dev-token.pin"
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    pin = pin_file.read_text()
    assert len(pin) == 32
    assert seen and all(pin not in " ".join(args) for args in seen)
    assert result.settings["uri"].endswith(f"pin-source=file:{pin_file}")
    data = tomllib.loads((softhsm_home / "config.toml").read_text())
    assert data["methods"]["face"] == {"backend": "fido2"}
    assert data["environment"]["SOFTHSM2_CONF"] == str(softhsm_home / "softhsm" / "softhsm2.conf")
    with pytest.raises(ConfigError, match="--replace"):
        tokens.init_softhsm(Paths(softhsm_home), "dev-token-2", Method.DEVICE)
    with pytest.raises(InvalidInput, match="exists already"):
        tokens.init_softhsm(Paths(softhsm_home), "dev-token", Method.DEVICE, replace=True)
    with pytest.raises(InvalidInput, match="label"):
        tokens.init_softhsm(Paths(softhsm_home), "bad label!", Method.DEVICE, replace=True)


@pytest.mark.softhsm
def test_softhsm_tokens_serve_device_and_pin_through_the_cli(softhsm_home, tmp_path):
    cli_ok(softhsm_home, "token", "init", "--softhsm", "dev")
    pin_file = tmp_path / "offline.pin"
    pin_file.write_text("482916\n")
    pin_file.chmod(0o600)
    cli_ok(
        softhsm_home,
        "token",
        "init",
        "--softhsm",
        "pin",
        "--method",
        "pin",
        "--pin-file",
        str(pin_file),
    )
    refused = run_cli(softhsm_home, "token", "init", "--softhsm", "x", "--pin-file", str(pin_file))
    assert refused.returncode == 2 and "--pin-file/--pin-fd are for --method pin" in refused.stderr
    cli_ok(softhsm_home, "verifier", "init")
    assert "accepted: alice with device" in flow(softhsm_home, "device")
    assert "accepted: alice with pin" in flow(softhsm_home, "pin", "--pin-file", str(pin_file))


# --- swtpm ---------------------------------------------------------------------------


@pytest.mark.swtpm
def test_swtpm_started_used_and_stopped(tmp_path):
    reason = swtpm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    tpm_dir = tmp_path / "tpm"
    try:
        cli_ok(home, "token", "init", "--swtpm", str(tpm_dir))
        assert socket_accepts(tpm_dir / "tpm.sock")
        assert tomllib.loads((home / "config.toml").read_text())["methods"]["device"] == {
            "backend": "tpm2",
            "tcti": f"swtpm:path={tpm_dir / 'tpm.sock'}",
        }
        cli_ok(home, "verifier", "init")
        assert "accepted: alice with device" in flow(home, "device")
        # a second init finds it running and keeps it
        again = run_cli(home, "token", "init", "--swtpm", str(tpm_dir), "--replace")
        assert again.returncode == 0 and "runs already" in again.stderr
    finally:
        stopped = run_cli(home, "--json", "token", "stop", "--swtpm", str(tpm_dir))
    assert json.loads(stopped.stdout) == {"stopped": True}
    assert not socket_accepts(tpm_dir / "tpm.sock")
    assert "was not running" in cli_ok(home, "token", "stop", "--swtpm", str(tpm_dir))


def test_udev_rules_command_prints_the_packaged_rules(tmp_path):
    out = cli_ok(tmp_path / "home", "token", "udev-rules")
    assert out == tokens.udev_rules().strip()
    assert 'TAG+="uaccess"' in out


def test_token_init_help_says_these_are_the_test_emulators(tmp_path):
    text = " ".join(cli_ok(tmp_path / "home", "token", "init", "--help").split())
    assert "These are the emulators of hsm_auth.testing" in text
    assert "never for protecting anything" in text
    assert "No PIN is put on any command line" in text
