"""The whole offline flow on real SoftHSM tokens through the library API:
enroll, start, finish, verify, replay refused, and every bad input refused
without changing state."""

from __future__ import annotations

import dataclasses
import os

import cbor2
import pytest
from _verifier_device import Clock
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, textcode
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    AlreadyEnrolled,
    ConfigError,
    DecodeError,
    ExpiredMessage,
    InvalidToken,
    LoginRequired,
    PinInvalid,
    PinRequired,
    TokenNotFound,
    UnknownMethod,
    UnsupportedVersion,
    UntrustedMessage,
)
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

OFFLINE_PIN = "482916"


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def tokens(softhsm_env, tmp_path):
    device = init_token(unique_label("dev"), so_pin="12345678", user_pin="device-secret")
    pin = init_token(unique_label("pin"), so_pin="12345678", user_pin=OFFLINE_PIN)
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(device.user_pin)
    pin_file.chmod(0o600)
    device_uri = Pkcs11Uri(
        token=device.label, module_path=device.module_path, pin_source=f"file:{pin_file}"
    )
    pin_uri = Pkcs11Uri(token=pin.label, module_path=pin.module_path)
    return Config(
        methods={
            Method.DEVICE: MethodConfig("pkcs11", {"uri": str(device_uri)}),
            Method.PIN: MethodConfig("pkcs11", {"uri": str(pin_uri), "allow_unenforced_pin": True}),
        }
    )


@pytest.fixture
def verifier(tmp_path, clock):
    v = Verifier.init(tmp_path / "verifier", "Workstation", clock=clock)
    yield v
    v.close()


@pytest.fixture
def warnings():
    return []


@pytest.fixture
def authenticator(tmp_path, tokens, clock, warnings):
    with Authenticator(tmp_path / "auth", tokens, clock=clock, warn=warnings.append) as a:
        yield a


@pytest.fixture
def enrolled(verifier, authenticator):
    for method in (Method.DEVICE, Method.PIN):
        offer = verifier.create_offer("alice", methods=[method])
        pin = OFFLINE_PIN if method is Method.PIN else None
        verifier.accept_enrollment(
            authenticator.add_or_update(
                method, offer.text, activation_code=offer.activation_code, pin=pin
            )
        )
    return authenticator


@pytest.mark.parametrize("method", [Method.DEVICE, Method.PIN])
def test_offline_flow_accepts_once_then_refuses_replay(verifier, enrolled, method, warnings):
    session = verifier.start_session("alice", "Log in to ws-7 as alice")
    request = enrolled.start_offline_authentication(session.text)
    assert request.verifier_name == "Workstation"
    assert request.context == "Log in to ws-7 as alice"
    assert set(request.methods) == {Method.DEVICE, Method.PIN}
    pin = OFFLINE_PIN if method is Method.PIN else None
    result = enrolled.finish_offline_authentication(request, method, pin=pin)
    assert len(result.otp) == 8 and result.otp.isdigit()
    accepted = verifier.verify(session.session_id, result.otp)
    assert (accepted.method, accepted.atc) == (method, result.atc)
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, result.otp)
    if method is Method.PIN:  # SoftHSM has no retry limit: warned every time
        assert any("does not limit PIN retries" in w for w in warnings)


def test_counter_advances_for_every_otp(verifier, enrolled):
    atcs = []
    for _ in range(3):
        session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
        request = enrolled.start_offline_authentication(session.text)
        atcs.append(enrolled.finish_offline_authentication(request, Method.DEVICE).atc)
    assert atcs == sorted(set(atcs)) and len(atcs) == 3


def test_pin_method_is_refused_without_explicit_opt_in(tmp_path, tokens, verifier, clock):
    strict = Config(
        methods={
            Method.PIN: MethodConfig("pkcs11", {"uri": tokens.methods[Method.PIN].settings["uri"]})
        }
    )
    with Authenticator(tmp_path / "strict", strict, clock=clock) as a:
        offer = verifier.create_offer("bob", methods=[Method.PIN])
        with pytest.raises(ConfigError, match="does not limit PIN retries"):
            a.add_or_update(
                Method.PIN, offer.text, activation_code=offer.activation_code, pin=OFFLINE_PIN
            )
        assert a.enrolled == []


def test_wrong_pin_releases_no_otp_and_changes_nothing(verifier, enrolled):
    session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
    request = enrolled.start_offline_authentication(session.text)
    with pytest.raises(PinInvalid):
        enrolled.finish_offline_authentication(request, Method.PIN, pin="000000")
    with pytest.raises(PinRequired):
        enrolled.finish_offline_authentication(request, Method.PIN)
    result = enrolled.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN)
    assert result.atc == 1  # the failed attempts did not move the counter
    assert verifier.verify(session.session_id, result.otp).atc == 1


def _tamper(text: str) -> str:
    body, sig = cbor2.loads(textcode.decode(text))
    return textcode.encode(cbor2.dumps([body.replace(b"ctx", b"cty"), sig]))


def _wrong_version(text: str) -> str:
    body, sig = cbor2.loads(textcode.decode(text))
    fields = cbor2.loads(body)
    fields[0] += 1  # a version this side does not speak
    return textcode.encode(cbor2.dumps([cbor2.dumps(fields), sig]))


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda t: textcode.encode(os.urandom(120)), DecodeError),
        (lambda t: t[: len(t) // 2], DecodeError),
        (lambda t: "not a code", DecodeError),
        (_wrong_version, UnsupportedVersion),
        (_tamper, UntrustedMessage),
    ],
    ids=["random-bytes", "truncated", "not-ours", "wrong-version", "tampered"],
)
def test_bad_verification_data_is_refused_before_anything_is_shown(
    verifier, enrolled, mangle, error
):
    session = verifier.start_session("alice", "ctx")
    with pytest.raises(error):
        enrolled.start_offline_authentication(mangle(session.text))


def test_foreign_signed_verification_data_is_refused(verifier, enrolled):
    session = verifier.start_session("alice", "ctx")
    data, _ = VerificationData.from_text(session.text)
    rogue = cec.generate_private_key(cec.SECP256R1())
    forged = data.to_text(lambda b: ec.der_to_raw(rogue.sign(b, cec.ECDSA(hashes.SHA256()))))
    with pytest.raises(UntrustedMessage):
        enrolled.start_offline_authentication(forged)


def test_expired_verification_data_is_refused(verifier, enrolled, clock):
    session = verifier.start_session("alice", "ctx")
    clock.now += verifier.identity.session_ttl + 1
    with pytest.raises(ExpiredMessage):
        enrolled.start_offline_authentication(session.text)


def test_unknown_or_disallowed_method(verifier, enrolled):
    session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
    request = enrolled.start_offline_authentication(session.text)
    with pytest.raises(UnknownMethod):
        enrolled.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN)
    with pytest.raises(UnknownMethod):
        enrolled.finish_offline_authentication(request, Method.FACE)


def test_re_enrolling_needs_replace_and_a_replace_offer(verifier, enrolled):
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    with pytest.raises(AlreadyEnrolled, match="--replace"):
        enrolled.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
    with pytest.raises(AlreadyEnrolled, match="does not allow"):
        enrolled.add_or_update(
            Method.DEVICE, offer.text, activation_code=offer.activation_code, replace=True
        )
    verifier.policy = dataclasses.replace(verifier.policy, allow_override=True)
    replace_offer = verifier.create_offer("alice", methods=[Method.DEVICE], replace=True)
    verifier.accept_enrollment(
        enrolled.add_or_update(
            Method.DEVICE,
            replace_offer.text,
            activation_code=replace_offer.activation_code,
            replace=True,
        )
    )
    session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
    request = enrolled.start_offline_authentication(session.text)
    otp = enrolled.finish_offline_authentication(request, Method.DEVICE).otp
    assert verifier.verify(session.session_id, otp).method is Method.DEVICE


def test_login_required_after_window_offline_uses_until_synced(verifier, enrolled):
    window = verifier.identity.window
    session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
    request = enrolled.start_offline_authentication(session.text)
    otps = [enrolled.finish_offline_authentication(request, Method.DEVICE) for _ in range(window)]
    with pytest.raises(LoginRequired):
        enrolled.finish_offline_authentication(request, Method.DEVICE)
    assert verifier.verify(session.session_id, otps[-1].otp).atc == window
    synced = enrolled.sync(verifier.sync_message("alice", Method.DEVICE))
    applied = verifier.apply_sync(synced.report)
    assert applied.atc == window + 1
    enrolled.apply_sync_ack(applied.ack)  # offline use counts from there
    again = enrolled.finish_offline_authentication(request, Method.DEVICE)
    assert again.atc == window + 2


def test_absent_token_is_a_clear_error(tmp_path, verifier, clock):
    missing = Config(
        methods={
            Method.DEVICE: MethodConfig(
                "pkcs11", {"uri": str(Pkcs11Uri(token="no-such-token", module_path=None))}
            )
        }
    )
    with Authenticator(tmp_path / "absent", missing, clock=clock) as a:
        offer = verifier.create_offer("carol", methods=[Method.DEVICE])
        with pytest.raises(TokenNotFound):
            a.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        assert a.enrolled == []


def test_every_pin_use_is_a_fresh_login_that_the_token_checks(verifier, enrolled):
    """A long-lived authenticator keeps no PKCS#11 session logged in for the pin
    method: after a good OTP, a wrong PIN still goes to the token's C_Login (and so
    to its retry counter), not to a comparison in this process."""
    session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
    request = enrolled.start_offline_authentication(session.text)
    enrolled.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN)
    with pytest.raises(PinInvalid) as wrong:
        enrolled.finish_offline_authentication(request, Method.PIN, pin="000000")
    assert wrong.value.native_code == 0xA0  # CKR_PIN_INCORRECT, from the token
