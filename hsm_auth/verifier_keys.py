"""The verifier's own keys: the signing key (offers, verification data, sync)
and the ECDH agreement key, from which each method's OTP key is derived.

``VerifierKeys`` is the interface. The OTP check never asks for a raw OTP key:
it asks for HMAC-SHA256 under the credential's OTP key (:meth:`VerifierKeys.otp_macs`),
so an implementation can keep the key where it is made.

* :class:`FileVerifierKeys` keeps both private keys in one 0600 PEM file and
  computes ECDH and the HMAC in Python. **Whoever can read that file (or the
  verifier's memory) can derive the OTP key of every enrolled method** from
  the public data in the database: the file is then as sensitive as all the
  users' tokens together. Use it for a workstation or a test; use an HSM for a
  service. Since the agreement key is in memory anyway, it keeps the derived
  32-byte OTP keys in memory too (:class:`OtpKeyCache`, at most
  :data:`OTP_KEY_CACHE_BYTES`): that adds no exposure and saves the ECDH (or
  the unwrap) on every later check of the same credential.
* ``Pkcs11VerifierKeys`` (:mod:`hsm_auth_backends.pkcs11_verifier`, in the
  pkcs11 backend) keeps both keys in a PKCS#11 HSM, sensitive and not
  extractable, and derives each OTP key inside the HSM for one check.

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
import sys
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import ec as ecutil
from . import key_transport
from .errors import InvalidInput, StateError
from .files import atomic_write, read_private
from .store.base import CredentialRecord

#: Memory that :class:`FileVerifierKeys` may spend on derived OTP keys: about
#: 290 bytes a credential, so some 115,000 credentials stay cached.
OTP_KEY_CACHE_BYTES = 32 * 2**20

#: HMAC-SHA256 under one credential's OTP key.
MacFunction = Callable[[bytes], bytes]


class OtpKeyCache:
    """Derived OTP keys by the public material they come from, least recently
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


class VerifierKeys(ABC):
    #: ``"file"``, or the entry-point name of an implementation (``"pkcs11"``).
    kind: ClassVar[str] = ""

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
    def otp_macs(self, credential: CredentialRecord) -> AbstractContextManager[MacFunction]:
        """A function computing HMAC-SHA256 under ``credential``'s OTP key, valid
        inside the ``with`` block (the key is derived once for the block)."""

    def otp_mac(self, credential: CredentialRecord, data: bytes) -> bytes:
        """HMAC-SHA256(OTP key of ``credential``, ``data``)."""
        with self.otp_macs(credential) as mac:
            return mac(data)

    @abstractmethod
    def check_wrapped(self, wrapped: bytes) -> None:
        """Raise DecodeError unless ``wrapped`` decrypts under the agreement key."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the HSM session, if any."""

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


class FileVerifierKeys(VerifierKeys):
    """Both keys in one PEM file, mode 0600 (see the module docstring for what that means)."""

    kind: ClassVar[str] = "file"

    def __init__(
        self,
        signing: ec.EllipticCurvePrivateKey,
        agreement: ec.EllipticCurvePrivateKey,
        *,
        cache_bytes: int = OTP_KEY_CACHE_BYTES,
    ):
        self._signing = signing
        self._agreement = agreement
        # Derived OTP keys (32 bytes each), by b"a" + agreement point or b"w" +
        # wrapped key: no exposure beyond the agreement key held above.
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
        """ECDH x-coordinate with the agreement key: the OTP key of that peer."""
        return self._agreement.exchange(ec.ECDH(), peer)

    def unwrap_otp_key(self, wrapped: bytes) -> bytes:
        """Decrypt an OTP key that an authenticator encrypted to the agreement key."""
        peer = key_transport.ephemeral_point(wrapped)
        return key_transport.open_with_shared(self.shared_secret(peer), wrapped)

    def check_wrapped(self, wrapped: bytes) -> None:
        self.unwrap_otp_key(wrapped)

    def _otp_key(self, credential: CredentialRecord) -> bytes:
        if credential.agreement_key is not None:
            tag = b"a" + credential.agreement_key
            key = self.otp_keys.get(tag)
            if key is None:
                key = self.shared_secret(ecutil.decode_point(credential.agreement_key))
                self.otp_keys.put(tag, key)
            return key
        if credential.wrapped_otp_key is not None:
            tag = b"w" + credential.wrapped_otp_key
            key = self.otp_keys.get(tag)
            if key is None:
                key = self.unwrap_otp_key(credential.wrapped_otp_key)
                self.otp_keys.put(tag, key)
            return key
        raise StateError("the credential has neither an agreement key nor a wrapped OTP key")

    def close(self) -> None:
        self.otp_keys.clear()

    @contextmanager
    def otp_macs(self, credential: CredentialRecord) -> Iterator[MacFunction]:
        key = self._otp_key(credential)

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
