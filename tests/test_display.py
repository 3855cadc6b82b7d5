"""What the user sees is what the OTP binds (issue 10, finding 4).

A context, verifier name or user name with a C1 control, a bidi control, a
zero-width character, a line or paragraph separator, DEL or a text that is not
NFC is refused by the verifier before it signs (library and CLI), and again by
the authenticator in signed data: the data below is signed with the verifier's
real key (keys.pem), so only the text check stops it. The CLI never writes a raw
control character to a terminal.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import unicodedata
from pathlib import Path

import pytest
from _cli import cli_ok, code_file
from _verifier_device import Clock, enroll

from hsm_auth import display
from hsm_auth.authenticator import Authenticator
from hsm_auth.cli import main
from hsm_auth.config import Paths
from hsm_auth.config import load as load_config
from hsm_auth.demo import prepare
from hsm_auth.errors import DecodeError, InvalidInput
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentOffer, VerificationData
from hsm_auth.testing.softhsm import softhsm_available
from hsm_auth.verifier import Verifier
from hsm_auth.verifier_keys import FileVerifierKeys

#: (text, the code point the refusal names)
BAD = [
    ("Pay 9,999 EUR to acct 666\u009b2K\u009b1GLog in to ws-7", "U+009B"),  # C1 CSI
    ("Log in\u0085Pay 10 EUR", "U+0085"),  # C1 NEL
    ("Pay to acct \u202e999\u202c", "U+202E"),  # bidi override
    ("Pay \u2066666\u2069 EUR", "U+2066"),  # bidi isolate
    ("Log\u200bin", "U+200B"),  # zero-width space
    ("\ufeffLog in", "U+FEFF"),  # zero-width no-break space
    ("Log in\u2028Pay", "U+2028"),  # line separator
    ("Log in\u2029Pay", "U+2029"),  # paragraph separator
    ("Log in\x7f", "U+007F"),  # DEL
    ("Log in\x1b[2K", "U+001B"),  # ESC (C0)
    ("Pay Rene\u0301", "U+0301"),  # not NFC: e + combining acute
    ("\u212b ngstr\u00f6m", "U+212B"),  # not NFC: ANGSTROM SIGN
]
IDS = [code for _, code in BAD]
GOOD = ["Log in to ws-7", "Zahlung an Müller: 9,99 €", "東京のサーバーにログイン", "Pay René"]


def _raw_refused(text: str) -> list[str]:
    """The characters of ``text`` that must never reach a terminal raw."""
    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


# --- the policy ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_policy_names_the_offending_code_point(text: str, code: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(code)) as info:
        display.check(text, "the context", max_len=display.MAX_CONTEXT)
    message = str(info.value)
    assert message.startswith("the context ") and "\n" not in message
    assert not _raw_refused(message)  # the message names, never carries, the character
    assert not _raw_refused(display.escape(text))


@pytest.mark.parametrize("text", GOOD)
def test_policy_accepts_nfc_text(text: str) -> None:
    assert display.check(text, "the context", max_len=display.MAX_CONTEXT) == text
    assert display.escape(text) == text


def test_policy_bounds_the_length() -> None:
    display.check("x" * display.MAX_CONTEXT, "the context", max_len=display.MAX_CONTEXT)
    with pytest.raises(InvalidInput, match="longer than 200"):
        display.check("x" * 201, "the context", max_len=display.MAX_CONTEXT)
    with pytest.raises(InvalidInput, match="empty"):
        display.check("", "the context", max_len=display.MAX_CONTEXT)


def test_escape_keeps_json_valid() -> None:
    line = display.escape(json.dumps({"context": "a\x7fb"}))  # json leaves DEL raw
    assert json.loads(line) == {"context": "a\x7fb"} and "\x7f" not in line


# --- the verifier refuses before it signs ----------------------------------------


@pytest.fixture
def verifier(tmp_path: Path):
    v = Verifier.init(tmp_path / "verifier", "Test verifier", clock=Clock())
    enroll(v, "alice")
    yield v
    v.close()


@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_verifier_refuses_the_context(verifier: Verifier, text: str, code: str) -> None:
    with pytest.raises(InvalidInput, match=f"the context .*{re.escape(code)}"):
        verifier.start_session("alice", text)
    assert verifier.start_session("alice", "Log in to ws-7").data.context == "Log in to ws-7"


@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_verifier_refuses_the_user_name(verifier: Verifier, text: str, code: str) -> None:
    with pytest.raises(InvalidInput, match=f"the user name .*{re.escape(code)}"):
        verifier.create_offer(text.replace(" ", "_"))


@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_verifier_init_refuses_the_name(tmp_path: Path, text: str, code: str) -> None:
    with pytest.raises(InvalidInput, match=f"the verifier name .*{re.escape(code)}"):
        Verifier.init(tmp_path / "v", text)
    assert not (tmp_path / "v" / "identity.json").exists()


def test_offer_refuses_a_name_an_older_version_stored(tmp_path: Path) -> None:
    Verifier.init(tmp_path / "v", "Old verifier").close()
    identity = tmp_path / "v" / "identity.json"
    doc = json.loads(identity.read_text())
    identity.write_text(json.dumps({**doc, "name": "Old\x1b[2Jverifier"}))
    with Verifier.open(tmp_path / "v") as v, pytest.raises(InvalidInput, match="U\\+001B"):
        v.create_offer("alice")


# --- the decoders refuse signed data (the authenticator's side) -------------------


def _forged_data(keys: FileVerifierKeys, verifier_id: bytes, context: str) -> str:
    """Verification data with ``context``, signed with the verifier's real key."""
    data = VerificationData(
        verifier_id=verifier_id,
        user="alice",
        challenge=os.urandom(16),
        context=context,
        methods=(Method.DEVICE, Method.PIN),
        expires=2**40,
    )
    return data.to_text(keys.sign_raw)


@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_decoder_refuses_signed_offers_with_a_bad_name(
    verifier: Verifier, text: str, code: str
) -> None:
    verifier.policy = dataclasses.replace(verifier.policy, allow_override=True)
    offer = verifier.create_offer("alice", replace=True).offer
    forged = EnrollmentOffer(**{**offer.__dict__, "verifier_name": text, "signature": b""})
    with pytest.raises(DecodeError, match=f"verifier_name.*{re.escape(code)}"):
        EnrollmentOffer.from_text(forged.to_text(verifier.keys.sign_raw))


# --- the authenticator and the CLI, on SoftHSM -------------------------------------


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("home")
    with prepare(home, tpm=False, fido2=False):
        pin_file = home / "offline.pin"
    # Enrollment touches the SoftHSM tokens of this home: in processes of their own, so
    # that the module's SoftHSM, loaded in this process by other tests, is never asked.
    cli_ok(home, "verifier", "init", "--name", "Display verifier")
    for method in ("device", "pin"):
        code = code_file(home)
        offer = cli_ok(home, "verifier", "offer", *code, "--user", "alice", "--methods", method)
        extra = ["--pin-file", str(pin_file)] if method == "pin" else []
        response = cli_ok(
            home, "enroll", *code_file(home), "--method", method, *extra, "--offer", offer
        )
        cli_ok(home, "verifier", "enroll", response)
    return home


class _env:
    """The CLI applies the config's [environment] (SOFTHSM2_CONF) to this process:
    put it back afterwards so other tests keep their own tokens."""

    def __enter__(self) -> None:
        self._saved = dict(os.environ)

    def __exit__(self, *exc: object) -> None:
        os.environ.clear()
        os.environ.update(self._saved)


def _cli(home: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with _env():
        code = main(["--home", str(home), *args], out=out, err=err)
    return code, out.getvalue().strip(), err.getvalue()


def _file_keys(home: Path) -> tuple[FileVerifierKeys, bytes]:
    directory = Paths.from_env(home).verifier_dir
    identity = json.loads((directory / "identity.json").read_text())
    return FileVerifierKeys.load(directory / "keys.pem"), bytes.fromhex(identity["verifier_id"])


@pytest.mark.softhsm
@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_authenticator_refuses_signed_data_with_a_bad_context(
    home: Path, text: str, code: str
) -> None:
    keys, verifier_id = _file_keys(home)
    try:
        good = _forged_data(keys, verifier_id, "Log in to ws-7")
        bad = _forged_data(keys, verifier_id, text)
    finally:
        keys.close()
    paths = Paths.from_env(home)
    with _env():
        authenticator = Authenticator(paths.authenticator_dir, load_config(paths))
        # The signature is the verifier's: the same data with a clean context is shown...
        assert authenticator.start_offline_authentication(good).context == "Log in to ws-7"
        with pytest.raises(DecodeError, match=f"context.*{re.escape(code)}"):  # ...this one is not
            authenticator.start_offline_authentication(bad)
    for command in (["start"], ["finish", "--method", "device"]):
        result, out, err = _cli(home, *command, bad)
        assert result != 0 and code in err and err.startswith("hsm-auth: error: ")
        assert not _raw_refused(out + err)


@pytest.mark.softhsm
@pytest.mark.parametrize(("text", "code"), BAD, ids=IDS)
def test_cli_session_refuses_the_context(home: Path, text: str, code: str) -> None:
    result, out, err = _cli(home, "verifier", "session", "--user", "alice", "--context", text)
    assert result == InvalidInput.exit_code and out == ""
    assert err.splitlines() == [err.strip()] and code in err and "the context" in err
    assert not _raw_refused(err)


def test_cli_verifier_init_refuses_a_name_with_esc(tmp_path: Path) -> None:
    result, _, err = _cli(tmp_path, "verifier", "init", "--name", "ACME\x1b[8m bank")
    assert result == InvalidInput.exit_code and "U+001B" in err and not _raw_refused(err)
    assert not list(tmp_path.rglob("identity.json"))


@pytest.mark.softhsm
def test_cli_writes_no_raw_control_character(home: Path, tmp_path: Path) -> None:
    """A name that was never checked (a state file edited by hand) is shown escaped."""
    state = Paths.from_env(home).authenticator_dir / "credentials.json"
    saved = state.read_bytes()
    try:
        doc = json.loads(saved)
        for v in doc["verifiers"]:
            v["name"] = "Bank\u009b2K\u202eevil"
        state.write_text(json.dumps(doc))
        keys, verifier_id = _file_keys(home)
        try:
            data = _forged_data(keys, verifier_id, "Log in to ws-7")
        finally:
            keys.close()
        result, out, err = _cli(home, "start", data)
        assert result == 0, err
        assert "Verifier: Bank\\u009b2K\\u202eevil" in out and not _raw_refused(out + err)
        result, out, err = _cli(home, "--json", "start", data)
        assert json.loads(out)["verifier"] == "Bank\u009b2K\u202eevil"
        assert not _raw_refused(out)
    finally:
        state.write_bytes(saved)


def test_cli_usage_errors_quote_argv_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["start", "HA1:X", "Pay\u009b2K\nLog in\u202e"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hsm-auth: error: unrecognized arguments")
    assert "Pay\\u009b2K\\u000aLog in\\u202e" in err and not _raw_refused(err)
