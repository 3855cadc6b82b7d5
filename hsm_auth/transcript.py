"""Enrollment transcript, key confirmation and credential id (docs/PROTOCOL.md, "Enrollment").

Both sides compute these from the messages exactly as sent:

* :func:`offer_hash`: SHA-256 over the offer's signed body bytes;
* :func:`enrollment_transcript` ``T``: SHA-256 over a domain tag, the offer hash,
  the user, the method, the new signing key and the OTP key agreement (the
  authenticator's one-time agreement point, or the whole FIDO2 wrapped key);
* :func:`confirmation_message`: what the token MACs with the freshly made OTP key
  to prove it holds the agreement key (key confirmation). It starts with a
  domain tag, never with ``OCRA-1:``, so the MAC can never be an OTP or a sync MAC;
* :func:`credential_id`: 16 bytes naming a credential, from its signing key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from .methods import Method

__all__ = [
    "CONFIRMATION_BYTES",
    "CREDENTIAL_ID_BYTES",
    "check_confirmation",
    "confirmation_message",
    "credential_id",
    "enrollment_transcript",
    "offer_hash",
]

TRANSCRIPT_DOMAIN: Final = b"hsm-auth/enrollment-transcript/v3"
CONFIRMATION_DOMAIN: Final = b"hsm-auth/key-confirmation/v3\x00"
CREDENTIAL_ID_DOMAIN: Final = b"hsm-auth/credential-id/v3"
#: Key confirmation: a full HMAC-SHA256.
CONFIRMATION_BYTES: Final = 32
CREDENTIAL_ID_BYTES: Final = 16


def lp16(data: bytes) -> bytes:
    """``data`` with a 2-byte big-endian length prefix."""
    if len(data) > 0xFFFF:
        raise ValueError("field too long for a 16-bit length prefix")
    return struct.pack(">H", len(data)) + data


def offer_hash(offer_body: bytes) -> bytes:
    """SHA-256 of an offer's signed body bytes (exactly as sent)."""
    return hashlib.sha256(offer_body).digest()


def enrollment_transcript(
    *,
    offer_hash: bytes,
    user: str,
    method: Method,
    signing_key: bytes,
    key_agreement: bytes,
) -> bytes:
    """``T``: SHA-256 over the enrollment's identities and public keys.

    ``signing_key`` and ``key_agreement`` are the response's SEC1 bytes as sent;
    ``key_agreement`` is its agreement point or, for FIDO2, its whole wrapped OTP key."""
    h = hashlib.sha256(TRANSCRIPT_DOMAIN)
    h.update(lp16(offer_hash))
    h.update(lp16(user.encode("utf-8")))
    h.update(struct.pack(">B", method.code))
    h.update(lp16(signing_key))
    h.update(lp16(key_agreement))
    return h.digest()


def confirmation_message(transcript: bytes) -> bytes:
    """The bytes the token MACs with the new OTP key: domain tag || 0x00 || ``T``."""
    return CONFIRMATION_DOMAIN + transcript


def check_confirmation(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two key confirmations."""
    return len(received) == CONFIRMATION_BYTES and hmac.compare_digest(expected, received)


def credential_id(signing_key: bytes) -> bytes:
    """16 bytes naming a credential: SHA-256(domain || its SEC1 signing key as sent)."""
    return hashlib.sha256(CREDENTIAL_ID_DOMAIN + signing_key).digest()[:CREDENTIAL_ID_BYTES]
