"""Who and what an enrollment and an OTP are bound to (issue 10, finding 3).

The attack the review ran: the account ``mallory`` enrolled the public agreement
key of the account ``alice``, and an OTP that alice's token made for a
``mallory`` session was then accepted as ``mallory``. Protocol 3 answers with a
key confirmation (a MAC made in the token with the new OTP key over the
enrollment transcript) and an OTP question that binds the verifier, the user,
the method and the credential. These tests run the attack on a real SoftHSM
token and a real verifier, then each variation of it.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest
from _unattested import allow_unattested_fido2_methods
from _verifier_device import Clock, PythonDevice, activated
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, transcript
from hsm_auth.audit import Reason
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import InvalidToken, StateError, UnknownMethod, UntrustedMessage
from hsm_auth.keystore import NO_AUTH
from hsm_auth.methods import Method
from hsm_auth.otp_scheme import OtpScheme
from hsm_auth.protocol import EnrollmentResponse
from hsm_auth.registry import load_backend
from hsm_auth.store.base import CredentialRecord
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm


@pytest.fixture
def verifier(tmp_path):
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    v = Verifier.init(tmp_path / "verifier", "Bank", clock=Clock())
    yield v
    v.close()


@pytest.fixture
def config(softhsm_env, tmp_path) -> Config:
    token = init_token(unique_label("alice"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    return Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})


@pytest.fixture
def alice(tmp_path, config, verifier):
    """Alice's authenticator with her real SoftHSM token, enrolled; and her response text."""
    with Authenticator(tmp_path / "alice", config, clock=verifier._clock) as a:
        offer = verifier.create_offer("alice", methods=[Method.DEVICE])
        response = a.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        verifier.accept_enrollment(response)
        yield a, response


def _signed_by(key: cec.EllipticCurvePrivateKey, response: EnrollmentResponse) -> str:
    return response.to_text(lambda b: ec.der_to_raw(key.sign(b, cec.ECDSA(hashes.SHA256()))))


def _refusals(verifier: Verifier, user: str) -> list[Reason | None]:
    return [r.reason for r in verifier.store.audit_records(user)]


# --- enrollment: nobody enrolls another person's agreement key -----------------------


def test_mallory_cannot_enroll_alices_agreement_key(verifier, alice):
    _, alice_text = alice
    alices, _ = EnrollmentResponse.from_text(alice_text)
    mallory = cec.generate_private_key(cec.SECP256R1())
    issued = verifier.create_offer("mallory", methods=[Method.DEVICE])
    offer = issued.offer
    forged = dataclasses.replace(
        alices,
        offer_id=offer.offer_id,
        user="mallory",
        signing_key=ec.encode_point(mallory.public_key()),
    )
    # Alice's own confirmation (replayed), and one Mallory made under a key of his own;
    # Mallory is a user, with an activation code of his own.
    for confirmation in (alices.confirmation, b"\x00" * 32):
        attempt = activated(dataclasses.replace(forged, confirmation=confirmation), issued)
        with pytest.raises(UntrustedMessage, match="key confirmation"):
            verifier.accept_enrollment(_signed_by(mallory, attempt))
    with pytest.raises(UnknownMethod):
        verifier.credential("mallory", Method.DEVICE)
    assert _refusals(verifier, "mallory").count(Reason.KEY_CONFIRMATION) == 2
    # The offer was not burned by the forgeries: Mallory's honest enrollment still works.
    device = PythonDevice()
    verifier.accept_enrollment(device.enroll(issued, Method.DEVICE))
    session = verifier.start_session("mallory", "Approve transfer #4711")
    assert verifier.verify(session.session_id, device.otp(session)).atc == 1


def test_a_confirmation_made_without_the_otp_key_is_refused(verifier):
    for wrapped in (False, True):  # PKCS#11/TPM style, and FIDO2 style (a wrapped key)
        device = PythonDevice(wrapped=wrapped)
        offer = verifier.create_offer("bob", methods=[Method.FACE])
        with pytest.raises(UntrustedMessage, match="key confirmation"):
            verifier.accept_enrollment(device.enroll(offer, Method.FACE, confirm_with=b"k" * 32))
    with pytest.raises(UnknownMethod):
        verifier.credential("bob", Method.FACE)


def test_a_response_for_another_offer_of_the_same_user_is_refused(verifier):
    """The transcript covers the offer's hash: a confirmation made for one offer does
    not check for another offer's id (an answer moved between offers)."""
    device = PythonDevice()
    first_text = verifier.create_offer("bob", methods=[Method.DEVICE])
    second = verifier.create_offer("bob", methods=[Method.DEVICE])
    response, _ = EnrollmentResponse.from_text(device.enroll(first_text, Method.DEVICE))
    # bob holds both codes: the activation MAC is right for the second offer
    moved = activated(dataclasses.replace(response, offer_id=second.offer.offer_id), second)
    with pytest.raises(UntrustedMessage, match="key confirmation"):
        verifier.accept_enrollment(_signed_by(device.signing, moved))


# --- OTPs: one user's token answers only that user's sessions --------------------------


def test_alices_authenticator_refuses_a_session_for_another_user(verifier, alice):
    authenticator, _ = alice
    bob = PythonDevice()
    offer = verifier.create_offer("bob", methods=[Method.DEVICE])
    verifier.accept_enrollment(bob.enroll(offer, Method.DEVICE))
    session = verifier.start_session("bob", "Approve transfer #4711")
    with pytest.raises(UnknownMethod, match="no enrollment of 'bob'"):
        authenticator.start_offline_authentication(session.text)
    own = authenticator.start_offline_authentication(
        verifier.start_session("alice", "Log in").text
    )
    assert own.user == "alice"
    forced = dataclasses.replace(own, data=session.data)  # skip start's check
    with pytest.raises(UnknownMethod):
        authenticator.finish_offline_authentication(forced, Method.DEVICE)


def test_alices_token_mac_does_not_answer_a_session_of_a_credential_with_her_key(
    verifier, alice, config
):
    """Even with the enrollment check bypassed (a credential for mallory written
    straight into the store with alice's agreement key, as the old protocol let
    happen), an OTP alice's token makes over mallory's session is refused: the
    question binds the user and the credential id, and alice's token binds hers."""
    authenticator, alice_text = alice
    alices, _ = EnrollmentResponse.from_text(alice_text)
    mallory_key = ec.encode_point(cec.generate_private_key(cec.SECP256R1()).public_key())
    record = verifier.credential("alice", Method.DEVICE)
    verifier.store.save_credential(
        dataclasses.replace(record, user="mallory", signing_key=mallory_key, id=0),
        replace=False,
    )
    session = verifier.start_session("mallory", "Approve transfer #4711")
    enrolled = authenticator.enrolled[0]
    scheme = OtpScheme.for_suite(enrolled.suite)
    question = scheme.question(
        verifier_id=enrolled.verifier_id,
        user="alice",
        method=Method.DEVICE,
        credential_id=bytes.fromhex(enrolled.credential_id),
        challenge=session.data.challenge,
        context=session.data.context,
    )
    store = load_backend("pkcs11").open(config.methods[Method.DEVICE].settings)
    try:  # the token itself, driven directly: alice's key, mallory's challenge
        otps = [
            scheme.truncate(store.hmac(enrolled.otp_key, scheme.message(atc, question), NO_AUTH))
            for atc in range(1, 4)
        ]
    finally:
        store.close()
    assert alices.agreement_key == record.agreement_key
    for otp in otps:
        with pytest.raises(InvalidToken):
            verifier.verify(session.session_id, otp)
        session = verifier.start_session("mallory", "Approve transfer #4711")


# --- state from an older protocol: a clear "enroll again" -----------------------------


def test_an_authenticator_record_from_protocol_2_asks_to_enroll_again(tmp_path, verifier, alice):
    authenticator, _ = alice
    path = tmp_path / "alice" / "credentials.json"
    data = json.loads(path.read_text())
    for m in data["methods"]:
        del m["credential_id"]
    path.write_text(json.dumps(data))
    with Authenticator(tmp_path / "alice", authenticator.config, clock=verifier._clock) as again:
        request = again.start_offline_authentication(verifier.start_session("alice", "x").text)
        with pytest.raises(StateError, match="older protocol; enroll it again"):
            again.finish_offline_authentication(request, Method.DEVICE)


def test_a_verifier_credential_from_protocol_2_asks_to_enroll_again(tmp_path, verifier):
    device = PythonDevice()
    offer = verifier.create_offer("carol", methods=[Method.DEVICE])
    verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))
    session = verifier.start_session("carol", "Log in")
    otp = device.otp(session)
    with sqlite3.connect(tmp_path / "verifier" / "verifier.db") as db:
        db.execute("UPDATE credentials SET protocol=2 WHERE user_name='carol'")
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, otp)
    assert Reason.OLD_PROTOCOL in _refusals(verifier, "carol")
    with pytest.raises(UnknownMethod, match="older protocol"):
        verifier.start_session("carol", "Log in")


def test_credential_records_made_now_are_protocol_3(verifier):
    device = PythonDevice()
    offer = verifier.create_offer("dave", methods=[Method.DEVICE])
    saved = verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))
    assert isinstance(saved, CredentialRecord)
    assert saved.protocol == 3 == verifier.credential("dave", Method.DEVICE).protocol
    assert transcript.credential_id(saved.signing_key) == device.credential_id
