"""The sync dead end, closed: OTPs made and never submitted exhaust offline use
("login required"); after an online login the verifier's sync message, answered
by a report in which the token states its ATC (MAC under the OTP key, made in the
token), moves the verifier's ATC to the token's, and the next OTP is accepted.
On real SoftHSM tokens, through the library and through the CLI; then attacks on
the report (forged, altered, replayed, late, for another session)."""

from __future__ import annotations

import json
import os

import cbor2
import pytest
from _cli import cli_ok, code_file, run_cli
from _verifier_device import Clock

from hsm_auth import textcode
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.demo import prepare
from hsm_auth.errors import InvalidInput, InvalidToken, LoginRequired
from hsm_auth.methods import Method
from hsm_auth.protocol import SyncMessage
from hsm_auth.testing.softhsm import init_token, softhsm_available, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock):
    v = Verifier.init(tmp_path / "verifier", "Workstation", clock=clock)
    yield v
    v.close()


@pytest.fixture
def auth(softhsm_env, tmp_path, clock, verifier):
    token = init_token(unique_label("sync"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
    with Authenticator(tmp_path / "auth", config, clock=clock) as a:
        offer = verifier.create_offer("alice", methods=[Method.DEVICE])
        response = a.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        verifier.accept_enrollment(response)
        yield a


def _otp(verifier, auth, context="Log in"):
    session = verifier.start_session("alice", context)
    request = auth.start_offline_authentication(session.text)
    return session, auth.finish_offline_authentication(request, Method.DEVICE)


def _exhaust(verifier, auth):
    """Make ``window`` OTPs that are never submitted; the next one is refused."""
    window = verifier.identity.window
    for _ in range(window):
        _otp(verifier, auth)
    with pytest.raises(LoginRequired):
        _otp(verifier, auth)
    return window


def test_unsubmitted_otps_then_sync_then_the_next_otp_is_accepted(verifier, auth):
    window = _exhaust(verifier, auth)
    assert verifier.credential("alice", Method.DEVICE).atc == 0  # it saw none of them
    result = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    assert result.unsubmitted == window
    assert result.atc == window + 1  # the report itself used one ATC
    assert result.method.synced_atc == 0  # counted from there only once acknowledged
    accepted = verifier.apply_sync(result.report)
    assert accepted.atc == window + 1
    assert verifier.credential("alice", Method.DEVICE).atc == window + 1
    with pytest.raises(LoginRequired):  # the report alone resets nothing here
        _otp(verifier, auth)
    assert auth.apply_sync_ack(accepted.ack).synced_atc == window + 1
    session, otp = _otp(verifier, auth)
    assert verifier.verify(session.session_id, otp.otp).atc == window + 2
    for _ in range(window - 1):  # a whole window of offline use again
        session, otp = _otp(verifier, auth)
        verifier.verify(session.session_id, otp.otp)


def test_without_the_report_the_verifier_stays_behind(verifier, auth):
    """Why the report matters: the token's OTPs are beyond the verifier's window."""
    window = _exhaust(verifier, auth)
    auth.sync(verifier.sync_message("alice", Method.DEVICE))  # report never delivered
    with pytest.raises(LoginRequired):  # and so never acknowledged: the count stays
        _otp(verifier, auth)
    assert verifier.credential("alice", Method.DEVICE).atc == 0  # still behind
    # a later sync still gets out of it: the report carries wherever the token is
    result = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    auth.apply_sync_ack(verifier.apply_sync(result.report).ack)
    session, otp = _otp(verifier, auth)
    assert verifier.verify(session.session_id, otp.otp).atc == window + 3


def _altered(report: str, **fields) -> str:
    outer = cbor2.loads(textcode.decode(report))
    body = cbor2.loads(outer[0])
    order = ["verifier_id", "session_id", "user", "method", "atc", "credential_id"]
    for name, value in fields.items():
        body[2 + order.index(name)] = value
    return textcode.encode(cbor2.dumps([cbor2.dumps(body), outer[1]]))


def _forged_mac(report: str) -> str:
    outer = cbor2.loads(textcode.decode(report))
    mac = bytes([outer[1][0] ^ 1]) + outer[1][1:]
    return textcode.encode(cbor2.dumps([outer[0], mac]))


def test_a_report_is_good_once_and_only_as_the_token_made_it(verifier, auth, clock):
    result = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    report = result.report
    before = verifier.credential("alice", Method.DEVICE)
    for bad in (
        _forged_mac(report),
        _altered(report, atc=result.atc + 50),  # push the ATC further
        _altered(report, user="bob"),
    ):
        with pytest.raises(InvalidToken):
            verifier.apply_sync(bad)
    with pytest.raises(InvalidInput):
        verifier.apply_sync(_altered(report, verifier_id=os.urandom(8)))
    after = verifier.credential("alice", Method.DEVICE)
    assert after.atc == before.atc
    assert after.failures >= 1  # a wrong MAC counts toward lockout like a wrong OTP
    verifier.apply_sync(report)
    with pytest.raises(InvalidToken):  # the sync session is burned
        verifier.apply_sync(report)

    late = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    clock.now += verifier.identity.offer_ttl + 1
    with pytest.raises(InvalidToken):
        verifier.apply_sync(late.report)


def test_a_sync_session_takes_no_otp_and_a_report_needs_a_sync_session(verifier, auth):
    message = verifier.sync_message("alice", Method.DEVICE)
    sync, _ = SyncMessage.from_text(message)
    with pytest.raises(InvalidToken):  # whatever OTP: the sync session is not an OTP session
        verifier.verify(sync.session_id, "12345678")
    session = verifier.start_session("alice", "an ordinary session")
    report = auth.sync(message).report
    with pytest.raises(InvalidToken):  # pointed at an ordinary session: refused
        verifier.apply_sync(_altered(report, session_id=session.session_id))
    assert verifier.apply_sync(report).atc == 1
    assert [r.event.value for r in verifier.store.audit_records("alice")][-1] == "synced"


def test_an_old_report_never_moves_the_atc_back(verifier, auth):
    first = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    second = auth.sync(verifier.sync_message("alice", Method.DEVICE))
    verifier.apply_sync(second.report)
    with pytest.raises(InvalidToken):
        verifier.apply_sync(first.report)
    assert verifier.credential("alice", Method.DEVICE).atc == second.atc


# --- the same sequence through the CLI, as a user runs it ----------------------


def test_cli_login_required_then_sync_then_accepted(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    with prepare(home, tpm=False, fido2=False):
        pass
    cli_ok(home, "verifier", "init", "--name", "CLI")
    offer = cli_ok(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", "device"
    )
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)

    def session() -> tuple[str, str]:
        out = json.loads(
            cli_ok(home, "--json", "verifier", "session", "--user", "alice", "--context", "ws")
        )
        return out["session"], out["data"]

    for _ in range(10):
        cli_ok(home, "finish", "--method", "device", session()[1])  # never submitted
    refused = run_cli(home, "finish", "--method", "device", session()[1])
    assert refused.returncode == 36, refused.stderr
    sync = cli_ok(home, "verifier", "sync", "--user", "alice", "--method", "device")
    report = run_cli(home, "sync", sync)
    assert report.returncode == 0, report.stderr
    assert "10 OTPs were never submitted" in report.stderr
    assert run_cli(home, "finish", "--method", "device", session()[1]).returncode == 36
    applied = run_cli(home, "verifier", "sync-report", stdin=report.stdout)
    assert applied.returncode == 0, applied.stderr
    assert "synced: alice with device (ATC 11)" in applied.stderr
    assert run_cli(home, "finish", "--method", "device", session()[1]).returncode == 36
    assert "offline use counts from ATC 11" in cli_ok(home, "sync", stdin=applied.stdout)
    sid, data = session()
    otp = cli_ok(home, "finish", "--method", "device", data)
    assert "accepted: alice with device (ATC 12)" in cli_ok(
        home, "verifier", "verify", "--session", sid, stdin=otp + "\n"
    )
