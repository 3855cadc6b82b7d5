"""The enrollment offer names the methods the user has enrolled at the verifier
(protocol version 2), so that the authenticator refuses, before it makes any key,
what the verifier would refuse. Decoding stays strict."""

from __future__ import annotations

import os

import cbor2
import pytest
from _unattested import allow_unattested_fido2_methods
from _verifier_device import enroll
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec
from hsm_auth.errors import DecodeError, UnsupportedVersion
from hsm_auth.methods import Method
from hsm_auth.protocol import VERSION, EnrollmentOffer
from hsm_auth.verifier import Verifier

POINT = ec.encode_point(cec.generate_private_key(cec.SECP256R1()).public_key())


def _offer(**over) -> EnrollmentOffer:
    fields = dict(
        verifier_id=os.urandom(8),
        verifier_name="Bank",
        user="alice",
        offer_id=os.urandom(16),
        verifier_signing_key=POINT,
        verifier_agreement_key=POINT,
        suite="OCRA-1:HOTP-SHA256-8:C-QH64",
        window=10,
        methods=(Method.DEVICE, Method.PIN),
        replace=False,
        expires=2_000_000_000,
        enrolled=(Method.PIN,),
    )
    fields.update(over)
    return EnrollmentOffer(**fields)


def _wire(values: list) -> bytes:
    return cbor2.dumps([cbor2.dumps(values), b"s" * 64])


def _values(offer: EnrollmentOffer) -> list:
    return cbor2.loads(cbor2.loads(offer.encode(None))[0])


@pytest.mark.parametrize("enrolled", [(), (Method.PIN,), tuple(Method)])
def test_the_enrolled_methods_round_trip(enrolled):
    offer = _offer(enrolled=enrolled)
    assert EnrollmentOffer.decode(offer.encode(None))[0] == offer


@pytest.mark.parametrize(
    "bad", [None, 1, b"x", [1, 1], [99], list(range(1, 7)), ["pin"], [True], [2**70]]
)
def test_a_bad_enrolled_field_is_a_decode_error(bad):
    values = _values(_offer())
    values[2 + 11] = bad  # after version and type: enrolled, the 12th field
    with pytest.raises(DecodeError, match=r"bad field enrolled|CBOR tags are not allowed"):
        EnrollmentOffer.decode(_wire(values))


def test_an_offer_in_the_version_1_layout_is_refused():
    values = _values(_offer())
    with pytest.raises(DecodeError, match="wrong number of fields"):
        EnrollmentOffer.decode(_wire(values[:-1]))  # without the field
    with pytest.raises(UnsupportedVersion, match="version 1"):
        EnrollmentOffer.decode(_wire([1, *values[1:-1]]))  # as a version-1 peer sends it
    assert values[0] == VERSION == 3
    with pytest.raises(UnsupportedVersion, match="enroll again"):
        EnrollmentOffer.decode(_wire([2, *values[1:]]))  # as a protocol-2 verifier sends it


def test_the_verifier_names_what_the_user_has_enrolled(tmp_path):
    allow_unattested_fido2_methods(tmp_path / "v")  # software stand-ins for face
    with Verifier.init(tmp_path / "v", "Bank") as v:
        assert v.create_offer("alice").offer.enrolled == ()
        enroll(v, "alice", Method.PIN)
        enroll(v, "alice", Method.DEVICE)
        enroll(v, "bob", Method.FACE)
        issued = v.create_offer("alice", methods=[Method.DEVICE])
        assert set(issued.offer.enrolled) == {Method.PIN, Method.DEVICE}
        assert EnrollmentOffer.from_text(issued.text)[0].enrolled == issued.offer.enrolled
