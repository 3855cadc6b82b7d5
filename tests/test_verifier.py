"""The verifier's rules, checked against a device simulated in pure Python
(ECDH + OCRA done in memory): window, replay, resync, lockout, expiry, enrollment."""

from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, ocra
from hsm_auth.errors import (
    AlreadyEnrolled,
    ExpiredMessage,
    InvalidInput,
    InvalidToken,
    UnknownMethod,
    UntrustedMessage,
)
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentOffer, EnrollmentResponse, otp_question
from hsm_auth.verifier import Verifier

SUITE = ocra.OcraSuite.parse(ocra.OTP_SUITE)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class PythonDevice:
    """What a token does, in memory: signing key, ECDH-derived OTP key, counter."""

    def __init__(self) -> None:
        self.signing = cec.generate_private_key(cec.SECP256R1())
        self.agreement = cec.generate_private_key(cec.SECP256R1())
        self.atc = 0
        self.otp_key = b""

    def enroll(self, offer_text: str, method: Method, *, sign_with=None) -> str:
        offer, _ = EnrollmentOffer.from_text(offer_text)
        self.otp_key = self.agreement.exchange(
            cec.ECDH(), ec.decode_point(offer.verifier_agreement_key)
        )
        response = EnrollmentResponse(
            offer.verifier_id,
            offer.offer_id,
            offer.user,
            method,
            "python",
            ec.encode_point(self.signing.public_key()),
            ec.encode_point(self.agreement.public_key()),
            None,
            self.atc,
            None,
        )
        key = sign_with or self.signing
        return response.to_text(
            lambda body: ec.der_to_raw(key.sign(body, cec.ECDSA(hashes.SHA256())))
        )

    def otp(self, session, *, atc: int | None = None) -> str:
        if atc is None:
            self.atc += 1
            atc = self.atc
        q = otp_question(session.data.challenge, session.data.context).hex()
        return ocra.generate(SUITE, self.otp_key, counter=atc, question=q)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock):
    v = Verifier.init(tmp_path / "verifier", "Test verifier", clock=clock)
    yield v
    v.close()


@pytest.fixture
def device(verifier):
    d = PythonDevice()
    _, offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    verifier.accept_enrollment(d.enroll(offer, Method.DEVICE))
    return d


def test_correct_otp_is_accepted_once(verifier, device):
    session = verifier.start_session("alice", "Log in to host")
    otp = device.otp(session)
    accepted = verifier.verify(session.session_id, otp)
    assert (accepted.user, accepted.method, accepted.atc) == ("alice", Method.DEVICE, 1)
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, otp)


def test_otp_is_bound_to_the_context(verifier, device):
    shown = verifier.start_session("alice", "Pay 10 EUR")
    other = verifier.start_session("alice", "Pay 1000 EUR")
    with pytest.raises(InvalidToken):
        verifier.verify(other.session_id, device.otp(shown))


def test_an_older_counter_value_is_refused_after_a_newer_one(verifier, device):
    s1, s2 = verifier.start_session("alice", "one"), verifier.start_session("alice", "two")
    old = device.otp(s1, atc=3)
    assert verifier.verify(s2.session_id, device.otp(s2, atc=5)).atc == 5
    with pytest.raises(InvalidToken):
        verifier.verify(s1.session_id, old)


def test_look_ahead_window_accepts_up_to_window_and_not_beyond(verifier, device):
    window = verifier.identity.window
    s = verifier.start_session("alice", "ctx")
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, device.otp(s, atc=window + 1))
    assert verifier.verify(s.session_id, device.otp(s, atc=window)).atc == window


def test_resync_from_two_consecutive_otps_beyond_the_window(verifier, device):
    s = verifier.start_session("alice", "ctx")
    far = verifier.identity.window + 25
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, device.otp(s, atc=far))
    with pytest.raises(InvalidToken):  # not consecutive
        verifier.resync(s.session_id, device.otp(s, atc=far), device.otp(s, atc=far + 2))
    accepted = verifier.resync(s.session_id, device.otp(s, atc=far), device.otp(s, atc=far + 1))
    assert accepted.atc == far + 1
    s2 = verifier.start_session("alice", "after")
    assert verifier.verify(s2.session_id, device.otp(s2, atc=far + 2)).atc == far + 2


def test_lockout_after_ten_failures_refuses_even_a_correct_otp(verifier, device, caplog):
    s = verifier.start_session("alice", "ctx")
    for _ in range(verifier.identity.lockout_threshold):
        with pytest.raises(InvalidToken) as wrong:
            verifier.verify(s.session_id, "00000000")
    good = device.otp(s)
    with (
        caplog.at_level(logging.WARNING, logger="hsm_auth.verifier"),
        pytest.raises(InvalidToken) as locked,
    ):
        verifier.verify(s.session_id, good)
    assert str(locked.value) == str(wrong.value)  # same error to the caller
    assert "locked" in caplog.text  # the reason is in the log only
    assert good not in caplog.text  # and never the OTP
    verifier.unlock("alice", Method.DEVICE)
    assert verifier.verify(s.session_id, good).atc == 1


def test_a_success_resets_the_failure_count(verifier, device):
    for _ in range(9):
        s = verifier.start_session("alice", "ctx")
        with pytest.raises(InvalidToken):
            verifier.verify(s.session_id, "12345678")
    s = verifier.start_session("alice", "ctx")
    verifier.verify(s.session_id, device.otp(s))
    assert verifier.credential("alice", Method.DEVICE).failures == 0


def test_expired_and_unknown_sessions_are_refused(verifier, device, clock):
    s = verifier.start_session("alice", "ctx")
    otp = device.otp(s)
    clock.now += verifier.identity.session_ttl + 1
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, otp)
    with pytest.raises(InvalidToken):
        verifier.verify(b"\x00" * 16, otp)


@pytest.mark.parametrize(
    "otp",
    ["1234567", "123456789", "1234567a", "", "\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18"],
)
def test_malformed_otp_is_invalid_input(verifier, device, otp):
    s = verifier.start_session("alice", "ctx")
    with pytest.raises(InvalidInput):
        verifier.verify(s.session_id, otp)
    assert verifier.credential("alice", Method.DEVICE).failures == 0


def test_session_for_unenrolled_user_or_method(verifier, device):
    with pytest.raises(UnknownMethod):
        verifier.start_session("bob", "ctx")
    with pytest.raises(UnknownMethod):
        verifier.start_session("alice", "ctx", methods=[Method.FACE])


def test_enrollment_offer_is_single_use_and_expires(verifier, clock):
    d = PythonDevice()
    _, offer = verifier.create_offer("bob", methods=[Method.PIN])
    response = d.enroll(offer, Method.PIN)
    verifier.accept_enrollment(response)
    with pytest.raises(InvalidInput, match="already used"):
        verifier.accept_enrollment(response)
    _, offer2 = verifier.create_offer("carol", methods=[Method.PIN])
    clock.now += verifier.identity.offer_ttl + 1
    with pytest.raises(ExpiredMessage):
        verifier.accept_enrollment(PythonDevice().enroll(offer2, Method.PIN))


def test_enrollment_needs_proof_of_possession(verifier):
    d = PythonDevice()
    _, offer = verifier.create_offer("bob", methods=[Method.PIN])
    forged = d.enroll(offer, Method.PIN, sign_with=cec.generate_private_key(cec.SECP256R1()))
    with pytest.raises(UntrustedMessage):
        verifier.accept_enrollment(forged)


def test_method_not_in_offer_is_refused(verifier):
    _, offer = verifier.create_offer("bob", methods=[Method.PIN])
    with pytest.raises(UnknownMethod):
        verifier.accept_enrollment(PythonDevice().enroll(offer, Method.DEVICE))


def test_re_enrollment_needs_a_replace_offer(verifier, device):
    _, offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    with pytest.raises(AlreadyEnrolled):
        verifier.accept_enrollment(PythonDevice().enroll(offer, Method.DEVICE))
    new = PythonDevice()
    _, replace = verifier.create_offer("alice", methods=[Method.DEVICE], replace=True)
    verifier.accept_enrollment(new.enroll(replace, Method.DEVICE))
    s = verifier.start_session("alice", "ctx")
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, device.otp(s))
    assert verifier.verify(s.session_id, new.otp(s)).atc == 1


def test_state_survives_reopening(tmp_path, clock, verifier, device):
    s = verifier.start_session("alice", "ctx")
    verifier.verify(s.session_id, device.otp(s))
    verifier.close()
    reopened = Verifier.open(tmp_path / "verifier", clock=clock)
    try:
        assert reopened.credential("alice", Method.DEVICE).atc == 1
        assert (tmp_path / "verifier" / "keys.pem").stat().st_mode & 0o777 == 0o600
    finally:
        reopened.close()
