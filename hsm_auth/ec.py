"""P-256 helpers: point encoding and ECDSA signatures in raw and DER form."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .errors import DecodeError, UntrustedMessage

CURVE = ec.SECP256R1()
COORD = 32


def encode_point(public: ec.EllipticCurvePublicKey) -> bytes:
    """SEC1 compressed point (33 bytes): compact enough for QR codes."""
    # Imported here: the serialization package costs ~4 ms of CLI start-up
    # (it pulls in SSH keys and ciphers), and checking a signature never needs it.
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def decode_point(data: bytes) -> ec.EllipticCurvePublicKey:
    if not isinstance(data, bytes) or len(data) not in (33, 65):
        raise DecodeError("bad P-256 public key encoding")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)
    except ValueError:
        raise DecodeError("bad P-256 public key (not on the curve)") from None


def der_to_raw(signature: bytes) -> bytes:
    r, s = decode_dss_signature(signature)
    return r.to_bytes(COORD, "big") + s.to_bytes(COORD, "big")


def raw_to_der(signature: bytes) -> bytes:
    if len(signature) != 2 * COORD:
        raise UntrustedMessage("bad signature length")
    return encode_dss_signature(
        int.from_bytes(signature[:COORD], "big"), int.from_bytes(signature[COORD:], "big")
    )


class _EcdsaSha256(ec.ECDSA):
    """``ECDSA(SHA256())`` for verifying, made without ``ECDSA.__init__``: that imports
    cryptography's whole OpenSSL backend module (RSA, ciphers: ~5 ms of ``hsm-auth
    start``, bench/startup.py) to check deterministic signing, which verifying never
    uses. Only the public properties are defined, as cryptography reads them."""

    def __init__(self) -> None:
        pass

    @property
    def algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA256()

    @property
    def deterministic_signing(self) -> bool:
        return False


def verify(public: ec.EllipticCurvePublicKey, raw_signature: bytes, data: bytes) -> None:
    """Raise UntrustedMessage unless ``raw_signature`` (r||s) is ECDSA-SHA256 over ``data``."""
    try:
        public.verify(raw_to_der(raw_signature), data, _EcdsaSha256())
    except InvalidSignature:
        raise UntrustedMessage("signature does not verify") from None


def key_id(public: ec.EllipticCurvePublicKey, length: int = 8) -> bytes:
    """A short stable identifier for a public key."""
    return hashlib.sha256(encode_point(public)).digest()[:length]


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return hmac.compare_digest(encode_point(a), encode_point(b))
