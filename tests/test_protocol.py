"""Protocol messages: round trips, signatures, and decoders fed garbage."""

from __future__ import annotations

import contextlib
import os

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec as cec
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm_auth import ec, textcode
from hsm_auth.errors import DecodeError, UnsupportedVersion, UntrustedMessage
from hsm_auth.methods import Method
from hsm_auth.protocol import (
    VERSION,
    EnrollmentOffer,
    EnrollmentResponse,
    SyncMessage,
    SyncReport,
    VerificationData,
    message_kind,
)
from hsm_auth.sync_messages import AtcAck

KEY = cec.generate_private_key(cec.SECP256R1())
OTHER = cec.generate_private_key(cec.SECP256R1())


def signer(key: cec.EllipticCurvePrivateKey):
    from cryptography.hazmat.primitives import hashes

    return lambda body: ec.der_to_raw(key.sign(body, cec.ECDSA(hashes.SHA256())))


def verification_data(**over) -> VerificationData:
    fields = dict(
        verifier_id=os.urandom(8),
        user="alice",
        challenge=os.urandom(16),
        context="Log in to host as alice",
        methods=(Method.DEVICE, Method.PIN),
        expires=2_000_000_000,
    )
    fields.update(over)
    return VerificationData(**fields)


def test_verification_data_round_trips_and_signature_checks():
    data = verification_data(context="Pay 12,00 € to Bob")
    text = data.to_text(signer(KEY))
    decoded, signed = VerificationData.from_text(text)
    assert decoded.context == "Pay 12,00 € to Bob"
    assert decoded.methods == (Method.DEVICE, Method.PIN)
    assert decoded.challenge == data.challenge
    ec.verify(KEY.public_key(), signed.signature, signed.body)
    with pytest.raises(UntrustedMessage):
        ec.verify(OTHER.public_key(), signed.signature, signed.body)


def test_verification_data_is_qr_alphanumeric_and_small():
    from hsm_auth import qr

    # Protocol 3 names the user: a 60-character context with a user name of up to 19
    # characters stays within version 10 at level M (it was 273 characters without
    # the user, 283 with "alice", 288 since the three fields of docs/PROTOCOL.md §17,
    # null/null/0; version 10 holds 311).
    text = verification_data(context="x" * 60, user="u" * 19).to_text(signer(KEY))
    alphanumeric = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:")
    assert set(text) <= alphanumeric
    assert qr.version_of(text) <= 10
    longer = verification_data(context="x" * 60, user="u" * 20).to_text(signer(KEY))
    assert qr.version_of(longer) == 11  # the measured limit above is the real one
    typical = verification_data(context="Log in to ws-7 as alice").to_text(signer(KEY))
    assert qr.version_of(typical) <= 9  # 53x53 modules at M (version 8 before the user)


def test_tampered_body_fails_the_signature():
    text = verification_data().to_text(signer(KEY))
    raw = bytearray(textcode.decode(text))
    body, sig = cbor2.loads(bytes(raw))
    tampered_body = body.replace(b"alice", b"mallo")
    _, signed = VerificationData.decode(cbor2.dumps([tampered_body, sig]))
    with pytest.raises(UntrustedMessage):
        ec.verify(KEY.public_key(), signed.signature, signed.body)


def test_wrong_version_is_refused():
    body = cbor2.dumps([99, 3, b"x" * 8])
    with pytest.raises(UnsupportedVersion):
        VerificationData.decode(cbor2.dumps([body, b""]))


def test_wrong_message_type_is_refused():
    offer_like = SyncMessage(
        os.urandom(8), "alice", Method.PIN, 5, os.urandom(16), 1, os.urandom(16)
    ).encode(signer(KEY))
    assert message_kind(offer_like).name == "SYNC"
    with pytest.raises(DecodeError, match="expected verification data"):
        VerificationData.decode(offer_like)


def test_all_messages_round_trip():
    point = ec.encode_point(KEY.public_key())
    offer = EnrollmentOffer(
        os.urandom(8),
        "Bank",
        "alice",
        os.urandom(16),
        point,
        point,
        "OCRA-1:HOTP-SHA256-8:C-QH64",
        10,
        (Method.DEVICE,),
        False,
        123,
    )
    assert EnrollmentOffer.decode(offer.encode(signer(KEY)))[0] == offer
    response = EnrollmentResponse(
        offer.verifier_id,
        offer.offer_id,
        "alice",
        Method.FACE,
        "fido2",
        point,
        None,
        b"w" * 73,
        7,
        None,
        b"c" * 32,
    )
    assert EnrollmentResponse.decode(response.encode(None))[0] == response
    cid = os.urandom(16)
    sync = SyncMessage(offer.verifier_id, "alice", Method.PIN, 42, os.urandom(16), 99, cid)
    assert SyncMessage.decode(sync.encode(signer(KEY)))[0] == sync
    report = SyncReport(offer.verifier_id, sync.session_id, "alice", Method.PIN, 43, cid)
    decoded, signed = SyncReport.decode(report.encode(lambda body: b"m" * 32))
    assert decoded == report and signed.signature == b"m" * 32
    with pytest.raises(DecodeError):  # the MAC is a full HMAC-SHA256
        SyncReport.decode(report.encode(lambda body: b"m" * 8))
    ack = AtcAck(offer.verifier_id, "alice", Method.PIN, cid, sync.session_id, 43)
    assert AtcAck.decode(ack.encode(signer(KEY)))[0] == ack
    for bad in (
        SyncMessage(offer.verifier_id, "alice", Method.PIN, 42, sync.session_id, 99, cid[:8]),
        SyncReport(offer.verifier_id, sync.session_id, "alice", Method.PIN, 43, cid + b"x"),
        AtcAck(offer.verifier_id, "alice", Method.PIN, cid, sync.session_id, 0),  # no ATC 0
        AtcAck(offer.verifier_id, "alice", Method.PIN, None, sync.session_id, 43),  # type: ignore[arg-type]
    ):
        mac = b"m" * (32 if isinstance(bad, SyncReport) else 64)
        with pytest.raises(DecodeError):  # the credential id is exactly 16 bytes
            type(bad).decode(bad.encode(lambda body, mac=mac: mac))
    with pytest.raises(DecodeError, match="expected atc ack"):
        AtcAck.decode(sync.encode(signer(KEY)))


def test_a_wrapped_otp_key_is_exactly_the_key_transport_size():
    from hsm_auth import key_transport
    from hsm_auth.protocol import WRAPPED_OTP_KEY_BYTES

    assert WRAPPED_OTP_KEY_BYTES == key_transport.WRAPPED_BYTES == 73
    point = ec.encode_point(KEY.public_key())
    for size in (72, 74, 93):
        response = EnrollmentResponse(
            os.urandom(8), os.urandom(16), "a", Method.FACE, "fido2", point, None,
            b"w" * size, 0, None, b"c" * 32,
        )
        with pytest.raises(DecodeError, match="wrapped_otp_key"):
            EnrollmentResponse.decode(response.encode(None))


def test_response_needs_exactly_one_way_to_the_otp_key():
    point = ec.encode_point(KEY.public_key())
    both = EnrollmentResponse(
        os.urandom(8),
        os.urandom(16),
        "a",
        Method.PIN,
        "pkcs11",
        point,
        point,
        b"w" * 73,
        0,
        None,
        b"c" * 32,
    )
    with pytest.raises(DecodeError):
        EnrollmentResponse.decode(both.encode(None))


@pytest.mark.parametrize(
    "text",
    ["", "HA1:", "HA1:!!!!", "hello", "HA1:A", "HA1:MZXW6===", textcode.encode(b"\xff\x00")],
)
def test_garbage_text_is_a_decode_error(text):
    with pytest.raises(DecodeError):
        VerificationData.from_text(text)


def test_truncated_data_is_a_decode_error():
    text = verification_data().to_text(signer(KEY))
    for cut in (5, len(text) // 2, len(text) - 3):
        with pytest.raises(DecodeError):
            VerificationData.from_text(text[:cut])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_decoders_raise_only_decode_errors_on_arbitrary_bytes(data):
    for cls in (VerificationData, EnrollmentOffer, EnrollmentResponse, SyncMessage):
        with contextlib.suppress(DecodeError):
            cls.decode(data)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=70) | st.text(max_size=70),
        lambda inner: st.lists(inner, max_size=12),
        max_leaves=30,
    )
)
def test_decoders_raise_only_decode_errors_on_arbitrary_cbor_bodies(value):
    body = cbor2.dumps([VERSION, 3, value] if not isinstance(value, list) else [VERSION, 3, *value])
    for wire in (cbor2.dumps([body, b"s" * 64]), cbor2.dumps(value)):
        with contextlib.suppress(DecodeError):
            VerificationData.decode(wire)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_text_decoder_raises_only_decode_errors(text):
    with contextlib.suppress(DecodeError):
        VerificationData.from_text(text)
