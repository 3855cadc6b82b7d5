"""FIDO2 backend: the ``biometric`` and ``face`` methods through built-in user verification.

python-fido2 speaks CTAP2 to the authenticator directly (``Ctap2`` +
``ClientPin``; not ``Fido2Client``, whose silent pre-check assertion would
move the signature counter twice per use).

Configuration (``[methods.biometric]`` / ``[methods.face]`` settings):

* ``device`` — ``"hid:/dev/hidrawN"``, ``"pcsc"``, ``"soft:/path/state.json"``
  (the software test authenticator of :mod:`hsm_auth.testing.soft_fido2`), or
  unset / ``"auto"``: the first HID authenticator, else the first PC/SC one
  (needs pyscard); with ``allow_software_authenticator``, ``$HSM_AUTH_SOFT_FIDO2``
  first when it is set.
* ``allow_software_authenticator`` — accept the software authenticator
  (``soft:`` or ``$HSM_AUTH_SOFT_FIDO2``). Off by default, and a ``soft:``
  device without it is refused: that authenticator keeps its keys in a plain
  file and is for tests and demos only.
* ``rp_id`` — the relying party id of the credentials, default ``"hsm-auth"``
  (the same default as workstation login). Any fixed string works: we talk
  CTAP directly, so no browser origin rules apply. Fixed at enrollment: each
  credential remembers its own.
* ``state_dir`` — where the host keeps what it knows of each credential (its
  id, public key, its ATC and the last signature counter seen), default
  ``<user state dir>/hsm-auth/fido2``; the file is 0600, written atomically.
* ``timeout`` — seconds to wait for the user (default 30); ``Authorization.timeout``
  overrides it per call.
* ``allow_pin_fallback`` — when true, and a PIN is given, the authenticator's
  PIN replaces built-in UV when that is blocked or not set up. Off by default:
  the PIN does not prove a fingerprint or a face.
* ``prompts`` — pass "the authenticator waits for you" to the caller's
  ``Authorization.interaction`` (:meth:`~hsm_auth.keystore.UserInteraction.prompt_up`;
  default true). The backend never writes to the terminal itself: the CLI's
  interaction prints the prompt on stderr. Before built-in user verification
  the interaction is also asked for consent
  (:meth:`~hsm_auth.keystore.UserInteraction.request_uv`).

Credentials. One ES256 credential per enrolled method, made with
``hmac-secret`` and ``credProtect`` level 3 (userVerificationRequired: the
authenticator will not even admit the credential exists without UV). They
are **not resident** (not discoverable): the host keeps the credential id in
the key URI anyway, resident slots are few on real authenticators, and a
non-resident credential leaves nothing on the device to enumerate. Key URIs
look like RFC 7512 ones: ``fido2:rp=hsm-auth;id=<credential id, base64url>;type=otp``
with ``type`` one of ``signing``, ``otp``, ``counter`` (one credential serves
all three). Deleting forgets the credential on the host; a non-resident
credential has nothing to delete on the device.

Every use requires user verification: a pinUvAuthToken from
``getPinUvAuthTokenUsingUvWithPermissions`` (permission GA or MC, the rpId),
or the ``uv`` option on a CTAP 2.0 authenticator without tokens. An
authenticator without built-in UV is refused at open; a method whose modality
the authenticator lacks (``uvModality``: fingerprint for ``biometric``, face
for ``face``) is refused with a message naming what it has.

OTP key. Derived again for each OTP through ``hmac-secret`` with the fixed
salt SHA-256("hsm-auth/otp/v1") under UV, decrypted into a ``bytearray``,
used for one HMAC-SHA256 on the host, and zeroed. Unlike PKCS#11 and TPM2,
**the host holds the OTP key for the moment of each OTP**. At enrollment the
key is wrapped to the verifier's agreement key (:mod:`hsm_auth.key_transport`)
and MACs the key confirmation, in hand, before it is wiped.

ATC. Each credential has its own application counter, kept by the host in
the state file: 0 at enrollment, and +1 for each OTP (or counter increment),
written durably *before* the MAC is computed, so a crash can skip a value but
never release two OTPs for one. The authenticator's signature counter
(``signCount``) is not the ATC: many authenticators (YubiKeys, and the soft
one) keep one counter for all their credentials, so a website login would
move it by an unknown amount, overrun the verifier's look-ahead window and
count as offline uses. The signature counter guards against clones instead:
every assertion (OTP, counter, login, enrollment) must carry a counter above
the last one the host saw for that credential, else the credential is
refused from then on (a cloned authenticator, or a restored one). Login
assertions carry the raw signature counter (checked again by
:mod:`hsm_auth.login`) and leave the ATC alone. What the host counter cannot
stop: restoring the host's state file from a backup lets an ATC be released
again; the verifier refuses every ATC it has already accepted, and each OTP
is bound to its session's challenge.

Ctrl+C during a call sets the CTAP cancel event (the device is told to
stop) and raises :class:`Cancelled`; so does the timeout.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac as _hmac
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsm_auth import ec as ecutil
from hsm_auth import key_transport
from hsm_auth.errors import (
    AuthorizationError,
    BackendError,
    BackendUnavailable,
    Cancelled,
    ConfigError,
    CounterError,
    HsmAuthError,
    InvalidInput,
    KeyNotFound,
    MechanismNotSupported,
    PinInvalid,
    PinLocked,
    PinRequired,
    RetryStatus,
    StateError,
    TokenNotFound,
    UserVerificationFailed,
)
from hsm_auth.files import (
    atomic_write_json,
    check_private,
    check_state,
    ensure_private_dir,
    locked,
    read_json,
)
from hsm_auth.keystore import (
    Authorization,
    Capability,
    ConfirmationMessage,
    Enrollment,
    KeyInfo,
    KeyKind,
    KeyStore,
    PinStatus,
    Settings,
    check_counter_limit,
)
from hsm_auth.methods import Method
from hsm_auth.uri import format_attr_uri, parse_attr_uri
from hsm_auth.webauthn_proof import (
    client_data_hash,
    encode_enrollment_attestation,
)

__all__ = [
    "ALLOW_SOFT_SETTING",
    "DEFAULT_RP_ID",
    "DEFAULT_TIMEOUT",
    "ENV_SOFT_DEVICE",
    "MODALITY_NAMES",
    "OTP_SALT",
    "Fido2KeyStore",
    "required_modality",
]

DEFAULT_RP_ID = "hsm-auth"
DEFAULT_TIMEOUT = 30.0
#: The soft authenticator's own variable (``soft_fido2.ENV_STATE_FILE``).
ENV_SOFT_DEVICE = "HSM_AUTH_SOFT_FIDO2"
#: The setting that lets a method use the software authenticator.
ALLOW_SOFT_SETTING = "allow_software_authenticator"
#: The hmac-secret salt: the same for every OTP, so the OTP key is stable.
OTP_SALT = hashlib.sha256(b"hsm-auth/otp/v1").digest()
STATE_FILE = "credentials.json"
#: 2: a host-kept ``atc`` per credential; 1 (read, then rewritten as 2) had none
#: and used the signature counter as the ATC, so migrating starts the ATC there.
_STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_CANCEL_GRACE = 5.0  # seconds to let the device acknowledge a cancel
_DEFAULT_PROMPT = "Verify it is you"

#: uvModality bits (FIDO Registry of Predefined Values, USER_VERIFY_*).
MODALITY_NAMES: dict[int, str] = {
    0x001: "presence",
    0x002: "fingerprint",
    0x004: "passcode",
    0x008: "voice",
    0x010: "face",
    0x020: "location",
    0x040: "eye",
    0x080: "drawn pattern",
    0x100: "hand",
    0x200: "none",
    0x400: "all",
    0x800: "external passcode",
    0x1000: "external pattern",
}
_REQUIRED_MODALITY = {Method.BIOMETRIC: 0x002, Method.FACE: 0x010}

# CTAP2 status codes this module looks at (CTAP 2.1, 8.2).
_ERR_INVALID_CBOR = 0x12
_ERR_OPERATION_DENIED = 0x27
_ERR_KEEPALIVE_CANCEL = 0x2D
_ERR_NO_CREDENTIALS = 0x2E
_ERR_USER_ACTION_TIMEOUT = 0x2F
_ERR_NOT_ALLOWED = 0x30  # built-in UV not set up
_ERR_PIN_INVALID = 0x31
_ERR_PIN_BLOCKED = 0x32
_ERR_PIN_AUTH_INVALID = 0x33
_ERR_PIN_AUTH_BLOCKED = 0x34
_ERR_PIN_NOT_SET = 0x35
_ERR_PUAT_REQUIRED = 0x36
_ERR_ACTION_TIMEOUT = 0x3A
_ERR_UV_BLOCKED = 0x3C
_ERR_UV_INVALID = 0x3F
_CANCEL_CODES = {_ERR_KEEPALIVE_CANCEL, _ERR_USER_ACTION_TIMEOUT, _ERR_ACTION_TIMEOUT}

_PERM_MC = 0x01
_PERM_GA = 0x02
_FLAG_UP, _FLAG_UV = 0x01, 0x04
_ES256 = -7
_KEEPALIVE_UPNEEDED = 2

# Exceptions python-fido2 lets through when the device's answer does not parse.
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error)

T = TypeVar("T")


def required_modality(method: Method) -> int:
    """The uvModality bit a method needs (fingerprint for biometric, face for face)."""
    try:
        return _REQUIRED_MODALITY[method]
    except KeyError:
        raise MechanismNotSupported(f"the {method.value} method on FIDO2") from None


def _modality_text(bits: int) -> str:
    names = [name for bit, name in MODALITY_NAMES.items() if bits & bit]
    return " + ".join(names) if names else "an unreported modality"


def _unsupported(mechanism: str, message: str) -> MechanismNotSupported:
    """A MechanismNotSupported whose message says more than the default sentence."""
    error = MechanismNotSupported(mechanism)
    error.args = (message,)
    return error


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not text or any(c not in _B64URL for c in text):
        raise InvalidInput("malformed credential id in a fido2: URI")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise InvalidInput("malformed credential id in a fido2: URI") from None


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# --- configuration ------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    device: str
    rp_id: str
    state_dir: Path
    timeout: float
    allow_pin_fallback: bool
    prompts: bool
    allow_software: bool

    def soft_path(self) -> str | None:
        """The software authenticator's state file that ``device`` selects, if any;
        refused unless the settings allow the software authenticator."""
        spec = self.device
        if spec.startswith("soft:"):
            path, where = spec[len("soft:"):], f"device = {spec[:60]!r}"
        elif spec in ("", "auto") and os.environ.get(ENV_SOFT_DEVICE):
            path, where = os.environ[ENV_SOFT_DEVICE], f"${ENV_SOFT_DEVICE}"
        else:
            return None
        if not self.allow_software:
            raise ConfigError(
                f"{where} is the software FIDO2 authenticator, a test tool with its keys in "
                f"a plain file: set {ALLOW_SOFT_SETTING} = true for this method to use it"
            )
        return path


def _config(settings: Settings) -> _Config:
    device = settings.get("device", "auto")
    rp_id = settings.get("rp_id", DEFAULT_RP_ID)
    timeout = settings.get("timeout", DEFAULT_TIMEOUT)
    fallback = settings.get("allow_pin_fallback", False)
    prompts = settings.get("prompts", True)
    allow_software = settings.get(ALLOW_SOFT_SETTING, False)
    if not isinstance(device, str):
        raise ConfigError("fido2 setting 'device' must be a string (soft:PATH, hid:PATH, pcsc)")
    if not isinstance(rp_id, str) or not 0 < len(rp_id) <= 128 or not rp_id.isprintable():
        raise ConfigError("fido2 setting 'rp_id' must be 1 to 128 printable characters")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError("fido2 setting 'timeout' must be a positive number of seconds")
    if not isinstance(fallback, bool):
        raise ConfigError("fido2 setting 'allow_pin_fallback' must be true or false")
    if not isinstance(prompts, bool):
        raise ConfigError("fido2 setting 'prompts' must be true or false")
    if not isinstance(allow_software, bool):
        raise ConfigError(f"fido2 setting '{ALLOW_SOFT_SETTING}' must be true or false")
    configured = settings.get("state_dir")
    if configured:
        state_dir = Path(str(configured)).expanduser()
    else:
        import platformdirs

        state_dir = Path(platformdirs.user_state_dir("hsm-auth")) / "fido2"
    return _Config(device, rp_id, state_dir, float(timeout), fallback, prompts, allow_software)


def _fido2_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fido2")
    except PackageNotFoundError:
        return "unknown"


def _import_fido2() -> Any:
    try:
        import fido2.ctap2
    except ImportError as e:
        raise BackendUnavailable(
            f"python-fido2 is not installed (pip install 'hsm-auth[fido2]'): {e}"
        ) from e
    import fido2

    return fido2


# --- finding the authenticator --------------------------------------------------


def _soft_device(path: str) -> tuple[Any, str]:
    from hsm_auth.testing.soft_fido2 import SoftAuthenticator

    if not path or not os.path.exists(path):
        raise TokenNotFound(f"no soft FIDO2 authenticator at {path or '(empty path)'}")
    try:
        return SoftAuthenticator.load(path), f"soft:{path}"
    except StateError as e:
        raise TokenNotFound(f"the soft FIDO2 authenticator is unusable: {e}") from e


def _hid_device(path: str) -> tuple[Any, str]:
    from fido2.hid import open_device

    try:
        return open_device(path), f"hid:{path}"
    except (OSError, ValueError) as e:
        raise TokenNotFound(f"no FIDO2 authenticator at {path} ({e.__class__.__name__})") from e


def _pcsc_devices() -> list[Any]:
    try:
        from fido2.pcsc import CtapPcscDevice
    except ImportError:  # pyscard missing
        return []
    try:
        return list(CtapPcscDevice.list_devices())
    except Exception:  # pcscd not running, no reader: "none found"
        return []


def _hid_devices() -> list[Any]:
    from fido2.hid import CtapHidDevice

    try:
        return list(CtapHidDevice.list_devices())
    except OSError:
        return []


def _find_device(cfg: _Config) -> tuple[Any, str]:
    soft = cfg.soft_path()
    if soft is not None:
        return _soft_device(soft)
    spec = cfg.device
    if spec.startswith("hid:"):
        return _hid_device(spec[len("hid:"):])
    if spec == "pcsc":
        found = _pcsc_devices()
        if not found:
            raise TokenNotFound("no FIDO2 authenticator on PC/SC (pyscard and pcscd needed)")
        return found[0], "pcsc"
    if spec not in ("", "auto"):
        raise ConfigError(f"fido2 setting 'device' {spec[:40]!r}: use hid:PATH, pcsc or soft:PATH")
    for devices, kind in ((_hid_devices(), "hid"), (_pcsc_devices(), "pcsc")):
        if devices:
            for extra in devices[1:]:
                with contextlib.suppress(Exception):
                    extra.close()
            return devices[0], kind
    raise TokenNotFound(
        "no FIDO2 authenticator found (none on HID or PC/SC; "
        f"for tests, device = \"soft:PATH\" and {ALLOW_SOFT_SETTING} = true)"
    )


# --- what the host remembers of each credential ---------------------------------


@dataclass(frozen=True)
class _Credential:
    credential_id: bytes
    rp_id: str
    label: str
    public: bytes  # SEC1 uncompressed point
    last_sign_count: int  # the last signature counter seen: the clone guard
    roles: tuple[str, ...]  # KeyKind values this credential serves
    aaguid: bytes
    method: str | None = None
    suspect: bool = False  # a counter once failed to increase: refused until re-enrolled
    atc: int = 0  # the credential's own ATC, kept here; +1 per OTP

    def to_json(self) -> dict[str, Any]:
        return {
            "id": _b64url(self.credential_id),
            "rp_id": self.rp_id,
            "label": self.label,
            "public": self.public.hex(),
            "last_sign_count": self.last_sign_count,
            "atc": self.atc,
            "roles": list(self.roles),
            "aaguid": self.aaguid.hex(),
            "method": self.method,
            "suspect": self.suspect,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], version: int = _STATE_VERSION) -> _Credential:
        if version == 1:  # the signature counter was the ATC: the verifier stands there
            last_sign_count = atc = int(d["sign_count"])
        else:
            last_sign_count, atc = int(d["last_sign_count"]), int(d["atc"])
        if last_sign_count < 0 or atc < 0:
            raise ValueError("negative counter")
        return cls(
            credential_id=_unb64url(str(d["id"])),
            rp_id=str(d["rp_id"]),
            label=str(d["label"]),
            public=bytes.fromhex(str(d["public"])),
            last_sign_count=last_sign_count,
            roles=tuple(str(r) for r in d["roles"]),
            aaguid=bytes.fromhex(str(d["aaguid"])),
            method=None if d.get("method") is None else str(d["method"]),
            suspect=bool(d.get("suspect", False)),
            atc=atc,
        )

    @property
    def key(self) -> str:
        return _b64url(self.credential_id)

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ecutil.CURVE, self.public)


class _CredentialFile:
    """``<state_dir>/credentials.json``: 0600, atomic writes, re-read on every access,
    and an exclusive ``flock`` (``.lock``) around each read-check-write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        ensure_private_dir(self.directory)
        with locked(self.directory / ".lock"):
            yield

    def load(self) -> dict[str, _Credential]:
        check_state(self.directory, directory=True, missing_ok=True)
        if not self.path.exists():
            return {}
        check_private(self.path)
        data = read_json(self.path)
        try:
            version = data.get("version")
            if version not in _READABLE_VERSIONS:
                raise ValueError("version")
            records = (_Credential.from_json(d, version) for d in data["credentials"])
            return {c.key: c for c in records}
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError, InvalidInput):
            raise StateError(f"{self.path} is malformed") from None

    def save(self, credentials: Mapping[str, _Credential]) -> None:
        atomic_write_json(
            self.path,
            {
                "version": _STATE_VERSION,
                "credentials": [c.to_json() for c in credentials.values()],
            },
        )


# --- the secret buffer ----------------------------------------------------------


def _wipe(buffer: bytearray) -> None:
    for i in range(len(buffer)):
        buffer[i] = 0


def _decrypt_into(protocol_version: int, shared: bytes, ciphertext: bytes) -> bytearray:
    """Decrypt an hmac-secret output into a bytearray (wipeable, unlike ``bytes``)."""
    if protocol_version == 1:
        key, iv, body = shared, bytes(16), ciphertext
    else:
        key, iv, body = shared[32:], ciphertext[:16], ciphertext[16:]
    if len(body) != 32:
        raise BackendError("the authenticator's hmac-secret output has the wrong size")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    out = bytearray(len(body) + 15)
    try:
        written = decryptor.update_into(body, out)
        decryptor.finalize()
        secret = bytearray(32)
        secret[:] = memoryview(out)[:written]
        return secret
    finally:
        _wipe(out)


# --- the key store ----------------------------------------------------------------


@dataclass(frozen=True)
class _Verified:
    """What user verification gave for one operation."""

    protocol: Any  # fido2 PinProtocol
    key_agreement: Mapping[int, Any]
    shared: bytes = field(repr=False)
    token: bytes | None = field(repr=False)  # None: the request carries {"uv": True}


@dataclass(frozen=True)
class _Assertion:
    auth_data: bytes
    signature: bytes
    sign_count: int
    hmac_output: bytes | None = field(repr=False)  # encrypted hmac-secret output
    protocol_version: int = 0
    shared: bytes = field(default=b"", repr=False)


class Fido2KeyStore(KeyStore):
    """A FIDO2 authenticator with built-in user verification (see the module doc)."""

    name: ClassVar[str] = "fido2"
    setting_names: ClassVar[frozenset[str] | None] = frozenset(
        {"device", "rp_id", "timeout", "allow_pin_fallback", "prompts", "state_dir",
         ALLOW_SOFT_SETTING}
    )
    priority: ClassVar[float] = 10.0
    methods: ClassVar[tuple[Method, ...]] = (Method.BIOMETRIC, Method.FACE)
    uses_state_dir: ClassVar[bool] = True
    #: How workstation login (:mod:`hsm_auth.login`) checks this backend's proofs.
    login_format: ClassVar[str] = "fido2-assertion"

    def __init__(self, device: Any, description: str, cfg: _Config) -> None:
        from fido2.ctap2.base import Ctap2
        from fido2.ctap2.pin import ClientPin

        self._device = device
        self._description = description
        self._cfg = cfg
        self._file = _CredentialFile(cfg.state_dir)
        self._closed = False
        try:
            self._ctap = Ctap2(device)
            self._info = self._ctap.info
            options = dict(self._info.options)
            self._protocol = ClientPin(self._ctap).protocol if self._info.pin_uv_protocols else None
        except Exception as e:
            self._close_device()
            raise self._convert(e, "getInfo") from e
        if "uv" not in options:
            self._close_device()
            raise MechanismNotSupported(
                "built-in user verification (fingerprint or face); this authenticator has none"
            )
        self._options = options

    # --- lifecycle ----------------------------------------------------------

    @classmethod
    def probe(cls, settings: Settings) -> Mapping[str, str]:
        cfg = _config(settings)
        _import_fido2()
        spec = cfg.device
        soft = cfg.soft_path()
        if soft is not None:
            if not os.path.exists(soft):
                raise TokenNotFound(f"no soft FIDO2 authenticator at {soft}")
            return {"device": f"soft:{soft}", "python-fido2": _fido2_version()}
        if spec.startswith("hid:"):
            if not os.path.exists(spec[len("hid:"):]):
                raise TokenNotFound(f"no FIDO2 authenticator at {spec[len('hid:'):]}")
            return {"device": spec, "python-fido2": _fido2_version()}
        from fido2.hid import list_descriptors

        try:
            descriptors = list(list_descriptors())  # type: ignore[no-untyped-call]
        except OSError:
            descriptors = []
        if descriptors:
            first = descriptors[0]
            return {
                "device": f"hid:{first.path}",
                "product": str(first.product_name or "FIDO2 authenticator"),
                "python-fido2": _fido2_version(),
            }
        if spec == "pcsc" or _pcsc_devices():
            return {"device": "pcsc", "python-fido2": _fido2_version()}
        raise TokenNotFound("no FIDO2 authenticator found on HID or PC/SC")

    @classmethod
    def open(cls, settings: Settings) -> Fido2KeyStore:
        cfg = _config(settings)
        _import_fido2()
        device, description = _find_device(cfg)
        return cls(device, description, cfg)

    @classmethod
    def from_device(cls, device: Any, settings: Settings) -> Fido2KeyStore:
        """A store on an already open ``fido2.ctap.CtapDevice`` (tests, embedding)."""
        _import_fido2()
        return cls(device, type(device).__name__, _config(settings))

    def _close_device(self) -> None:
        close = getattr(self._device, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_device()

    @property
    def description(self) -> str:
        return self._description

    @property
    def rp_id(self) -> str:
        return self._cfg.rp_id

    @property
    def state_file(self) -> Path:
        return self._file.path

    @property
    def uv_modality(self) -> int:
        return int(self._info.uv_modality)

    def capabilities(self) -> frozenset[Capability]:
        # COUNTER, not HARDWARE_COUNTER: the ATC is kept by the host (see the module doc).
        caps = {Capability.COUNTER}
        extensions = set(self._info.extensions)
        if "hmac-secret" in extensions:
            caps.add(Capability.HMAC)
        if self._options.get("uv") is True:
            caps.add(Capability.USER_VERIFICATION)
        if self._options.get("clientPin") is True:
            caps |= {Capability.PIN, Capability.PIN_RETRY_LIMIT}
        return frozenset(caps)

    def require_method(self, method: Method) -> None:
        """Refuse a method whose UV modality this authenticator does not have."""
        wanted = MODALITY_NAMES[required_modality(method)]
        have = self.uv_modality
        if not have:
            raise _unsupported(
                f"{wanted} user verification",
                f"the {method.value} method needs {wanted} user verification, and this "
                "authenticator does not report its modality (uvModality)",
            )
        if not have & required_modality(method):
            raise _unsupported(
                f"{wanted} user verification",
                f"the {method.value} method needs an authenticator with {wanted} user "
                f"verification; this one verifies by {_modality_text(have)}",
            )

    # --- running one device operation ------------------------------------------

    def _run(
        self, what: str, auth: Authorization, fn: Callable[[Any, Callable[[int], None]], T]
    ) -> T:
        """Run ``fn(event, on_keepalive)`` in a worker thread, so that Ctrl+C and the
        timeout can set the CTAP cancel event while the device waits for the user."""
        if self._closed:
            raise StateError("the FIDO2 key store is closed")
        timeout = auth.timeout if auth.timeout is not None else self._cfg.timeout
        event = threading.Event()
        prompted = threading.Event()
        prompt = auth.prompt or _DEFAULT_PROMPT
        interaction = auth.interaction if self._cfg.prompts else None

        def on_keepalive(status: int) -> None:
            if status == _KEEPALIVE_UPNEEDED and not prompted.is_set():
                prompted.set()
                if interaction is not None:  # the library itself never writes to a terminal
                    interaction.prompt_up(prompt)

        outcome: dict[str, Any] = {}
        done = threading.Event()  # not Thread.join: an interrupted join marks the thread stopped

        def work() -> None:
            try:
                outcome["value"] = fn(event, on_keepalive)
            except BaseException as e:  # handed to the caller's thread
                outcome["error"] = e
            finally:
                done.set()

        worker = threading.Thread(target=work, name=f"hsm-auth-fido2 {what}", daemon=True)
        worker.start()
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            while not done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    event.set()  # CTAP cancel
                    done.wait(_CANCEL_GRACE)
                    break
                done.wait(remaining)
        except KeyboardInterrupt:
            event.set()  # CTAP cancel: the authenticator stops waiting for the user
            done.wait(_CANCEL_GRACE)
            outcome.clear()  # drop whatever a late worker produced
            raise Cancelled(f"{what} cancelled (Ctrl+C)") from None
        if timed_out:
            outcome.clear()  # drop whatever a late worker produced
            raise Cancelled(f"{what}: no user verification within {timeout:g} s (timed out)")
        if "error" in outcome:
            raise self._convert(outcome["error"], what) from outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def _convert(self, exc: BaseException, what: str) -> BaseException:
        """One converter from python-fido2 / device failures to hsm_auth errors."""
        from fido2.ctap import CtapError

        if isinstance(exc, HsmAuthError):
            return exc
        if isinstance(exc, CtapError):
            return self._ctap_error(int(exc.code), what)
        if isinstance(exc, OSError):
            return TokenNotFound(
                f"{what}: the authenticator is gone (unplugged?)", native_code=exc.errno
            )
        if isinstance(exc, _MALFORMED) or type(exc).__module__.startswith("fido2"):
            return BackendError(
                f"{what}: the authenticator sent a malformed response",
                native_code=type(exc).__name__,
            )
        return exc

    def _ctap_error(self, code: int, what: str) -> HsmAuthError:
        if code in _CANCEL_CODES:
            return Cancelled(f"{what}: cancelled or timed out on the authenticator")
        if code == _ERR_OPERATION_DENIED:
            return Cancelled(f"{what}: declined on the authenticator")
        if code == _ERR_UV_INVALID:
            left = self._uv_retries()
            return UserVerificationFailed(
                retry=RetryStatus(retries_left=left, locked=left == 0), native_code=code
            )
        if code == _ERR_UV_BLOCKED:
            return UserVerificationFailed(
                "user verification is blocked: unlock the authenticator with its PIN",
                retry=RetryStatus(retries_left=0, locked=True), native_code=code,
            )
        if code == _ERR_PIN_INVALID:
            left = self._pin_retries()
            if left == 0:
                return PinLocked(
                    "wrong authenticator PIN; it is now blocked (reset needed)",
                    retry=RetryStatus(retries_left=0), native_code=code,
                )
            return PinInvalid(
                "wrong authenticator PIN", retry=RetryStatus(retries_left=left),
                native_code=code,
            )
        if code == _ERR_PIN_BLOCKED:
            return PinLocked(
                "the authenticator's PIN is blocked (reset needed)",
                retry=RetryStatus(retries_left=0), native_code=code,
            )
        if code == _ERR_PIN_AUTH_BLOCKED:
            return PinLocked(  # until a power cycle; the PIN's own count stands
                "too many wrong PINs: unplug and replug the authenticator",
                retry=RetryStatus(retries_left=self._pin_retries()), native_code=code,
            )
        if code == _ERR_PIN_NOT_SET:
            return AuthorizationError("the authenticator has no PIN set", native_code=code)
        if code in (_ERR_PUAT_REQUIRED, _ERR_PIN_AUTH_INVALID):
            return AuthorizationError(
                f"{what}: the authenticator refused the user verification token (0x{code:02X})",
                native_code=code,
            )
        if code == _ERR_NO_CREDENTIALS:
            return KeyNotFound(
                f"{what}: the credential is not on this authenticator "
                "(another authenticator, or it was reset)", native_code=code,
            )
        if code == _ERR_INVALID_CBOR:
            return BackendError(f"{what}: the authenticator could not parse the request",
                                native_code=code)
        return BackendError(f"{what} failed on the authenticator (CTAP 0x{code:02X})",
                            native_code=code)

    def _uv_retries(self) -> int | None:
        from fido2.ctap2.pin import ClientPin

        try:
            return int(ClientPin(self._ctap, self._protocol).get_uv_retries())
        except Exception:  # best effort: the message just lacks the count
            return None

    def _pin_retries(self) -> int | None:
        from fido2.ctap2.pin import ClientPin

        try:
            return int(ClientPin(self._ctap, self._protocol).get_pin_retries()[0])
        except Exception:  # best effort
            return None

    # --- user verification ----------------------------------------------------------

    def _verify_user(
        self,
        permission: int,
        rp_id: str,
        auth: Authorization,
        event: Any,
        on_keepalive: Callable[[int], None],
    ) -> _Verified:
        """Built-in UV (a pinUvAuthToken for ``permission`` on ``rp_id``); the PIN
        instead only when the configuration allows it and UV is blocked or not set up."""
        from fido2.ctap import CtapError
        from fido2.ctap2.pin import ClientPin

        if self._protocol is None:
            raise MechanismNotSupported("a PIN/UV auth protocol")
        proto = self._protocol
        uv_ready = self._options.get("uv") is True
        use_pin = self._cfg.allow_pin_fallback and auth.pin is not None
        if not (uv_ready or use_pin):
            if self._cfg.allow_pin_fallback:
                raise PinRequired("built-in UV is not set up: the authenticator PIN is needed")
            raise UserVerificationFailed(
                "no fingerprint or face is enrolled on the authenticator "
                "(PIN fallback is off: allow_pin_fallback)"
            )
        consent = auth.interaction.request_uv if auth.interaction is not None else None
        if uv_ready and consent is not None and not consent(auth.prompt or _DEFAULT_PROMPT):
            raise Cancelled("user verification declined")
        agreement = self._ctap.client_pin(
            proto.VERSION, ClientPin.CMD.GET_KEY_AGREEMENT, event=event
        )
        key_agreement, shared = proto.encapsulate(agreement[ClientPin.RESULT.KEY_AGREEMENT])
        if uv_ready:
            if self._options.get("pinUvAuthToken") is not True:
                return _Verified(proto, key_agreement, shared, None)  # CTAP 2.0: uv option
            try:
                response = self._ctap.client_pin(
                    proto.VERSION,
                    ClientPin.CMD.GET_TOKEN_USING_UV,
                    key_agreement=key_agreement,
                    permissions=permission,
                    permissions_rpid=rp_id,
                    event=event,
                    on_keepalive=on_keepalive,
                )
            except CtapError as e:
                if not (use_pin and e.code in (_ERR_UV_BLOCKED, _ERR_NOT_ALLOWED)):
                    raise
            else:
                token = proto.validate_token(
                    proto.decrypt(shared, response[ClientPin.RESULT.PIN_UV_TOKEN])
                )
                return _Verified(proto, key_agreement, shared, token)
        assert auth.pin is not None
        pin_hash = hashlib.sha256(auth.pin.encode()).digest()[:16]
        response = self._ctap.client_pin(
            proto.VERSION,
            ClientPin.CMD.GET_TOKEN_USING_PIN,
            key_agreement=key_agreement,
            pin_hash_enc=proto.encrypt(shared, pin_hash),
            permissions=permission,
            permissions_rpid=rp_id,
            event=event,
        )
        token = proto.validate_token(proto.decrypt(shared, response[ClientPin.RESULT.PIN_UV_TOKEN]))
        return _Verified(proto, key_agreement, shared, token)

    # --- credentials -------------------------------------------------------------

    def _check_extensions(self) -> None:
        missing = {"hmac-secret", "credProtect"} - set(self._info.extensions)
        if missing:
            raise MechanismNotSupported(f"the FIDO2 extension(s) {', '.join(sorted(missing))}")
        if not any(a.get("alg") == _ES256 for a in self._info.algorithms or [{"alg": _ES256}]):
            raise MechanismNotSupported("ES256 credentials")

    def _make_credential(
        self, label: str, cdh: bytes, auth: Authorization
    ) -> tuple[Any, bytes]:
        """makeCredential under UV: ES256, hmac-secret, credProtect 3, not resident.
        Returns the attestation response and the credential's SEC1 public point."""
        self._check_extensions()
        rp_id = self._cfg.rp_id

        def make(event: Any, on_keepalive: Callable[[int], None]) -> Any:
            verified = self._verify_user(_PERM_MC, rp_id, auth, event, on_keepalive)
            token = verified.token
            return self._ctap.make_credential(
                cdh,
                {"id": rp_id, "name": "hsm-auth"},
                {"id": secrets.token_bytes(16), "name": label[:64], "displayName": label[:64]},
                [{"type": "public-key", "alg": _ES256}],
                extensions={"hmac-secret": True, "credProtect": 3},
                options={"rk": False} if token is not None else {"rk": False, "uv": True},
                pin_uv_param=verified.protocol.authenticate(token, cdh) if token else None,
                pin_uv_protocol=verified.protocol.VERSION if token else None,
                event=event,
                on_keepalive=on_keepalive,
            )

        response = self._run("user verification for a new credential", auth, make)
        try:
            data = response.auth_data
            cred = data.credential_data
            ok = cred is not None and data.rp_id_hash == hashlib.sha256(rp_id.encode()).digest()
            flags = int(data.flags)
            cose = dict(cred.public_key) if cred is not None else {}
            point = b"\x04" + cose[-2] + cose[-3]
            ec.EllipticCurvePublicKey.from_encoded_point(ecutil.CURVE, point)
            protect = (data.extensions or {}).get("credProtect")
        except _MALFORMED as e:
            raise BackendError("makeCredential: the authenticator sent a malformed credential",
                               native_code=type(e).__name__) from e
        if not ok or cose.get(3) != _ES256 or cose.get(-1) != 1:
            raise BackendError("makeCredential: the authenticator made no ES256 credential")
        if not flags & _FLAG_UV:
            raise UserVerificationFailed("the authenticator made the credential without UV")
        if protect not in (2, 3):
            raise MechanismNotSupported("credProtect (the credential came back unprotected)")
        return response, point

    def _new_credential(
        self, label: str, roles: tuple[KeyKind, ...], auth: Authorization,
        *, cdh: bytes | None = None, method: Method | None = None,
    ) -> tuple[_Credential, Any]:
        response, point = self._make_credential(
            label, cdh if cdh is not None else secrets.token_bytes(32), auth
        )
        data = response.auth_data
        record = _Credential(
            credential_id=bytes(data.credential_data.credential_id),
            rp_id=self._cfg.rp_id,
            label=label,
            public=point,
            last_sign_count=int(data.counter),
            roles=tuple(r.value for r in roles),
            aaguid=bytes(data.credential_data.aaguid),
            method=method.value if method is not None else None,
            atc=0,
        )
        with self._file.locked():
            credentials = self._file.load()
            credentials[record.key] = record
            self._file.save(credentials)
        return record, response

    def _uri(self, record: _Credential, kind: KeyKind) -> str:
        return format_attr_uri(
            "fido2", {"rp": record.rp_id, "id": record.key, "type": kind.value}
        )

    def _lookup(self, uri: str, kind: KeyKind | None = None) -> _Credential:
        path, _query = parse_attr_uri(uri, "fido2")
        ident = path.get("id")
        if ident is None:
            raise InvalidInput("a fido2: URI needs an id= attribute")
        key = _b64url(_unb64url(ident))
        typ = path.get("type")
        if typ is not None and typ not in {k.value for k in KeyKind}:
            raise InvalidInput(f"unknown type {typ[:20]!r} in a fido2: URI")
        record = self._file.load().get(key)
        if record is None:
            raise KeyNotFound("no such FIDO2 credential is enrolled on this host")
        if path.get("rp", record.rp_id) != record.rp_id:
            raise KeyNotFound("the fido2: URI names another relying party")
        if kind is not None and kind.value not in record.roles:
            raise InvalidInput(f"that FIDO2 credential is not used as a {kind.value} key")
        return record

    # --- assertions ----------------------------------------------------------------

    def _assert(
        self,
        record: _Credential,
        auth: Authorization,
        *,
        with_hmac: bool,
        cdh: bytes | None = None,
        what: str = "user verification",
    ) -> _Assertion:
        """One getAssertion under UV (with hmac-secret if asked) on ``record``'s
        credential; checks rpId, flags, the signature and the credential id."""
        cdh = cdh if cdh is not None else secrets.token_bytes(32)
        rp_id = record.rp_id

        def get(event: Any, on_keepalive: Callable[[int], None]) -> _Assertion:
            verified = self._verify_user(_PERM_GA, rp_id, auth, event, on_keepalive)
            proto, token = verified.protocol, verified.token
            extensions = None
            if with_hmac:
                salt_enc = proto.encrypt(verified.shared, OTP_SALT)
                extensions = {
                    "hmac-secret": {
                        1: dict(verified.key_agreement),
                        2: salt_enc,
                        3: proto.authenticate(verified.shared, salt_enc),
                        4: proto.VERSION,
                    }
                }
            response = self._ctap.get_assertion(
                rp_id,
                cdh,
                [{"type": "public-key", "id": record.credential_id}],
                extensions=extensions,
                options=None if token is not None else {"uv": True},
                pin_uv_param=proto.authenticate(token, cdh) if token else None,
                pin_uv_protocol=proto.VERSION if token else None,
                event=event,
                on_keepalive=on_keepalive,
            )
            data = response.auth_data
            output = (data.extensions or {}).get("hmac-secret") if with_hmac else None
            return _Assertion(
                auth_data=bytes(data),
                signature=bytes(response.signature),
                sign_count=int(data.counter),
                hmac_output=output if isinstance(output, bytes) else None,
                protocol_version=int(proto.VERSION),
                shared=bytes(verified.shared),
            )

        result = self._run(what, auth, get)
        data = result.auth_data
        if data[:32] != hashlib.sha256(rp_id.encode()).digest():
            raise BackendError("the authenticator answered for another relying party")
        if not data[32] & _FLAG_UV:
            raise UserVerificationFailed("the authenticator did not verify the user")
        try:
            record.public_key.verify(result.signature, data + cdh, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise BackendError(
                "the assertion does not verify with the enrolled credential key"
            ) from None
        if with_hmac and result.hmac_output is None:
            raise BackendError("the authenticator returned no hmac-secret output")
        return result

    def _advance(self, record: _Credential, seen: int, *, count: bool) -> _Credential:
        """Refuse a signature counter that does not increase; record it durably, with
        the credential's ATC + 1 when ``count`` (an OTP or a counter increment)."""
        credentials = self._file.load()
        current = credentials.get(record.key)
        if current is None:
            raise KeyNotFound("the FIDO2 credential was deleted meanwhile")
        if seen == 0:
            raise MechanismNotSupported(
                "a signature counter (this authenticator reports 0: it keeps none)"
            )
        if seen <= current.last_sign_count:
            credentials[record.key] = replace(current, suspect=True)
            self._file.save(credentials)  # latched: a clone must not get through by retrying
            raise CounterError(
                f"the authenticator's signature counter went from {current.last_sign_count} to "
                f"{seen} (it must increase): possibly a cloned authenticator; this "
                "credential is refused from now on (re-enroll the method)",
                native_code="counter-not-increasing",
            )
        updated = replace(current, last_sign_count=seen, atc=current.atc + int(count))
        credentials[record.key] = updated
        self._file.save(credentials)  # durable before any MAC exists
        return updated

    def _counted_key(
        self, uri: str, auth: Authorization, kind: KeyKind, *, with_hmac: bool,
        count: bool, cdh: bytes | None = None, limit: int | None = None,
    ) -> tuple[_Credential, _Assertion, bytearray | None]:
        """One assertion on the credential of ``uri``, under the state file's lock:
        the clone check, then the new signature counter (and, when ``count``, the
        ATC + 1) written durably; returns the updated record, the assertion and
        the decrypted hmac-secret output (when ``with_hmac``). An ATC at ``limit``
        is refused (``LoginRequired``) before the assertion."""
        with self._file.locked():
            record = self._lookup(uri, kind)
            check_counter_limit(record.atc, limit)
            if record.suspect:
                raise CounterError(
                    "this FIDO2 credential is refused: its signature counter once failed to "
                    "increase (possibly a cloned authenticator); re-enroll the method",
                    native_code="credential-suspect",
                )
            result = self._assert(record, auth, with_hmac=with_hmac, cdh=cdh)
            key = None
            if with_hmac:
                assert result.hmac_output is not None
                key = _decrypt_into(result.protocol_version, result.shared, result.hmac_output)
            try:
                record = self._advance(record, result.sign_count, count=count)
            except BaseException:
                if key is not None:
                    _wipe(key)
                raise
        return record, result, key

    # --- KeyStore: keys -------------------------------------------------------------

    def generate_key(self, label: str, kind: KeyKind, auth: Authorization) -> str:
        if kind is not KeyKind.SIGNING:
            raise MechanismNotSupported(
                f"{kind.value} keys (a FIDO2 authenticator makes ES256 credentials only)"
            )
        record, _ = self._new_credential(label, (KeyKind.SIGNING, KeyKind.COUNTER), auth)
        return self._uri(record, KeyKind.SIGNING)

    def list_keys(self, auth: Authorization) -> list[KeyInfo]:
        keys = []
        for record in self._file.load().values():
            for role in record.roles:
                kind = KeyKind(role)
                keys.append(KeyInfo(self._uri(record, kind), kind, record.label))
        return keys

    def delete_key(self, uri: str, auth: Authorization) -> None:
        """Forget the credential on this host (all of its URIs). A non-resident
        credential keeps nothing on the authenticator that could be deleted."""
        with self._file.locked():
            try:
                record = self._lookup(uri)
            except KeyNotFound:
                return
            credentials = self._file.load()
            credentials.pop(record.key, None)
            self._file.save(credentials)

    def public_key(self, uri: str, auth: Authorization) -> ec.EllipticCurvePublicKey:
        return self._lookup(uri).public_key

    def sign(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        raise MechanismNotSupported(
            "signing arbitrary data (a FIDO2 credential signs only its own assertions)"
        )

    def login_assertion(
        self, uri: str, client_data_hash: bytes, auth: Authorization
    ) -> tuple[bytes, bytes]:
        """A getAssertion under UV over ``client_data_hash`` (workstation login):
        returns (authenticatorData, DER signature). The signature counter in it is
        checked against and recorded as the last one seen; the ATC does not move."""
        if len(client_data_hash) != 32:
            raise InvalidInput("a client data hash has 32 bytes")
        _, result, _ = self._counted_key(
            uri, auth, KeyKind.SIGNING, with_hmac=False, count=False, cdh=client_data_hash
        )
        return result.auth_data, result.signature

    # --- KeyStore: OTP key ------------------------------------------------------------

    def derive_otp_key(
        self,
        label: str,
        agreement_key: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> str:
        raise MechanismNotSupported(
            "ECDH key derivation (FIDO2 derives the OTP key through hmac-secret at enrollment)"
        )

    def hmac(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        """HMAC-SHA256 with the OTP key (one assertion: clone check; the ATC does not move)."""
        _, _, key = self._counted_key(uri, auth, KeyKind.OTP, with_hmac=True, count=False)
        assert key is not None
        try:
            return _hmac.new(key, data, hashlib.sha256).digest()
        finally:
            _wipe(key)

    # --- KeyStore: counter ----------------------------------------------------------

    def create_counter(self, label: str, auth: Authorization) -> str:
        record, _ = self._new_credential(label, (KeyKind.COUNTER,), auth)
        return self._uri(record, KeyKind.COUNTER)

    def counter_value(self, uri: str, auth: Authorization) -> int:
        """The credential's ATC as the host keeps it (no device call)."""
        return self._lookup(uri, KeyKind.COUNTER).atc

    def counter_increment(self, uri: str, auth: Authorization) -> int:
        """One assertion under UV (the clone check), then the ATC + 1, durably."""
        record, _, _ = self._counted_key(
            uri, auth, KeyKind.COUNTER, with_hmac=False, count=True
        )
        return record.atc

    def counted_hmac(
        self,
        otp_key: str,
        counter: str,
        message_for: Callable[[int], bytes],
        auth: Authorization,
        *,
        limit: int | None = None,
    ) -> tuple[int, bytes]:
        """ONE assertion gives the OTP key and passes the clone check; the ATC + 1
        and the signature counter are durable before the MAC over the message for
        the new ATC is computed, and the key is wiped afterwards. Past ``limit``
        it refuses before asking for user verification."""
        if self._lookup(otp_key, KeyKind.OTP).key != self._lookup(counter, KeyKind.COUNTER).key:
            raise InvalidInput("the OTP key and the counter must be the same FIDO2 credential")
        record, _, key = self._counted_key(
            otp_key, auth, KeyKind.OTP, with_hmac=True, count=True, limit=limit
        )
        assert key is not None
        try:
            return record.atc, _hmac.new(key, message_for(record.atc), hashlib.sha256).digest()
        finally:
            _wipe(key)

    # --- KeyStore: PIN ----------------------------------------------------------------

    def pin_status(self) -> PinStatus:
        if self._options.get("clientPin") is not True:
            return PinStatus(enforced=False)
        left = self._pin_retries()
        return PinStatus(
            enforced=True,
            retries_left=left,
            final_try=left == 1,
            locked=left == 0,
        )

    # --- enrollment ---------------------------------------------------------------------

    def enroll(
        self,
        method: Method,
        label: str,
        verifier_agreement_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
        *,
        binding: bytes = b"",
        confirm: ConfirmationMessage | None = None,
    ) -> Enrollment:
        """makeCredential + one hmac-secret assertion, both under UV and over a client
        data hash that binds the enrollment (offer, user, method) and the wrapped OTP key's
        ephemeral point; the OTP key goes to the verifier wrapped, MACs the key
        confirmation (``confirm``: the transcript is complete once the key is wrapped),
        then is wiped."""
        self.require_method(method)
        if not isinstance(verifier_agreement_public.curve, ec.SECP256R1):
            raise InvalidInput("the verifier's agreement key must be a P-256 key")
        ephemeral = ec.generate_private_key(ecutil.CURVE)
        cdh = client_data_hash(binding, ecutil.encode_point(ephemeral.public_key()))
        roles = (KeyKind.SIGNING, KeyKind.OTP, KeyKind.COUNTER)
        record, made = self._new_credential(label, roles, auth, cdh=cdh, method=method)
        otp_uri = self._uri(record, KeyKind.OTP)
        try:
            record, result, key = self._counted_key(
                otp_uri, auth, KeyKind.OTP, with_hmac=True, count=False, cdh=cdh
            )
            assert key is not None
            try:
                wrapped = key_transport.wrap(key, verifier_agreement_public, ephemeral)
                signing_public = ecutil.encode_point(record.public_key)
                confirmation = (
                    None
                    if confirm is None
                    else _hmac.digest(bytes(key), confirm(signing_public, wrapped), hashlib.sha256)
                )
            finally:
                _wipe(key)
            attestation = encode_enrollment_attestation(
                str(made.fmt),
                bytes(made.auth_data),
                dict(made.att_stmt),
                result.auth_data,
                result.signature,
            )
            return Enrollment(
                signing_key=self._uri(record, KeyKind.SIGNING),
                signing_public=record.public_key,
                otp_key=otp_uri,
                counter=self._uri(record, KeyKind.COUNTER),
                initial_atc=record.atc,  # 0: the ATC is the host's, per credential
                otp_key_for_verifier=wrapped,
                attestation=attestation,
                confirmation=confirmation,
            )
        except BaseException:  # incl. KeyboardInterrupt: forget the new credential
            self.roll_back([otp_uri], auth)
            raise
