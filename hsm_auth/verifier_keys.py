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
* :class:`Pkcs11VerifierKeys` keeps both keys in a PKCS#11 HSM (SoftHSM in the
  tests), generated there, sensitive and not extractable. For each check the
  ECDH secret is derived *inside* the HSM as a session (non-token), sensitive,
  non-extractable key, the OCRA data inputs are HMAC'd there, and the session
  key is destroyed: the OTP key never exists on the host, and nothing derived
  is cached between checks.

  FIDO2 methods send their OTP key encrypted to the agreement key (ECIES:
  ECDH + HKDF-SHA256 + AES-256-GCM, :func:`wrap_otp_key`). PKCS#11 modules
  commonly lack HKDF (SoftHSM does), so with an HSM the ECDH step runs in the
  HSM and the short-lived ECIES secret, the key-encryption key and the
  unwrapped OTP key are handled on the host for the duration of that one
  check (pragmatic choice; the agreement private key still never leaves the
  HSM, and the database alone reveals nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
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
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import ec as ecutil
from .errors import BackendError, DecodeError, HsmAuthError, InvalidInput, StateError
from .files import atomic_write, read_private
from .store.base import CredentialRecord

WRAP_INFO = b"hsm-auth/otp-key-wrap/v1"
_WRAP_MIN = 33 + 12 + 16 + 16
#: Memory that :class:`FileVerifierKeys` may spend on derived OTP keys: about
#: 290 bytes a credential, so some 115,000 credentials stay cached.
OTP_KEY_CACHE_BYTES = 32 * 2**20

#: HMAC-SHA256 under one credential's OTP key.
MacFunction = Callable[[bytes], bytes]


def _kek(shared: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, WRAP_INFO).derive(shared)


def _open_wrapped(kek: bytes, wrapped: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(wrapped[33:45], wrapped[45:], WRAP_INFO)
    except Exception:
        raise DecodeError("wrapped OTP key does not decrypt") from None


def _check_wrapped_shape(wrapped: bytes) -> ec.EllipticCurvePublicKey:
    if not isinstance(wrapped, bytes) or len(wrapped) < _WRAP_MIN:
        raise DecodeError("wrapped OTP key too short")
    return ecutil.decode_point(wrapped[:33])


def wrap_otp_key(otp_key: bytes, verifier_agreement: ec.EllipticCurvePublicKey) -> bytes:
    """Authenticator side of the FIDO2 key transport (ECIES with P-256).

    Format: ephemeral SEC1 point (33) || 12-byte nonce || AES-256-GCM ciphertext,
    key = HKDF-SHA256(ECDH(ephemeral, agreement key), info=WRAP_INFO).
    """
    ephemeral = ec.generate_private_key(ecutil.CURVE)
    kek = _kek(ephemeral.exchange(ec.ECDH(), verifier_agreement))
    nonce = os.urandom(12)
    return (
        ecutil.encode_point(ephemeral.public_key())
        + nonce
        + AESGCM(kek).encrypt(nonce, otp_key, WRAP_INFO)
    )


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
    #: ``"file"`` or ``"pkcs11"``.
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
        peer = _check_wrapped_shape(wrapped)
        return _open_wrapped(_kek(self.shared_secret(peer)), wrapped)

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


# --- keys in a PKCS#11 HSM -------------------------------------------------------


class Pkcs11VerifierKeys(VerifierKeys):
    """Both keys in a PKCS#11 token, used through the project's PKCS#11 backend
    (login from the URI's ``pin-source``, signing, key generation) plus one
    extra session of this process for the per-check session keys."""

    kind: ClassVar[str] = "pkcs11"
    LABEL_PREFIX: ClassVar[str] = "hsm-auth-verifier"

    def __init__(self, token_uri: str, store: Any, signing_uri: str, agreement_uri: str) -> None:
        self.token_uri = token_uri
        self.signing_uri = signing_uri
        self.agreement_uri = agreement_uri
        self._store = store
        self._lock = threading.RLock()
        from .keystore import NO_AUTH

        self._auth = NO_AUTH
        self._signing_public = store.public_key(signing_uri, NO_AUTH)
        self._agreement_public = store.public_key(agreement_uri, NO_AUTH)
        self._p11: Any = None
        self._session: Any = None
        self._agreement_key: Any = None

    # --- lifecycle ---------------------------------------------------------

    @staticmethod
    def _open_store(token_uri: str) -> Any:
        from .registry import load_backend

        return load_backend("pkcs11").open({"uri": token_uri})

    @classmethod
    def create(cls, token_uri: str) -> Pkcs11VerifierKeys:
        """Generate the signing and agreement key pairs in the token named by ``token_uri``."""
        from .keystore import NO_AUTH, KeyKind

        store = cls._open_store(token_uri)
        try:
            tag = os.urandom(4).hex()
            signing = store.generate_key(f"{cls.LABEL_PREFIX}/{tag}/sign", KeyKind.SIGNING, NO_AUTH)
            agreement = store.generate_key(
                f"{cls.LABEL_PREFIX}/{tag}/ecdh", KeyKind.AGREEMENT, NO_AUTH
            )
            return cls(token_uri, store, signing, agreement)
        except BaseException:
            store.close()
            raise

    @classmethod
    def open(cls, token_uri: str, signing_uri: str, agreement_uri: str) -> Pkcs11VerifierKeys:
        store = cls._open_store(token_uri)
        try:
            return cls(token_uri, store, signing_uri, agreement_uri)
        except BaseException:
            store.close()
            raise

    def to_json(self) -> dict[str, str]:
        return {
            "type": self.kind,
            "token": self.token_uri,
            "signing": self.signing_uri,
            "agreement": self.agreement_uri,
        }

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                with contextlib.suppress(Exception):  # a session that is gone is fine
                    self._session.close()
                self._session = None
                self._agreement_key = None
            self._store.close()

    # --- the extra session -----------------------------------------------------

    def _derive_session(self) -> tuple[Any, Any]:
        """(python-pkcs11 module, agreement private key object) in our own session.

        The backend store logged in; PKCS#11 login state belongs to the
        application and token, so this session is logged in too.
        """
        if self._session is not None:
            return self._p11, self._agreement_key
        import pkcs11

        from .uri import Pkcs11Uri

        uri = Pkcs11Uri.parse(self.agreement_uri)
        module = uri.module_path
        if module is None:
            raise StateError("the verifier's agreement key URI has no module-path")
        try:
            lib = pkcs11.lib(module)
            tokens = [
                t for t in lib.get_tokens(token_label=uri.token)
                if uri.serial is None or _text(t.serial) == uri.serial
            ]
            if len(tokens) != 1:
                raise StateError(f"{len(tokens)} tokens match the verifier's agreement key URI")
            session = tokens[0].open(rw=False)
            try:
                key = session.get_key(
                    object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=uri.id, label=uri.object
                )
            except BaseException:
                session.close()
                raise
        except pkcs11.PKCS11Error as e:
            raise _convert(e, "open the verifier's agreement key") from e
        self._p11, self._session, self._agreement_key = pkcs11, session, key
        return pkcs11, key

    def _derive(self, peer: ec.EllipticCurvePublicKey, *, extractable: bool) -> Any:
        p11, private = self._derive_session()
        attr = p11.Attribute
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return private.derive_key(
            p11.KeyType.GENERIC_SECRET,
            256,
            store=False,
            capabilities=p11.MechanismFlag.SIGN,
            mechanism=p11.Mechanism.ECDH1_DERIVE,
            mechanism_param=(p11.KDF.NULL, None, point),
            template={
                attr.TOKEN: False,
                attr.SENSITIVE: not extractable,
                attr.EXTRACTABLE: extractable,
                attr.SIGN: True,
                attr.VERIFY: False,
            },
        )

    # --- VerifierKeys ----------------------------------------------------------

    @property
    def signing_public(self) -> ec.EllipticCurvePublicKey:
        return self._signing_public  # type: ignore[no-any-return]

    @property
    def agreement_public(self) -> ec.EllipticCurvePublicKey:
        return self._agreement_public  # type: ignore[no-any-return]

    def sign_raw(self, data: bytes) -> bytes:
        with self._lock:
            return ecutil.der_to_raw(self._store.sign(self.signing_uri, data, self._auth))

    def _unwrap(self, wrapped: bytes) -> bytes:
        peer = _check_wrapped_shape(wrapped)
        with self._lock:
            try:
                secret = self._derive(peer, extractable=True)
                try:
                    shared = bytes(secret[self._p11.Attribute.VALUE])
                finally:
                    secret.destroy()
            except HsmAuthError:
                raise
            except Exception as e:
                raise _convert(e, "derive the key-transport secret") from e
        return _open_wrapped(_kek(shared), wrapped)

    def check_wrapped(self, wrapped: bytes) -> None:
        self._unwrap(wrapped)

    @contextmanager
    def otp_macs(self, credential: CredentialRecord) -> Iterator[MacFunction]:
        if credential.agreement_key is None:
            if credential.wrapped_otp_key is None:
                raise StateError("the credential has neither an agreement key nor a wrapped key")
            key = self._unwrap(credential.wrapped_otp_key)

            def host_mac(data: bytes) -> bytes:
                return hmac.digest(key, data, hashlib.sha256)

            yield host_mac
            return
        peer = ecutil.decode_point(credential.agreement_key)
        with self._lock:
            try:
                secret = self._derive(peer, extractable=False)
            except HsmAuthError:
                raise
            except Exception as e:
                raise _convert(e, "derive the OTP key in the HSM") from e
            mechanism = self._p11.Mechanism.SHA256_HMAC

            def hsm_mac(data: bytes) -> bytes:
                try:
                    return bytes(secret.sign(data, mechanism=mechanism))
                except Exception as e:
                    raise _convert(e, "HMAC in the HSM") from e

            try:
                yield hsm_mac
            finally:
                try:
                    secret.destroy()
                except Exception as e:
                    raise _convert(e, "destroy the per-check OTP key") from e


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip(" \x00")
    return value.rstrip(" \x00")


def _convert(error: BaseException, action: str) -> HsmAuthError:
    """A python-pkcs11 error as an hsm_auth error, native code kept (via the backend)."""
    try:
        from hsm_auth_backends.pkcs11 import convert_error
    except ImportError:  # pragma: no cover - the backend ships with the package
        return BackendError(f"PKCS#11: {action} failed: {type(error).__name__}")
    converted = convert_error(error, action)
    if isinstance(converted, HsmAuthError):
        return converted
    return BackendError(f"PKCS#11: {action} failed")  # pragma: no cover


def load_keys(directory: Path, spec: dict[str, Any] | None, hsm: str | None) -> VerifierKeys:
    """The keys a verifier directory names: ``spec`` from its identity file
    (``None``: the key file), with ``hsm`` (a token URI) overriding the stored one."""
    if spec is None or spec.get("type", "file") == "file":
        if hsm:
            raise InvalidInput("this verifier keeps its keys in a file, not in an HSM")
        return FileVerifierKeys.load(directory / "keys.pem")
    if spec.get("type") != Pkcs11VerifierKeys.kind:
        raise StateError(f"unknown verifier key type {spec.get('type')!r}")
    try:
        token, signing, agreement = str(spec["token"]), str(spec["signing"]), str(spec["agreement"])
    except KeyError:
        raise StateError("the verifier identity names HSM keys incompletely") from None
    return Pkcs11VerifierKeys.open(hsm or token, signing, agreement)
