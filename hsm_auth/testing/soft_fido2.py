"""A software CTAP 2.1 authenticator for tests and CI. It is NOT hardware.

.. warning::

   Every key of this authenticator (the credential master key, the resident
   credentials, the PIN hash, the PIN/UV auth token) lives in an ordinary
   file on disk. It protects nothing against anyone who can read that file.
   It exists so that CI machines without USB, ``/dev/uhid`` or USB/IP can run
   the real python-fido2 stack (``Ctap2``, ``ClientPin``, ``Fido2Client``,
   ``Fido2Server``) end to end. Its AAGUID is :data:`SOFT_AAGUID`, which the
   verifier's default policy refuses (a policy allows it only by naming it).
   The fido2 backend opens it (``soft:PATH``, ``$HSM_AUTH_SOFT_FIDO2``) only
   for a method configured with ``allow_software_authenticator = true``.

:class:`SoftAuthenticator` is a :class:`fido2.ctap.CtapDevice` that answers
``call(CTAPHID.CBOR, ...)`` with real CTAP2 CBOR: authenticatorGetInfo,
MakeCredential (ES256; packed attestation with an ``x5c`` chain, packed self
attestation, or "none"), GetAssertion,
GetNextAssertion, ClientPIN (PIN/UV auth protocols 1 and 2), Reset and
Selection; extensions hmac-secret and credProtect.

Design notes:

* Credential ids are the credential's private key wrapped with AES-256-GCM
  under a key derived from the authenticator's master key, with the rpIdHash
  as associated data, so a credential id works only for its RP. Resident
  credentials use the same ids and add a stored record (user, RP).
  ``credRandomWithUV`` / ``credRandomWithoutUV`` are derived per credential
  from the master key and the credential id. Reset makes a new master key,
  which kills every credential id issued before.
* One global signature counter, incremented by every MakeCredential and
  GetAssertion (also the ``up: false`` pre-flight that fido2 2.2's client
  sends), written durably before the response leaves.
* State lives in one JSON file (mode 0600, written atomically: temp file,
  fsync, rename, fsync of the directory), re-read at the start of every call
  under an exclusive ``fcntl`` lock on ``<file>.lock``, so several processes
  share one authenticator and interleave correctly. The "power cycle" state
  (key agreement key, pinUvAuthToken, consecutive wrong PINs, pending
  GetNextAssertion) is in the file too: one device, whoever talks to it.
  :meth:`SoftAuthenticator.replug` is the power cycle.
* User presence and user verification are scripted through settings
  (:class:`SoftSettings`): ``up_outcome`` ("approve", "deny", "cancel") and
  ``uv_outcome`` ("succeed", "fail", "cancel"); a set ``event`` cancels any
  wait for the user with KEEPALIVE_CANCEL.
* Attestation: each authenticator state holds an attestation key and its
  certificate (the ``x5c`` leaf, made with the FIDO requirements: version 3, C,
  O, OU "Authenticator Attestation", CN, the AAGUID extension
  1.3.6.1.4.1.45724.1.1.4, CA=false) issued by a test root made at
  :meth:`SoftAuthenticator.create` (its key is thrown away), or by a test CA the
  caller gives (:func:`make_attestation_ca`, to share one root between several
  authenticators). :attr:`SoftAuthenticator.attestation_root` exports the root
  for a verifier's policy. Reset keeps the attestation key, as devices do.
* Simplifications: the pinUvAuthToken has no usage timer (it lives until it
  is used with user presence, replaced, or the device is replugged); Reset is
  allowed at any time after user presence (no 10 s window); UV enrollment is a
  setting and survives Reset; the signature counter survives Reset.

Needs python-fido2 (the ``fido2`` extra): importing this module without it
raises ImportError.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from threading import Event
from typing import Any, Final, Literal, TypeVar, get_args

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from fido2 import cbor
from fido2.cose import ES256
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.hid import CAPABILITY, CTAPHID
from fido2.webauthn import AttestedCredentialData, AuthenticatorData

from hsm_auth.attestation import SOFT_AUTHENTICATOR_AAGUID
from hsm_auth.errors import InvalidInput, StateError
from hsm_auth.files import atomic_write, locked

__all__ = [
    "ENV_STATE_FILE",
    "MAX_PIN_RETRIES",
    "MAX_UV_RETRIES",
    "SOFT_AAGUID",
    "ResidentCredential",
    "SoftAuthenticator",
    "SoftSettings",
    "SoftStatus",
    "UpOutcome",
    "UvModality",
    "UvOutcome",
    "make_attestation_ca",
]

ERR = CtapError.ERR

#: Environment variable naming a state file; :meth:`SoftAuthenticator.list_devices`
#: yields the authenticator it names, so a subprocess (the CLI) can find it.
ENV_STATE_FILE: Final = "HSM_AUTH_SOFT_FIDO2"

#: Stable AAGUID of this software authenticator (a name-based UUID), so that a
#: verifier can recognise, and in production refuse, credentials made by it.
SOFT_AAGUID: Final = SOFT_AUTHENTICATOR_AAGUID

MAX_PIN_RETRIES: Final = 8
MAX_UV_RETRIES: Final = 8
#: Consecutive wrong PINs after which the device needs a power cycle (replug).
PIN_FAILURES_BEFORE_REPLUG: Final = 3
MIN_PIN_LENGTH: Final = 4
MAX_RESIDENT_CREDENTIALS: Final = 32
MAX_CREDS_IN_LIST: Final = 8
MAX_CRED_ID_LENGTH: Final = 128
MAX_MSG_SIZE: Final = 2048
#: GetNextAssertion must come within this many seconds of GetAssertion.
NEXT_ASSERTION_TIMEOUT: Final = 30.0

_STATE_VERSION: Final = 2  # 2: an attestation key and certificates
_CRED_ID_VERSION: Final = 1
_ALG_ES256: Final = -7
_PUBLIC_KEY: Final = "public-key"
_HMAC_SECRET: Final = "hmac-secret"  # noqa: S105 (an extension name)
_CRED_PROTECT: Final = "credProtect"

UvOutcome = Literal["succeed", "fail", "cancel"]
UpOutcome = Literal["approve", "deny", "cancel"]
#: "packed": signed by the attestation key, its certificate in x5c; "self": packed self
#: attestation (signed by the credential key, no x5c); "none".
Attestation = Literal["packed", "self", "none"]


class UvModality(IntEnum):
    """User verification methods from the FIDO registry (getInfo ``uvModality``)."""

    FINGERPRINT = 0x00000002  # USER_VERIFY_FINGERPRINT_INTERNAL
    FACE = 0x00000010  # USER_VERIFY_FACEPRINT_INTERNAL


class _Cmd(IntEnum):
    MAKE_CREDENTIAL = 0x01
    GET_ASSERTION = 0x02
    GET_INFO = 0x04
    CLIENT_PIN = 0x06
    RESET = 0x07
    GET_NEXT_ASSERTION = 0x08
    SELECTION = 0x0B


class _PinCmd(IntEnum):
    GET_PIN_RETRIES = 0x01
    GET_KEY_AGREEMENT = 0x02
    SET_PIN = 0x03
    CHANGE_PIN = 0x04
    GET_PIN_TOKEN = 0x05
    GET_TOKEN_USING_UV = 0x06
    GET_UV_RETRIES = 0x07
    GET_TOKEN_USING_PIN = 0x09


class _Perm(IntEnum):
    MAKE_CREDENTIAL = 0x01
    GET_ASSERTION = 0x02


_SUPPORTED_PERMISSIONS: Final = _Perm.MAKE_CREDENTIAL | _Perm.GET_ASSERTION


# --- public records ---------------------------------------------------------


@dataclass(frozen=True)
class SoftSettings:
    """How the soft authenticator behaves; change with :meth:`SoftAuthenticator.configure`."""

    uv_modality: int = UvModality.FINGERPRINT
    uv_enrolled: bool = True
    uv_outcome: UvOutcome = "succeed"
    up_outcome: UpOutcome = "approve"
    attestation: Attestation = "packed"
    make_cred_uv_not_rqd: bool = False

    def __post_init__(self) -> None:
        if self.uv_outcome not in get_args(UvOutcome):
            raise InvalidInput(f"uv_outcome must be one of {get_args(UvOutcome)}")
        if self.up_outcome not in get_args(UpOutcome):
            raise InvalidInput(f"up_outcome must be one of {get_args(UpOutcome)}")
        if self.attestation not in get_args(Attestation):
            raise InvalidInput(f"attestation must be one of {get_args(Attestation)}")
        if not isinstance(self.uv_modality, int) or self.uv_modality <= 0:
            raise InvalidInput("uv_modality must be a positive FIDO registry value")


@dataclass(frozen=True)
class ResidentCredential:
    """A discoverable credential stored in the authenticator (no key material)."""

    credential_id: bytes
    rp_id: str
    user_id: bytes
    user_name: str | None
    display_name: str | None
    cred_protect: int


@dataclass(frozen=True)
class SoftStatus:
    """A snapshot of the authenticator's counters, for tests and diagnostics."""

    sign_count: int
    pin_set: bool
    pin_retries: int
    uv_retries: int
    pin_auth_blocked: bool
    resident_credentials: int


# --- PIN/UV auth protocols (CTAP 2.1, 6.5.6 and 6.5.7), authenticator side ---


class _PinUvProtocol:
    """PIN/UV auth protocol 1 or 2; ``key`` is a shared secret or a pinUvAuthToken."""

    def __init__(self, version: int) -> None:
        self.version = version

    def kdf(self, z: bytes) -> bytes:
        if self.version == 1:
            return hashlib.sha256(z).digest()
        return self._hkdf(z, b"CTAP2 HMAC key") + self._hkdf(z, b"CTAP2 AES key")

    @staticmethod
    def _hkdf(z: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=info).derive(z)

    def _aes_key(self, key: bytes) -> bytes:
        return key if self.version == 1 else key[32:]

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        iv = bytes(16) if self.version == 1 else os.urandom(16)
        enc = Cipher(algorithms.AES(self._aes_key(key)), modes.CBC(iv)).encryptor()
        body = enc.update(plaintext) + enc.finalize()
        return body if self.version == 1 else iv + body

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        if self.version == 1:
            iv, body = bytes(16), ciphertext
        else:
            iv, body = ciphertext[:16], ciphertext[16:]
        if len(iv) != 16 or not body or len(body) % 16:
            raise CtapError(ERR.INVALID_PARAMETER)
        dec = Cipher(algorithms.AES(self._aes_key(key)), modes.CBC(iv)).decryptor()
        return dec.update(body) + dec.finalize()

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        if self.version == 1:
            return hmac.digest(key, message, "sha256")[:16]
        return hmac.digest(key[:32], message, "sha256")

    def verify(self, key: bytes, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.authenticate(key, message), signature)


def _protocol(version: Any) -> _PinUvProtocol:
    if type(version) is not int:
        raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
    if version not in (1, 2):
        raise CtapError(ERR.INVALID_PARAMETER)
    return _PinUvProtocol(version)


# --- persistent state ---------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _opt_b64(data: bytes | None) -> str | None:
    return None if data is None else _b64(data)


def _opt_unb64(text: Any) -> bytes | None:
    return None if text is None else _unb64(text)


@dataclass
class _Volatile:
    """What a real authenticator loses at power-off."""

    ka_key: bytes  # P-256 private scalar of the key agreement key
    pin_failures: int = 0  # consecutive wrong PINs since power-up
    token: bytes | None = None
    token_protocol: int = 0
    token_permissions: int = 0
    token_rp_id: str | None = None
    token_user_verified: bool = False
    token_user_present: bool = False
    pending: dict[str, Any] | None = None  # GetNextAssertion state (JSON-ready)

    @classmethod
    def fresh(cls) -> _Volatile:
        return cls(ka_key=_new_p256_scalar())

    def clear_token(self) -> None:
        self.token = None
        self.token_protocol = 0
        self.token_permissions = 0
        self.token_rp_id = None
        self.token_user_verified = False
        self.token_user_present = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ka_key": _b64(self.ka_key),
            "pin_failures": self.pin_failures,
            "token": _opt_b64(self.token),
            "token_protocol": self.token_protocol,
            "token_permissions": self.token_permissions,
            "token_rp_id": self.token_rp_id,
            "token_user_verified": self.token_user_verified,
            "token_user_present": self.token_user_present,
            "pending": self.pending,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Volatile:
        return cls(
            ka_key=_unb64(d["ka_key"]),
            pin_failures=int(d["pin_failures"]),
            token=_opt_unb64(d["token"]),
            token_protocol=int(d["token_protocol"]),
            token_permissions=int(d["token_permissions"]),
            token_rp_id=d["token_rp_id"],
            token_user_verified=bool(d["token_user_verified"]),
            token_user_present=bool(d["token_user_present"]),
            pending=d["pending"],
        )


@dataclass
class _Resident:
    cred_id: bytes
    rp_id: str
    user_id: bytes
    user_name: str | None
    display_name: str | None
    cred_protect: int
    created: int  # signature counter at creation: orders discovery, newest first

    def to_json(self) -> dict[str, Any]:
        return {
            "cred_id": _b64(self.cred_id),
            "rp_id": self.rp_id,
            "user_id": _b64(self.user_id),
            "user_name": self.user_name,
            "display_name": self.display_name,
            "cred_protect": self.cred_protect,
            "created": self.created,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Resident:
        return cls(
            cred_id=_unb64(d["cred_id"]),
            rp_id=str(d["rp_id"]),
            user_id=_unb64(d["user_id"]),
            user_name=d["user_name"],
            display_name=d["display_name"],
            cred_protect=int(d["cred_protect"]),
            created=int(d["created"]),
        )

    def public(self) -> ResidentCredential:
        return ResidentCredential(
            self.cred_id,
            self.rp_id,
            self.user_id,
            self.user_name,
            self.display_name,
            self.cred_protect,
        )


@dataclass(frozen=True)
class _AttestationKey:
    """The attestation key (P-256 scalar), its certificate and the root above it (DER)."""

    scalar: bytes
    certificate: bytes
    root: bytes

    def to_json(self) -> dict[str, Any]:
        return {"key": _b64(self.scalar), "x5c": [_b64(self.certificate)], "root": _b64(self.root)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _AttestationKey:
        (leaf,) = d["x5c"]
        return cls(_unb64(d["key"]), _unb64(leaf), _unb64(d["root"]))


def make_attestation_ca(
    name: str = "hsm-auth soft-fido2 test attestation root",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed P-256 test CA (certificate, key) that can issue the attestation
    certificates of several soft authenticators (``create(attestation_ca=...)``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-auth test authenticators"),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


#: The AAGUID extension of a FIDO attestation certificate (its value: an OCTET STRING).
_OID_AAGUID: Final = x509.ObjectIdentifier("1.3.6.1.4.1.45724.1.1.4")
_CA_USAGE: Final = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)


def _attestation_key(
    aaguid: bytes, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> _AttestationKey:
    """A new attestation key and its certificate under ``ca`` (default: a new root)."""
    root, root_key = ca if ca is not None else make_attestation_ca()
    scalar = _new_p256_scalar()
    public = _p256_key(scalar).public_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-auth test authenticators"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Authenticator Attestation"),
        x509.NameAttribute(NameOID.COMMON_NAME, "hsm-auth soft-fido2 (software, not hardware)"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.UnrecognizedExtension(_OID_AAGUID, b"\x04\x10" + aaguid), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    return _AttestationKey(
        scalar, leaf.public_bytes(Encoding.DER), root.public_bytes(Encoding.DER)
    )


@dataclass
class _State:
    aaguid: bytes
    master_key: bytes
    settings: SoftSettings
    attestation_key: _AttestationKey
    sign_count: int = 0
    pin_hash: bytes | None = None  # LEFT(SHA-256(PIN), 16)
    pin_retries: int = MAX_PIN_RETRIES
    uv_retries: int = MAX_UV_RETRIES
    residents: list[_Resident] = field(default_factory=list)
    volatile: _Volatile = field(default_factory=_Volatile.fresh)

    def to_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "version": _STATE_VERSION,
            "kind": "hsm-auth soft-fido2 test authenticator (keys in this file, not hardware)",
            "aaguid": _b64(self.aaguid),
            "master_key": _b64(self.master_key),
            "attestation_key": self.attestation_key.to_json(),
            "settings": {
                "uv_modality": int(s.uv_modality),
                "uv_enrolled": s.uv_enrolled,
                "uv_outcome": s.uv_outcome,
                "up_outcome": s.up_outcome,
                "attestation": s.attestation,
                "make_cred_uv_not_rqd": s.make_cred_uv_not_rqd,
            },
            "sign_count": self.sign_count,
            "pin_hash": _opt_b64(self.pin_hash),
            "pin_retries": self.pin_retries,
            "uv_retries": self.uv_retries,
            "residents": [r.to_json() for r in self.residents],
            "volatile": self.volatile.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _State:
        if d.get("version") != _STATE_VERSION:
            raise ValueError("unsupported state version (from another hsm-auth: create it again)")
        s = d["settings"]
        return cls(
            aaguid=_unb64(d["aaguid"]),
            master_key=_unb64(d["master_key"]),
            attestation_key=_AttestationKey.from_json(d["attestation_key"]),
            settings=SoftSettings(
                uv_modality=int(s["uv_modality"]),
                uv_enrolled=bool(s["uv_enrolled"]),
                uv_outcome=s["uv_outcome"],
                up_outcome=s["up_outcome"],
                attestation=s["attestation"],
                make_cred_uv_not_rqd=bool(s["make_cred_uv_not_rqd"]),
            ),
            sign_count=int(d["sign_count"]),
            pin_hash=_opt_unb64(d["pin_hash"]),
            pin_retries=int(d["pin_retries"]),
            uv_retries=int(d["uv_retries"]),
            residents=[_Resident.from_json(r) for r in d["residents"]],
            volatile=_Volatile.from_json(d["volatile"]),
        )


def _new_p256_scalar() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_numbers().private_value.to_bytes(32, "big")


def _p256_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def _pin_hash(pin: str) -> bytes:
    return hashlib.sha256(pin.encode()).digest()[:16]


def _check_pin_policy(pin: str) -> None:
    if len(pin) < MIN_PIN_LENGTH or len(pin.encode()) > 63:
        raise InvalidInput(f"a PIN has {MIN_PIN_LENGTH} to 63 bytes")


# --- credential ids -------------------------------------------------------------

_FLAG_HMAC_SECRET: Final = 0x04
_FLAG_RESIDENT: Final = 0x08
_PROTECT_MASK: Final = 0x03


@dataclass(frozen=True)
class _Key:
    """An unwrapped credential: its id, private key and flags."""

    cred_id: bytes
    private: ec.EllipticCurvePrivateKey
    cred_protect: int
    hmac_secret: bool
    resident: bool


def _subkey(master: bytes, label: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"hsm-auth soft-fido2 " + label
    ).derive(master)


def _wrap(master: bytes, rp_id_hash: bytes, scalar: bytes, flags: int) -> bytes:
    nonce = os.urandom(12)
    aad = bytes([_CRED_ID_VERSION]) + rp_id_hash
    sealed = AESGCM(_subkey(master, b"credential wrap")).encrypt(
        nonce, bytes([flags]) + scalar, aad
    )
    return bytes([_CRED_ID_VERSION]) + nonce + sealed


def _unwrap(master: bytes, rp_id_hash: bytes, cred_id: bytes) -> _Key | None:
    if len(cred_id) != 1 + 12 + 33 + 16 or cred_id[0] != _CRED_ID_VERSION:
        return None
    aad = bytes([_CRED_ID_VERSION]) + rp_id_hash
    try:
        plain = AESGCM(_subkey(master, b"credential wrap")).decrypt(
            cred_id[1:13], cred_id[13:], aad
        )
    except InvalidTag:
        return None
    flags = plain[0]
    return _Key(
        cred_id=cred_id,
        private=_p256_key(plain[1:]),
        cred_protect=(flags & _PROTECT_MASK) or 1,
        hmac_secret=bool(flags & _FLAG_HMAC_SECRET),
        resident=bool(flags & _FLAG_RESIDENT),
    )


def _cred_random(master: bytes, cred_id: bytes, uv: bool) -> bytes:
    label = b"CredRandomWithUV" if uv else b"CredRandomWithoutUV"
    return hmac.digest(_subkey(master, b"credRandom"), label + cred_id, "sha256")


# --- CBOR parameter access --------------------------------------------------------

_T = TypeVar("_T")


def _is(value: Any, typ: type[Any]) -> bool:
    if typ is int:
        return type(value) is int
    return isinstance(value, typ)


def _req(params: Mapping[Any, Any], key: Any, typ: type[_T]) -> _T:
    if key not in params:
        raise CtapError(ERR.MISSING_PARAMETER)
    value = params[key]
    if not _is(value, typ):
        raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
    return value  # type: ignore[no-any-return]


def _opt(params: Mapping[Any, Any], key: Any, typ: type[_T]) -> _T | None:
    if key not in params:
        return None
    return _req(params, key, typ)


def _descriptors(value: list[Any] | None) -> list[bytes]:
    """Credential ids of the ``public-key`` entries of an allowList / excludeList."""
    ids: list[bytes] = []
    for entry in value or []:
        if not isinstance(entry, dict):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
        kind = _req(entry, "type", str)
        cred_id = _req(entry, "id", bytes)
        if kind == _PUBLIC_KEY:
            ids.append(cred_id)
    return ids


def _bool_options(value: dict[Any, Any] | None) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for k, v in (value or {}).items():
        if not isinstance(k, str) or not isinstance(v, bool):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
        out[k] = v
    return out


# --- the CTAP2 engine (one instance per call) -------------------------------------


class _Engine:
    def __init__(
        self,
        state: _State,
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> None:
        self.s = state
        self.v = state.volatile
        self.event = event
        self.on_keepalive = on_keepalive

    # user interaction ---------------------------------------------------------

    def _cancelled(self) -> bool:
        return self.event is not None and self.event.is_set()

    def _keepalive(self, status: STATUS) -> None:
        if self.on_keepalive is not None:
            self.on_keepalive(status)

    def user_presence(self) -> None:
        self._keepalive(STATUS.UPNEEDED)
        outcome = self.s.settings.up_outcome
        if self._cancelled() or outcome == "cancel":
            raise CtapError(ERR.KEEPALIVE_CANCEL)
        if outcome == "deny":
            raise CtapError(ERR.OPERATION_DENIED)

    def builtin_uv(self) -> None:
        if not self.s.settings.uv_enrolled:
            raise CtapError(ERR.NOT_ALLOWED)
        if self.s.uv_retries <= 0:
            raise CtapError(ERR.UV_BLOCKED)
        self._keepalive(STATUS.UPNEEDED)
        outcome = self.s.settings.uv_outcome
        if self._cancelled() or outcome == "cancel":
            raise CtapError(ERR.KEEPALIVE_CANCEL)
        if outcome == "fail":
            self.s.uv_retries -= 1
            raise CtapError(ERR.UV_BLOCKED if self.s.uv_retries == 0 else ERR.UV_INVALID)
        self.s.uv_retries = MAX_UV_RETRIES

    @property
    def protected(self) -> bool:
        return self.s.pin_hash is not None or self.s.settings.uv_enrolled

    # key agreement ------------------------------------------------------------

    def key_agreement_cose(self) -> dict[int, Any]:
        pub = _p256_key(self.v.ka_key).public_key().public_numbers()
        return {1: 2, 3: -25, -1: 1, -2: pub.x.to_bytes(32, "big"), -3: pub.y.to_bytes(32, "big")}

    def shared_secret(self, proto: _PinUvProtocol, peer: Any) -> bytes:
        if not isinstance(peer, dict):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
        x, y = peer.get(-2), peer.get(-3)
        if peer.get(1) != 2 or peer.get(-1) != 1 or not isinstance(x, bytes):
            raise CtapError(ERR.INVALID_PARAMETER)
        if not isinstance(y, bytes) or len(x) != 32 or len(y) != 32:
            raise CtapError(ERR.INVALID_PARAMETER)
        try:
            point = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError:
            raise CtapError(ERR.INVALID_PARAMETER) from None
        z = _p256_key(self.v.ka_key).exchange(ec.ECDH(), point)
        return proto.kdf(z)

    def regenerate_key_agreement(self) -> None:
        self.v.ka_key = _new_p256_scalar()

    # pinUvAuthToken -------------------------------------------------------------

    def new_token(
        self, proto: _PinUvProtocol, permissions: int, rp_id: str | None, user_present: bool
    ) -> bytes:
        self.v.clear_token()
        self.v.token = secrets.token_bytes(32)
        self.v.token_protocol = proto.version
        self.v.token_permissions = permissions
        self.v.token_rp_id = rp_id
        self.v.token_user_verified = True
        self.v.token_user_present = user_present
        return self.v.token

    def check_token(
        self,
        params: Mapping[int, Any],
        param_key: int,
        proto_key: int,
        message: bytes,
        permission: int,
        rp_id: str,
    ) -> None:
        """Verify pinUvAuthParam over ``message`` with the current token."""
        param = _req(params, param_key, bytes)
        proto = _protocol(_req(params, proto_key, int))
        v = self.v
        if v.token is None or v.token_protocol != proto.version:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if not proto.verify(v.token, message, param):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if not v.token_permissions & permission or not v.token_user_verified:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if v.token_rp_id is not None and v.token_rp_id != rp_id:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        v.token_rp_id = rp_id

    def verify_user(
        self,
        params: Mapping[int, Any],
        param_key: int,
        proto_key: int,
        message: bytes,
        permission: int,
        rp_id: str,
        options: Mapping[str, bool],
    ) -> bool:
        """User verification for makeCredential / getAssertion: by the pinUvAuthToken
        when a pinUvAuthParam is present, else by built-in UV when ``uv`` is asked for.
        Returns whether the user was verified."""
        if params.get(param_key) is not None:
            self.check_token(params, param_key, proto_key, message, permission, rp_id)
            return True
        if options.get("uv", False):
            if not self.s.settings.uv_enrolled:
                raise CtapError(ERR.INVALID_OPTION)
            self.builtin_uv()
            return True
        return False

    def up_with_token(self, token_used: bool) -> None:
        """Collect user presence (a token may carry it), then spend the token's rights."""
        if not (token_used and self.v.token_user_present):
            self.user_presence()
        if token_used:
            self.v.token_user_present = False
            self.v.token_user_verified = False
            self.v.token_permissions = 0

    def zero_length_pin_auth(self) -> None:
        """Legacy "touch to select" probe: an empty pinUvAuthParam."""
        self.user_presence()
        raise CtapError(ERR.PIN_INVALID if self.s.pin_hash is not None else ERR.PIN_NOT_SET)

    # getInfo ---------------------------------------------------------------------

    def get_info(self) -> dict[int, Any]:
        st = self.s.settings
        options = {
            "rk": True,
            "up": True,
            "uv": st.uv_enrolled,
            "plat": False,
            "clientPin": self.s.pin_hash is not None,
            "pinUvAuthToken": True,
            "makeCredUvNotRqd": st.make_cred_uv_not_rqd,
        }
        return {
            0x01: ["FIDO_2_0", "FIDO_2_1"],
            0x02: [_CRED_PROTECT, _HMAC_SECRET],
            0x03: self.s.aaguid,
            0x04: options,
            0x05: MAX_MSG_SIZE,
            0x06: [2, 1],
            0x07: MAX_CREDS_IN_LIST,
            0x08: MAX_CRED_ID_LENGTH,
            0x09: ["usb"],
            0x0A: [{"alg": _ALG_ES256, "type": _PUBLIC_KEY}],
            0x0D: MIN_PIN_LENGTH,
            0x0E: 1,
            0x11: 1,
            0x12: int(st.uv_modality),
            0x14: MAX_RESIDENT_CREDENTIALS - len(self.s.residents),
        }

    # clientPIN ---------------------------------------------------------------------

    def client_pin(self, p: Mapping[int, Any]) -> dict[int, Any] | None:
        sub = _req(p, 0x02, int)
        if sub == _PinCmd.GET_PIN_RETRIES:
            return {
                0x03: self.s.pin_retries,
                0x04: self.v.pin_failures >= PIN_FAILURES_BEFORE_REPLUG,
            }
        if sub == _PinCmd.GET_UV_RETRIES:
            return {0x05: self.s.uv_retries}
        proto = _protocol(_req(p, 0x01, int))
        if sub == _PinCmd.GET_KEY_AGREEMENT:
            return {0x01: self.key_agreement_cose()}
        if sub == _PinCmd.SET_PIN:
            self.set_pin(proto, p)
            return None
        if sub == _PinCmd.CHANGE_PIN:
            self.change_pin(proto, p)
            return None
        if sub in (_PinCmd.GET_PIN_TOKEN, _PinCmd.GET_TOKEN_USING_PIN):
            return self.token_using_pin(proto, p, legacy=sub == _PinCmd.GET_PIN_TOKEN)
        if sub == _PinCmd.GET_TOKEN_USING_UV:
            return self.token_using_uv(proto, p)
        raise CtapError(ERR.INVALID_SUBCOMMAND)

    def _new_pin(self, proto: _PinUvProtocol, shared: bytes, new_pin_enc: bytes) -> bytes:
        padded = proto.decrypt(shared, new_pin_enc)
        if len(padded) < 64:
            raise CtapError(ERR.PIN_POLICY_VIOLATION)
        pin = padded.rstrip(b"\0")
        try:
            text = pin.decode()
        except UnicodeDecodeError:
            raise CtapError(ERR.PIN_POLICY_VIOLATION) from None
        if len(text) < MIN_PIN_LENGTH or len(pin) > 63:
            raise CtapError(ERR.PIN_POLICY_VIOLATION)
        return hashlib.sha256(pin).digest()[:16]

    def set_pin(self, proto: _PinUvProtocol, p: Mapping[int, Any]) -> None:
        peer = _req(p, 0x03, dict)
        pin_auth = _req(p, 0x04, bytes)
        new_pin_enc = _req(p, 0x05, bytes)
        if self.s.pin_hash is not None:
            raise CtapError(ERR.NOT_ALLOWED)
        shared = self.shared_secret(proto, peer)
        if not proto.verify(shared, new_pin_enc, pin_auth):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        self.s.pin_hash = self._new_pin(proto, shared, new_pin_enc)
        self.s.pin_retries = MAX_PIN_RETRIES

    def _check_pin(self, proto: _PinUvProtocol, shared: bytes, pin_hash_enc: bytes) -> None:
        """The PIN check with its counters (CTAP 2.1, 6.5.5.5 and following)."""
        assert self.s.pin_hash is not None
        self.s.pin_retries -= 1
        given = proto.decrypt(shared, pin_hash_enc)
        if not hmac.compare_digest(given[:16], self.s.pin_hash) or len(given) != 16:
            self.regenerate_key_agreement()
            self.v.pin_failures += 1
            if self.s.pin_retries <= 0:
                raise CtapError(ERR.PIN_BLOCKED)
            if self.v.pin_failures >= PIN_FAILURES_BEFORE_REPLUG:
                raise CtapError(ERR.PIN_AUTH_BLOCKED)
            raise CtapError(ERR.PIN_INVALID)
        self.s.pin_retries = MAX_PIN_RETRIES
        self.s.uv_retries = MAX_UV_RETRIES
        self.v.pin_failures = 0

    def _pin_gate(self) -> None:
        if self.s.pin_hash is None:
            raise CtapError(ERR.PIN_NOT_SET)
        if self.s.pin_retries <= 0:
            raise CtapError(ERR.PIN_BLOCKED)
        if self.v.pin_failures >= PIN_FAILURES_BEFORE_REPLUG:
            raise CtapError(ERR.PIN_AUTH_BLOCKED)

    def change_pin(self, proto: _PinUvProtocol, p: Mapping[int, Any]) -> None:
        peer = _req(p, 0x03, dict)
        pin_auth = _req(p, 0x04, bytes)
        new_pin_enc = _req(p, 0x05, bytes)
        pin_hash_enc = _req(p, 0x06, bytes)
        self._pin_gate()
        shared = self.shared_secret(proto, peer)
        if not proto.verify(shared, new_pin_enc + pin_hash_enc, pin_auth):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        self._check_pin(proto, shared, pin_hash_enc)
        self.s.pin_hash = self._new_pin(proto, shared, new_pin_enc)
        self.v.clear_token()

    def _permissions(self, p: Mapping[int, Any]) -> tuple[int, str | None]:
        permissions = _req(p, 0x09, int)
        rp_id = _opt(p, 0x0A, str)
        if permissions == 0:
            raise CtapError(ERR.INVALID_PARAMETER)
        if permissions & ~_SUPPORTED_PERMISSIONS:
            raise CtapError(ERR.UNAUTHORIZED_PERMISSION)
        return permissions, rp_id

    def token_using_pin(
        self, proto: _PinUvProtocol, p: Mapping[int, Any], *, legacy: bool
    ) -> dict[int, Any]:
        peer = _req(p, 0x03, dict)
        pin_hash_enc = _req(p, 0x06, bytes)
        if legacy:
            if 0x09 in p or 0x0A in p:
                raise CtapError(ERR.INVALID_PARAMETER)
            permissions, rp_id = int(_SUPPORTED_PERMISSIONS), None
        else:
            permissions, rp_id = self._permissions(p)
        self._pin_gate()
        shared = self.shared_secret(proto, peer)
        self._check_pin(proto, shared, pin_hash_enc)
        token = self.new_token(proto, permissions, rp_id, user_present=False)
        return {0x02: proto.encrypt(shared, token)}

    def token_using_uv(self, proto: _PinUvProtocol, p: Mapping[int, Any]) -> dict[int, Any]:
        peer = _req(p, 0x03, dict)
        permissions, rp_id = self._permissions(p)
        shared = self.shared_secret(proto, peer)
        self.builtin_uv()
        token = self.new_token(proto, permissions, rp_id, user_present=True)
        return {0x02: proto.encrypt(shared, token)}

    # makeCredential ------------------------------------------------------------------

    def make_credential(self, p: Mapping[int, Any]) -> dict[int, Any]:
        cdh = _req(p, 0x01, bytes)
        rp = _req(p, 0x02, dict)
        user = _req(p, 0x03, dict)
        cred_params = _req(p, 0x04, list)
        exclude = _descriptors(_opt(p, 0x05, list))
        extensions = _opt(p, 0x06, dict) or {}
        options = _bool_options(_opt(p, 0x07, dict))
        rp_id = _req(rp, "id", str)
        user_id = _req(user, "id", bytes)
        user_name = _opt(user, "name", str)
        display_name = _opt(user, "displayName", str)
        if not 0 < len(user_id) <= 64:
            raise CtapError(ERR.INVALID_LENGTH)

        pin_auth = _opt(p, 0x08, bytes)
        if pin_auth is not None and len(pin_auth) == 0:
            self.zero_length_pin_auth()
        if not any(
            isinstance(c, dict) and c.get("type") == _PUBLIC_KEY and c.get("alg") == _ALG_ES256
            for c in cred_params
        ):
            raise CtapError(ERR.UNSUPPORTED_ALGORITHM)
        if options.get("up") is False:
            raise CtapError(ERR.INVALID_OPTION)
        rk = options.get("rk", False)
        token_used = pin_auth is not None
        uv = self.verify_user(p, 0x08, 0x09, cdh, _Perm.MAKE_CREDENTIAL, rp_id, options)
        if not uv and self.protected and (rk or not self.s.settings.make_cred_uv_not_rqd):
            raise CtapError(ERR.PUAT_REQUIRED)

        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        for cred_id in exclude:
            key = _unwrap(self.s.master_key, rp_id_hash, cred_id)
            if key is not None and (key.cred_protect < 3 or uv):
                self.up_with_token(token_used)
                raise CtapError(ERR.CREDENTIAL_EXCLUDED)

        protect = extensions.get(_CRED_PROTECT, 1)
        if type(protect) is not int or protect not in (1, 2, 3):
            raise CtapError(ERR.INVALID_PARAMETER)
        hmac_secret = extensions.get(_HMAC_SECRET) is True
        if (
            rk
            and not any(r.rp_id == rp_id and r.user_id == user_id for r in self.s.residents)
            and len(self.s.residents) >= MAX_RESIDENT_CREDENTIALS
        ):
            raise CtapError(ERR.KEY_STORE_FULL)

        self.up_with_token(token_used)

        flags_byte = protect | (_FLAG_HMAC_SECRET if hmac_secret else 0)
        flags_byte |= _FLAG_RESIDENT if rk else 0
        scalar = _new_p256_scalar()
        cred_id = _wrap(self.s.master_key, rp_id_hash, scalar, flags_byte)
        private = _p256_key(scalar)
        self.s.sign_count += 1
        if rk:
            self.s.residents = [
                r for r in self.s.residents if not (r.rp_id == rp_id and r.user_id == user_id)
            ]
            self.s.residents.append(
                _Resident(
                    cred_id, rp_id, user_id, user_name, display_name, protect, self.s.sign_count
                )
            )

        ext_out: dict[str, Any] = {}
        if _CRED_PROTECT in extensions:
            ext_out[_CRED_PROTECT] = protect
        if hmac_secret:
            ext_out[_HMAC_SECRET] = True
        flags = AuthenticatorData.FLAG.UP | AuthenticatorData.FLAG.AT
        if uv:
            flags |= AuthenticatorData.FLAG.UV
        if ext_out:
            flags |= AuthenticatorData.FLAG.ED
        pub = private.public_key().public_numbers()
        cose = ES256(
            {
                1: 2,
                3: _ALG_ES256,
                -1: 1,
                -2: pub.x.to_bytes(32, "big"),
                -3: pub.y.to_bytes(32, "big"),
            }
        )
        cred_data = AttestedCredentialData.create(self.s.aaguid, cred_id, cose)
        auth_data = AuthenticatorData.create(
            rp_id_hash, flags, self.s.sign_count, cred_data, ext_out or None
        )
        kind = self.s.settings.attestation
        if kind == "none":
            return {0x01: "none", 0x02: bytes(auth_data), 0x03: {}}
        signed = bytes(auth_data) + cdh
        if kind == "self":
            sig = private.sign(signed, ec.ECDSA(hashes.SHA256()))
            return {0x01: "packed", 0x02: bytes(auth_data), 0x03: {"alg": _ALG_ES256, "sig": sig}}
        att = self.s.attestation_key
        sig = _p256_key(att.scalar).sign(signed, ec.ECDSA(hashes.SHA256()))
        stmt = {"alg": _ALG_ES256, "sig": sig, "x5c": [att.certificate]}
        return {0x01: "packed", 0x02: bytes(auth_data), 0x03: stmt}

    # getAssertion ------------------------------------------------------------------------

    def get_assertion(self, p: Mapping[int, Any], raw: bytes) -> dict[int, Any]:
        rp_id = _req(p, 0x01, str)
        cdh = _req(p, 0x02, bytes)
        allow = _opt(p, 0x03, list)
        allow_ids = _descriptors(allow)
        extensions = _opt(p, 0x04, dict) or {}
        options = _bool_options(_opt(p, 0x05, dict))
        pin_auth = _opt(p, 0x06, bytes)
        if pin_auth is not None and len(pin_auth) == 0:
            self.zero_length_pin_auth()
        if "rk" in options:
            raise CtapError(ERR.UNSUPPORTED_OPTION)
        up = options.get("up", True)
        token_used = pin_auth is not None
        uv = self.verify_user(p, 0x06, 0x07, cdh, _Perm.GET_ASSERTION, rp_id, options)
        hmac_in = extensions.get(_HMAC_SECRET)
        if hmac_in is not None and not isinstance(hmac_in, dict):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)

        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        if allow:
            keys = [
                k
                for k in (_unwrap(self.s.master_key, rp_id_hash, i) for i in allow_ids)
                if k is not None and (k.cred_protect < 3 or uv)
            ]
            keys = keys[:1]
        else:
            found = sorted(
                (r for r in self.s.residents if r.rp_id == rp_id), key=lambda r: -r.created
            )
            keys = [
                k
                for k in (_unwrap(self.s.master_key, rp_id_hash, r.cred_id) for r in found)
                if k is not None and (k.cred_protect < 2 or uv)
            ]
        if not keys:
            raise CtapError(ERR.NO_CREDENTIALS)
        if up:
            self.up_with_token(token_used)

        pending = {
            "request": _b64(raw),
            "up": up,
            "uv": uv,
            "remaining": [_b64(k.cred_id) for k in keys[1:]],
            "deadline": time.time() + NEXT_ASSERTION_TIMEOUT,
        }
        self.v.pending = pending if len(keys) > 1 else None
        response = self.assertion(keys[0], rp_id, cdh, up, uv, hmac_in)
        if len(keys) > 1:
            response[0x05] = len(keys)
        return response

    def get_next_assertion(self) -> dict[int, Any]:
        pending = self.v.pending
        if pending is None or not pending["remaining"] or time.time() > pending["deadline"]:
            self.v.pending = None
            raise CtapError(ERR.NOT_ALLOWED)
        p = cbor.decode(_unb64(pending["request"]))
        assert isinstance(p, dict)
        rp_id: str = p[0x01]
        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        cred_id = _unb64(pending["remaining"].pop(0))
        key = _unwrap(self.s.master_key, rp_id_hash, cred_id)
        if key is None:  # reset in between
            self.v.pending = None
            raise CtapError(ERR.NOT_ALLOWED)
        hmac_in = (p.get(0x04) or {}).get(_HMAC_SECRET)
        return self.assertion(key, rp_id, p[0x02], pending["up"], pending["uv"], hmac_in)

    def assertion(
        self, key: _Key, rp_id: str, cdh: bytes, up: bool, uv: bool, hmac_in: dict[Any, Any] | None
    ) -> dict[int, Any]:
        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        ext_out: dict[str, Any] = {}
        if hmac_in is not None and key.hmac_secret:
            ext_out[_HMAC_SECRET] = self.hmac_secret(hmac_in, key, uv)
        flags = AuthenticatorData.FLAG(0)
        if up:
            flags |= AuthenticatorData.FLAG.UP
        if uv:
            flags |= AuthenticatorData.FLAG.UV
        if ext_out:
            flags |= AuthenticatorData.FLAG.ED
        self.s.sign_count += 1
        auth_data = AuthenticatorData.create(
            rp_id_hash, flags, self.s.sign_count, b"", ext_out or None
        )
        sig = key.private.sign(bytes(auth_data) + cdh, ec.ECDSA(hashes.SHA256()))
        response: dict[int, Any] = {
            0x01: {"id": key.cred_id, "type": _PUBLIC_KEY},
            0x02: bytes(auth_data),
            0x03: sig,
        }
        resident = next((r for r in self.s.residents if r.cred_id == key.cred_id), None)
        if resident is not None:
            user: dict[str, Any] = {"id": resident.user_id}
            if uv and resident.user_name is not None:
                user["name"] = resident.user_name
            if uv and resident.display_name is not None:
                user["displayName"] = resident.display_name
            response[0x04] = user
        return response

    def hmac_secret(self, hmac_in: Mapping[Any, Any], key: _Key, uv: bool) -> bytes:
        peer = _req(hmac_in, 1, dict)
        salt_enc = _req(hmac_in, 2, bytes)
        salt_auth = _req(hmac_in, 3, bytes)
        proto = _protocol(hmac_in.get(4, 1))
        shared = self.shared_secret(proto, peer)
        if not proto.verify(shared, salt_enc, salt_auth):
            raise CtapError(ERR.EXTENSION_FIRST)
        salts = proto.decrypt(shared, salt_enc)
        if len(salts) not in (32, 64):
            raise CtapError(ERR.INVALID_LENGTH)
        cred_random = _cred_random(self.s.master_key, key.cred_id, uv)
        output = b"".join(
            hmac.digest(cred_random, salts[i : i + 32], "sha256") for i in range(0, len(salts), 32)
        )
        return proto.encrypt(shared, output)

    # reset / selection ------------------------------------------------------------------

    def reset(self) -> None:
        self.user_presence()
        self.s.master_key = secrets.token_bytes(32)
        self.s.residents = []
        self.s.pin_hash = None
        self.s.pin_retries = MAX_PIN_RETRIES
        self.s.uv_retries = MAX_UV_RETRIES
        self.s.volatile = self.v = _Volatile.fresh()

    def dispatch(self, command: int, params: dict[Any, Any], raw: bytes) -> dict[int, Any] | None:
        if command not in (_Cmd.GET_NEXT_ASSERTION, _Cmd.GET_INFO):
            self.v.pending = None  # GetNextAssertion must follow directly
        if command == _Cmd.GET_INFO:
            return self.get_info()
        if command == _Cmd.MAKE_CREDENTIAL:
            return self.make_credential(params)
        if command == _Cmd.GET_ASSERTION:
            return self.get_assertion(params, raw)
        if command == _Cmd.GET_NEXT_ASSERTION:
            return self.get_next_assertion()
        if command == _Cmd.CLIENT_PIN:
            return self.client_pin(params)
        if command == _Cmd.RESET:
            self.reset()
            return None
        if command == _Cmd.SELECTION:
            self.user_presence()
            return None
        raise CtapError(ERR.INVALID_COMMAND)


# --- the device ----------------------------------------------------------------------


class SoftAuthenticator(CtapDevice):
    """A CTAP2.1 authenticator in software, its state in one file (see module doc).

    Make one with :meth:`create`, open an existing one with :meth:`load`.
    Every :meth:`call` re-reads the file under an exclusive lock and writes it
    back before answering, so instances in several processes are one device.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._read()  # fail early on a missing or unsafe file

    # construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        uv_modality: int = UvModality.FINGERPRINT,
        pin: str | None = None,
        uv_enrolled: bool = True,
        uv_outcome: UvOutcome = "succeed",
        up_outcome: UpOutcome = "approve",
        attestation: Attestation = "packed",
        make_cred_uv_not_rqd: bool = False,
        aaguid: bytes = SOFT_AAGUID,
        attestation_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
        overwrite: bool = False,
    ) -> SoftAuthenticator:
        """Create a fresh authenticator (new master key) in ``path``; its attestation
        certificate is issued by ``attestation_ca`` (:func:`make_attestation_ca`) or by
        a root made for it alone (:attr:`attestation_root`)."""
        target = Path(path)
        settings = SoftSettings(
            uv_modality=uv_modality,
            uv_enrolled=uv_enrolled,
            uv_outcome=uv_outcome,
            up_outcome=up_outcome,
            attestation=attestation,
            make_cred_uv_not_rqd=make_cred_uv_not_rqd,
        )
        if len(aaguid) != 16:
            raise InvalidInput("an AAGUID has 16 bytes")
        state = _State(
            aaguid=aaguid,
            master_key=secrets.token_bytes(32),
            settings=settings,
            attestation_key=_attestation_key(aaguid, attestation_ca),
        )
        if pin is not None:
            _check_pin_policy(pin)
            state.pin_hash = _pin_hash(pin)
        with cls._lock_path(target):
            if target.exists() and not overwrite:
                raise StateError(f"soft authenticator state exists already: {target}")
            atomic_write(target, json.dumps(state.to_json(), indent=1).encode())
        return cls(target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SoftAuthenticator:
        """Open the authenticator whose state is in ``path``."""
        return cls(path)

    @classmethod
    def list_devices(cls) -> Iterator[SoftAuthenticator]:
        """The authenticator named by ``$HSM_AUTH_SOFT_FIDO2``, if that is set."""
        path = os.environ.get(ENV_STATE_FILE)
        if path:
            yield cls(path)

    # file and lock -----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @staticmethod
    @contextlib.contextmanager
    def _lock_path(path: Path) -> Iterator[None]:
        with locked(path.with_name(path.name + ".lock")):
            yield

    def _read(self) -> _State:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise StateError(f"cannot open soft authenticator state {self._path}") from e
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077:
                raise StateError(f"soft authenticator state {self._path} is not mode 0600")
            raw = f.read()
        try:
            return _State.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, InvalidInput) as e:
            raise StateError(f"soft authenticator state {self._path} is damaged") from e

    def _write(self, state: _State) -> None:
        atomic_write(self._path, json.dumps(state.to_json(), indent=1).encode())

    @contextlib.contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[_State]:
        with self._lock_path(self._path):
            state = self._read()
            try:
                yield state
            finally:
                if write:
                    self._write(state)

    # CtapDevice ----------------------------------------------------------------------------

    @property
    def capabilities(self) -> int:
        return int(CAPABILITY.CBOR | CAPABILITY.NMSG)

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        if cmd == CTAPHID.PING:
            return data
        if cmd == CTAPHID.WINK:
            return b""
        if cmd != CTAPHID.CBOR:
            raise CtapError(ERR.INVALID_COMMAND)
        if not data:
            return bytes([ERR.INVALID_LENGTH])
        if len(data) > MAX_MSG_SIZE:
            return bytes([ERR.REQUEST_TOO_LARGE])
        command, payload = data[0], data[1:]
        params: Any = {}
        if payload:
            # fido2's decoder is lenient (a truncated byte string decodes short), so
            # also insist on CTAP2 canonical CBOR, which every platform must send.
            try:
                params = cbor.decode(payload)
                canonical = cbor.encode(params) == payload
            except Exception:  # any malformed input: the parser's errors vary
                return bytes([ERR.INVALID_CBOR])
            if not canonical or not isinstance(params, dict):
                return bytes([ERR.INVALID_CBOR])
        with self._transaction(write=command != _Cmd.GET_INFO) as state:
            try:
                result = _Engine(state, event, on_keepalive).dispatch(command, params, payload)
            except CtapError as e:
                return bytes([e.code])
        return b"\x00" + (cbor.encode(result) if result else b"")

    # test controls ---------------------------------------------------------------------------

    def replug(self) -> None:
        """Power cycle: new key agreement key, no token, wrong-PIN streak forgotten."""
        with self._transaction() as state:
            state.volatile = _Volatile.fresh()

    def configure(
        self,
        *,
        uv_outcome: UvOutcome | None = None,
        up_outcome: UpOutcome | None = None,
        uv_enrolled: bool | None = None,
        uv_modality: int | None = None,
        attestation: Attestation | None = None,
        make_cred_uv_not_rqd: bool | None = None,
    ) -> SoftSettings:
        """Change settings (persisted: other processes see them); returns the new settings."""
        changes: dict[str, Any] = {
            k: v
            for k, v in {
                "uv_outcome": uv_outcome,
                "up_outcome": up_outcome,
                "uv_enrolled": uv_enrolled,
                "uv_modality": uv_modality,
                "attestation": attestation,
                "make_cred_uv_not_rqd": make_cred_uv_not_rqd,
            }.items()
            if v is not None
        }
        with self._transaction() as state:
            state.settings = replace(state.settings, **changes)
            return state.settings

    @property
    def settings(self) -> SoftSettings:
        return self._read().settings

    def status(self) -> SoftStatus:
        s = self._read()
        return SoftStatus(
            sign_count=s.sign_count,
            pin_set=s.pin_hash is not None,
            pin_retries=s.pin_retries,
            uv_retries=s.uv_retries,
            pin_auth_blocked=s.volatile.pin_failures >= PIN_FAILURES_BEFORE_REPLUG,
            resident_credentials=len(s.residents),
        )

    @property
    def attestation_root(self) -> x509.Certificate:
        """The root certificate its attestation chains to (for a verifier's ``roots``)."""
        return x509.load_der_x509_certificate(self._read().attestation_key.root)

    @property
    def attestation_certificate(self) -> x509.Certificate:
        """Its attestation certificate (the ``x5c`` leaf of a packed attestation)."""
        return x509.load_der_x509_certificate(self._read().attestation_key.certificate)

    @property
    def aaguid(self) -> bytes:
        return self._read().aaguid

    def resident_credentials(self) -> list[ResidentCredential]:
        return [r.public() for r in self._read().residents]

    def __repr__(self) -> str:
        return f"SoftAuthenticator({str(self._path)!r})"
