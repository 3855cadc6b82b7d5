"""The CLI as a user runs it: separate processes, real SoftHSM tokens, exit
codes, one-line errors, no traceback, no state changed by bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from _cli import code_file

from hsm_auth import textcode
from hsm_auth.demo import prepare
from hsm_auth.testing.softhsm import softhsm_available
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm


def run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(home), *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def ok(home: Path, *args: str, stdin: str | None = None) -> str:
    result = run(home, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def fails(home: Path, code: int, *args: str, stdin: str | None = None) -> str:
    result = run(home, *args, stdin=stdin)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("hsm-auth: error: ")
    return lines[-1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("home")
    with prepare(home, tpm=False, fido2=False):  # SoftHSM only: no process to keep running
        pin_file = home / "offline.pin"
    ok(home, "verifier", "init", "--name", "CLI verifier")
    for method in ("device", "pin"):
        offer = ok(
            home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method
        )
        extra = ["--pin-file", str(pin_file)] if method == "pin" else []
        response = ok(home, "enroll", *code_file(home), "--method", method, *extra, stdin=offer)
        assert ok(home, "verifier", "enroll", stdin=response).startswith("HA1:")  # the result
    home.joinpath("pin-file").write_text(str(pin_file))
    return home


def pin_file(home: Path) -> str:
    return home.joinpath("pin-file").read_text()


def session(home: Path, *extra: str) -> tuple[str, str]:
    out = json.loads(
        ok(
            home,
            "--json",
            "verifier",
            "session",
            "--user",
            "alice",
            "--context",
            "Log in to ws",
            *extra,
        )
    )
    return out["session"], out["data"]


def snapshot(home: Path) -> tuple[bytes, str]:
    creds = (home / "authenticator" / "credentials.json").read_bytes()
    return creds, ok(home, "verifier", "credentials")


@pytest.mark.parametrize("method", ["device", "pin"])
def test_cli_flow_accepts_then_refuses_replay(home, tmp_path, method):
    sid, data = session(home, "--qr", f"svg:{tmp_path / 'qr.svg'}")
    assert (tmp_path / "qr.svg").read_text().startswith("<?xml")
    shown = json.loads(ok(home, "--json", "start", data))
    assert shown == {
        "verifier": "CLI verifier",
        "user": "alice",
        "context": "Log in to ws",
        "methods": ["device", "pin"],
        "expires": shown["expires"],
    }
    extra = ["--pin-file", pin_file(home)] if method == "pin" else []
    otp = ok(home, "finish", "--method", method, *extra, data)
    assert len(otp) == 8 and otp.isdigit()
    assert "accepted" in ok(home, "verifier", "verify", "--session", sid, "--otp", otp)
    assert fails(home, 40, "verifier", "verify", "--session", sid, "--otp", otp).endswith(
        "OTP refused"
    )


def test_terminal_qr_goes_to_stderr(home):
    result = run(
        home, "verifier", "session", "--user", "alice", "--context", "x", "--qr", "terminal"
    )
    assert result.returncode == 0
    assert "\u2588" in result.stderr and "\u2588" not in result.stdout


def _reencode(data: str, change) -> str:
    body, sig = cbor2.loads(textcode.decode(data))
    fields = cbor2.loads(body)
    body, sig = change(body, fields, sig)
    return textcode.encode(cbor2.dumps([body, sig]))


BAD_DATA = {
    "random-bytes": (3, lambda d: textcode.encode(os.urandom(100))),
    "truncated": (3, lambda d: d[: len(d) // 2]),
    "wrong-version": (
        4,
        lambda d: _reencode(d, lambda b, f, s: (cbor2.dumps([7, *f[1:]]), s)),
    ),
    "tampered": (6, lambda d: _reencode(d, lambda b, f, s: (b.replace(b"ws", b"wz"), s))),
    "foreign-signed": (6, lambda d: _reencode(d, lambda b, f, s: (b, bytes(64)))),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_verification_data_has_its_own_exit_code_and_changes_nothing(home, case):
    code, mangle = BAD_DATA[case]
    _, data = session(home)
    before = snapshot(home)
    fails(home, code, "start", mangle(data))
    fails(home, code, "finish", "--method", "device", mangle(data))
    assert snapshot(home) == before


def test_expired_verification_data(home):
    # an hour ago (an identity edited to a negative session_ttl is refused as unsafe state)
    with Verifier.open(home / "verifier", clock=lambda: time.time() - 3600) as verifier:
        data = verifier.start_session("alice", "Log in to ws").text
    assert "expired" in fails(home, 5, "start", data)


def test_wrong_pin_unknown_method_and_missing_pin(home, tmp_path):
    _, data = session(home)
    before = snapshot(home)
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000")
    wrong.chmod(0o600)  # a PIN file others can read is refused before the token is tried
    assert "wrong PIN" in fails(
        home, 32, "finish", "--method", "pin", "--pin-file", str(wrong), data
    )
    fails(home, 7, "finish", "--method", "retina", data)
    fails(home, 31, "finish", "--method", "pin", data)  # no terminal, no PIN file
    assert snapshot(home) == before


def test_absent_token(home, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text(
        (home / "config.toml").read_text().replace("hsm-auth-device", "unplugged-token")
    )
    ok(other, "verifier", "init")
    offer = ok(
        other, "verifier", "offer", *code_file(other), "--user", "bob", "--methods", "device"
    )
    fails(other, 22, "enroll", *code_file(other), "--method", "device", stdin=offer)


def test_backends_lists_pkcs11_with_details(home):
    listing = json.loads(ok(home, "--json", "backends"))["backends"]
    pkcs11 = next(b for b in listing if b["name"] == "pkcs11")
    assert pkcs11["available"] is True


def test_help_documents_exit_codes(home):
    assert "exit codes" in ok(home, "--help")


def test_secrets_are_not_world_readable(home):
    for path in [
        home / "verifier" / "keys.pem",
        home / "authenticator" / "credentials.json",
        home / "verifier" / "verifier.db",
    ]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_verify_reads_the_otp_from_stdin_to_keep_it_out_of_argv(home):
    sid, data = session(home)
    otp = ok(home, "finish", "--method", "device", data)
    assert "accepted" in ok(home, "verifier", "verify", "--session", sid, stdin=otp + "\n")
    fails(home, 2, "verifier", "verify", "--session", sid, stdin="")


def test_messages_can_be_given_as_a_file_path(home, tmp_path):
    _, data = session(home)
    data_file = tmp_path / "data.txt"
    data_file.write_text(data + "\n")
    shown = json.loads(ok(home, "--json", "start", str(data_file)))
    assert shown["context"] == "Log in to ws"
    assert json.loads(ok(home, "--json", "start", "@" + str(data_file))) == shown
    fails(home, 2, "start", "@" + str(tmp_path / "missing.txt"))
