"""One OTP scheme, per credential (issue 10): the question and the OTP have one owner
(hsm_auth.otp_scheme), the verifier checks each credential with its own enrolled
suite, and neither side accepts a suite the tokens cannot feed."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct

import pytest
from _verifier_device import Clock, PythonDevice

from hsm_auth import ocra
from hsm_auth.errors import InvalidInput
from hsm_auth.methods import Method
from hsm_auth.otp_scheme import OtpScheme
from hsm_auth.protocol import EnrollmentOffer
from hsm_auth.verifier import Verifier

KEY = bytes(range(32))
CHALLENGE = b"\x11" * 16
CONTEXT = "Pay 10 EUR to Bob"
SIX = "OCRA-1:HOTP-SHA256-6:C-QH64"


# --- the wire format (docs/PROTOCOL.md), pinned -----------------------------------

VID = b"\x0a" * 8
CID = b"\x0c" * 16
WHO = dict(verifier_id=VID, user="alice", method=Method.PIN, credential_id=CID)


def test_question_is_the_protocol_3_formula() -> None:
    """Recomputed with hashlib alone: domain, verifier id, user, method, credential id,
    challenge (>H prefixes), context (>I prefix), then tenant, transaction digest and
    user data (>H prefixes; empty here: none of them)."""
    ctx = CONTEXT.encode()
    expected = hashlib.sha256(
        b"hsm-auth/otp-question/v3"
        + struct.pack(">H", 8) + VID
        + struct.pack(">H", 5) + b"alice"
        + bytes([Method.PIN.code])
        + struct.pack(">H", 16) + CID
        + struct.pack(">H", 16) + CHALLENGE
        + struct.pack(">I", len(ctx)) + ctx
        + struct.pack(">H", 0) * 3
    ).hexdigest()
    q = OtpScheme.default().question(**WHO, challenge=CHALLENGE, context=CONTEXT)
    assert q == expected == "38595dca42839a087574555a049e6a46209981d639027fe4f5f4636c6207fe39"


def test_question_with_tenant_transaction_and_data() -> None:
    """docs/PROTOCOL.md §17: the tenant's UTF-8, TH (SHA-256 over its own domain, the
    number of pairs and each label and value, >H prefixes) and the user's data."""
    ctx = CONTEXT.encode()
    items = (("Amount", "10.00 EUR"), ("Payee", "Bob"))
    th = hashlib.sha256(
        b"hsm-auth/transaction/v1" + bytes([2])
        + b"\x00\x06Amount" + b"\x00\x0910.00 EUR" + b"\x00\x05Payee" + b"\x00\x03Bob"
    ).digest()
    expected = hashlib.sha256(
        b"hsm-auth/otp-question/v3"
        + struct.pack(">H", 8) + VID
        + struct.pack(">H", 5) + b"alice"
        + bytes([Method.PIN.code])
        + struct.pack(">H", 16) + CID
        + struct.pack(">H", 16) + CHALLENGE
        + struct.pack(">I", len(ctx)) + ctx
        + struct.pack(">H", 6) + b"retail"
        + struct.pack(">H", 32) + th
        + struct.pack(">H", 5) + "Müll".encode()
    ).hexdigest()
    q = OtpScheme.default().question(
        **WHO, challenge=CHALLENGE, context=CONTEXT, tenant="retail", transaction=items,
        data="Müll",
    )
    assert q == expected


def test_sync_question_is_todays_formula() -> None:
    sid = b"\x22" * 16
    expected = hashlib.sha256(
        b"hsm-auth/sync-question/v2"
        + struct.pack(">H", 16)
        + sid
        + struct.pack(">H", 5)
        + b"alice"
        + bytes([Method.PIN.code])
        + struct.pack(">H", 16)
        + CID
    ).hexdigest()
    q = OtpScheme.default().sync_question(
        session_id=sid, user="alice", method=Method.PIN, credential_id=CID
    )
    assert q == expected == "f934a08f076c0b1d97b660a11ac97ccb675d2eda45c0b1a5cae177c657092425"


def test_otps_and_sync_mac_are_pinned() -> None:
    """Fixed key and inputs -> the exact OTPs (and sync MAC): a change of the wire format
    shows here (and in the docs/PROTOCOL.md vectors)."""
    scheme = OtpScheme.default()
    q = scheme.question(**WHO, challenge=CHALLENGE, context=CONTEXT)
    assert [scheme.otp(KEY, counter=c, question=q) for c in (1, 2, 3)] == [
        "94184938",
        "13272806",
        "37957201",
    ]
    six = OtpScheme.for_suite(SIX)
    assert [six.otp(KEY, counter=c, question=q) for c in (1, 2, 3)] == [
        "603164",
        "405210",
        "873153",
    ]
    sq = scheme.sync_question(
        session_id=b"\x22" * 16, user="alice", method=Method.PIN, credential_id=CID
    )
    mac = hmac.new(KEY, scheme.message(7, sq), hashlib.sha256).digest()
    assert mac.hex() == "00b743c6a39c90ab26a6aa5fcd20346fc3a503a7d6559a085f5699294b2adaaf"

    def mac_fn(data: bytes) -> bytes:
        return hmac.new(KEY, data, hashlib.sha256).digest()

    assert scheme.verify_mac(mac_fn, mac, counter=7, question=sq)
    assert not scheme.verify_mac(mac_fn, mac, counter=8, question=sq)
    # The token path (MAC the message, then truncate) equals the software OTP.
    assert scheme.truncate(mac_fn(scheme.message(2, q))) == "13272806"
    assert scheme.verify(mac_fn, "13272806", counter=2, question=q)
    assert scheme.verify(KEY, "13272806", counter=2, question=q)
    assert not scheme.verify(mac_fn, "13272800", counter=2, question=q)
    assert not scheme.verify(mac_fn, "13272806", counter=3, question=q)


def test_question_binds_challenge_and_context_and_sync_has_its_own_domain() -> None:
    s = OtpScheme.default()
    c = os.urandom(16)

    def q(**over: object) -> str:
        return s.question(**{**WHO, "challenge": c, "context": "Pay 10", **over})  # type: ignore[arg-type]

    assert q() != q(context="Pay 100")
    assert q(context="ab") != q(challenge=c + b"a", context="b")
    assert len(q(context="")) == 64
    # Every identity is bound: another verifier, user, method or credential, another OTP.
    assert len({q(), q(verifier_id=b"\x0b" * 8), q(user="mallory"), q(method=Method.DEVICE),
                q(credential_id=b"\x0d" * 16), q(user="alic", credential_id=b"e" + CID)}) == 6
    sync = s.sync_question(session_id=c, user="alice", method=Method.PIN, credential_id=CID)
    assert sync != q(context="alice")
    # The sync question binds the credential: another credential, another question.
    assert sync != s.sync_question(
        session_id=c, user="alice", method=Method.PIN, credential_id=b"\x0d" * 16
    )
    # The tenant, each pair of a transaction (and their order) and the user's data.
    pay = (("Amount", "120.00 EUR"), ("Payee", "DE89 3704"))
    swapped = (("Amount", "DE89 3704"), ("Payee", "120.00 EUR"))
    variants = [
        q(), q(tenant="a"), q(tenant="b"), q(transaction=pay), q(transaction=pay[::-1]),
        q(transaction=swapped), q(transaction=pay[:1]), q(transaction=(("Amount", "120.00 EUR"),
        ("Payee", "DE89 3705"))), q(data="1234"), q(data="1235"), q(transaction=pay, data="1"),
        # no shifting between fields: the tenant's text is not the data's
        q(tenant="ab"), q(data="ab"),
    ]
    assert len(set(variants)) == len(variants)


# --- refusing what the product cannot feed -----------------------------------------


@pytest.mark.parametrize("digits", [6, 7, 8, 9, 10])
def test_feedable_suites(digits: int) -> None:
    scheme = OtpScheme.for_suite(f"OCRA-1:HOTP-SHA256-{digits}:C-QH64")
    assert scheme.digits == digits
    assert OtpScheme.for_suite(ocra.OTP_SUITE) == OtpScheme.default()


@pytest.mark.parametrize(
    ("suite", "why"),
    [
        ("OCRA-1:HOTP-SHA1-8:C-QH64", "HMAC-SHA256"),
        ("OCRA-1:HOTP-SHA512-8:C-QH64", "HMAC-SHA256"),
        ("OCRA-1:HOTP-SHA256-0:C-QH64", "digits"),
        ("OCRA-1:HOTP-SHA256-4:C-QH64", "digits"),
        ("OCRA-1:HOTP-SHA256-8:QH64", "counter"),
        ("OCRA-1:HOTP-SHA256-8:C-QN08", "QH64"),
        ("OCRA-1:HOTP-SHA256-8:C-QA64", "QH64"),
        ("OCRA-1:HOTP-SHA256-8:C-QH40", "QH64"),
        ("OCRA-1:HOTP-SHA256-8:C-QH64-PSHA1", "password"),
        ("OCRA-1:HOTP-SHA256-8:C-QH64-S064", "session"),
        ("OCRA-1:HOTP-SHA256-8:C-QH64-T1M", "time"),
        ("OCRA-1:HOTP-SHA1-6:QN08", "HMAC-SHA256"),
        ("not a suite", "OCRA"),
    ],
)
def test_unfeedable_suites_are_refused(suite: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        OtpScheme.for_suite(suite)


# --- the verifier: each credential with its own scheme -------------------------------


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock):
    v = Verifier.init(tmp_path / "verifier", "Bank", clock=clock)
    yield v
    v.close()


def _with_suite(v: Verifier, suite: str, clock) -> Verifier:
    """The same verifier (keys, database) after its identity.json suite was edited."""
    return Verifier(dataclasses.replace(v.identity, suite=suite), v.keys, v.store, clock=clock)


def _enroll(v: Verifier, user: str) -> PythonDevice:
    device = PythonDevice()
    offer = v.create_offer(user, methods=[Method.DEVICE])
    v.accept_enrollment(device.enroll(offer, Method.DEVICE))
    return device


def test_a_credential_is_verified_with_its_own_suite_not_the_verifiers_default(
    verifier, clock
):
    """The bug: the suite is stored per credential, but every check used the verifier's.
    alice enrolled under the 8-digit default; the default is now 6 digits."""
    alice = _enroll(verifier, "alice")
    changed = _with_suite(verifier, SIX, clock)
    bob = _enroll(changed, "bob")
    assert bob.scheme.digits == 6
    creds = {c.user: c.suite for c in changed.store.all_credentials()}
    assert creds == {"alice": ocra.OTP_SUITE, "bob": SIX}

    session = changed.start_session("alice", "Log in")
    otp = alice.otp(session)
    assert len(otp) == 8
    assert changed.verify(session.session_id, otp).atc == 1
    session = changed.start_session("bob", "Log in")
    assert changed.verify(session.session_id, bob.otp(session)).atc == 1
    # And back: the 6-digit credential still works under the 8-digit default.
    session = verifier.start_session("bob", "Again")
    assert verifier.verify(session.session_id, bob.otp(session)).atc == 2
    session = verifier.start_session("alice", "Again")
    assert verifier.verify(session.session_id, alice.otp(session)).atc == 2


def test_a_credential_keeps_the_suite_its_offer_named(verifier, clock):
    """identity.json's suite changed between the offer and the response: the credential
    gets the offer's suite, the one the device enrolled with, so its OTPs verify."""
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    device = PythonDevice()
    response = device.enroll(offer, Method.DEVICE)
    changed = _with_suite(verifier, SIX, clock)
    assert changed.accept_enrollment(response).suite == ocra.OTP_SUITE
    session = changed.start_session("alice", "Log in")
    assert changed.verify(session.session_id, device.otp(session)).atc == 1


def test_the_verifier_refuses_a_suite_no_token_can_feed(verifier, clock):
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    response = PythonDevice().enroll(offer, Method.DEVICE)
    bad = _with_suite(verifier, "OCRA-1:HOTP-SHA1-6:QN08", clock)
    with pytest.raises(InvalidInput, match="HMAC-SHA256"):
        bad.create_offer("bob", methods=[Method.DEVICE])
    with pytest.raises(InvalidInput, match="HMAC-SHA256"):
        bad.accept_enrollment(response)
    assert verifier.store.all_credentials() == []
    verifier.accept_enrollment(response)  # the offer was not burned by the refusal
    assert [c.suite for c in verifier.store.all_credentials()] == [ocra.OTP_SUITE]


# --- the authenticator refuses it before making keys -------------------------------


@pytest.mark.softhsm
def test_the_authenticator_refuses_an_offer_with_a_suite_no_token_can_feed(
    softhsm_env, tmp_path, clock, verifier
):
    from hsm_auth.authenticator import Authenticator
    from hsm_auth.config import Config, MethodConfig
    from hsm_auth.testing.softhsm import init_token, unique_label
    from hsm_auth.uri import Pkcs11Uri

    token = init_token(unique_label("scheme"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
    issued = verifier.create_offer("alice", methods=[Method.DEVICE])
    offer, code = issued.offer, issued.activation_code
    forged = dataclasses.replace(offer, suite="OCRA-1:HOTP-SHA1-6:QN08")
    text = forged.to_text(verifier.keys.sign_raw)  # signed by the verifier itself
    assert EnrollmentOffer.from_text(text)[0].suite == forged.suite
    with Authenticator(tmp_path / "auth", config, clock=clock) as a:
        with pytest.raises(InvalidInput, match="HMAC-SHA256"):
            a.add_or_update(Method.DEVICE, text, activation_code=code)
        assert a.enrolled == []
        # Nothing was made on the token: the good offer enrolls without --replace.
        good = verifier.create_offer("alice", methods=[Method.DEVICE])
        response = a.add_or_update(Method.DEVICE, good.text, activation_code=good.activation_code)
        verifier.accept_enrollment(response)
        # And that token's OTPs go through the same scheme on both sides.
        changed = _with_suite(verifier, SIX, clock)
        session = changed.start_session("alice", "Log in")
        request = a.start_offline_authentication(session.text)
        otp = a.finish_offline_authentication(request, Method.DEVICE)
        assert len(otp.otp) == 8
        assert changed.verify(session.session_id, otp.otp).atc == otp.atc
