"""PKCS#11 backend (smartcards, USB tokens, HSMs, SoftHSM) through python-pkcs11.

Configuration (``[methods.<m>]`` settings):

* ``uri`` — an RFC 7512 URI naming the token, e.g.
  ``pkcs11:token=alice?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/home/a/.pin``.
  Without ``module-path`` the module is ``$HSM_AUTH_PKCS11_MODULE``, else
  ``/usr/lib/softhsm/libsofthsm2.so``. ``pin-source`` (``file:`` only) is read
  at open; the file must not be accessible by group or others. ``pin-value``
  is refused: a PIN does not belong in a config file.
* ``allow_unenforced_pin`` — a token that does not limit PIN retries itself
  (SoftHSM) serves the ``pin`` method only when this is true.

Keys. Signing and agreement keys are P-256 key pairs generated in the token
(private half ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``, not
``CKA_EXTRACTABLE``), both halves with the given label and one random 16-byte
``CKA_ID``. The OTP key is ``CKM_ECDH1_DERIVE`` (KDF null) of the agreement
key with the verifier's public point into a 32-byte ``CKK_GENERIC_SECRET``
token object, sensitive, not extractable, not modifiable and not derivable,
usable only for ``CKM_SHA256_HMAC``. At enrollment
(:meth:`Pkcs11KeyStore.agree_otp_key`) the agreement key pair is a session
object destroyed right after the derive, so no token key can derive it again.
Signatures are ``CKM_ECDSA`` over a SHA-256 digest made on the host (SoftHSM
has no ``CKM_ECDSA_SHA256``), returned DER-encoded.

The application transaction counter (ATC). PKCS#11 has no counter object
that applications can advance, and SoftHSM rewrites an object's file in place
(a kill during the write leaves it empty and the object is gone), so each
enrollment's ATC is **two** ``CKO_DATA`` token objects, private (readable only
after login), written alternately:

* ``CKA_APPLICATION`` = ``"hsm-auth-atc"`` marks them;
* ``CKA_VALUE`` = a random 16-byte id, ``0x00``, the slot (``0`` or ``1``),
  then the UTF-8 label; set once at creation (SoftHSM makes ``CKA_VALUE``
  read-only afterwards). The id is the counter's identity, so both objects are
  one counter URI: ``pkcs11:token=...;serial=...;type=data;x-atc-id=<32 hex>``;
* ``CKA_LABEL`` = ``<value>:<check>``, the value in decimal and as check the
  first 16 hex digits of SHA-256 over a tag, the id, the slot and the value
  (8 bytes): a torn, garbled or misplaced label does not check.

The counter's value is the highest valid value of its objects. Advancing writes
value + 1 (``C_SetAttributeValue``, a durable write) into the object that does
NOT hold the current value, recreating it if it vanished, and returns the new
value only after that call returned, so an OTP is never computed for a value
that is not stored. A torn write can therefore lose only the value being
written, never move the counter back or make it vanish. Since every writer
writes the slot not holding the highest value, a store that finds the slot it
would write next unchanged since it last saw it knows nobody advanced the
counter meanwhile: an OTP costs one label read, one label write and the HMAC;
anything else makes it read all the counter's objects again. Counters of
earlier versions (one object, ``CKA_VALUE`` = id + label, a bare decimal in
``CKA_LABEL``) are read as slot 0, whose bare value counts only while no
checked value exists; the first advance adds slot 1, the second rewrites the
old object in the new format. Two processes advancing the same counter at the
same instant are not serialised by the token: the authenticator holds a lock.

Sessions. A store opens one R/W session and logs the user in once (PIN from
``Authorization.pin``, else ``pin-source``); the login and the object handles
found by the first lookup are kept for the store's life, so an OTP costs
one attribute read, one attribute write and one HMAC. PKCS#11 login state
is per process and token, so stores on the same token in one process share
it: the first login is checked by the token, later ones (and later PINs given
to a logged-in store) are compared with a keyed hash of the PIN that the
token accepted. A ``CKR_USER_ALREADY_LOGGED_IN`` answer (another session of
the process, not one of our stores, is logged in) checked nothing and never
accepts a PIN: the store logs the application out and in again, so that the
token checks the PIN in that very call. Login goes through ``C_Login`` directly (ctypes) so that a
wrong PIN never leaks a session (python-pkcs11 0.10 does) and the native
return code is kept. SoftHSM rewrites its ``token.object`` in place at every
``C_Login``: a kill during a login leaves it empty and the whole token is lost,
which no client can prevent; token discovery skips such a token so that the
others still work.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac as _hmac
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NoReturn
from urllib.parse import unquote

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsm_auth.errors import (
    AuthorizationError,
    BackendError,
    BackendUnavailable,
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
)
from hsm_auth.files import decode_pin, read_secret_file
from hsm_auth.keystore import (
    Authorization,
    Capability,
    KeyInfo,
    KeyKind,
    KeyStore,
    PinStatus,
    Settings,
    check_counter_limit,
)
from hsm_auth.methods import Method
from hsm_auth.uri import Pkcs11Uri

__all__ = ["ATC_APPLICATION", "DEFAULT_MODULE", "MODULE_ENV", "Pkcs11KeyStore"]

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
MODULE_ENV = "HSM_AUTH_PKCS11_MODULE"
ATC_APPLICATION = "hsm-auth-atc"
ATC_URI_ATTR = "x-atc-id"
_ID_LEN = 16
_COUNTER_MAX = 2**64 - 1
# DER of the named-curve OID 1.2.840.10045.3.1.7 (P-256), the CKA_EC_PARAMS value.
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")

# Token flags (PKCS#11 v2.40 CK_TOKEN_INFO.flags).
_CKF_LOGIN_REQUIRED = 0x4
_CKF_TOKEN_INITIALIZED = 0x400
_CKF_USER_PIN_COUNT_LOW = 0x10000
_CKF_USER_PIN_FINAL_TRY = 0x20000
_CKF_USER_PIN_LOCKED = 0x40000

# Return codes this module looks at.
_CKR_OK = 0x0
_CKR_PIN_INCORRECT = 0xA0
_CKR_PIN_INVALID = 0xA1
_CKR_PIN_LEN_RANGE = 0xA2
_CKR_PIN_EXPIRED = 0xA3
_CKR_PIN_LOCKED = 0xA4
_CKR_USER_ALREADY_LOGGED_IN = 0x100
_CKR_USER_NOT_LOGGED_IN = 0x101
_CKU_USER = 1

# The mechanisms this backend uses (CKM_* values, PKCS#11 v2.40).
_MECHANISM_IDS = {
    "EC_KEY_PAIR_GEN": 0x1040,
    "ECDSA": 0x1041,
    "ECDH1_DERIVE": 0x1050,
    "SHA256_HMAC": 0x251,
}

# python-pkcs11 raises one class per CK_RV but drops the number: put it back.
_CKR_BY_EXCEPTION: dict[str, tuple[str, int]] = {
    "AnotherUserAlreadyLoggedIn": ("CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x104),
    "ArgumentsBad": ("CKR_ARGUMENTS_BAD", 0x7),
    "AttributeReadOnly": ("CKR_ATTRIBUTE_READ_ONLY", 0x10),
    "AttributeSensitive": ("CKR_ATTRIBUTE_SENSITIVE", 0x11),
    "AttributeTypeInvalid": ("CKR_ATTRIBUTE_TYPE_INVALID", 0x12),
    "AttributeValueInvalid": ("CKR_ATTRIBUTE_VALUE_INVALID", 0x13),
    "DataInvalid": ("CKR_DATA_INVALID", 0x20),
    "DataLenRange": ("CKR_DATA_LEN_RANGE", 0x21),
    "DeviceError": ("CKR_DEVICE_ERROR", 0x30),
    "DeviceMemory": ("CKR_DEVICE_MEMORY", 0x31),
    "DeviceRemoved": ("CKR_DEVICE_REMOVED", 0x32),
    "DomainParamsInvalid": ("CKR_DOMAIN_PARAMS_INVALID", 0x130),
    "FunctionCancelled": ("CKR_FUNCTION_CANCELED", 0x50),
    "FunctionFailed": ("CKR_FUNCTION_FAILED", 0x6),
    "FunctionNotSupported": ("CKR_FUNCTION_NOT_SUPPORTED", 0x54),
    "FunctionRejected": ("CKR_FUNCTION_REJECTED", 0x200),
    "GeneralError": ("CKR_GENERAL_ERROR", 0x5),
    "HostMemory": ("CKR_HOST_MEMORY", 0x2),
    "KeyHandleInvalid": ("CKR_KEY_HANDLE_INVALID", 0x60),
    "KeySizeRange": ("CKR_KEY_SIZE_RANGE", 0x62),
    "KeyTypeInconsistent": ("CKR_KEY_TYPE_INCONSISTENT", 0x63),
    "KeyUnextractable": ("CKR_KEY_UNEXTRACTABLE", 0x6A),
    "MechanismInvalid": ("CKR_MECHANISM_INVALID", 0x70),
    "MechanismParamInvalid": ("CKR_MECHANISM_PARAM_INVALID", 0x71),
    "ObjectHandleInvalid": ("CKR_OBJECT_HANDLE_INVALID", 0x82),
    "OperationActive": ("CKR_OPERATION_ACTIVE", 0x90),
    "OperationNotInitialized": ("CKR_OPERATION_NOT_INITIALIZED", 0x91),
    "PinExpired": ("CKR_PIN_EXPIRED", _CKR_PIN_EXPIRED),
    "PinIncorrect": ("CKR_PIN_INCORRECT", _CKR_PIN_INCORRECT),
    "PinInvalid": ("CKR_PIN_INVALID", _CKR_PIN_INVALID),
    "PinLenRange": ("CKR_PIN_LEN_RANGE", _CKR_PIN_LEN_RANGE),
    "PinLocked": ("CKR_PIN_LOCKED", _CKR_PIN_LOCKED),
    "PublicKeyInvalid": ("CKR_PUBLIC_KEY_INVALID", 0x1B9),
    "SessionClosed": ("CKR_SESSION_CLOSED", 0xB0),
    "SessionCount": ("CKR_SESSION_COUNT", 0xB1),
    "SessionHandleInvalid": ("CKR_SESSION_HANDLE_INVALID", 0xB3),
    "SessionReadOnly": ("CKR_SESSION_READ_ONLY", 0xB5),
    "SignatureInvalid": ("CKR_SIGNATURE_INVALID", 0xC0),
    "SlotIDInvalid": ("CKR_SLOT_ID_INVALID", 0x3),
    "TemplateIncomplete": ("CKR_TEMPLATE_INCOMPLETE", 0xD0),
    "TemplateInconsistent": ("CKR_TEMPLATE_INCONSISTENT", 0xD1),
    "TokenNotPresent": ("CKR_TOKEN_NOT_PRESENT", 0xE0),
    "TokenNotRecognised": ("CKR_TOKEN_NOT_RECOGNIZED", 0xE1),
    "TokenWriteProtected": ("CKR_TOKEN_WRITE_PROTECTED", 0xE2),
    "UserAlreadyLoggedIn": ("CKR_USER_ALREADY_LOGGED_IN", _CKR_USER_ALREADY_LOGGED_IN),
    "UserNotLoggedIn": ("CKR_USER_NOT_LOGGED_IN", 0x101),
    "UserPinNotInitialized": ("CKR_USER_PIN_NOT_INITIALIZED", 0x102),
}
_CKR_NAMES = {code: name for name, code in _CKR_BY_EXCEPTION.values()} | {
    0x68: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x101: "CKR_USER_NOT_LOGGED_IN",
}
_KEY_GONE = {"ObjectHandleInvalid", "KeyHandleInvalid", "NoSuchKey"}
_TOKEN_GONE = {
    "TokenNotPresent", "DeviceRemoved", "SlotIDInvalid", "NoSuchToken", "TokenNotRecognised",
}
_NO_MECHANISM = {"MechanismInvalid", "MechanismParamInvalid", "FunctionNotSupported"}


# --- the one converter from native errors to hsm_auth.errors ------------------


def _code_of(exc: BaseException) -> int | str:
    """The CK_RV behind a python-pkcs11 exception, else its class name."""
    name = type(exc).__name__
    if name in _CKR_BY_EXCEPTION:
        return _CKR_BY_EXCEPTION[name][1]
    found = re.search(r"0x([0-9a-fA-F]+)", str(exc))  # "Unmapped error code 0x68"
    return int(found.group(1), 16) if found else name


def _describe(code: int | str) -> str:
    if isinstance(code, int):
        return _CKR_NAMES.get(code, f"CK_RV 0x{code:X}")
    return code


def convert_error(exc: BaseException, action: str, *, mechanism: str | None = None) -> HsmAuthError:
    """Map a python-pkcs11 exception (or a raw CK_RV wrapped by :func:`_rv_error`) to
    the hsm_auth error family, keeping the native code. Messages hold no secret."""
    if isinstance(exc, HsmAuthError):
        return exc
    name = type(exc).__name__
    code = _code_of(exc)
    what = _describe(code)
    if name in ("PinIncorrect", "PinInvalid", "PinLenRange"):
        return PinInvalid(native_code=code)
    if name == "PinLocked":
        return PinLocked("the token's user PIN is locked", native_code=code)
    if name == "PinExpired":
        return AuthorizationError(
            "the token's user PIN has expired: change it first", native_code=code
        )
    if name == "UserNotLoggedIn" or code == 0x101:
        return PinRequired("the token needs its user PIN for this operation")
    if name in _NO_MECHANISM and mechanism is not None:
        return MechanismNotSupported(mechanism, native_code=code)
    if name in _KEY_GONE:
        return KeyNotFound(f"{action}: the object is no longer in the token ({what})",
                           native_code=code)
    if name in _TOKEN_GONE:
        return TokenNotFound(f"{action}: the token is gone ({what})", native_code=code)
    return BackendError(f"PKCS#11 {action} failed: {what}", native_code=code)


def retry_status(flags: int) -> RetryStatus:
    """What a token's ``CK_TOKEN_INFO`` flags say about further user-PIN tries, the
    only count PKCS#11 gives: ``CKF_USER_PIN_LOCKED`` → none left, locked;
    ``CKF_USER_PIN_FINAL_TRY`` → 1 left; else unknown (``CKF_USER_PIN_COUNT_LOW``
    says some tries failed, not how many remain). The one reading of these flags:
    every authorization error of this backend carries it, and :meth:`pin_status`."""
    locked = bool(flags & _CKF_USER_PIN_LOCKED)
    final = bool(flags & _CKF_USER_PIN_FINAL_TRY)
    return RetryStatus(retries_left=0 if locked else (1 if final else None), locked=locked)


class _RvError(Exception):
    """A raw CK_RV from a ctypes call, shaped like a python-pkcs11 exception."""

    def __init__(self, rv: int) -> None:
        super().__init__(f"0x{rv:x}")
        self.rv = rv


# --- process-wide state: PKCS#11 login is per application and token -----------


class _FunctionList(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_Logout (PKCS#11 v2.x layout, Unix packing).
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (n, ctypes.c_void_p)
        for n in (
            "Initialize", "Finalize", "GetInfo", "GetFunctionList", "GetSlotList", "GetSlotInfo",
            "GetTokenInfo", "GetMechanismList", "GetMechanismInfo", "InitToken", "InitPIN",
            "SetPIN", "OpenSession", "CloseSession", "CloseAllSessions", "GetSessionInfo",
            "GetOperationState", "SetOperationState", "Login", "Logout",
        )
    ]


class _Native:
    """``C_Login`` / ``C_Logout`` of a module, called directly: python-pkcs11 only logs
    in while opening a session and leaks that session when the PIN is wrong."""

    def __init__(self, module: str) -> None:
        dll = ctypes.CDLL(module)  # same handle as python-pkcs11's dlopen of this path
        flist = ctypes.POINTER(_FunctionList)()
        rv = dll.C_GetFunctionList(ctypes.byref(flist))
        if rv != _CKR_OK or not flist:
            raise BackendUnavailable(f"C_GetFunctionList failed in {module}", native_code=rv)
        ulong = ctypes.c_ulong
        login_t = ctypes.CFUNCTYPE(ulong, ulong, ulong, ctypes.c_char_p, ulong)
        logout_t = ctypes.CFUNCTYPE(ulong, ulong)
        self._login = login_t(flist.contents.Login)
        self._logout = logout_t(flist.contents.Logout)

    def login(self, session: int, pin: str) -> int:
        data = pin.encode("utf-8")
        return int(self._login(session, _CKU_USER, data, len(data)))

    def logout(self, session: int) -> int:
        return int(self._logout(session))


@dataclass
class _Login:
    count: int
    pin_tag: bytes
    owned: bool  # we called C_Login, so the last store to close calls C_Logout


_LOCK = threading.RLock()
_PIN_KEY = secrets.token_bytes(32)  # keys the in-memory PIN tags; never leaves the process
_NATIVE: dict[str, _Native] = {}
_SESSIONS: dict[str, int] = {}  # module -> sessions our stores hold open
_LOGINS: dict[tuple[str, int], _Login] = {}  # (module, slot id) -> shared login


def _pin_tag(pin: str) -> bytes:
    return _hmac.new(_PIN_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _native(module: str) -> _Native:
    with _LOCK:
        if module not in _NATIVE:
            _NATIVE[module] = _Native(module)
        return _NATIVE[module]


# --- configuration ------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    uri: Pkcs11Uri
    module: str
    allow_unenforced_pin: bool


def _config(settings: Settings) -> _Config:
    raw = settings.get("uri", "pkcs11:")
    if not isinstance(raw, str):
        raise ConfigError("pkcs11 setting 'uri' must be a pkcs11: URI string")
    try:
        uri = Pkcs11Uri.parse(raw)
    except InvalidInput as e:
        raise ConfigError(f"pkcs11 setting 'uri': {e}") from None
    if uri.pin_value is not None:
        raise ConfigError("pkcs11 uri: pin-value is refused; use pin-source=file:/path (mode 0600)")
    if uri.module_name is not None and uri.module_path is None:
        raise ConfigError("pkcs11 uri: module-name is not supported; give module-path")
    allow = settings.get("allow_unenforced_pin", False)
    if not isinstance(allow, bool):
        raise ConfigError("pkcs11 setting 'allow_unenforced_pin' must be true or false")
    module = uri.module_path or os.environ.get(MODULE_ENV) or DEFAULT_MODULE
    return _Config(uri, module, allow)


def _read_pin_source(source: str) -> str:
    """Read the PIN named by an RFC 7512 ``pin-source`` (``file:`` URIs only)."""
    if source.startswith("file://"):
        host, slash, rest = source[len("file://"):].partition("/")
        if host not in ("", "localhost") or not slash:
            raise ConfigError("pkcs11 uri: pin-source must be a local file: URI")
        path = "/" + unquote(rest)
    elif source.startswith("file:"):
        path = unquote(source[len("file:"):])
    else:
        raise ConfigError("pkcs11 uri: pin-source must be a file: URI")
    pin = decode_pin(read_secret_file(path), f"the PIN file {path}")
    if not pin:
        raise StateError(f"the PIN file {path} is empty")
    return pin

# --- token discovery ------------------------------------------------------------


def _import_pkcs11() -> Any:
    """``import pkcs11``, with its ``pkcs11.util`` helpers loaded on first use.

    python-pkcs11's package imports ``pkcs11.util.{dh,dsa,ec,rsa,x509}`` eagerly, and
    they import asn1crypto: about 19 of its 27 ms here, paid by every PAM login
    (README: bench/login.py). This backend uses none of them, so they
    are registered as :class:`importlib.util.LazyLoader` modules first: each loads
    when an attribute is used. Where the package's layout differs, or it is imported
    already, this is a plain import."""
    import sys

    if "pkcs11" not in sys.modules:
        with contextlib.suppress(Exception):  # an unexpected layout: the plain import
            _lazy_pkcs11_util(sys.modules)
    import pkcs11

    return pkcs11


def _lazy_pkcs11_util(modules: dict[str, Any]) -> None:
    import importlib.machinery
    import importlib.util

    top = importlib.util.find_spec("pkcs11")  # finds, does not run, the package
    if top is None or not top.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec("pkcs11.util",
                                                    list(top.submodule_search_locations))
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    util = importlib.util.module_from_spec(spec)
    lazy = {}
    for name in ("dh", "dsa", "ec", "rsa", "x509"):
        sub = importlib.machinery.PathFinder.find_spec(
            f"pkcs11.util.{name}", list(spec.submodule_search_locations))
        if sub is None or sub.loader is None:
            return
        sub.loader = importlib.util.LazyLoader(sub.loader)
        lazy[name] = (sub, importlib.util.module_from_spec(sub))
    spec.loader.exec_module(util)  # the package's own __init__: typing only
    modules["pkcs11.util"] = util
    for name, (sub, module) in lazy.items():
        modules[f"pkcs11.util.{name}"] = module
        assert sub.loader is not None
        sub.loader.exec_module(module)  # LazyLoader: runs it on first attribute use
        setattr(util, name, module)


def _load(module: str) -> tuple[Any, Any]:
    """(pkcs11 module, pkcs11.lib) or BackendUnavailable with the reason."""
    try:
        pkcs11 = _import_pkcs11()
    except ImportError:
        raise BackendUnavailable(
            "python-pkcs11 is not installed (pip install 'hsm-auth[pkcs11]')"
        ) from None
    if not os.path.isfile(module):
        raise BackendUnavailable(f"PKCS#11 module {module} not found")
    try:
        return pkcs11, pkcs11.lib(module)
    except Exception as e:  # any loader failure means "cannot run here"
        raise BackendUnavailable(
            f"PKCS#11 module {module} failed to load: {type(e).__name__}: {str(e)[:200]}"
        ) from e


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip(" \x00")
    return value.rstrip(" \x00")


def _token_matches(lib: Any, token: Any, uri: Pkcs11Uri) -> bool:
    slot = token.slot
    checks = (
        (uri.token, lambda: token.label),
        (uri.manufacturer, lambda: token.manufacturer_id),
        (uri.serial, lambda: token.serial),
        (uri.model, lambda: token.model),
        (uri.slot_description, lambda: slot.slot_description),
        (uri.slot_manufacturer, lambda: slot.manufacturer_id),
        (uri.library_manufacturer, lambda: lib.manufacturer_id),
        (uri.library_description, lambda: lib.library_description),
    )
    for wanted, get in checks:
        if wanted is not None and _text(get()) != wanted:  # type: ignore[no-untyped-call]
            return False
    if uri.slot_id is not None and slot.slot_id != uri.slot_id:
        return False
    if uri.library_version is not None:
        major, minor = lib.library_version
        wanted_major, _, wanted_minor = uri.library_version.partition(".")
        if int(wanted_major) != major or int(wanted_minor or 0) != minor:
            return False
    return True


def _matching_tokens(lib: Any, uri: Pkcs11Uri) -> list[Any]:
    import pkcs11

    found = []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except pkcs11.PKCS11Error:
            # One broken token (SoftHSM: a token.object emptied by a kill during
            # C_Login) must not hide the others.
            continue
        if int(token.flags) & _CKF_TOKEN_INITIALIZED and _token_matches(lib, token, uri):
            found.append(token)
    return found


def _token_uri(uri: Pkcs11Uri) -> str:
    return str(replace(uri, pin_source=None, pin_value=None, module_path=None, vendor_query=()))


def _find_token(p11: Any, lib: Any, cfg: _Config) -> Any:
    try:
        tokens = _matching_tokens(lib, cfg.uri)
        if not tokens:
            # python-pkcs11 caches the module: tokens created after it was loaded
            # appear only after C_Finalize + C_Initialize, which would also close
            # every session in this process. Do it only when we hold none.
            with _LOCK:
                if not _SESSIONS.get(cfg.module):
                    lib.reinitialize()
                    tokens = _matching_tokens(lib, cfg.uri)
    except p11.PKCS11Error as e:
        raise BackendUnavailable(
            f"PKCS#11 module {cfg.module} cannot list tokens: {_describe(_code_of(e))}",
            native_code=_code_of(e),
        ) from e
    if not tokens:
        raise TokenNotFound(f"no initialised token matches {_token_uri(cfg.uri)} in {cfg.module}")
    if len(tokens) > 1:
        raise ConfigError(
            f"{len(tokens)} tokens match {_token_uri(cfg.uri)}; name one with token= or serial="
        )
    return tokens[0]


def _is_enforced(token: Any) -> bool:
    """Whether the token limits PIN retries itself. SoftHSM never does (and never
    sets the retry flags); every other token is taken at its word."""
    return "softhsm" not in _text(token.manufacturer_id).lower()


def _public_from_point(value: bytes) -> ec.EllipticCurvePublicKey:
    """CKA_EC_POINT is a DER OCTET STRING around the X9.62 point (some modules omit it)."""
    point = value
    if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2:
        point = value[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise BackendError("the token holds a public key that is not a P-256 point") from None


# --- the ATC: two objects written alternately ----------------------------------

#: After the 16-byte id in CKA_VALUE: the two-object format (then the slot, the label).
#: Without it, CKA_VALUE is an older one-object counter (id + label), read as slot 0.
_ATC_SLOTTED = b"\x00"
_ATC_SLOTS = (0, 1)
_DECIMAL = re.compile(r"[0-9]{1,20}")
_ATC_LABEL = re.compile(r"([0-9]{1,20}):([0-9a-f]{16})")


@dataclass(frozen=True)
class _AtcMeta:
    """What an ATC object's CKA_VALUE says: set once at creation, never rewritten."""

    ident: bytes
    slot: int
    label: bytes  # the enrollment's label (UTF-8)
    legacy: bool  # made by the one-object scheme: its CKA_LABEL may be a bare decimal


@dataclass(frozen=True)
class _AtcObject:
    obj: Any
    meta: _AtcMeta


@dataclass
class _AtcState:
    """One counter as this store last read or wrote it: per slot, the object to
    write and the checked value it holds (``None``: absent, or damaged)."""

    objects: list[Any | None]
    values: list[int | None]
    label: bytes
    fallback: int | None  # an older one-object counter's unchecked value

    @property
    def current(self) -> int | None:
        valid = [v for v in self.values if v is not None]
        return max(valid) if valid else self.fallback

    @property
    def target(self) -> int:
        """The slot to write next: the one NOT holding the current value."""
        valid = [v for v in self.values if v is not None]
        if not valid:
            return 1  # only an older one-object counter (slot 0) holds a value
        return 1 - self.values.index(max(valid))


def _parse_atc_value(value: bytes) -> _AtcMeta | None:
    if len(value) < _ID_LEN:
        return None
    ident, rest = value[:_ID_LEN], value[_ID_LEN:]
    if len(rest) >= 2 and rest[:1] == _ATC_SLOTTED and rest[1] in _ATC_SLOTS:
        return _AtcMeta(ident, rest[1], rest[2:], legacy=False)
    return _AtcMeta(ident, 0, rest, legacy=True)


def _atc_check(ident: bytes, slot: int, value: int) -> str:
    """Binds a value to one slot of one counter, so that a torn or misplaced write
    never reads as valid. Not a secret: whoever can write the token can write it."""
    data = b"hsm-auth-atc\x00" + ident + bytes([slot]) + value.to_bytes(8, "big")
    return hashlib.sha256(data).hexdigest()[:16]


def _atc_label(ident: bytes, slot: int, value: int) -> str:
    return f"{value}:{_atc_check(ident, slot, value)}"


def _atc_checked(ident: bytes, slot: int, text: str) -> int | None:
    """The value in a CKA_LABEL ``<decimal>:<check>``, or ``None`` when it does not check."""
    found = _ATC_LABEL.fullmatch(text)
    if found is None:
        return None
    value = int(found.group(1))
    if value > _COUNTER_MAX or not _hmac.compare_digest(
        found.group(2), _atc_check(ident, slot, value)
    ):
        return None
    return value


@dataclass(frozen=True)
class _Ref:
    """What a key URI names, once parsed and checked to be on this token."""

    kind: str  # "private", "public", "secret-key", "data"
    id: bytes
    label: str | None


class Pkcs11KeyStore(KeyStore):
    """Keys, OTP keys and the ATC in a PKCS#11 token. See the module docstring."""

    name: ClassVar[str] = "pkcs11"
    setting_names: ClassVar[frozenset[str] | None] = frozenset({"uri", "allow_unenforced_pin"})
    priority: ClassVar[float] = 10.0
    methods: ClassVar[tuple[Method, ...]] = (Method.PIN, Method.DEVICE)
    pin_unlocks_session: ClassVar[bool] = True

    @classmethod
    def priority_for(cls, method: Method) -> float:
        # DESIGN §2: the pin method belongs on a token with its own PIN retry counter
        # (a smartcard) before a TPM auth value; device prefers the TPM (priority 20).
        return 30.0 if method is Method.PIN else cls.priority

    def __init__(self, cfg: _Config, p11: Any, token: Any, session: Any) -> None:
        self._cfg = cfg
        self._p11 = p11
        self._token = token
        self._session = session
        self._slot_id: int = token.slot.slot_id
        self._label = _text(token.label)
        self._serial = _text(token.serial)
        self._manufacturer = _text(token.manufacturer_id)
        self._enforced = _is_enforced(token)
        self._login_required = bool(int(token.flags) & _CKF_LOGIN_REQUIRED)
        self._mechanisms: frozenset[int] = frozenset(int(m) for m in token.slot.get_mechanisms())
        self._lock = threading.RLock()
        self._logged_in = False
        self._pin_tag = b""
        self._closed = False
        self._refs: dict[str, _Ref] = {}  # URI text -> parsed reference
        self._objects: dict[tuple[str, bytes], Any] = {}  # (kind, id) -> python-pkcs11 object
        self._publics: dict[bytes, ec.EllipticCurvePublicKey] = {}
        self._atcs: dict[bytes, _AtcState] = {}  # counter id -> its objects and values

    # --- lifecycle --------------------------------------------------------

    @classmethod
    def probe(cls, settings: Settings) -> Mapping[str, str]:
        cfg = _config(settings)
        p11, lib = _load(cfg.module)
        token = _find_token(p11, lib, cfg)
        major, minor = token.firmware_version
        return {
            "module": cfg.module,
            "library": _text(lib.library_description),
            "manufacturer": _text(token.manufacturer_id),
            "model": _text(token.model),
            "firmware": f"{major}.{minor}",
            "label": _text(token.label),
            "serial": _text(token.serial),
            "pin_retry_limit": "yes" if _is_enforced(token) else "no",
        }

    @classmethod
    def open(cls, settings: Settings) -> Pkcs11KeyStore:
        cfg = _config(settings)
        pin = _read_pin_source(cfg.uri.pin_source) if cfg.uri.pin_source else None
        p11, lib = _load(cfg.module)
        token = _find_token(p11, lib, cfg)
        try:
            session = token.open(rw=True)  # public session; login below, without leaks
        except p11.PKCS11Error as e:
            raise convert_error(e, "C_OpenSession") from e
        with _LOCK:
            _SESSIONS[cfg.module] = _SESSIONS.get(cfg.module, 0) + 1
        try:
            store = cls(cfg, p11, token, session)
        except BaseException as e:
            with _LOCK, contextlib.suppress(p11.PKCS11Error):
                _SESSIONS[cfg.module] -= 1
                session.close()
            if isinstance(e, p11.PKCS11Error):
                raise convert_error(e, "C_GetMechanismList") from e
            raise
        if pin is not None:
            try:
                store._login(pin)
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._refs.clear()
            self._objects.clear()
            self._atcs.clear()
            with _LOCK:
                if self._logged_in:
                    self._release_login()
                # A session that is gone already (token removed, finalised) is fine.
                with contextlib.suppress(self._p11.PKCS11Error):
                    self._session.close()
                _SESSIONS[self._cfg.module] = max(0, _SESSIONS.get(self._cfg.module, 1) - 1)

    def _release_login(self) -> None:
        key = (self._cfg.module, self._slot_id)
        entry = _LOGINS.get(key)
        self._logged_in = False
        if entry is None:
            return
        entry.count -= 1
        if entry.count <= 0:
            del _LOGINS[key]
            if entry.owned:
                _native(self._cfg.module).logout(self._session.handle)

    # --- login ------------------------------------------------------------

    def _login(self, pin: str) -> None:
        tag = _pin_tag(pin)
        key = (self._cfg.module, self._slot_id)
        with _LOCK:
            entry = _LOGINS.get(key)
            if entry is not None:
                # Logged in already in this process: the token will not check again.
                if not _hmac.compare_digest(entry.pin_tag, tag):
                    raise PinInvalid(retry=retry_status(self._token_flags()))
                entry.count += 1
            else:
                rv = _native(self._cfg.module).login(self._session.handle, pin)
                owned = rv == _CKR_OK
                if rv == _CKR_USER_ALREADY_LOGGED_IN:
                    rv = self._login_again(pin)  # someone else's login checked nothing
                if rv != _CKR_OK:
                    self._raise_login_error(rv)
                _LOGINS[key] = _Login(1, tag, owned=owned)
        self._logged_in = True
        self._pin_tag = tag

    def _login_again(self, pin: str) -> int:
        """``C_Login`` answered ``CKR_USER_ALREADY_LOGGED_IN``: another session of this
        process (not one of our stores) is logged in, and the token checked nothing. A
        PIN counts only when the token checked it in this very call, so log the
        application out and in again with ``pin``. A wrong PIN leaves the token logged
        out (the other session too: it shares the login); the right one restores it.
        Returns the second ``C_Login``'s code; refuses when someone logged in between."""
        native = _native(self._cfg.module)
        rv = native.logout(self._session.handle)
        if rv not in (_CKR_OK, _CKR_USER_NOT_LOGGED_IN):
            raise convert_error(_RvError(rv), "C_Logout")
        rv = native.login(self._session.handle, pin)
        if rv == _CKR_USER_ALREADY_LOGGED_IN:
            raise StateError(
                "another session of this process logged in to the token while hsm-auth "
                "had it check the PIN; the PIN was not checked, try again"
            )
        return rv

    def _raise_login_error(self, rv: int) -> NoReturn:
        retry = retry_status(self._token_flags())
        if rv == _CKR_PIN_LOCKED or retry.locked:
            raise PinLocked("the token's user PIN is locked",
                            retry=replace(retry, retries_left=0), native_code=rv)
        if rv in (_CKR_PIN_INCORRECT, _CKR_PIN_INVALID, _CKR_PIN_LEN_RANGE):
            raise PinInvalid(retry=retry, native_code=rv)
        error = convert_error(_RvError(rv), "C_Login")
        if isinstance(error, AuthorizationError):
            error.retry = retry
        raise error

    def _token_flags(self) -> int:
        try:
            return int(self._token.slot.get_token().flags)
        except self._p11.PKCS11Error:
            return 0

    def _ensure_login(self, auth: Authorization) -> None:
        if self._closed:
            raise StateError("this PKCS#11 key store is closed")
        if self._logged_in:
            if auth.pin is not None and not _hmac.compare_digest(_pin_tag(auth.pin), self._pin_tag):
                raise PinInvalid(retry=retry_status(self._token_flags()))
            return
        if auth.pin is None:
            if not self._login_required:
                return
            raise PinRequired("the token needs its user PIN")
        self._login(auth.pin)

    @contextmanager
    def _call(
        self, action: str, auth: Authorization, *, mechanism: str | None = None,
        drop: tuple[str, bytes] | None = None,
    ) -> Iterator[None]:
        """Log in if needed, serialise, and convert every native error."""
        with self._lock:
            self._ensure_login(auth)
            try:
                yield
            except self._p11.PKCS11Error as e:
                error = convert_error(e, action, mechanism=mechanism)
                if drop is not None and isinstance(error, KeyNotFound):
                    self._objects.pop(drop, None)
                if isinstance(error, AuthorizationError) and not isinstance(error, PinRequired):
                    error.retry = retry_status(self._token_flags())
                    if isinstance(error, PinLocked):
                        error.retry = replace(error.retry, retries_left=0, locked=True)
                raise error from e

    def _require(self, mechanism: str) -> None:
        if _MECHANISM_IDS[mechanism] not in self._mechanisms:
            raise MechanismNotSupported(f"CKM_{mechanism}")

    # --- URIs and object handles ---------------------------------------------

    def _uri(self, kind: str, ident: bytes, label: str | None) -> str:
        base = Pkcs11Uri(
            token=self._label, serial=self._serial, type=kind, module_path=self._cfg.module
        )
        if kind == "data":
            return str(replace(base, vendor_path=((ATC_URI_ATTR, ident.hex()),)))
        return str(replace(base, object=label, id=ident))

    def _ref(self, uri: str) -> _Ref:
        ref = self._refs.get(uri)
        if ref is not None:
            return ref
        parsed = Pkcs11Uri.parse(uri)
        if (parsed.token is not None and parsed.token != self._label) or (
            parsed.serial is not None and parsed.serial != self._serial
        ):
            raise KeyNotFound(f"{_token_uri(parsed)} is not on token {self._label!r}")
        atc = parsed.vendor(ATC_URI_ATTR)
        if atc is not None:
            try:
                ident = bytes.fromhex(atc)
            except ValueError:
                raise InvalidInput(f"malformed {ATC_URI_ATTR} in a pkcs11: URI") from None
            ref = _Ref("data", ident, None)
        elif parsed.id is not None:
            ref = _Ref(parsed.type or "private", parsed.id, parsed.object)
        else:
            raise InvalidInput("a pkcs11: key URI needs an id= attribute")
        self._refs[uri] = ref
        return ref

    def _find(self, kind: str, ref: _Ref) -> Any:
        cached = self._objects.get((kind, ref.id))
        if cached is not None:
            return cached
        attr, cls = self._p11.Attribute, self._p11.ObjectClass
        classes = {"private": cls.PRIVATE_KEY, "public": cls.PUBLIC_KEY,
                   "secret-key": cls.SECRET_KEY}
        if kind not in classes:
            raise InvalidInput(f"a pkcs11: URI of type {kind!r} cannot be used here")
        template = {attr.CLASS: classes[kind], attr.ID: ref.id}
        if ref.label is not None:
            template[attr.LABEL] = ref.label
        found = list(self._session.get_objects(template))
        if not found:
            raise KeyNotFound(f"no {kind} key with that id on token {self._label!r}")
        self._objects[(kind, ref.id)] = found[0]
        return found[0]

    def _key(self, uri: str, kind: str) -> tuple[Any, tuple[str, bytes]]:
        ref = self._ref(uri)
        if kind != "public" and ref.kind != kind:
            raise InvalidInput(f"expected a pkcs11: URI of type {kind}, got {ref.kind}")
        return self._find(kind, ref), (kind, ref.id)

    # --- capabilities and PIN ------------------------------------------------

    def capabilities(self) -> frozenset[Capability]:
        have = {name for name, ident in _MECHANISM_IDS.items() if ident in self._mechanisms}
        caps = {Capability.COUNTER}
        if {"EC_KEY_PAIR_GEN", "ECDSA"} <= have:
            caps.add(Capability.SIGN)
        if {"EC_KEY_PAIR_GEN", "ECDH1_DERIVE"} <= have:
            caps.add(Capability.ECDH_DERIVE)
        if "SHA256_HMAC" in have:
            caps.add(Capability.HMAC)
        if self._login_required and (self._enforced or self._cfg.allow_unenforced_pin):
            caps.add(Capability.PIN)
        if self._login_required and self._enforced:
            caps.add(Capability.PIN_RETRY_LIMIT)
        return frozenset(caps)

    def pin_status(self) -> PinStatus:
        retry = retry_status(self._token_flags())
        return PinStatus(
            enforced=self._enforced,
            retries_left=retry.retries_left,
            final_try=retry.final_try,
            locked=retry.locked,
        )

    # --- keys ---------------------------------------------------------------

    def generate_key(self, label: str, kind: KeyKind, auth: Authorization) -> str:
        if kind not in (KeyKind.SIGNING, KeyKind.AGREEMENT):
            raise InvalidInput(f"generate_key makes signing or agreement keys, not {kind.value}")
        p11 = self._p11
        attr, flag = p11.Attribute, p11.MechanismFlag
        signing = kind is KeyKind.SIGNING
        with self._call("C_GenerateKeyPair", auth, mechanism="CKM_EC_KEY_PAIR_GEN"):
            self._require("EC_KEY_PAIR_GEN")
            self._require("ECDSA" if signing else "ECDH1_DERIVE")
            ident = secrets.token_bytes(_ID_LEN)
            params = self._session.create_domain_parameters(
                p11.KeyType.EC, {attr.EC_PARAMS: _P256_PARAMS}, local=True
            )
            public, private = params.generate_keypair(
                id=ident,
                label=label,
                store=True,
                capabilities=(flag.SIGN | flag.VERIFY) if signing else flag.DERIVE,
                public_template={attr.TOKEN: True, attr.PRIVATE: False, attr.DERIVE: False},
                private_template={
                    attr.TOKEN: True,
                    attr.PRIVATE: True,
                    attr.SENSITIVE: True,
                    attr.EXTRACTABLE: False,
                    attr.SIGN: signing,
                    attr.DERIVE: not signing,
                    # Nobody turns a signing key into an ECDH key (CKA_DERIVE) later.
                    attr.MODIFIABLE: False,
                },
            )
            self._objects[("private", ident)] = private
            self._objects[("public", ident)] = public
            self._publics[ident] = _public_from_point(public[attr.EC_POINT])
        return self._uri("private", ident, label)

    def list_keys(self, auth: Authorization) -> list[KeyInfo]:
        p11 = self._p11
        attr, cls = p11.Attribute, p11.ObjectClass
        keys: list[KeyInfo] = []
        pairs: set[bytes] = set()
        with self._call("C_FindObjects", auth):
            for obj in self._session.get_objects(
                {attr.CLASS: cls.PRIVATE_KEY, attr.KEY_TYPE: p11.KeyType.EC}
            ):
                got = obj.get_attributes([attr.ID, attr.LABEL, attr.SIGN, attr.DERIVE])
                pairs.add(got[attr.ID])
                kind = KeyKind.SIGNING if got[attr.SIGN] else KeyKind.AGREEMENT
                if not (got[attr.SIGN] or got[attr.DERIVE]):
                    continue
                label = got[attr.LABEL]
                keys.append(KeyInfo(self._uri("private", got[attr.ID], label), kind, label))
            # A public half without its private key (a kill inside C_GenerateKeyPair).
            for obj in self._session.get_objects(
                {attr.CLASS: cls.PUBLIC_KEY, attr.KEY_TYPE: p11.KeyType.EC}
            ):
                got = obj.get_attributes([attr.ID, attr.LABEL, attr.VERIFY])
                if got[attr.ID] not in pairs:
                    kind = KeyKind.SIGNING if got[attr.VERIFY] else KeyKind.AGREEMENT
                    label = got[attr.LABEL]
                    keys.append(KeyInfo(self._uri("public", got[attr.ID], label), kind, label))
            for obj in self._session.get_objects(
                {attr.CLASS: cls.SECRET_KEY, attr.KEY_TYPE: p11.KeyType.GENERIC_SECRET}
            ):
                got = obj.get_attributes([attr.ID, attr.LABEL])
                label = got[attr.LABEL]
                keys.append(KeyInfo(self._uri("secret-key", got[attr.ID], label), KeyKind.OTP,
                                    label))
            seen: set[bytes] = set()
            for copy in self._atc_objects():  # two objects (or one, if older): one counter
                if copy.meta.ident not in seen:
                    seen.add(copy.meta.ident)
                    label = copy.meta.label.decode("utf-8", "replace")
                    keys.append(KeyInfo(self._uri("data", copy.meta.ident, None),
                                        KeyKind.COUNTER, label))
        return keys

    def delete_key(self, uri: str, auth: Authorization) -> None:
        attr, cls = self._p11.Attribute, self._p11.ObjectClass
        with self._call("C_DestroyObject", auth):
            ref = self._ref(uri)
            if ref.kind == "data":
                victims = [copy.obj for copy in self._atc_objects(ref.id)]
                self._atcs.pop(ref.id, None)
            else:
                kinds = {"private": ("private", "public"), "public": ("public",),
                         "secret-key": ("secret-key",)}.get(ref.kind, ())
                classes = {"private": cls.PRIVATE_KEY, "public": cls.PUBLIC_KEY,
                           "secret-key": cls.SECRET_KEY}
                victims = []
                for kind in kinds:
                    self._objects.pop((kind, ref.id), None)
                    victims += self._session.get_objects({attr.CLASS: classes[kind],
                                                          attr.ID: ref.id})
            for kind in ("private", "public", "secret-key", "data"):
                self._objects.pop((kind, ref.id), None)
            self._publics.pop(ref.id, None)
            self._refs.pop(uri, None)
            for obj in victims:
                # Gone meanwhile is what we wanted.
                with contextlib.suppress(self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid):
                    obj.destroy()

    def public_key(self, uri: str, auth: Authorization) -> ec.EllipticCurvePublicKey:
        ref = self._ref(uri)
        cached = self._publics.get(ref.id)
        if cached is not None and not self._closed:
            return cached
        with self._call("C_GetAttributeValue", auth, drop=("public", ref.id)):
            public = self._find("public", ref)
            key = _public_from_point(public[self._p11.Attribute.EC_POINT])
            self._publics[ref.id] = key
        return key

    def sign(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        with self._call("C_Sign", auth, mechanism="CKM_ECDSA"):
            self._require("ECDSA")
            key, handle_key = self._key(uri, "private")
            digest = hashlib.sha256(data).digest()
            try:
                raw = key.sign(digest, mechanism=self._p11.Mechanism.ECDSA)
            except (self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid):
                self._objects.pop(handle_key, None)
                raise
        if len(raw) != 64:
            raise BackendError("the token returned an ECDSA signature of the wrong size")
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        return encode_dss_signature(r, s)

    # --- OTP key --------------------------------------------------------------

    def agree_otp_key(
        self,
        label: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> tuple[str, ec.EllipticCurvePublicKey]:
        # The agreement key pair is a session object (CKA_TOKEN false): never
        # written to the token, destroyed right after the derive, and gone with
        # the session if this process dies first.
        p11 = self._p11
        attr, flag = p11.Attribute, p11.MechanismFlag
        with self._call("C_GenerateKeyPair", auth, mechanism="CKM_EC_KEY_PAIR_GEN"):
            self._require("EC_KEY_PAIR_GEN")
            self._require("ECDH1_DERIVE")
            params = self._session.create_domain_parameters(
                p11.KeyType.EC, {attr.EC_PARAMS: _P256_PARAMS}, local=True
            )
            public, private = params.generate_keypair(
                label=f"{label}/ecdh",
                store=False,
                capabilities=flag.DERIVE,
                public_template={attr.TOKEN: False, attr.PRIVATE: False, attr.DERIVE: False},
                private_template={
                    attr.TOKEN: False,
                    attr.PRIVATE: True,
                    attr.SENSITIVE: True,
                    attr.EXTRACTABLE: False,
                    attr.SIGN: False,
                    attr.DERIVE: True,
                },
            )
        try:
            agreement_public = _public_from_point(public[attr.EC_POINT])
            otp_key = self._derive(f"{label}/otp", private, peer_public, auth)
        finally:
            with self._call("C_DestroyObject", auth):
                for obj in (private, public):
                    with contextlib.suppress(p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                        obj.destroy()
        return otp_key, agreement_public

    def derive_otp_key(
        self,
        label: str,
        agreement_key: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> str:
        with self._call("C_DeriveKey", auth, mechanism="CKM_ECDH1_DERIVE"):
            private, _ = self._key(agreement_key, "private")
        return self._derive(label, private, peer_public, auth)

    def _derive(
        self, label: str, private: Any, peer_public: ec.EllipticCurvePublicKey, auth: Authorization
    ) -> str:
        """ECDH of ``private`` with ``peer_public`` into the OTP key: a token object that
        can only HMAC (not derive, not be read, not be changed)."""
        if not isinstance(peer_public.curve, ec.SECP256R1):
            raise InvalidInput("the verifier's agreement key must be a P-256 key")
        from cryptography.hazmat.primitives import serialization  # enrollment only

        point = peer_public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        p11 = self._p11
        attr, flag = p11.Attribute, p11.MechanismFlag
        with self._call("C_DeriveKey", auth, mechanism="CKM_ECDH1_DERIVE"):
            self._require("ECDH1_DERIVE")
            self._require("SHA256_HMAC")
            ident = secrets.token_bytes(_ID_LEN)
            secret = private.derive_key(
                p11.KeyType.GENERIC_SECRET,
                256,
                id=ident,
                label=label,
                store=True,
                capabilities=flag.SIGN,
                mechanism=p11.Mechanism.ECDH1_DERIVE,
                mechanism_param=(p11.KDF.NULL, None, point),
                template={
                    attr.TOKEN: True,
                    attr.PRIVATE: True,
                    attr.SENSITIVE: True,
                    attr.EXTRACTABLE: False,
                    attr.SIGN: True,
                    attr.VERIFY: False,
                    attr.DERIVE: False,
                    attr.MODIFIABLE: False,
                },
            )
            self._objects[("secret-key", ident)] = secret
        return self._uri("secret-key", ident, label)

    def hmac(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        with self._call("C_Sign", auth, mechanism="CKM_SHA256_HMAC"):
            self._require("SHA256_HMAC")
            key, handle_key = self._key(uri, "secret-key")
            try:
                mac: bytes = key.sign(data, mechanism=self._p11.Mechanism.SHA256_HMAC)
            except (self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid):
                self._objects.pop(handle_key, None)
                raise
            except self._p11.MechanismInvalid:
                raise MechanismNotSupported("CKM_SHA256_HMAC") from None
        return mac

    # --- counter ----------------------------------------------------------

    def _atc_objects(self, ident: bytes | None = None) -> list[_AtcObject]:
        """Every ATC object (of counter ``ident`` when given): one C_FindObjects, then
        one CKA_VALUE read per object. An object that vanishes meanwhile is skipped."""
        attr, cls = self._p11.Attribute, self._p11.ObjectClass
        found = []
        for obj in self._session.get_objects(
            {attr.CLASS: cls.DATA, attr.APPLICATION: ATC_APPLICATION}
        ):
            try:
                value = bytes(obj[attr.VALUE])
            except (self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid):
                continue
            parsed = _parse_atc_value(value)
            if parsed is not None and (ident is None or parsed.ident == ident):
                found.append(_AtcObject(obj, parsed))
        return found

    def _label_of(self, obj: Any) -> str | None:
        """An ATC object's CKA_LABEL, or ``None`` if the object is gone or unreadable."""
        try:
            text = obj[self._p11.Attribute.LABEL]
        except (self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid, ValueError):
            return None
        return text if isinstance(text, str) else None

    def _read_atc(self, ident: bytes) -> _AtcState:
        """Find and read every object of one counter: per slot, the copy with the
        highest valid value (else a damaged copy to overwrite, else none)."""
        copies = self._atc_objects(ident)
        if not copies:
            self._atcs.pop(ident, None)
            raise KeyNotFound(f"no counter with that id on token {self._label!r}")
        state = _AtcState([None, None], [None, None], copies[0].meta.label, None)
        for copy in copies:
            slot = copy.meta.slot
            text = self._label_of(copy.obj)
            if text is None:
                continue
            value = _atc_checked(ident, slot, text)
            if value is not None:
                best = state.values[slot]
                if best is None or value > best:
                    state.values[slot], state.objects[slot] = value, copy.obj
                continue
            if state.values[slot] is None and state.objects[slot] is None:
                state.objects[slot] = copy.obj  # damaged: overwrite it rather than add one
            if copy.meta.legacy and _DECIMAL.fullmatch(text):
                state.fallback = max(state.fallback or 0, int(text))
        if state.current is None:
            self._atcs.pop(ident, None)
            raise CounterError("the counter's objects in the token hold no valid value")
        self._atcs[ident] = state
        return state

    def _atc_state(self, ident: bytes) -> _AtcState:
        """The counter's state, read with as few calls as is safe. Every writer writes
        the slot that does not hold the highest value, so if the slot this store would
        write next still holds what this store last saw there, nobody advanced the
        counter meanwhile: one CKA_LABEL read. Anything else reads everything again."""
        state = self._atcs.get(ident)
        if state is not None:
            target = state.target
            obj, seen = state.objects[target], state.values[target]
            if obj is not None and seen is not None:
                text = self._label_of(obj)
                if text is not None and _atc_checked(ident, target, text) == seen:
                    return state
        return self._read_atc(ident)

    def _write_atc(self, ident: bytes, state: _AtcState, value: int) -> None:
        """Store ``value`` in the slot not holding the current value (recreating that
        slot's object if it vanished): durable in the token when this returns."""
        target = state.target
        text = _atc_label(ident, target, value)
        obj = state.objects[target]
        if obj is not None:
            try:
                obj[self._p11.Attribute.LABEL] = text
            except (self._p11.ObjectHandleInvalid, self._p11.KeyHandleInvalid):
                obj = None
        if obj is None:
            obj = self._create_atc_object(ident, target, state.label, text)
        state.objects[target], state.values[target] = obj, value

    def _create_atc_object(self, ident: bytes, slot: int, label: bytes, text: str) -> Any:
        attr, cls = self._p11.Attribute, self._p11.ObjectClass
        return self._session.create_object(
            {
                attr.CLASS: cls.DATA,
                attr.TOKEN: True,
                attr.PRIVATE: True,
                attr.MODIFIABLE: True,
                attr.APPLICATION: ATC_APPLICATION,
                attr.VALUE: ident + _ATC_SLOTTED + bytes([slot]) + label,
                attr.LABEL: text,
            }
        )

    def _counter_ref(self, uri: str) -> _Ref:
        ref = self._ref(uri)
        if ref.kind != "data":
            raise InvalidInput("a counter URI has type=data and an x-atc-id")
        return ref

    def _advance(self, uri: str, limit: int | None) -> int:
        ref = self._counter_ref(uri)
        state = self._atc_state(ref.id)
        current = state.current
        assert current is not None
        check_counter_limit(current, limit)
        if current >= _COUNTER_MAX:
            raise CounterError("the counter is exhausted (2**64 - 1)")
        try:
            self._write_atc(ref.id, state, current + 1)
        except self._p11.PKCS11Error as e:
            self._atcs.pop(ref.id, None)
            raise CounterError(
                f"the counter could not be advanced: {_describe(_code_of(e))}",
                native_code=_code_of(e),
            ) from e
        return current + 1

    def create_counter(self, label: str, auth: Authorization) -> str:
        with self._call("C_CreateObject", auth):
            ident = secrets.token_bytes(_ID_LEN)
            raw = label.encode("utf-8")
            objects: list[Any] = []
            try:
                for slot in _ATC_SLOTS:
                    text = _atc_label(ident, slot, 0)
                    objects.append(self._create_atc_object(ident, slot, raw, text))
            except BaseException:
                for obj in objects:
                    with contextlib.suppress(self._p11.PKCS11Error):
                        obj.destroy()
                raise
            self._atcs[ident] = _AtcState(list(objects), [0, 0], raw, None)
        return self._uri("data", ident, None)

    def counter_value(self, uri: str, auth: Authorization) -> int:
        with self._call("C_GetAttributeValue", auth):
            value = self._atc_state(self._counter_ref(uri).id).current
        assert value is not None
        return value

    def counter_increment(self, uri: str, auth: Authorization) -> int:
        with self._call("C_SetAttributeValue", auth):
            return self._advance(uri, None)

    def counted_hmac(
        self,
        otp_key: str,
        counter: str,
        message_for: Callable[[int], bytes],
        auth: Authorization,
        *,
        limit: int | None = None,
    ) -> tuple[int, bytes]:
        """One CKA_LABEL read (see :meth:`_atc_state`), the label write, the HMAC."""
        with self._call("C_SetAttributeValue", auth):
            value = self._advance(counter, limit)
        return value, self.hmac(otp_key, message_for(value), auth)
