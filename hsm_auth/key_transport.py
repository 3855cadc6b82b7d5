"""The FIDO2 OTP key's transport to the verifier (docs/PROTOCOL.md, "FIDO2 key transport").

A FIDO2 authenticator cannot keep an HMAC key of the verifier's choosing: its
OTP key is an hmac-secret output, which the authenticator side encrypts to the
verifier's (per-offer) agreement key at enrollment::

    wrapped = E || AES-KW-256(Z, otp_key)          (33 + 40 bytes)

with ``E`` a one-time P-256 point (SEC1 compressed) and ``Z`` the x-coordinate
of ECDH(e, verifier agreement key). RFC 3394 AES key wrap, because a PKCS#11
HSM can unwrap it *into* the HSM (``CKM_AES_KEY_WRAP``) as a sensitive key:
SoftHSM has no AEAD unwrap, so the format has no associated data. The wrapped
key is bound to its enrollment by the per-offer agreement key (it opens under
that offer's key only) and by the key confirmation over the transcript, which
contains the whole ``wrapped`` value.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.asymmetric import ec

from . import ec as ecutil
from .errors import DecodeError

__all__ = [
    "OTP_KEY_BYTES",
    "WRAPPED_BYTES",
    "ephemeral_point",
    "open_with_shared",
    "wrap",
    "wrap_otp_key",
]

OTP_KEY_BYTES: Final = 32
POINT_BYTES: Final = 33
#: E (33) || AES-KW of a 32-byte key (40).
WRAPPED_BYTES: Final = POINT_BYTES + OTP_KEY_BYTES + 8


def wrap(
    otp_key: bytes | bytearray,
    verifier_agreement: ec.EllipticCurvePublicKey,
    ephemeral: ec.EllipticCurvePrivateKey,
) -> bytes:
    """Encrypt ``otp_key`` to ``verifier_agreement`` with the one-time key ``ephemeral``.

    The caller chooses ``ephemeral`` so that it can bind its point into a proof
    before the OTP key exists (FIDO2 client data hash)."""
    if len(otp_key) != OTP_KEY_BYTES:
        raise ValueError("an OTP key is 32 bytes")
    shared = ephemeral.exchange(ec.ECDH(), verifier_agreement)
    return ecutil.encode_point(ephemeral.public_key()) + keywrap.aes_key_wrap(
        shared, bytes(otp_key)
    )


def ephemeral_point(wrapped: bytes) -> ec.EllipticCurvePublicKey:
    """The one-time point ``E`` of a wrapped key; DecodeError if the shape is wrong."""
    if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_BYTES:
        raise DecodeError(f"a wrapped OTP key is {WRAPPED_BYTES} bytes")
    return ecutil.decode_point(wrapped[:POINT_BYTES])


def key_wrap_part(wrapped: bytes) -> bytes:
    """The RFC 3394 ciphertext of a wrapped key (what an HSM unwraps)."""
    ephemeral_point(wrapped)
    return wrapped[POINT_BYTES:]


def open_with_shared(shared: bytes, wrapped: bytes) -> bytes:
    """The OTP key, given the ECDH x-coordinate ``Z`` of ``E`` and the agreement key."""
    try:
        return keywrap.aes_key_unwrap(shared, key_wrap_part(wrapped))
    except keywrap.InvalidUnwrap:
        raise DecodeError("wrapped OTP key does not unwrap") from None


def wrap_otp_key(
    otp_key: bytes | bytearray, verifier_agreement: ec.EllipticCurvePublicKey
) -> bytes:
    """:func:`wrap` with a fresh one-time key."""
    return wrap(otp_key, verifier_agreement, ec.generate_private_key(ecutil.CURVE))
