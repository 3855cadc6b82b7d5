"""The verifier's own keys, one job each (docs/PROTOCOL.md, "Verifier key custody").

* The **signing key** (long-lived) signs offers, verification data and sync
  messages. It does nothing else.
* The **device CA key** (long-lived) signs the X.509 certificate that the
  verifier issues for each enrolled credential's signing key, and its own
  self-signed CA certificate (:mod:`hsm_auth.device_ca`); nothing else.
* A **per-offer agreement key** is made for each enrollment offer
  (:meth:`VerifierKeys.offer_key`); its public point is the offer's
  ``verifier_agreement_key``. At :meth:`Verifier.accept_enrollment
  <hsm_auth.verifier.Verifier.accept_enrollment>` it turns the response's key
  agreement into the credential's OTP key (PKCS#11/TPM2: the ECDH x-coordinate
  Z with the authenticator's one-time point; FIDO2: it opens the AES key wrap
  of the hmac-secret key) and the result is at once **sealed**
  (:meth:`VerifierKeys.seal`); then the per-offer key is destroyed
  (:meth:`VerifierKeys.drop_offer_key`). A kill in between leaves it behind
  until :meth:`Verifier.purge <hsm_auth.verifier.Verifier.purge>` destroys
  every per-offer key whose offer is used or expired (:meth:`VerifierKeys.offer_keys`).
* The **key-encryption key** (KEK, long-lived) seals each OTP key; the sealed
  blob is stored in the credential's row (``sealed_otp_key``) and opened for
  each check (:meth:`VerifierKeys.otp_macs`). It can open sealed blobs only:
  it derives nothing, and no agreement key outlives its offer, so no key can
  re-derive an enrolled credential's OTP key from the public data in the database.
* The **activation-code key** (long-lived) makes each offer's one-time
  activation code from the offer id (:meth:`VerifierKeys.activation_code`,
  :mod:`hsm_auth.activation`): HMAC-SHA256 of the offer id, so the database holds
  no code. It does nothing else.

The OTP check never asks for a raw OTP key: it asks for HMAC-SHA256 under the
credential's OTP key (:meth:`VerifierKeys.otp_macs`), so an implementation can
keep the key where it is opened.

* :class:`FileVerifierKeys` keeps the signing key and a **root secret** in one
  0600 PEM file; every per-offer agreement key and the file KEK are derived
  from the root secret (HKDF-SHA256), so nothing secret goes to the database
  and nothing needs destroying. With file keys **the verifier holds every key
  in memory by nature**: whoever can read that file (or the verifier's memory)
  can open every sealed OTP key in the database; the file is then as sensitive
  as all the users' tokens together. Use it for a workstation or a test; use
  an HSM for a service. Since the KEK is in memory anyway, it keeps the opened
  32-byte OTP keys in memory too (:class:`OtpKeyCache`, at most
  :data:`OTP_KEY_CACHE_BYTES`): that adds no exposure and saves the AES-GCM
  open on every later check of the same credential.
* ``Pkcs11VerifierKeys`` (:mod:`hsm_auth_backends.pkcs11_verifier`, in the
  pkcs11 backend) keeps the signing key, the KEK and each per-offer key in a
  PKCS#11 HSM, sensitive and not extractable; Z and the OTP keys exist only
  as HSM objects, and no code path reads a secret key's value. See that
  module for what exists in the HSM when.

Implementations other than the key file register in the entry-point group
``hsm_auth.verifier_keys`` under the ``type`` they record in the verifier's
identity file; :func:`create_keys` and :func:`load_keys` find them there (via
:mod:`hsm_auth.registry`), so this module imports no backend and no PKCS#11
library. Such a class implements :meth:`VerifierKeys.generate`,
:meth:`VerifierKeys.from_spec` and :meth:`VerifierKeys.to_json`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import activation, key_transport, transcript
from . import ec as ecutil
from .errors import InvalidInput, StateError
from .files import atomic_write, read_private
from .store.base import CredentialRecord

#: Memory that :class:`FileVerifierKeys` may spend on opened OTP keys: about
#: 320 bytes a credential (the key by its 60-byte sealed blob), so some 105,000
#: credentials stay cached.
OTP_KEY_CACHE_BYTES = 32 * 2**20

#: HMAC-SHA256 under one credential's OTP key.
MacFunction = Callable[[bytes], bytes]

#: The order n of P-256's base point.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class OtpKeyCache:
    """Opened OTP keys by the sealed blob they come from, least recently
    used out first, holding at most ``max_bytes``: the keys, the values and the
    map's own cost per entry are counted. Thread-safe. ``max_bytes=0`` caches nothing."""

    #: The ordered map's own memory per entry (hash table slot and list node):
    #: about 105 bytes measured at 100,000 entries on CPython 3.11, plus headroom
    #: for the table's growth steps.
    ENTRY_OVERHEAD: ClassVar[int] = 160

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise InvalidInput("the OTP key cache size must not be negative")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def cost(cls, key: bytes, value: bytes) -> int:
        """The bytes one entry is counted as."""
        return sys.getsizeof(key) + sys.getsizeof(value) + cls.ENTRY_OVERHEAD

    @property
    def nbytes(self) -> int:
        """The bytes the entries held now are counted as (never above ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: bytes) -> None:
        cost = self.cost(key, value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self.cost(key, old)
            if cost > self.max_bytes:
                return
            self._entries[key] = value
            self._bytes += cost
            while self._bytes > self.max_bytes:
                evicted_key, evicted = self._entries.popitem(last=False)
                self._bytes -= self.cost(evicted_key, evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


@dataclass(frozen=True)
class OfferKey:
    """A per-offer agreement key the keys hold: its offer and when that offer expires."""

    offer_id: bytes
    expires: int


def key_agreement(credential: CredentialRecord) -> bytes:
    """The credential's OTP key agreement as enrolled: the authenticator's one-time
    agreement point (PKCS#11, TPM2) or the FIDO2 wrapped key."""
    agreement = credential.agreement_key or credential.wrapped_otp_key
    if agreement is None:
        raise StateError("the credential has neither an agreement key nor a wrapped OTP key")
    return agreement


class VerifierKeys(ABC):
    #: ``"file"``, or the entry-point name of an implementation (``"pkcs11"``).
    kind: ClassVar[str] = ""

    @property
    @abstractmethod
    def signing_public(self) -> ec.EllipticCurvePublicKey: ...

    @abstractmethod
    def sign_raw(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data``; raw r||s."""

    @abstractmethod
    def offer_key(self, offer_id: bytes, expires: int) -> ec.EllipticCurvePublicKey:
        """A fresh agreement key for the offer ``offer_id`` (which expires at
        ``expires``); returns its public key, the offer's ``verifier_agreement_key``."""

    @abstractmethod
    def seal(self, offer_id: bytes, credential: CredentialRecord) -> bytes:
        """The OTP key that the offer's agreement key makes of ``credential``'s key
        agreement, sealed under the key-encryption key (what ``sealed_otp_key`` stores).
        Raises DecodeError for a FIDO2 wrapped key that does not open under the
        offer's key, StateError when the offer has no agreement key (any more)."""

    @abstractmethod
    def otp_macs(self, credential: CredentialRecord) -> AbstractContextManager[MacFunction]:
        """A function computing HMAC-SHA256 under ``credential``'s OTP key (opened from
        its ``sealed_otp_key``), valid inside the ``with`` block."""

    def otp_mac(self, credential: CredentialRecord, data: bytes) -> bytes:
        """HMAC-SHA256(OTP key of ``credential``, ``data``)."""
        with self.otp_macs(credential) as mac:
            return mac(data)

    @abstractmethod
    def activation_hmac(self, message: bytes) -> bytes:
        """HMAC-SHA256 under the activation-code key, whose only job this is
        (``message`` is :func:`hsm_auth.activation.code_input` of an offer id)."""

    def activation_code(self, offer_id: bytes) -> str:
        """The one-time activation code of the offer ``offer_id`` (``XXXX-XXXX-XXXX``):
        made again from the offer id whenever it is needed, never stored."""
        return activation.code_from_mac(self.activation_hmac(activation.code_input(offer_id)))

    @abstractmethod
    def offer_keys(self) -> list[OfferKey]:
        """The per-offer agreement keys held now (none where they are derived on demand)."""

    @abstractmethod
    def drop_offer_key(self, offer_id: bytes) -> None:
        """Destroy the agreement key of ``offer_id``, if it is held (idempotent)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the HSM session, if any."""

    # --- the device CA's key (hsm_auth.device_ca): a key of its own, one job ---

    @property
    def ca_public(self) -> ec.EllipticCurvePublicKey:
        """The public key of the device CA key, which signs only the certificates of
        enrolled signing keys and its own CA certificate (:mod:`hsm_auth.device_ca`)."""
        raise StateError(f"verifier keys of type {self.kind!r} have no device CA key")

    def ca_sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data`` by the device CA key; DER, as X.509 holds it."""
        raise StateError(f"verifier keys of type {self.kind!r} have no device CA key")

    # --- hooks of the implementations registered in ``hsm_auth.verifier_keys`` ---

    @classmethod
    def generate(cls, uri: str) -> VerifierKeys:
        """New keys in the device ``uri`` names (:func:`create_keys`)."""
        raise StateError(f"verifier keys of type {cls.kind!r} are not made from a URI")

    @classmethod
    def from_spec(cls, spec: dict[str, Any], uri: str | None) -> VerifierKeys:
        """The keys ``spec`` (what :meth:`to_json` returned) names, ``uri``
        overriding the device it records (:func:`load_keys`)."""
        raise StateError(f"verifier keys of type {cls.kind!r} are not opened from a spec")

    def to_json(self) -> dict[str, Any]:
        """What the identity file records to find these keys again (``type``: :attr:`kind`)."""
        raise StateError(f"verifier keys of type {self.kind!r} are not recorded in the identity")


#: HKDF-SHA256 ``info`` prefixes of the keys derived from a key file's root secret.
OFFER_KEY_INFO = b"hsm-auth/file-keys/offer-agreement-key/v1\x00"
KEK_INFO = b"hsm-auth/file-keys/kek/v1"
CA_KEY_INFO = b"hsm-auth/file-keys/device-ca-key/v1"
ACTIVATION_INFO = b"hsm-auth/file-keys/activation-code-key/v1"
#: AES-GCM associated data of a sealed OTP key: this tag, then the credential's identity.
SEAL_DOMAIN = b"hsm-auth/file-keys/sealed-otp-key/v1"
NONCE_BYTES = 12


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(secret)


def _derived_scalar_key(secret: bytes, info: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 key whose scalar is HKDF(secret, info, 48 bytes) mod (n - 1) + 1."""
    scalar = int.from_bytes(_hkdf(secret, info, 48), "big")
    return ec.derive_private_key(scalar % (_P256_ORDER - 1) + 1, ecutil.CURVE)


def seal_context(credential: CredentialRecord) -> bytes:
    """The associated data a file-sealed OTP key is bound to: user, method, signing
    key and key agreement of its credential (a blob moved to another row does not open)."""
    return b"".join(
        (
            SEAL_DOMAIN,
            transcript.lp16(credential.user.encode("utf-8")),
            struct.pack(">B", credential.method.code),
            transcript.lp16(credential.signing_key),
            transcript.lp16(key_agreement(credential)),
        )
    )


class FileVerifierKeys(VerifierKeys):
    """The signing key and the root secret in one PEM file, mode 0600 (see the module
    docstring for what that means). The file's second key is not used for ECDH: its
    32-byte private scalar is the root secret from which HKDF-SHA256 derives

    * each offer's agreement key: ``info = OFFER_KEY_INFO || offer_id``, 48 bytes
      read as an integer, reduced mod ``n - 1``, plus 1 (a P-256 scalar);
    * the device CA key (:mod:`hsm_auth.device_ca`): ``info = CA_KEY_INFO``, reduced
      like an offer's key;
    * the file KEK: ``info = KEK_INFO``, 32 bytes. A sealed OTP key is
      ``nonce (12) || AES-256-GCM(KEK, nonce, OTP key, aad = seal_context(credential))``,
      60 bytes; the associated data binds it to its credential's row;
    * the activation-code key: ``info = ACTIVATION_INFO``, 32 bytes (an HMAC-SHA256 key)."""

    kind: ClassVar[str] = "file"

    def __init__(
        self,
        signing: ec.EllipticCurvePrivateKey,
        root: ec.EllipticCurvePrivateKey,
        *,
        cache_bytes: int = OTP_KEY_CACHE_BYTES,
    ):
        self._signing = signing
        self._root = root
        self._secret = root.private_numbers().private_value.to_bytes(32, "big")
        self._kek_bytes = _hkdf(self._secret, KEK_INFO, 32)
        self._kek = AESGCM(self._kek_bytes)
        self._ca = _derived_scalar_key(self._secret, CA_KEY_INFO)
        self._activation = _hkdf(self._secret, ACTIVATION_INFO, 32)
        # Opened OTP keys (32 bytes each), by sealed blob: no exposure beyond the KEK above.
        self.otp_keys = OtpKeyCache(cache_bytes)

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
            for k in (keys._signing, keys._root)
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
        signing, root = loaded
        if not isinstance(signing, ec.EllipticCurvePrivateKey) or not isinstance(
            root, ec.EllipticCurvePrivateKey
        ):
            raise StateError(f"{path} does not hold P-256 keys")
        return cls(signing, root)

    @property
    def signing_public(self) -> ec.EllipticCurvePublicKey:
        return self._signing.public_key()

    def sign_raw(self, data: bytes) -> bytes:
        return ecutil.der_to_raw(self._signing.sign(data, ec.ECDSA(hashes.SHA256())))

    def offer_private(self, offer_id: bytes) -> ec.EllipticCurvePrivateKey:
        """The agreement key of ``offer_id``, derived from the root secret."""
        return _derived_scalar_key(self._secret, OFFER_KEY_INFO + offer_id)

    @property
    def ca_public(self) -> ec.EllipticCurvePublicKey:
        return self._ca.public_key()

    def ca_sign(self, data: bytes) -> bytes:
        return self._ca.sign(data, ec.ECDSA(hashes.SHA256()))

    def offer_key(self, offer_id: bytes, expires: int) -> ec.EllipticCurvePublicKey:
        return self.offer_private(offer_id).public_key()

    def activation_hmac(self, message: bytes) -> bytes:
        return hmac.digest(self._activation, message, hashlib.sha256)

    def offer_keys(self) -> list[OfferKey]:
        return []  # derived on demand: none is held

    def drop_offer_key(self, offer_id: bytes) -> None:
        pass  # derived on demand: nothing to destroy

    def seal(self, offer_id: bytes, credential: CredentialRecord) -> bytes:
        agreement = self.offer_private(offer_id)
        if credential.agreement_key is not None:
            otp_key = agreement.exchange(ec.ECDH(), ecutil.decode_point(credential.agreement_key))
        else:
            wrapped = key_agreement(credential)
            peer = key_transport.ephemeral_point(wrapped)
            otp_key = key_transport.open_with_shared(agreement.exchange(ec.ECDH(), peer), wrapped)
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._kek.encrypt(nonce, otp_key, seal_context(credential))

    def otp_key(self, credential: CredentialRecord) -> bytes:
        """The credential's OTP key, opened from its sealed blob (file keys hold it anyway)."""
        sealed = credential.sealed_otp_key
        if sealed is None:
            raise StateError("the credential has no sealed OTP key; enroll it again")
        key = self.otp_keys.get(sealed)
        if key is None:
            try:
                key = self._kek.decrypt(
                    sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], seal_context(credential)
                )
            except (InvalidTag, ValueError):
                raise StateError(
                    f"the sealed OTP key of {credential.user!r}'s {credential.method.value} "
                    "method does not open with this verifier's key file"
                ) from None
            self.otp_keys.put(sealed, key)
        return key

    def close(self) -> None:
        self.otp_keys.clear()

    @contextmanager
    def otp_macs(self, credential: CredentialRecord) -> Iterator[MacFunction]:
        key = self.otp_key(credential)

        def mac(data: bytes) -> bytes:
            return hmac.digest(key, data, hashlib.sha256)

        yield mac


def load_keys(directory: Path, spec: dict[str, Any] | None, hsm: str | None) -> VerifierKeys:
    """The keys a verifier directory names: ``spec`` from its identity file
    (``None``: the key file), with ``hsm`` (a device URI) overriding the stored one.
    Types other than ``file`` are found through the entry-point group ``hsm_auth.verifier_keys``."""
    if spec is None or (isinstance(spec, dict) and spec.get("type", "file") == "file"):
        if hsm:
            raise InvalidInput("this verifier keeps its keys in a file, not in an HSM")
        return FileVerifierKeys.load(directory / "keys.pem")
    if not isinstance(spec, dict):
        raise StateError("the verifier identity names its keys in an unknown form")
    return _implementation(spec.get("type")).from_spec(spec, hsm)


def create_keys(kind: str, uri: str) -> VerifierKeys:
    """New keys of the registered ``kind`` in the device ``uri`` names (``verifier init --hsm``)."""
    return _implementation(kind).generate(uri)


def _implementation(kind: object) -> type[VerifierKeys]:
    from .registry import VERIFIER_KEYS_GROUP, entry_point_names, load_entry_point

    cls = None
    if isinstance(kind, str):
        cls = load_entry_point(VERIFIER_KEYS_GROUP, kind, VerifierKeys, f"verifier keys {kind!r}")
    if cls is None:
        installed = ", ".join(["file", *entry_point_names(VERIFIER_KEYS_GROUP)])
        raise StateError(f"unknown verifier key type {kind!r} (installed: {installed})")
    return cls
