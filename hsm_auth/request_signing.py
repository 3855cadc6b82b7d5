"""Requests and approvals signed in the token (docs/PROTOCOL.md §13, "Signed requests").

The authenticator has no bearer secret for the online service: each request it
makes is signed by the credential's key, inside the token, over

    request message = "hsm-auth/signed-request/v1" 0x00
                      || lp16(HTTP method, upper case ASCII)
                      || lp16(path and query exactly as sent, e.g. "/v1/device/challenges?wait=30")
                      || SHA-256(body bytes)                      (32 bytes; of b"" without a body)
                      || lp16(nonce)                              (from GET /v1/device/nonce)
                      || lp16(verifier id) || lp16(credential id)

and an answer to a challenge carries an **approval**, signed the same way over

    approval message = "hsm-auth/approval/v1" 0x00
                       || lp16(challenge id) || context hash (32 bytes, hsm_auth.challenges)
                       || decision (1 byte: 1 approve, 2 reject)
                       || lp16(verifier id) || lp16(credential id)

``lp16`` is a 2-byte big-endian length then the bytes. Two signature formats,
fixed by the credential's method (never chosen by the client):

* ``ecdsa-p256-sha256`` (device, pin: PKCS#11 or TPM 2.0): ECDSA P-256 over
  SHA-256(message) made by :meth:`hsm_auth.keystore.KeyStore.sign`; sent as raw
  ``r || s`` (64 bytes);
* ``fido2-assertion`` (biometric, face): a getAssertion whose client data hash is
  SHA-256(message) (:meth:`Fido2KeyStore.login_assertion`); sent as the signature
  (raw ``r || s``) and the authenticator data. The verifier checks it with the
  one assertion check (:func:`hsm_auth.login.check_assertion`): the rpId hash,
  user presence, user verification, and a signature counter above the one it
  recorded for the credential, which it then advances (compare-and-swap).

The header of a signed request::

    Hsm-Auth-Signature: credential=<hex>, nonce=<b64u>, signature=<b64u>[, authdata=<b64u>]

Nonces (:data:`NONCE_BYTES` random bytes, base64url without padding) are issued
by the service, live :data:`NONCE_TTL` seconds and are consumed by one atomic
``DELETE ... WHERE nonce=? AND expires>=now`` (table ``request_nonces``) in the
same transaction as the FIDO2 counter: a replay, even to another worker, finds
no row. The signature is checked first (a forged request burns nothing).

An answer (``POST /v1/device/challenges/{id}/answer``) is authenticated by its
approval alone: the challenge id makes it single use (the answer is a
compare-and-swap out of pending/claimed), so one PIN entry or one user
verification answers a challenge.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from . import ec
from .challenges import Decision
from .errors import DecodeError, InvalidInput, InvalidToken, UntrustedMessage
from .methods import Method

__all__ = [
    "APPROVAL_DOMAIN",
    "ECDSA_P256_SHA256",
    "FIDO2_ASSERTION",
    "HEADER",
    "NONCE_BYTES",
    "NONCE_TTL",
    "REQUEST_DOMAIN",
    "Signature",
    "SignatureRefused",
    "SignedHeader",
    "approval_message",
    "b64u",
    "check_signature",
    "format_header",
    "new_nonce",
    "parse_header",
    "request_message",
    "signature_format",
    "unb64u",
]

log = logging.getLogger("hsm_auth.request_signing")

REQUEST_DOMAIN: Final = b"hsm-auth/signed-request/v1\x00"
APPROVAL_DOMAIN: Final = b"hsm-auth/approval/v1\x00"
HEADER: Final = "Hsm-Auth-Signature"
NONCE_BYTES: Final = 32
NONCE_TTL: Final = 60
ECDSA_P256_SHA256: Final = "ecdsa-p256-sha256"
FIDO2_ASSERTION: Final = "fido2-assertion"
#: The rpId of the FIDO2 credentials (the backend's default, as for workstation login).
DEFAULT_RP_ID: Final = "hsm-auth"
MAX_TARGET: Final = 2048
_MAX_AUTHDATA: Final = 1024
_CREDENTIAL_ID_BYTES: Final = 16


class SignatureRefused(UntrustedMessage):
    """A signed request or approval that does not check (the reason is logged only;
    the service answers 403 ``signature-refused``)."""

    def __init__(self, message: str = "signature refused") -> None:
        super().__init__(message)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str, what: str = "a value") -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise DecodeError(f"{what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise DecodeError(f"{what} is not base64url") from None
    if b64u(data) != text:  # one encoding per value (no stray bits in the last character)
        raise DecodeError(f"{what} is not canonical base64url")
    return data


def _lp16(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise InvalidInput("a signed field is too long")
    return struct.pack(">H", len(data)) + data


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def request_message(
    method: str, target: str, body: bytes, nonce: bytes, verifier_id: bytes,
    credential_id: bytes,
) -> bytes:
    """The bytes a signed request's signature covers (see the module docstring)."""
    if not method.isascii() or not method.isalpha():
        raise InvalidInput("an HTTP method is ASCII letters")
    if not target.startswith("/") or len(target) > MAX_TARGET:
        raise InvalidInput("a request target is a path (and query) of at most 2048 characters")
    return (
        REQUEST_DOMAIN
        + _lp16(method.upper().encode("ascii"))
        + _lp16(target.encode("utf-8"))
        + hashlib.sha256(body).digest()
        + _lp16(nonce)
        + _lp16(verifier_id)
        + _lp16(credential_id)
    )


def approval_message(
    challenge_id: bytes, context_hash: bytes, decision: Decision, verifier_id: bytes,
    credential_id: bytes,
) -> bytes:
    """The bytes an approval's signature covers (see the module docstring)."""
    if len(context_hash) != 32:
        raise InvalidInput("a context hash has 32 bytes")
    return (
        APPROVAL_DOMAIN
        + _lp16(challenge_id)
        + context_hash
        + bytes([decision.code])
        + _lp16(verifier_id)
        + _lp16(credential_id)
    )


def signature_format(method: Method) -> str:
    """The signature format of a method's credentials: FIDO2 assertions for the
    methods only a FIDO2 authenticator serves (biometric, face), else ECDSA."""
    return FIDO2_ASSERTION if method.needs_user_verification else ECDSA_P256_SHA256


@dataclass(frozen=True)
class Signature:
    """A signature made in the token: raw ``r || s``; ``authdata`` for FIDO2 assertions."""

    signature: bytes = field(repr=False)
    authdata: bytes | None = None

    def to_json(self) -> dict[str, str]:
        out = {"signature": b64u(self.signature)}
        if self.authdata is not None:
            out["authdata"] = b64u(self.authdata)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> Signature:
        if not isinstance(data, Mapping) or set(data) - {"signature", "authdata"} or (
            "signature" not in data
        ):
            raise DecodeError("a signature is {signature, authdata?}")
        return cls.checked(
            unb64u(data["signature"], "the signature"),
            None if data.get("authdata") is None else unb64u(data["authdata"], "the authdata"),
        )

    @classmethod
    def checked(cls, signature: bytes, authdata: bytes | None) -> Signature:
        if len(signature) != 64:
            raise DecodeError("a signature is 64 bytes (r || s)")
        if authdata is not None and not 37 <= len(authdata) <= _MAX_AUTHDATA:
            raise DecodeError("malformed authenticator data")
        return cls(signature, authdata)


@dataclass(frozen=True)
class SignedHeader:
    """A parsed ``Hsm-Auth-Signature`` header."""

    credential_id: bytes
    nonce: bytes
    signature: Signature


_PARAM = re.compile(r"\s*([a-z]+)=([A-Za-z0-9_-]+)\s*")


def format_header(credential_id: bytes, nonce: bytes, signature: Signature) -> str:
    parts = [f"credential={credential_id.hex()}", f"nonce={b64u(nonce)}",
             f"signature={b64u(signature.signature)}"]
    if signature.authdata is not None:
        parts.append(f"authdata={b64u(signature.authdata)}")
    return ", ".join(parts)


def parse_header(text: str | None) -> SignedHeader:
    """The header's fields; :class:`SignatureRefused` when it is missing or malformed
    (every parameter exactly once, no unknown one)."""
    if not text:
        raise SignatureRefused("this request must be signed (Hsm-Auth-Signature)")
    if len(text) > 4096:
        raise SignatureRefused("the Hsm-Auth-Signature header is too long")
    params: dict[str, str] = {}
    for part in text.split(","):
        m = _PARAM.fullmatch(part)
        if m is None or m.group(1) in params:
            raise SignatureRefused("a malformed Hsm-Auth-Signature header")
        params[m.group(1)] = m.group(2)
    if set(params) - {"credential", "nonce", "signature", "authdata"} or not {
        "credential", "nonce", "signature"
    } <= set(params):
        raise SignatureRefused("a malformed Hsm-Auth-Signature header")
    try:
        cid = bytes.fromhex(params["credential"])
        if len(cid) != _CREDENTIAL_ID_BYTES or params["credential"] != cid.hex():
            raise ValueError("credential")
        nonce = unb64u(params["nonce"], "the nonce")
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce")
        authdata = params.get("authdata")
        signature = Signature.checked(
            unb64u(params["signature"], "the signature"),
            None if authdata is None else unb64u(authdata, "the authdata"),
        )
    except (ValueError, DecodeError):
        raise SignatureRefused("a malformed Hsm-Auth-Signature header") from None
    return SignedHeader(cid, nonce, signature)


def check_signature(
    method: Method, signing_key: bytes, message: bytes, signature: Signature, *,
    last_counter: int, rp_id: str = DEFAULT_RP_ID,
) -> int | None:
    """Check ``signature`` over ``message`` with a credential's SEC1 ``signing_key``,
    in the format of its ``method``. Returns the FIDO2 signature counter to record
    (``None`` for ECDSA); :class:`SignatureRefused` otherwise (the reason is logged)."""
    try:
        public = ec.decode_point(signing_key)
    except DecodeError:
        raise SignatureRefused() from None
    fmt = signature_format(method)
    if fmt == ECDSA_P256_SHA256:
        if signature.authdata is not None:
            log.info("signature refused: authdata for an ECDSA credential")
            raise SignatureRefused()
        try:
            ec.verify(public, signature.signature, message)
        except InvalidInput:
            log.info("signature refused: does not verify")
            raise SignatureRefused() from None
        return None
    if signature.authdata is None:
        log.info("signature refused: a FIDO2 credential's signature without authdata")
        raise SignatureRefused()
    from .login import check_assertion

    try:
        return check_assertion(
            public, signature.authdata, hashlib.sha256(message).digest(),
            ec.raw_to_der(signature.signature), rp_id=rp_id,
            user_verification=method.needs_user_verification, last_counter=last_counter,
        )
    except InvalidToken as e:
        log.info("signature refused: %s", e)
        raise SignatureRefused() from None
    except InvalidInput:
        raise SignatureRefused() from None


def same_id(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
