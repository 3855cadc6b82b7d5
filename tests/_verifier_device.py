"""Test helpers shared by the verifier tests: a device simulated in pure Python
(ECDH + OCRA in memory, or a FIDO2-style OTP key wrapped to the verifier), a
fake clock, and the worker run by the multi-process tests."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import activation, ec, ocra, transcript
from hsm_auth.key_transport import wrap_otp_key
from hsm_auth.methods import Method
from hsm_auth.otp_scheme import OtpScheme
from hsm_auth.protocol import EnrollmentOffer, EnrollmentResponse

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class PythonDevice:
    """What a token does, in memory: signing key, ECDH-derived OTP key, counter.
    ``wrapped=True`` behaves like FIDO2: a random OTP key sent encrypted to the verifier."""

    def __init__(self, *, wrapped: bool = False) -> None:
        self.signing = cec.generate_private_key(cec.SECP256R1())
        self.agreement = cec.generate_private_key(cec.SECP256R1())
        self.wrapped = wrapped
        self.atc = 0
        self.otp_key = b""
        self.scheme = OtpScheme.default()  # the offer's, once enrolled
        self.otps: list[str] = []  # every OTP this device made (for the leak test)
        self.verifier_id = b""
        self.user = ""
        self.method = Method.DEVICE
        self.credential_id = transcript.credential_id(ec.encode_point(self.signing.public_key()))

    def enroll(
        self,
        issued,
        method: Method,
        *,
        activation_code: str | None = None,
        sign_with=None,
        confirm_with: bytes | None = None,
    ) -> str:
        """The enrollment response to ``issued`` (an IssuedOffer, or an offer's text with
        ``activation_code``; no code at all: a response without an activation MAC);
        ``confirm_with`` MACs the key confirmation with another key than the OTP key
        (what someone without the agreement key can do)."""
        if isinstance(issued, str):
            offer_text = issued
        else:
            offer_text = issued.text
            if activation_code is None:
                activation_code = issued.activation_code
        offer, signed = EnrollmentOffer.from_text(offer_text)
        self.verifier_id, self.user, self.method = offer.verifier_id, offer.user, method
        self.scheme = OtpScheme.for_suite(offer.suite)
        verifier_agreement = ec.decode_point(offer.verifier_agreement_key)
        if self.wrapped:
            self.otp_key = os.urandom(32)
            agreement, wrapped = None, wrap_otp_key(self.otp_key, verifier_agreement)
        else:
            self.otp_key = self.agreement.exchange(cec.ECDH(), verifier_agreement)
            agreement, wrapped = ec.encode_point(self.agreement.public_key()), None
        signing_key = ec.encode_point(self.signing.public_key())
        offer_hash = transcript.offer_hash(signed.body)
        t = transcript.enrollment_transcript(
            offer_hash=offer_hash,
            user=offer.user,
            method=method,
            signing_key=signing_key,
            key_agreement=agreement or wrapped or b"",
        )
        message = transcript.confirmation_message(t)
        activation_mac = (
            None
            if activation_code is None
            else activation.activation_mac(activation_code, offer_hash, t)
        )
        confirmation = hmac.digest(
            self.otp_key if confirm_with is None else confirm_with, message, hashlib.sha256
        )
        response = EnrollmentResponse(
            offer.verifier_id,
            offer.offer_id,
            offer.user,
            method,
            "python",
            signing_key,
            agreement,
            wrapped,
            self.atc,
            None,
            confirmation,
            activation_mac,
        )
        key = sign_with or self.signing
        return response.to_text(
            lambda body: ec.der_to_raw(key.sign(body, cec.ECDSA(hashes.SHA256())))
        )

    def sign_raw(self, body: bytes) -> bytes:
        """ECDSA by the device's signing key, raw r||s (a message's signer)."""
        return ec.der_to_raw(self.signing.sign(body, cec.ECDSA(hashes.SHA256())))

    def otp(self, session, *, atc: int | None = None) -> str:
        data = session.data if hasattr(session, "data") else session
        return self.otp_for(data.challenge, data.context, atc=atc)

    def otp_for(self, challenge: bytes, context: str, *, atc: int | None = None) -> str:
        if atc is None:
            self.atc += 1
            atc = self.atc
        q = self.scheme.question(
            verifier_id=self.verifier_id,
            user=self.user,
            method=self.method,
            credential_id=self.credential_id,
            challenge=challenge,
            context=context,
        )
        otp = ocra.generate(self.scheme.suite, self.otp_key, counter=atc, question=q)
        self.otps.append(otp)
        return otp


def enroll(verifier, user: str, method: Method = Method.DEVICE, **kw) -> PythonDevice:
    device = PythonDevice(**kw)
    verifier.accept_enrollment(device.enroll(verifier.create_offer(user, methods=[method]), method))
    return device


def verify_worker(directory, database, session_id, otp, barrier, results) -> None:
    """One worker process: open the verifier, wait for all, submit, report."""
    from hsm_auth.errors import InvalidToken
    from hsm_auth.verifier import Verifier

    try:
        v = Verifier.open(directory, database=database)
    except Exception as e:  # report, do not hang the barrier
        barrier.abort()
        results.put(("error", f"open: {e!r}"))
        return
    try:
        barrier.wait(timeout=60)
        try:
            accepted = v.verify(session_id, otp)
            results.put(("accepted", accepted.atc))
        except InvalidToken:
            results.put(("refused", None))
        except Exception as e:
            results.put(("error", repr(e)))
    finally:
        v.close()


def activated(response: EnrollmentResponse, issued) -> EnrollmentResponse:
    """``response`` with the activation MAC the holder of ``issued``'s code makes for it
    (an insider with a code of their own: what the tests of later checks need)."""
    import dataclasses

    offer_hash = transcript.offer_hash(EnrollmentOffer.from_text(issued.text)[1].body)
    t = transcript.enrollment_transcript(
        offer_hash=offer_hash,
        user=response.user,
        method=response.method,
        signing_key=response.signing_key,
        key_agreement=response.agreement_key or response.wrapped_otp_key or b"",
    )
    mac = activation.activation_mac(issued.activation_code, offer_hash, t)
    return dataclasses.replace(response, activation_mac=mac)
