"""The verifier's own keys: the signing key (offers, verification data, sync)
and the ECDH agreement key (from which each method's OTP key is derived per check).

``VerifierKeys`` is the interface; ``FileVerifierKeys`` keeps both keys in one
0600 PEM file. Whoever can read that file can derive every OTP key: use an HSM
in production (an HSM-held implementation plugs in through the same interface).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import ec as ecutil
from .errors import DecodeError, StateError
from .files import atomic_write, read_private

WRAP_INFO = b"hsm-auth/otp-key-wrap/v1"


class VerifierKeys(ABC):
    @property
    @abstractmethod
    def signing_public(self) -> ec.EllipticCurvePublicKey: ...

    @property
    @abstractmethod
    def agreement_public(self) -> ec.EllipticCurvePublicKey: ...

    @abstractmethod
    def sign_raw(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data``; raw r||s."""

    @abstractmethod
    def shared_secret(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """ECDH x-coordinate with the verifier's agreement key: the OTP key of that peer."""

    def unwrap_otp_key(self, wrapped: bytes) -> bytes:
        """Decrypt an OTP key that an authenticator encrypted to the agreement key.

        Format: ephemeral SEC1 point (33) || 12-byte nonce || AES-256-GCM ciphertext,
        key = HKDF-SHA256(ECDH(ephemeral, agreement key), info=WRAP_INFO).
        """
        if len(wrapped) < 33 + 12 + 16 + 16:
            raise DecodeError("wrapped OTP key too short")
        peer = ecutil.decode_point(wrapped[:33])
        kek = HKDF(hashes.SHA256(), 32, None, WRAP_INFO).derive(self.shared_secret(peer))
        try:
            return AESGCM(kek).decrypt(wrapped[33:45], wrapped[45:], WRAP_INFO)
        except Exception:
            raise DecodeError("wrapped OTP key does not decrypt") from None


def wrap_otp_key(otp_key: bytes, verifier_agreement: ec.EllipticCurvePublicKey) -> bytes:
    """Authenticator side of :meth:`VerifierKeys.unwrap_otp_key` (ECIES with P-256)."""
    ephemeral = ec.generate_private_key(ecutil.CURVE)
    kek = HKDF(hashes.SHA256(), 32, None, WRAP_INFO).derive(
        ephemeral.exchange(ec.ECDH(), verifier_agreement)
    )
    nonce = os.urandom(12)
    return (
        ecutil.encode_point(ephemeral.public_key())
        + nonce
        + AESGCM(kek).encrypt(nonce, otp_key, WRAP_INFO)
    )


class FileVerifierKeys(VerifierKeys):
    """Both keys in one PEM file, mode 0600."""

    def __init__(self, signing: ec.EllipticCurvePrivateKey, agreement: ec.EllipticCurvePrivateKey):
        self._signing = signing
        self._agreement = agreement

    @classmethod
    def create(cls, path: Path) -> FileVerifierKeys:
        if path.exists():
            raise StateError(f"{path} exists; refusing to overwrite verifier keys")
        keys = cls(ec.generate_private_key(ecutil.CURVE), ec.generate_private_key(ecutil.CURVE))
        pem = b"".join(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for k in (keys._signing, keys._agreement)
        )
        atomic_write(path, pem)
        return keys

    @classmethod
    def load(cls, path: Path) -> FileVerifierKeys:
        data = read_private(path)
        marker = b"-----END PRIVATE KEY-----"
        blocks = [b + marker for b in data.split(marker) if b.strip()]
        if len(blocks) != 2:
            raise StateError(f"{path} does not hold the two verifier keys")
        try:
            loaded = [serialization.load_pem_private_key(b, None) for b in blocks]
        except ValueError:
            raise StateError(f"{path} does not hold valid verifier keys") from None
        signing, agreement = loaded
        if not isinstance(signing, ec.EllipticCurvePrivateKey) or not isinstance(
            agreement, ec.EllipticCurvePrivateKey
        ):
            raise StateError(f"{path} does not hold P-256 keys")
        return cls(signing, agreement)

    @property
    def signing_public(self) -> ec.EllipticCurvePublicKey:
        return self._signing.public_key()

    @property
    def agreement_public(self) -> ec.EllipticCurvePublicKey:
        return self._agreement.public_key()

    def sign_raw(self, data: bytes) -> bytes:
        return ecutil.der_to_raw(self._signing.sign(data, ec.ECDSA(hashes.SHA256())))

    def shared_secret(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        return self._agreement.exchange(ec.ECDH(), peer)
