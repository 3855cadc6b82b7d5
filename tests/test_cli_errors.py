"""Authorization errors through the CLI, on every backend: one line, the data worded
once and correctly ("1 retry left"), the same data as fields under ``--json``.
And the software FIDO2 authenticator refused unless the config allows it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cli import cli_ok, code_file, run_cli
from _cli import error_line as one_error_line

from hsm_auth.demo import prepare, write_config
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import softhsm_available

pytestmark = pytest.mark.softhsm


def error_line(home: Path, code: int, *args: str, stdin: str = "") -> str:
    """The one ``hsm-auth: error:`` line of a failing command, without its prefix."""
    return one_error_line(run_cli(home, *args, stdin=stdin), code)


def error_json(home: Path, code: int, *args: str) -> dict[str, object]:
    result = run_cli(home, "--json", *args)
    assert result.returncode == code, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


@dataclass
class Home:
    path: Path
    pin_file: Path
    wrong_pin: Path


def _enroll(home: Path, method: Method, pin_file: Path) -> None:
    offer = cli_ok(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method.value
    )
    extra = ["--pin-file", str(pin_file)] if method.needs_pin else []
    response = cli_ok(
        home, "enroll", *code_file(home), "--method", method.value, *extra, stdin=offer
    )
    cli_ok(home, "verifier", "enroll", stdin=response)


def _session(home: Path, method: Method) -> str:
    out = json.loads(
        cli_ok(
            home,
            "--json",
            "verifier",
            "session",
            "--user",
            "alice",
            "--context",
            "ctx",
            "--methods",
            method.value,
        )
    )
    return str(out["data"])


def _home(path: Path, methods: list[Method]) -> Home:
    cli_ok(path, "verifier", "init")
    wrong = path / "wrong.pin"
    wrong.write_text("000000")
    wrong.chmod(0o600)  # a PIN file others can read is refused before the PIN is tried
    for method in methods:
        _enroll(path, method, path / "offline.pin")
    return Home(path, path / "offline.pin", wrong)


@pytest.fixture(scope="module")
def softhsm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """pin on SoftHSM, biometric on the software FIDO2 authenticator (if installed)."""
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("p11")
    with prepare(path, tpm=False) as tokens:
        yield _home(path, [m for m in (Method.PIN, Method.BIOMETRIC) if m in tokens.methods])


@pytest.fixture(scope="module")
def tpm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """pin on swtpm (auth value = the offline PIN), 3 tries, a 2 s recovery time."""
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    from hsm_auth.testing.swtpm import set_da_parameters, swtpm_available

    reason = swtpm_available()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("tpm")
    with prepare(path, fido2=False) as tokens:
        backend, settings = tokens.methods[Method.DEVICE]
        assert backend == "tpm2"
        set_da_parameters(settings["tcti"], max_tries=3, recovery_time=2)
        tokens.methods = {Method.PIN: ("tpm2", {**settings, "auth": "pin"})}
        write_config(path / "config.toml", tokens)
        yield _home(path, [Method.PIN])


def test_pkcs11_wrong_pin_is_one_plain_line(softhsm_home: Home) -> None:
    home = softhsm_home
    data = _session(home.path, Method.PIN)
    finish = ("finish", "--method", "pin", "--pin-file", str(home.wrong_pin), data)
    assert error_line(home.path, 32, *finish) == "wrong PIN"  # SoftHSM gives no count
    assert error_json(home.path, 32, *finish) == {
        "error": "wrong PIN",
        "type": "PinInvalid",
        "retries_left": None,
        "retry_after": None,
        "locked": False,
    }


@pytest.mark.swtpm
def test_tpm_wrong_pins_count_down_once_then_lockout_says_when(tpm_home: Home) -> None:
    home = tpm_home
    data = _session(home.path, Method.PIN)
    finish = ("finish", "--method", "pin", "--pin-file", str(home.wrong_pin), data)
    assert error_line(home.path, 32, *finish) == "wrong PIN (2 retries left)"
    assert error_json(home.path, 32, *finish) == {
        "error": "wrong PIN (1 retry left)",
        "type": "PinInvalid",
        "retries_left": 1,
        "retry_after": None,
        "locked": False,
    }
    locked = error_json(home.path, 33, *finish)
    assert locked["type"] == "PinLocked" and locked["locked"] is True
    assert locked["retries_left"] == 0 and locked["retry_after"] == 2.0
    line = error_line(home.path, 33, *finish)
    assert line.endswith("(retry in 2 s)") and line.count("retry") == 1, line
    assert "retries left" not in line


@pytest.mark.fido2
def test_fido2_failed_user_verification_is_worded_once(softhsm_home: Home) -> None:
    pytest.importorskip("fido2")
    from hsm_auth.testing.soft_fido2 import MAX_UV_RETRIES, SoftAuthenticator

    home = softhsm_home
    device = SoftAuthenticator.load(home.path / "soft-fido2-biometric.json")
    device.configure(uv_outcome="fail")
    try:
        data = _session(home.path, Method.BIOMETRIC)
        finish = ("finish", "--method", "biometric", data)
        left = MAX_UV_RETRIES - 1
        first = error_line(home.path, 34, *finish)
        assert first == f"user verification failed ({left} retries left)"
        assert error_json(home.path, 34, *finish) == {
            "error": f"user verification failed ({left - 1} retries left)",
            "type": "UserVerificationFailed",
            "retries_left": left - 1,
            "retry_after": None,
            "locked": False,
        }
        for _ in range(left - 3):  # 5 .. 2
            error_line(home.path, 34, *finish)
        assert error_line(home.path, 34, *finish) == "user verification failed (1 retry left)"
        blocked = error_json(home.path, 34, *finish)
        assert blocked["locked"] is True and blocked["retries_left"] == 0
        line = error_line(home.path, 34, *finish)
        assert "blocked" in line and "retr" not in line, line
    finally:
        device.configure(uv_outcome="succeed")


@pytest.mark.fido2
def test_software_authenticator_needs_the_setting(softhsm_home: Home, tmp_path: Path) -> None:
    pytest.importorskip("fido2")
    config = (softhsm_home.path / "config.toml").read_text()
    assert "allow_software_authenticator = true" in config  # the demo opts in explicitly
    other = tmp_path / "home"
    other.mkdir()
    (other / "config.toml").write_text(config.replace("allow_software_authenticator = true\n", ""))
    cli_ok(other, "verifier", "init")
    offer = cli_ok(
        other, "verifier", "offer", *code_file(other), "--user", "bob", "--methods", "biometric"
    )
    line = error_line(other, 8, "enroll", *code_file(other), "--method", "biometric", stdin=offer)
    assert "software FIDO2 authenticator" in line
    assert line.endswith("set allow_software_authenticator = true for this method to use it")
    assert not (other / "authenticator" / "credentials.json").exists()
