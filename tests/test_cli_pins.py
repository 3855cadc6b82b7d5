"""What the CLI says about PINs: the pin method's prompt asks for the PIN the
token already has, a PIN option is refused (not ignored) where no PIN is used,
and a token that needs its user PIN names the option or config key that gives it."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from _cli import cli_env, cli_ok, code_file, error_line, run_cli

from hsm_auth.demo import prepare
from hsm_auth.testing.softhsm import softhsm_available

pytestmark = pytest.mark.softhsm


@pytest.fixture
def home(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    with prepare(home, tpm=False, fido2=False):
        pass
    assert run_cli(home, "verifier", "init", "--name", "PINs").returncode == 0
    return home


def offer(home: Path, method: str) -> str:
    result = run_cli(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_pin_option_is_refused_for_the_device_method(home):
    pin_file = home / "offline.pin"
    line = error_line(
        run_cli(
            home,
            "enroll",
            "--method",
            "device",
            "--pin-file",
            str(pin_file),
            stdin=offer(home, "device"),
        ),
        2,
    )
    assert "--pin-file/--pin-fd are for the pin method only" in line
    assert "pin-source=file:PATH" in line and "[methods.device]" in line
    assert not (home / "authenticator" / "credentials.json").exists()  # nothing enrolled
    line = error_line(
        run_cli(
            home,
            "enroll",
            *code_file(home),
            "--method",
            "device",
            "--pin-fd",
            "0",
            stdin=offer(home, "device"),
        ),
        2,
    )
    assert "--pin-file/--pin-fd are for the pin method only" in line


def test_finish_refuses_a_pin_option_for_device_in_one_line_before_showing_anything(home):
    response = cli_ok(
        home, "enroll", *code_file(home), "--method", "device", stdin=offer(home, "device")
    )
    cli_ok(home, "verifier", "enroll", stdin=response)
    data = cli_ok(home, "verifier", "session", "--user", "alice", "--context", "c").splitlines()[-1]
    pin_file = home / "offline.pin"
    result = run_cli(home, "finish", "--method", "device", "--pin-file", str(pin_file), data)
    line = error_line(result, 2)
    assert "--pin-file/--pin-fd are for the pin method only" in line
    assert result.stderr.strip() == "hsm-auth: error: " + line  # no Verifier:/Context: first
    assert result.stdout == ""


def test_a_device_token_without_pin_source_says_where_the_pin_goes(home):
    config = home / "config.toml"
    text = config.read_text()
    start = text.index("&pin-source=")
    end = text.index('"', start)
    config.write_text(text[:start] + text[end:])  # the device uri without its pin-source
    result = run_cli(
        home, "enroll", *code_file(home), "--method", "device", stdin=offer(home, "device")
    )
    line = error_line(result, 31)
    assert "Authorization" not in line
    assert line.endswith(
        "the token needs its user PIN: set pin-source=file:PATH (a 0600 file holding the "
        "token's user PIN) in the uri of [methods.device] in config.toml"
    ), line


def _pty_run(home: Path, args: list[str], answer: str, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with a controlling terminal; answer the first PIN prompt."""
    env = cli_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        try:
            os.execve(
                sys.executable, [sys.executable, "-m", "hsm_auth", "--home", str(home), *args], env
            )
        finally:
            os._exit(127)
    seen, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if not answered and seen.rstrip().endswith(b":"):
                os.write(fd, answer.encode() + b"\n")
                answered = True
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_the_pin_prompt_asks_for_the_existing_token_pin(home):
    offer_file = home / "offer.txt"
    offer_file.write_text(offer(home, "pin"))
    pin = (home / "offline.pin").read_text()
    code, screen = _pty_run(
        home, ["enroll", *code_file(home), "--method", "pin", "--offer", f"@{offer_file}"], pin
    )
    assert "Offline PIN (PKCS#11: the token's user PIN; TPM2: the PIN for the new keys):" in screen
    assert "New offline PIN" not in screen
    assert code == 0, screen


def test_enroll_asks_for_the_activation_code_on_the_terminal(home):
    """Without --activation-code-file, enroll asks on the terminal (never argv or stdin)."""
    offer_file = home / "offer-code.txt"
    offer_file.write_text(offer(home, "device"))
    code = (home / "activation-code").read_text().strip()
    status, screen = _pty_run(
        home, ["enroll", "--method", "device", "--offer", f"@{offer_file}"], code.lower()
    )
    assert "Activation code (from the verifier" in screen
    assert status == 0, screen
    assert "enrolled the device method" in screen
