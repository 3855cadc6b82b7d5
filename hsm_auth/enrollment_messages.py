"""Enrollment messages (docs/PROTOCOL.md): the verifier's offer, the authenticator's
response and the verifier's result. Wire form, field checks and the shared
message base: :mod:`hsm_auth.protocol`; kept apart from it because
``hsm-auth start`` needs none of them (``bench/startup.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import display
from .errors import DecodeError
from .methods import Method
from .protocol import (
    MAX_CONTEXT,
    MessageType,
    _bool,
    _bytes,
    _int,
    _Message,
    _method,
    _method_set,
    _methods,
    _opt_bytes,
    _opt_tenant,
    _point,
    _text,
)

#: A FIDO2 wrapped OTP key: E (33) || AES-KW of the 32-byte key (40). The format's
#: owner is :mod:`hsm_auth.key_transport` (not imported here: its cryptography is heavier).
WRAPPED_OTP_KEY_BYTES = 73
#: An enrollment response's activation MAC: a full HMAC-SHA256 (hsm_auth.activation).
ACTIVATION_MAC_BYTES = 32


@dataclass(frozen=True)
class EnrollmentOffer(_Message):
    """Verifier → authenticator: an invitation to enroll one method (signed, short-lived).

    ``enrolled`` names the methods the user had enrolled at the verifier when it made
    the offer: without ``replace`` the verifier will refuse those, so the
    authenticator refuses them too, before it creates any key. ``tenant`` (or None)
    names the user's tenant at the verifier (docs/PROTOCOL.md §17): the enrolled
    method keeps it, and sessions of that tenant's user bind it."""

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_OFFER

    verifier_id: bytes
    verifier_name: str
    user: str
    offer_id: bytes
    verifier_signing_key: bytes  # SEC1 point
    verifier_agreement_key: bytes  # SEC1 point
    suite: str
    window: int
    methods: tuple[Method, ...]
    replace: bool
    expires: int
    enrolled: tuple[Method, ...] = ()
    tenant: str | None = None
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentOffer:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            verifier_name=_text(v[1], "verifier_name", max_len=display.MAX_NAME),
            user=_text(v[2], "user", max_len=display.MAX_NAME),
            offer_id=_bytes(v[3], "offer_id", min_len=16, max_len=32),
            verifier_signing_key=_point(v[4], "verifier_signing_key"),
            verifier_agreement_key=_point(v[5], "verifier_agreement_key"),
            suite=_text(v[6], "suite", max_len=64),
            window=_int(v[7], "window", lo=1, hi=1000),
            methods=_methods(v[8]),
            replace=_bool(v[9], "replace"),
            expires=_int(v[10], "expires"),
            enrolled=_method_set(v[11], "enrolled"),
            tenant=_opt_tenant(v[12]),
            signature=signature,
        )


@dataclass(frozen=True)
class EnrollmentResponse(_Message):
    """Authenticator → verifier: the public half of one enrolled method.

    Signed with the new signing key (proof of possession) where the backend can
    sign arbitrary data; otherwise ``attestation`` carries the proof.
    ``confirmation`` is the key confirmation: HMAC-SHA256 under the new OTP key,
    made in the token, over the enrollment transcript
    (:func:`hsm_auth.transcript.confirmation_message`). ``activation_mac`` is the
    HMAC over the same transcript keyed from the offer's activation code
    (:mod:`hsm_auth.activation`); None: the authenticator had no code, which the
    verifier refuses as a wrong one.
    """

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_RESPONSE

    verifier_id: bytes
    offer_id: bytes
    user: str
    method: Method
    backend: str
    signing_key: bytes  # SEC1 point
    agreement_key: bytes | None  # SEC1 point: the verifier derives the OTP key by ECDH
    wrapped_otp_key: bytes | None  # or: the OTP key encrypted to the verifier
    initial_atc: int
    attestation: bytes | None
    confirmation: bytes = field(repr=False)
    activation_mac: bytes | None = field(default=None, repr=False)
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentResponse:
        agreement = None if v[6] is None else _point(v[6], "agreement_key")
        wrapped = None if v[7] is None else _bytes(
            v[7], "wrapped_otp_key", min_len=WRAPPED_OTP_KEY_BYTES, max_len=WRAPPED_OTP_KEY_BYTES
        )
        if (agreement is None) == (wrapped is None):
            raise DecodeError("exactly one of agreement_key and wrapped_otp_key must be set")
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            offer_id=_bytes(v[1], "offer_id", min_len=16, max_len=32),
            user=_text(v[2], "user", max_len=display.MAX_NAME),
            method=_method(v[3]),
            backend=_text(v[4], "backend", max_len=32),
            signing_key=_point(v[5], "signing_key"),
            agreement_key=agreement,
            wrapped_otp_key=wrapped,
            initial_atc=_int(v[8], "initial_atc"),
            attestation=_opt_bytes(v[9], "attestation", max_len=2048),
            confirmation=_bytes(v[10], "confirmation", min_len=32, max_len=32),
            activation_mac=None if v[11] is None else _bytes(
                v[11], "activation_mac", min_len=ACTIVATION_MAC_BYTES, max_len=ACTIVATION_MAC_BYTES
            ),
            signature=signature,
        )


#: Size limits of the certificates an :class:`EnrollmentResult` carries (DER).
MAX_CERTIFICATE = 2048
MAX_CA_CERTIFICATE = 1024
#: The longest an authenticator may keep a method unlocked (EnrollmentResult.pin_cache).
MAX_PIN_CACHE = 3600


@dataclass(frozen=True)
class EnrollmentResult(_Message):
    """Verifier → authenticator after a recorded enrollment (signed by the verifier's
    signing key, which the authenticator pinned at enrollment): the X.509
    certificate the verifier's device CA issued for the method's signing key, the
    CA certificate, and the attestation result's summary (:mod:`hsm_auth.device_ca`).
    ``credential_id`` names the enrolled credential (docs/PROTOCOL.md §8.3).
    ``offline_expires`` is the Unix time after which the credential makes no
    offline OTP (0: never); ``pin_cache`` how many seconds the authenticator may
    keep the method unlocked after one use (0: every use asks, at most 3600)."""

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_RESULT

    verifier_id: bytes
    user: str
    method: Method
    credential_id: bytes
    certificate: bytes  # DER
    ca_certificate: bytes  # DER
    attestation: str
    offline_expires: int = 0
    pin_cache: int = 0
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentResult:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            user=_text(v[1], "user", max_len=display.MAX_NAME),
            method=_method(v[2]),
            credential_id=_bytes(v[3], "credential_id", min_len=16, max_len=16),
            certificate=_bytes(v[4], "certificate", min_len=1, max_len=MAX_CERTIFICATE),
            ca_certificate=_bytes(v[5], "ca_certificate", min_len=1, max_len=MAX_CA_CERTIFICATE),
            attestation=_text(v[6], "attestation", max_len=MAX_CONTEXT),
            offline_expires=_int(v[7], "offline_expires"),
            pin_cache=_int(v[8], "pin_cache", hi=MAX_PIN_CACHE),
            signature=signature,
        )
