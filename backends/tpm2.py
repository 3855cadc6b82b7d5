"""TPM 2.0 backend on tpm2-pytss (ESAPI), for the ``device`` and ``pin`` methods.

TPM access
    A TCTI string selects the TPM: setting ``tcti``, else the environment
    (``HSM_AUTH_TCTI``, then ``TPM2TOOLS_TCTI``), else ``device:/dev/tpmrm0``.
    Examples: ``swtpm:path=/tmp/x/tpm.sock``, ``swtpm:port=2321``, ``tabrmd``.
    Without a resource manager (anything but ``/dev/tpmrm*`` and tabrmd, see
    :func:`has_resource_manager`) a killed client's objects and sessions stay
    loaded, so :meth:`Tpm2KeyStore.open` flushes every transient object and
    session it finds there first: such a TPM serves one client at a time.

Storage key
    The TCG standard ECC P-256 storage primary ("SRK" template: restricted
    decrypt, AES-128-CFB, SHA-256 name, empty auth, zero unique) under the
    owner hierarchy. It is derived from the owner seed, so the same template
    always gives the same key and it never exists outside the TPM. It is
    taken from the well-known persistent handle 0x81000001 when that holds
    the same public area, else made with TPM2_CreatePrimary on first use.
    The template carries ``noDA`` as the TCG one does: it has an empty auth
    that nobody guesses (the rule under PINs below).

Objects as TPM-wrapped blobs, not persistent handles
    Keys are kept as TPM2B_PUBLIC + TPM2B_PRIVATE (the private part encrypted
    and integrity-protected by the storage key) in files under ``state_dir``
    (files 0600, written atomically), and loaded into the TPM when used.
    Persistent handles would need owner auth for TPM2_EvictControl and take
    scarce NV slots (a few per TPM, shared with the platform); a blob needs
    neither, and it is useless off this TPM: only this TPM's storage key can
    load it. Loaded handles, and state files once read, are kept by the open
    instance (a state file never changes after it is written). The only NV
    object is the ATC, which must live in the TPM to be monotonic.

Keys
    signing: ECC P-256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign,
    ECDSA-SHA256, TPM2_Sign over a host-computed SHA-256 with a null ticket
    (allowed because the key is not restricted). :meth:`Tpm2KeyStore.private_key`
    exposes it as a ``cryptography`` ``EllipticCurvePrivateKey``.
    agreement: ECC P-256 with ``decrypt`` for TPM2_ECDH_ZGen. At enrollment
    (:meth:`Tpm2KeyStore.agree_otp_key`) it is created, loaded, used once and
    flushed, its blob never written: nothing in ``state_dir`` can run ZGen again.
    OTP key: TPM2_ECDH_ZGen with the verifier's point; the x-coordinate is
    sealed into a keyedhash HMAC-SHA256 object (fixedTPM|fixedParent|
    userWithAuth|sign) with TPM2_Create. The secret crosses the bus only
    inside an AES-CFB parameter-encrypted session salted to the storage key,
    and lives on the host in a bytearray that is wiped right after.
    ATC: an NV index of type TPM_NT_COUNTER in the owner range 0x01000000-
    0x013FFFFF (recorded in the URI), read and incremented with its own auth
    (the offline-use limit check reads it as the owner: see ``_peek``).
    A TPM counter starts at the highest value any counter on the TPM ever
    had, not at 0: the real value is reported (the verifier gets the initial ATC).

PINs
    With ``auth = "pin"`` (or the default ``"auto"`` when a PIN is given) every
    object gets the offline PIN as its auth value; with ``"none"`` an empty
    one. One rule (:func:`_dictionary_attack_rule`) decides the DA attributes:
    an object or NV index with an auth value is never ``noDA``, so wrong PINs
    count against the TPM's dictionary-attack lockout, reported as
    ``PinInvalid`` and ``PinLocked`` with a ``RetryStatus`` (tries left,
    seconds until the next try); one with an empty auth value (``device``) is
    ``noDA``: there is nothing to guess, and the lockout, which is TPM-wide,
    must not stop a PIN-less method. Device keys made before that rule are
    DA-protected: in a lockout they fail with ``LockedOut``, whose message
    names the cause and whose ``RetryStatus`` says when it ends.
    Authorizations use a salted HMAC session, so the PIN itself never crosses
    the bus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.utils import Buffer

from hsm_auth.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CounterError,
    HsmAuthError,
    InvalidInput,
    KeyNotFound,
    LockedOut,
    MechanismNotSupported,
    PinInvalid,
    PinLocked,
    PinRequired,
    RetryStatus,
    StateError,
    TokenNotFound,
)
from hsm_auth.files import atomic_write, check_state, ensure_private_dir, open_lock_file
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

DEFAULT_TCTI = "device:/dev/tpmrm0"
SRK_PERSISTENT_HANDLE = 0x81000001
NV_OWNER_FIRST = 0x01000000
NV_OWNER_LAST = 0x013FFFFF
#: TCG: the RSA 2048 EK's certificate and its usual persistent handle.
EK_CERT_NV_INDEX = 0x01C00002
EK_PERSISTENT_HANDLE = 0x81010001
_MAX_AUTH = 32  # a SHA-256 name algorithm bounds auth values to 32 bytes
_MAX_HMAC_BUFFER = 1024  # MAX_DIGEST_BUFFER: one TPM2_HMAC, else an HMAC sequence
_FORMAT = 1

# A response code's low 12 bits; in a format-one code (TPM2_RC.FMT1 set) the
# error number is the low 6 bits, above them the handle/session/parameter number.
_HANDLES_PER_CALL = 64
# ESYS's serialized resource (Esys_TR_Serialize): TPM2_HANDLE, TPM2B_NAME, then the
# UINT32 resource type, IESYSC_WITHOUT_MISC_RSRC = 0 carrying nothing more.
_EMPTY_NAME = b"\x00\x00"
_IESYSC_WITHOUT_MISC_RSRC = b"\x00\x00\x00\x00"
_IN_LOCKOUT = "the TPM is in dictionary-attack lockout, caused by wrong PINs"
_RC_CODE_BITS = 0xFFF
_RC_FMT1_ERROR_BITS = 0x3F

_KIND_TYPE = {
    KeyKind.SIGNING: "private",
    KeyKind.AGREEMENT: "private",
    KeyKind.OTP: "secret-key",
    KeyKind.COUNTER: "data",
}


@dataclass(frozen=True)
class _Record:
    """One object's state file: a wrapped blob or an NV counter's index."""

    id: str
    kind: KeyKind
    label: str
    has_pin: bool
    parent: str = ""  # hex name of the storage key that wraps the blob
    public: bytes = b""  # marshalled TPM2B_PUBLIC
    private: bytes = b""  # marshalled TPM2B_PRIVATE (encrypted by the storage key)
    nv_index: int = 0

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": _FORMAT,
            "id": self.id,
            "kind": self.kind.value,
            "label": self.label,
            "pin": self.has_pin,
        }
        if self.kind is KeyKind.COUNTER:
            data["nv_index"] = f"0x{self.nv_index:08x}"
        else:
            data |= {
                "parent": self.parent,
                "public": self.public.hex(),
                "private": self.private.hex(),
            }
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> _Record:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return cls(
            id=str(data["id"]),
            kind=KeyKind(data["kind"]),
            label=str(data["label"]),
            has_pin=bool(data["pin"]),
            parent=str(data.get("parent", "")),
            public=bytes.fromhex(data.get("public", "")),
            private=bytes.fromhex(data.get("private", "")),
            nv_index=int(data.get("nv_index", "0"), 16),
        )


@dataclass(frozen=True)
class _AkRecord:
    """The attestation key's state file (``attestation/ak.json``): its blob under the
    storage key, the EK certificate it was registered with (SHA-256), and the AK
    bindings (root hash, verifier signature) that verifiers returned."""

    parent: str
    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE
    ek_cert_hash: bytes
    bindings: tuple[tuple[bytes, bytes], ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _FORMAT,
                "parent": self.parent,
                "public": self.public.hex(),
                "private": self.private.hex(),
                "ek_cert_hash": self.ek_cert_hash.hex(),
                "bindings": [[r.hex(), s.hex()] for r, s in self.bindings],
            },
            indent=1,
        ) + "\n"

    @classmethod
    def from_json(cls, text: str) -> _AkRecord:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        return cls(
            parent=str(data["parent"]),
            public=bytes.fromhex(data["public"]),
            private=bytes.fromhex(data["private"]),
            ek_cert_hash=bytes.fromhex(data["ek_cert_hash"]),
            bindings=tuple(
                (bytes.fromhex(r), bytes.fromhex(s)) for r, s in data.get("bindings", [])
            ),
        )


def _resolve_tcti(settings: Settings) -> str:
    tcti = settings.get("tcti") or os.environ.get("HSM_AUTH_TCTI")
    return str(tcti or os.environ.get("TPM2TOOLS_TCTI") or DEFAULT_TCTI)


def has_resource_manager(tcti: str) -> bool:
    """Whether the TCTI reaches the TPM through a resource manager.

    The kernel's ``/dev/tpmrm*`` and tabrmd give every connection its own view
    of the TPM and flush what a connection leaves behind when it ends. Anything
    else (``swtpm``, ``mssim``, ``device:/dev/tpm0``, an unknown TCTI) is taken
    to be the TPM itself, where a killed client's objects and sessions stay
    loaded until someone flushes them.
    """
    name, _, conf = tcti.partition(":")
    name = name.removeprefix("libtss2-tcti-").split(".so", 1)[0]
    if name == "tabrmd":
        return True
    return name == "device" and Path(conf).name.startswith("tpmrm")


def _resolve_state_dir(settings: Settings) -> Path:
    configured = settings.get("state_dir")
    if configured:
        return Path(str(configured)).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir("hsm-auth")) / "tpm2"


def _import_pytss() -> Any:
    # ESYS logs every TPM error (wrong PIN included) to stderr unless told not to.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError as e:
        raise BackendUnavailable(
            "tpm2-pytss is not installed (pip install 'hsm-auth[tpm2]', which builds "
            f"against libtss2-dev): {e}"
        ) from e
    return tpm2_pytss


def _tpm_code(rc: int) -> int:
    """The TPM response code without handle/session/parameter numbers, comparable
    with ``TPM2_RC`` members (0 if the code is not from the TPM)."""
    from tpm2_pytss.constants import TPM2_RC, TSS2_RC

    # From the TPM itself, or passed on by a resource manager (tabrmd).
    if rc & TSS2_RC.RC_LAYER_MASK not in (TSS2_RC.TPM_RC_LAYER, TSS2_RC.RESMGR_TPM_RC_LAYER):
        return 0
    code = rc & _RC_CODE_BITS
    return int(TPM2_RC.FMT1 | (code & _RC_FMT1_ERROR_BITS)) if code & TPM2_RC.FMT1 else code


def convert_tss_error(
    e: Any,
    what: str,
    *,
    tcti: str,
    record: _Record | None = None,
    ectx: Any = None,
) -> HsmAuthError:
    """The one converter: a ``TSS2_Exception`` becomes an hsm-auth error, RC kept as
    ``native_code``. With ``ectx``, a wrong PIN or lockout reads the TPM's
    dictionary-attack state to report attempts left and the retry delay."""
    from tpm2_pytss.constants import TPM2_RC, TSS2_RC

    rc = int(e.rc)
    code = _tpm_code(rc)
    if rc & TSS2_RC.RC_LAYER_MASK == TSS2_RC.TCTI_RC_LAYER:
        if rc == TSS2_RC.TCTI_RC_NOT_SUPPORTED:
            return BackendUnavailable(
                f"TCTI {tcti!r} cannot be loaded (unknown name or its libtss2-tcti "
                "library is missing)",
                native_code=rc,
            )
        return TokenNotFound(f"{what}: no TPM reachable at TCTI {tcti!r}: {e}", native_code=rc)
    if code == TPM2_RC.AUTH_FAIL:
        return _pin_error(rc, _da_properties_or_none(ectx))
    if code == TPM2_RC.BAD_AUTH:  # an object exempt from DA: no attempt was counted
        return PinInvalid(native_code=rc)
    if code == TPM2_RC.LOCKOUT:
        props = _da_properties_or_none(ectx)
        if record is not None and record.has_pin:
            return _locked(rc, _IN_LOCKOUT, props)
        return _locked(rc, _IN_LOCKOUT, props, error=LockedOut)  # a key without a PIN
    if code == TPM2_RC.INTEGRITY and record is not None:
        return BackendError(
            f"the key blob {record.label!r} does not belong to this TPM's storage key",
            native_code=rc,
        )
    if code == TPM2_RC.HANDLE and record is not None and record.kind is KeyKind.COUNTER:
        return KeyNotFound(
            f"the counter {record.label!r} (NV index 0x{record.nv_index:08x}) is not in this TPM",
            native_code=rc,
        )
    if code == TPM2_RC.NV_UNINITIALIZED:
        return CounterError(f"{what}: the counter was never incremented", native_code=rc)
    if code == TPM2_RC.OBJECT_MEMORY:
        return BackendError(f"{what}: the TPM has no free object slot", native_code=rc)
    if code == TPM2_RC.SESSION_MEMORY:
        return BackendError(f"{what}: the TPM has no free session slot", native_code=rc)
    return BackendError(f"{what} failed: {e} (rc 0x{rc:x})", native_code=rc)


def _da_properties_or_none(ectx: Any) -> dict[int, int] | None:
    if ectx is None:
        return None
    try:
        return _da_properties(ectx)
    except _tss_exception():
        return None


def _da_properties(ectx: Any) -> dict[int, int]:
    """TPM2_PT.PERMANENT and the four dictionary-attack properties from LOCKOUT_COUNTER."""
    from tpm2_pytss.constants import TPM2_PT

    props = _properties(ectx, TPM2_PT.PERMANENT, 1)
    props |= _properties(ectx, TPM2_PT.LOCKOUT_COUNTER, 4)
    return props


def _lockout_state(props: dict[int, int]) -> tuple[int, bool]:
    """Failures left before the lockout, and whether the TPM is in it."""
    from tpm2_pytss.constants import TPM2_PT, TPMA_PERMANENT

    left = max(0, props[TPM2_PT.MAX_AUTH_FAIL] - props[TPM2_PT.LOCKOUT_COUNTER])
    return left, left == 0 or bool(props[TPM2_PT.PERMANENT] & TPMA_PERMANENT.INLOCKOUT)


def _pin_error(rc: int, props: dict[int, int] | None) -> HsmAuthError:
    if props is None:
        return PinInvalid(native_code=rc)
    left, locked = _lockout_state(props)
    if locked:
        return _locked(rc, "wrong PIN; the TPM is now in dictionary-attack lockout", props)
    return PinInvalid(retry=RetryStatus(retries_left=left), native_code=rc)


def _locked(
    rc: int,
    why: str,
    props: dict[int, int] | None,
    *,
    error: type[PinLocked | LockedOut] = PinLocked,
) -> PinLocked | LockedOut:
    wait = _retry_after(props) if props is not None else None
    if wait is None:
        return error(f"{why} until the lockout is reset", native_code=rc)
    return error(why, retry=RetryStatus(retries_left=0, retry_after=wait), native_code=rc)


def _connect(tcti: str) -> Any:
    pytss = _import_pytss()
    try:
        return pytss.ESAPI(tcti)
    except pytss.TSS2_Exception as e:
        raise convert_tss_error(e, "connecting", tcti=tcti) from e
    except (ValueError, TypeError, RuntimeError) as e:  # malformed TCTI string
        raise BackendUnavailable(f"bad TCTI {tcti!r}: {e}") from e


def _properties(ectx: Any, first: int, count: int) -> dict[int, int]:
    from tpm2_pytss import TPM2_CAP

    _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, first, count)
    return {int(p.property): int(p.value) for p in data.data.tpmProperties}


class _ClientLock:
    """Which hsm-auth stores use a TPM that has no resource manager.

    Every open store holds a shared ``flock`` on ``<state_dir>/.clients-<tcti hash>.lock``
    (released by the kernel when a process dies, however it dies). A store that
    gets the lock exclusively is the TPM's first live client, and only that one
    may flush leftovers; then it shares the lock like the others.
    """

    def __init__(self, state_dir: Path, tcti: str) -> None:
        import fcntl
        import hashlib

        digest = hashlib.sha256(tcti.encode()).hexdigest()[:16]
        self._fd: int | None = open_lock_file(state_dir / f".clients-{digest}.lock")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.first = True
        except BlockingIOError:
            self.first = False
            self.share()
        except BaseException:
            self.release()
            raise

    def share(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # waits while a first client flushes

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _handles(ectx: Any, first: int) -> list[int]:
    """The TPM's handles of ``first``'s type (TPM2_GetCapability, TPM2_CAP.HANDLES)."""
    from tpm2_pytss import TPM2_CAP

    out: list[int] = []
    more = True
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, first, _HANDLES_PER_CALL)
        handles = [int(h) for h in data.data.handles]
        if not handles:
            break
        out += handles
        first = handles[-1] + 1
    return out


def _esys_handle(ectx: Any, handle: int) -> Any:
    """An ESYS_TR for a TPM handle that this context did not create.

    ESYS reads an object's public area for that, which a hash or HMAC sequence
    object does not have (TPM2_RC.SEQUENCE): such a handle gets a bare resource,
    deserialized from the ESYS form (handle, empty name, type "no extra data"),
    which is all that TPM2_FlushContext needs."""
    from tpm2_pytss.constants import TPM2_RC

    try:
        return ectx.tr_from_tpmpublic(handle)
    except _tss_exception() as e:
        if _tpm_code(e.rc) != TPM2_RC.SEQUENCE:
            raise
    bare = handle.to_bytes(4, "big") + _EMPTY_NAME + _IESYSC_WITHOUT_MISC_RSRC
    return ectx.tr_deserialize(bare)


def _ascii(*words: int) -> str:
    raw = b"".join(w.to_bytes(4, "big") for w in words)
    return raw.replace(b"\x00", b"").decode("ascii", "replace").strip()


class Tpm2KeyStore(KeyStore):
    """Keys and the ATC in a TPM 2.0, reached through a TCTI. See the module docstring."""

    name: ClassVar[str] = "tpm2"
    setting_names: ClassVar[frozenset[str] | None] = frozenset(
        {"tcti", "state_dir", "auth", "owner_auth"}
    )
    priority: ClassVar[float] = 20.0
    methods: ClassVar[tuple[Method, ...]] = (Method.DEVICE, Method.PIN)
    uses_state_dir: ClassVar[bool] = True

    def __init__(self, ectx: Any, tcti: str, state_dir: Path, auth_mode: str, owner_auth: str):
        self._ectx: Any = ectx
        self._tcti = tcti
        self._state_dir = state_dir
        self._auth_mode = auth_mode
        self._owner_auth = owner_auth.encode()
        self._srk: Any = None
        self._srk_persistent = False
        self._srk_name = ""
        self._session: Any = None
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # record id -> ESYS_TR
        self._nv: dict[int, Any] = {}  # NV index -> ESYS_TR
        self._records: dict[str, _Record] = {}  # URI -> its state file, read once
        self._owner_reads = True  # see _peek
        self._cache_size = 1
        self._clients: _ClientLock | None = None

    # --- lifecycle ----------------------------------------------------------

    @classmethod
    def probe(cls, settings: Settings) -> Mapping[str, str]:
        tcti = _resolve_tcti(settings)
        ectx = _connect(tcti)
        from tpm2_pytss.constants import TPM2_PT, TPM2_PT_FIRMWARE, TPM2_PT_VENDOR

        try:
            with _converted("reading TPM properties", tcti):
                fixed = _properties(ectx, TPM2_PT.MANUFACTURER, 8)
                var = _properties(ectx, TPM2_PT.MAX_AUTH_FAIL, 3)
        finally:
            ectx.close()
        v1 = fixed.get(TPM2_PT_FIRMWARE.VERSION_1, 0)
        v2 = fixed.get(TPM2_PT_FIRMWARE.VERSION_2, 0)
        vendor = _ascii(*(fixed.get(TPM2_PT_VENDOR.STRING_1 + i, 0) for i in range(4)))
        return {
            "tcti": tcti,
            "manufacturer": _ascii(fixed.get(TPM2_PT.MANUFACTURER, 0)),
            "vendor": vendor,
            "firmware": f"{v1 >> 16}.{v1 & 0xFFFF}.{v2 >> 16}.{v2 & 0xFFFF}",
            "max_auth_fail": str(var.get(TPM2_PT.MAX_AUTH_FAIL, 0)),
            "lockout_interval": f"{var.get(TPM2_PT.LOCKOUT_INTERVAL, 0)} s",
            "lockout_recovery": f"{var.get(TPM2_PT.LOCKOUT_RECOVERY, 0)} s",
            "resource_manager": "yes"
            if has_resource_manager(tcti)
            else "no (one client at a time; open flushes what killed clients left)",
        }

    @classmethod
    def open(cls, settings: Settings) -> Tpm2KeyStore:
        auth_mode = str(settings.get("auth", "auto"))
        if auth_mode not in ("auto", "pin", "none"):
            raise ConfigError(
                f"tpm2 setting auth must be 'pin', 'none' or 'auto', not {auth_mode!r}"
            )
        state_dir = _resolve_state_dir(settings)
        ensure_private_dir(state_dir)
        tcti = _resolve_tcti(settings)
        clients = None if has_resource_manager(tcti) else _ClientLock(state_dir, tcti)
        try:
            ectx = _connect(tcti)
        except BaseException:
            if clients is not None:
                clients.release()
            raise
        store = cls(ectx, tcti, state_dir, auth_mode, str(settings.get("owner_auth", "")))
        store._clients = clients
        try:
            from tpm2_pytss.constants import TPM2_PT_HR

            with _converted("reading TPM properties", tcti):
                transient = _properties(store._ectx, TPM2_PT_HR.TRANSIENT_MIN, 1).get(
                    TPM2_PT_HR.TRANSIENT_MIN, 3
                )
            if clients is not None and clients.first:
                store._flush_leftovers()
            if clients is not None:
                clients.share()
        except BaseException:
            store.close()
            raise
        # Slots: the storage key, one cached key, one scratch (HMAC sequence, a new key).
        store._cache_size = max(1, transient - 2)
        return store

    def close(self) -> None:
        if self._ectx is None:
            return
        ectx, self._ectx = self._ectx, None
        with contextlib.suppress(Exception):  # best effort: the TPM may be gone already
            for handle in [*self._loaded.values(), self._session]:
                if handle is not None:
                    ectx.flush_context(handle)
            if self._srk is not None and not self._srk_persistent:
                ectx.flush_context(self._srk)
        self._loaded.clear()
        self._nv.clear()
        ectx.close()
        if self._clients is not None:
            self._clients.release()
            self._clients = None

    def capabilities(self) -> frozenset[Capability]:
        return frozenset(
            {
                Capability.SIGN,
                Capability.HMAC,
                Capability.ECDH_DERIVE,
                Capability.COUNTER,
                Capability.HARDWARE_COUNTER,
                Capability.PIN,
                Capability.PIN_RETRY_LIMIT,
            }
        )

    @property
    def tcti(self) -> str:
        return self._tcti

    @property
    def state_dir(self) -> Path:
        return self._state_dir

    # --- keys -----------------------------------------------------------------

    def generate_key(self, label: str, kind: KeyKind, auth: Authorization) -> str:
        from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

        attrs = (
            TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
        )
        if kind is KeyKind.SIGNING:
            template = TPMT_PUBLIC.parse(
                "ecc256:ecdsa-sha256", objectAttributes=attrs | TPMA_OBJECT.SIGN_ENCRYPT
            )
        elif kind is KeyKind.AGREEMENT:
            return self._create(label, kind, _agreement_template(), auth, None)
        else:
            raise InvalidInput(f"generate_key makes SIGNING or AGREEMENT keys, not {kind.value}")
        return self._create(label, kind, TPM2B_PUBLIC(publicArea=template), auth, None)

    def list_keys(self, auth: Authorization) -> list[KeyInfo]:
        out = []
        for path in sorted(self._state_dir.glob("*.json")):
            with contextlib.suppress(StateError, InvalidInput, KeyNotFound):
                record = self._read(path.stem)
                out.append(KeyInfo(self._uri(record), record.kind, record.label))
        return out

    def delete_key(self, uri: str, auth: Authorization) -> None:
        path, _ = parse_attr_uri(uri, "tpm2")
        record_id = path.get("id", "")
        try:
            record = self._read(record_id)
        except KeyNotFound:
            return
        self._forget(record_id)
        if record.kind is KeyKind.COUNTER:
            self._undefine_counter(record)
        self._file(record_id).unlink(missing_ok=True)

    def public_key(self, uri: str, auth: Authorization) -> ec.EllipticCurvePublicKey:
        record = self._record(uri, KeyKind.SIGNING, KeyKind.AGREEMENT)
        return _ec_public(record.public)

    def sign(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return self.sign_digest(uri, digest.finalize(), auth)

    def sign_digest(self, uri: str, digest: bytes, auth: Authorization) -> bytes:
        """ECDSA over a SHA-256 digest computed by the caller; DER signature."""
        from tpm2_pytss import TPM2_ALG, TPM2_RH, TPM2_ST, TPM2B_DIGEST, TPMT_SIG_SCHEME
        from tpm2_pytss import TPMT_TK_HASHCHECK as Ticket

        if len(digest) != 32:
            raise InvalidInput("sign_digest needs a 32-byte SHA-256 digest")
        record = self._record(uri, KeyKind.SIGNING)
        handle = self._load(record, auth)
        # The key is not restricted, so the TPM accepts a host-computed digest
        # with the null ticket (a restricted key would need TPM2_Hash's ticket).
        ticket = Ticket(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._tpm("signing", record):
            sig = self._ectx.sign(
                handle,
                TPM2B_DIGEST(digest),
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                ticket,
                session1=self._auth_session(record.has_pin),
            )
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)

    def private_key(self, uri: str, auth: Authorization) -> Tpm2EcPrivateKey:
        """The signing (or agreement) key as a ``cryptography`` private key whose
        ``sign()`` (or ``exchange()``) runs in the TPM."""
        record = self._record(uri, KeyKind.SIGNING, KeyKind.AGREEMENT)
        return Tpm2EcPrivateKey(self, uri, auth, _ec_public(record.public))

    def ecdh(self, uri: str, peer_public: ec.EllipticCurvePublicKey, auth: Authorization) -> bytes:
        """TPM2_ECDH_ZGen with an agreement key: the shared x-coordinate (leaves the TPM)."""
        secret = self._zgen(self._record(uri, KeyKind.AGREEMENT), peer_public, auth)
        try:
            return bytes(secret)
        finally:
            _wipe(secret)

    # --- OTP key ----------------------------------------------------------------

    def derive_otp_key(
        self,
        label: str,
        agreement_key: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> str:
        secret = self._zgen(self._record(agreement_key, KeyKind.AGREEMENT), peer_public, auth)
        try:
            return self._create(label, KeyKind.OTP, _otp_template(), auth, secret)
        finally:
            _wipe(secret)

    def agree_otp_key(
        self,
        label: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> tuple[str, ec.EllipticCurvePublicKey]:
        # The agreement key is created, loaded, used for one TPM2_ECDH_ZGen and
        # flushed; its blob is never written, so nothing in the state directory can
        # run ECDH_ZGen again. Z passes through this process once, into the
        # TPM2_Create that imports it as the keyedhash OTP key.
        record = self._create_record(f"{label}/ecdh", KeyKind.AGREEMENT,
                                     _agreement_template(), auth, None)
        try:
            secret = self._zgen(record, peer_public, auth)
        finally:
            self._forget(record.id)  # flushes the loaded key
        try:
            otp_key = self._create(f"{label}/otp", KeyKind.OTP, _otp_template(), auth, secret)
        finally:
            _wipe(secret)
        return otp_key, _ec_public(record.public)

    def hmac(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        record = self._record(uri, KeyKind.OTP)
        return self._hmac(record, self._load(record, auth), data)

    def _hmac(self, record: _Record, handle: Any, data: bytes) -> bytes:
        from tpm2_pytss import TPM2_ALG, TPM2B_AUTH, TPM2B_MAX_BUFFER

        with self._tpm("computing the HMAC", record):
            if len(data) <= _MAX_HMAC_BUFFER:
                mac = self._ectx.hmac(
                    handle,
                    TPM2B_MAX_BUFFER(data),
                    TPM2_ALG.NULL,
                    session1=self._auth_session(record.has_pin),
                )
                return bytes(mac)
            seq = self._ectx.hmac_start(
                handle,
                TPM2B_AUTH(b""),
                TPM2_ALG.SHA256,
                session1=self._auth_session(record.has_pin),
            )
            try:
                for i in range(0, len(data) - _MAX_HMAC_BUFFER, _MAX_HMAC_BUFFER):
                    self._ectx.sequence_update(seq, data[i : i + _MAX_HMAC_BUFFER])
                tail = (len(data) - 1) // _MAX_HMAC_BUFFER * _MAX_HMAC_BUFFER
                mac, _ = self._ectx.sequence_complete(seq, TPM2B_MAX_BUFFER(data[tail:]))
                seq = None  # TPM2_SequenceComplete flushed it
            finally:
                if seq is not None:
                    with contextlib.suppress(Exception):
                        self._ectx.flush_context(seq)
            return bytes(mac)

    # --- counter ----------------------------------------------------------------

    def create_counter(self, label: str, auth: Authorization) -> str:
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2_NT,
            TPM2_RC,
            TPM2B_AUTH,
            TPM2B_NV_PUBLIC,
            TPMA_NV,
            TPMS_NV_PUBLIC,
        )

        pin = self._new_auth(auth)
        has_pin = bool(pin)
        secret = has_pin or bool(self._owner_auth)
        ectx = self._ectx
        handle = None
        # The state file is written before the NV index is defined, so that a process
        # killed in between leaves a file naming the index (found and deleted as an
        # orphan), never an NV index that no file names.
        record = _Record(
            id=secrets.token_hex(8), kind=KeyKind.COUNTER, label=label, has_pin=has_pin
        )
        try:
            ectx.tr_set_auth(_esys_tr().OWNER, self._owner_auth)
            for _ in range(16):
                index = NV_OWNER_FIRST + secrets.randbelow(NV_OWNER_LAST - NV_OWNER_FIRST + 1)
                record = dataclasses.replace(record, nv_index=index)
                self._write(record)
                public = TPM2B_NV_PUBLIC(
                    TPMS_NV_PUBLIC(
                        nvIndex=index,
                        nameAlg=TPM2_ALG.SHA256,
                        attributes=_dictionary_attack_rule(
                            _COUNTER_ATTRS(TPMA_NV, TPM2_NT), TPMA_NV.NO_DA, pin
                        ),
                        dataSize=8,
                    )
                )
                try:
                    handle = ectx.nv_define_space(
                        TPM2B_AUTH(bytes(pin)),
                        public,
                        _esys_tr().OWNER,
                        session1=self._auth_session(secret, decrypt=has_pin),
                    )
                    break
                except _tss_exception() as e:
                    if _tpm_code(e.rc) == TPM2_RC.NV_DEFINED:
                        continue
                    raise self._convert(e, "defining the NV counter (needs owner auth)") from e
        except HsmAuthError:  # the TPM refused: nothing defined, only the file to remove
            self._file(record.id).unlink(missing_ok=True)
            raise
        finally:
            _wipe(pin)
        if handle is None:
            self._file(record.id).unlink(missing_ok=True)
            raise CounterError("no free NV index found in the owner range")
        index = record.nv_index
        try:
            self._nv[index] = handle
            # TPM_NT_COUNTER has no value until the first increment (TPMA_NV_WRITTEN).
            self.counter_increment(self._uri(record), auth)
        except BaseException:
            with contextlib.suppress(Exception):
                self.delete_key(self._uri(record), auth)
            raise
        return self._uri(record)

    def counter_value(self, uri: str, auth: Authorization) -> int:
        record = self._record(uri, KeyKind.COUNTER)
        handle = self._nv_handle(record, auth)
        with self._tpm("reading the counter", record):
            return self._nv_read(handle, record.has_pin)

    def counter_increment(self, uri: str, auth: Authorization) -> int:
        record = self._record(uri, KeyKind.COUNTER)
        return self._increment(record, self._nv_handle(record, auth))

    def _increment(self, record: _Record, handle: Any) -> int:
        with self._tpm("incrementing the counter", record):
            self._ectx.nv_increment(handle, handle, session1=self._auth_session(record.has_pin))
            return self._nv_read(handle, record.has_pin)

    def counted_hmac(
        self,
        otp_key: str,
        counter: str,
        message_for: Callable[[int], bytes],
        auth: Authorization,
        *,
        limit: int | None = None,
    ) -> tuple[int, bytes]:
        """TPM2_NV_Read (only with a ``limit``: refuse before advancing), then
        TPM2_NV_Increment and TPM2_NV_Read, then TPM2_HMAC: the counter is written
        through to NV before the MAC exists. The value is read back after the
        increment, not taken as the first read + 1, because anyone holding the
        index's auth (for ``device`` an empty one; a login proof, made without the
        authenticator's lock) may have advanced it in between. Both objects are
        found, and the OTP key loaded, before the counter moves, so a missing or
        foreign key costs no counter value."""
        key_record = self._record(otp_key, KeyKind.OTP)
        counter_record = self._record(counter, KeyKind.COUNTER)
        nv = self._nv_handle(counter_record, auth)
        key = self._load(key_record, auth)
        if limit is not None:
            check_counter_limit(self._peek(counter_record, nv), limit)
        value = self._increment(counter_record, nv)
        return value, self._hmac(key_record, key, message_for(value))

    # --- PIN --------------------------------------------------------------------

    def pin_status(self) -> PinStatus:
        with self._tpm("reading the lockout state"):
            props = _da_properties(self._ectx)
        retries, locked = _lockout_state(props)
        return PinStatus(
            enforced=True,
            retries_left=retries,
            final_try=retries == 1,
            locked=locked,
            retry_after=_retry_after(props) if locked else None,
        )

    # --- attestation (docs/PROTOCOL.md, "TPM 2.0 attestation") -------------------

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
        """The base enrollment, plus (once this TPM has an attestation key, see
        :meth:`registration_request`) TPM2_Certify statements by the AK over the new
        signing key and OTP key, qualified with ``binding``, as the attestation."""
        enrollment = super().enroll(
            method, label, verifier_agreement_public, auth, binding=binding, confirm=confirm
        )
        ak = self._read_ak()
        if ak is None:
            return enrollment
        try:
            attestation = self.attest(
                [enrollment.signing_key, enrollment.otp_key], binding, auth, ak
            )
        except BaseException:
            self.roll_back([enrollment.signing_key, enrollment.otp_key, enrollment.counter], auth)
            raise
        return dataclasses.replace(enrollment, attestation=attestation)

    def attest(
        self, uris: list[str], binding: bytes, auth: Authorization, ak: _AkRecord | None = None
    ) -> bytes:
        """The ``hsm-auth-tpm2`` attestation of the keys ``uris`` (signing key, then
        OTP key): TPM2_Certify of each by the attestation key, qualified with
        ``binding``, with the AK bindings this TPM holds."""
        from tpm2_pytss import TPM2_ALG, TPM2B_DATA, TPMT_SIG_SCHEME

        from hsm_auth.attestation_tpm2 import certify_qualifier, encode_attestation

        ak = ak or self._read_ak()
        if ak is None:
            raise StateError("this TPM has no attestation key (hsm-auth tpm register)")
        qualifier = TPM2B_DATA(certify_qualifier(binding))
        records = [self._record(uri, KeyKind.SIGNING, KeyKind.OTP) for uri in uris]
        certified = []
        with self._scratch_ak(ak) as ak_handle:
            for record in records:
                handle = self._load(record, auth)
                with self._tpm("certifying a key with the attestation key", record):
                    attest, signature = self._ectx.certify(
                        handle,
                        ak_handle,
                        qualifier,
                        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                        session1=self._auth_session(record.has_pin),
                        session2=_esys_tr().PASSWORD,
                    )
                certified.append(
                    (record.public[2:], bytes(attest), bytes(signature.marshal()))
                )
        return encode_attestation(ak.public[2:], ak.ek_cert_hash, ak.bindings, certified)

    def ek_certificate(self) -> bytes:
        """The RSA 2048 EK certificate (DER) from its NV index (TCG: 0x01C00002)."""
        from tpm2_pytss import TPM2_CAP, TPM2_PT_NV

        ectx = self._ectx
        with self._tpm("reading the EK certificate"):
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, EK_CERT_NV_INDEX, 1)
            if EK_CERT_NV_INDEX not in [int(h) for h in data.data.handles]:
                raise KeyNotFound(
                    f"this TPM has no RSA EK certificate (NV index 0x{EK_CERT_NV_INDEX:08x})"
                )
            chunk = _properties(ectx, TPM2_PT_NV.BUFFER_MAX, 1).get(TPM2_PT_NV.BUFFER_MAX, 512)
            handle = ectx.tr_from_tpmpublic(EK_CERT_NV_INDEX)
            public, _ = ectx.nv_read_public(handle)
            size = int(public.nvPublic.dataSize)
            out = b""
            while len(out) < size:
                n = min(chunk, size - len(out))
                out += bytes(ectx.nv_read(handle, n, len(out), handle))
            ectx.tr_close(handle)
        return out

    def registration_request(self) -> bytes:
        """The TPM registration request for a verifier (EK certificate, EK and AK
        public areas). The attestation key is made on first use, and again (its
        bindings dropped) when the EK certificate changed or the storage key did
        (the owner hierarchy was cleared, so the old AK blob no longer loads)."""
        import hashlib

        from hsm_auth.attestation_tpm2 import registration_request

        certificate = self.ek_certificate()
        with self._endorsement_key() as (_, ek_public):
            pass
        ak = self._read_ak()
        ek_hash = hashlib.sha256(certificate).digest()
        self._storage_key()
        if ak is None or ak.ek_cert_hash != ek_hash or ak.parent != self._srk_name:
            ak = self._create_ak(ek_hash)
        return registration_request(certificate, ek_public, ak.public[2:])

    def activate_registration(self, challenge: bytes) -> None:
        """TPM2_ActivateCredential on a verifier's registration challenge: the AK
        binding it carries is kept with the AK and sent with every enrollment."""
        from tpm2_pytss import TPM2_ALG, TPM2_SE, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT
        from tpm2_pytss import TPMT_SYM_DEF as SymDef

        from hsm_auth.attestation_tpm2 import open_binding, parse_challenge, parse_public

        ak = self._read_ak()
        if ak is None:
            raise StateError("this TPM has no attestation key: make a registration request first")
        blob, secret, sealed = parse_challenge(challenge)
        try:
            credential, _ = TPM2B_ID_OBJECT.unmarshal(blob)
            encrypted, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        except Exception:
            raise InvalidInput("malformed TPM registration challenge") from None
        ectx = self._ectx
        self._make_room(self._cache_size)
        with self._scratch_ak(ak) as ak_handle, self._endorsement_key() as (ek, _):
            with self._tpm("starting a policy session for the EK"):
                session = ectx.start_auth_session(
                    _esys_tr().NONE, _esys_tr().NONE, TPM2_SE.POLICY,
                    SymDef(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
                )
            try:
                with self._tpm("authorizing the EK (PolicySecret, endorsement)"):
                    ectx.tr_set_auth(_esys_tr().ENDORSEMENT, b"")
                    ectx.policy_secret(_esys_tr().ENDORSEMENT, session, b"", b"", b"", 0)
                with self._tpm("activating the verifier's credential"):
                    key = bytes(ectx.activate_credential(
                        ak_handle, ek, credential, encrypted,
                        session1=_esys_tr().PASSWORD, session2=session,
                    ))
            finally:
                with contextlib.suppress(Exception):
                    ectx.flush_context(session)
        root_hash, signature = open_binding(key, parse_public(ak.public[2:]).name, sealed)
        bindings = [b for b in ak.bindings if b[1] != signature] + [(root_hash, signature)]
        self._write_ak(dataclasses.replace(ak, bindings=tuple(bindings[-4:])))

    @contextlib.contextmanager
    def _endorsement_key(self) -> Iterator[tuple[Any, bytes]]:
        """The RSA EK (TCG template L-1) and its TPMT_PUBLIC: from 0x81010001 when it
        holds that template, else made with TPM2_CreatePrimary (and flushed after)."""
        from tpm2_pytss import TPM2B_PUBLIC
        from tpm2_pytss.utils import NVReadEK, create_ek_template

        ectx = self._ectx
        with self._tpm("finding the endorsement key"):
            _, template = create_ek_template("EK-RSA2048", NVReadEK(ectx))
            handle = None
            _, data = ectx.get_capability(_tpm2_cap().HANDLES, EK_PERSISTENT_HANDLE, 1)
            if EK_PERSISTENT_HANDLE in [int(h) for h in data.data.handles]:
                handle = ectx.tr_from_tpmpublic(EK_PERSISTENT_HANDLE)
                public, _, _ = ectx.read_public(handle)
                if not _same_rsa_template(public.publicArea, template.publicArea):
                    ectx.tr_close(handle)
                    handle = None
            transient = handle is None
            if transient:
                self._make_room(self._cache_size)
                ectx.tr_set_auth(_esys_tr().ENDORSEMENT, b"")
                handle, public, *_ = ectx.create_primary(
                    None, template, _esys_tr().ENDORSEMENT
                )
        try:
            yield handle, bytes(TPM2B_PUBLIC(publicArea=public.publicArea).marshal())[2:]
        finally:
            with contextlib.suppress(Exception):
                if transient:
                    ectx.flush_context(handle)
                else:
                    ectx.tr_close(handle)

    @contextlib.contextmanager
    def _scratch_ak(self, ak: _AkRecord) -> Iterator[Any]:
        """The AK loaded in the scratch slot for one operation, flushed after."""
        from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

        srk = self._storage_key()
        if ak.parent != self._srk_name:
            raise BackendError(
                "the attestation key was made by another TPM (or before this TPM's owner "
                "hierarchy was cleared): register the TPM again (hsm-auth tpm register)"
            )
        public, _ = TPM2B_PUBLIC.unmarshal(ak.public)
        private, _ = TPM2B_PRIVATE.unmarshal(ak.private)
        self._make_room(1)
        with self._tpm("loading the attestation key"):
            handle = self._ectx.load(srk, private, public)
        try:
            yield handle
        finally:
            with contextlib.suppress(Exception):
                self._ectx.flush_context(handle)

    def _create_ak(self, ek_cert_hash: bytes) -> _AkRecord:
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPMA_OBJECT,
            TPMS_SENSITIVE_CREATE,
            TPMT_PUBLIC,
        )

        attrs = (
            TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.SIGN_ENCRYPT
        )
        template = TPMT_PUBLIC.parse(
            "ecc256:ecdsa-sha256",
            objectAttributes=_dictionary_attack_rule(attrs, TPMA_OBJECT.NODA, b""),
        )
        template.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL  # a signing key
        srk = self._storage_key()
        self._make_room(1)
        with self._tpm("creating the attestation key"):
            private, public, *_ = self._ectx.create(
                srk, TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE()),
                TPM2B_PUBLIC(publicArea=template),
            )
        ak = _AkRecord(
            parent=self._srk_name,
            public=bytes(public.marshal()),
            private=bytes(private.marshal()),
            ek_cert_hash=ek_cert_hash,
        )
        self._write_ak(ak)
        return ak

    def _ak_file(self) -> Path:
        return self._state_dir / "attestation" / "ak.json"

    def _read_ak(self) -> _AkRecord | None:
        path = self._ak_file()
        if not path.exists():
            return None
        check_state(path)
        try:
            return _AkRecord.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"{path} is not an attestation key file ({e})") from e

    def _write_ak(self, ak: _AkRecord) -> None:
        path = self._ak_file()
        try:
            ensure_private_dir(path.parent)
            atomic_write(path, ak.to_json().encode())
        except OSError as e:
            raise StateError(f"cannot write {path}: {e.strerror}") from e

    # --- internals: a previous client's leftovers ---------------------------------

    def _flush_leftovers(self) -> None:
        """Flush every transient object and every session (loaded or saved) in the TPM.

        Only for a TPM reached without a resource manager: there a client that was
        killed leaves its objects and sessions loaded, and after two or three kills
        the TPM's few slots are full and every command fails. It runs only when no
        other store on this TCTI and state dir is open, in this process or another
        (:class:`_ClientLock`), so what it flushes belongs to no live hsm-auth
        client. Other programs on the same TPM are not seen: only one client can
        use such a TPM safely, and one that keeps contexts across connections
        (tpm2-tools without a resource manager) loses them here. Persistent objects
        and NV indexes are untouched.
        """
        from tpm2_pytss import TPM2_HR, TPM2_HT

        ectx = self._ectx
        for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION, TPM2_HT.SAVED_SESSION):
            with self._tpm("listing what a previous TPM client left loaded"):
                handles = _handles(ectx, kind << TPM2_HR.SHIFT)
            for handle in handles:
                with self._tpm("flushing what a previous TPM client left loaded"):
                    ectx.flush_context(_esys_handle(ectx, handle))

    # --- internals: storage key and sessions -------------------------------------

    def _storage_key(self) -> Any:
        if self._srk is not None:
            return self._srk
        from tpm2_pytss import TPM2B_PUBLIC

        ectx = self._ectx
        template = _srk_template()
        with self._tpm("looking for the storage key at 0x81000001"):
            if SRK_PERSISTENT_HANDLE in self._persistent_handles():
                handle = ectx.tr_from_tpmpublic(SRK_PERSISTENT_HANDLE)
                public, _, _ = ectx.read_public(handle)
                if _same_template(public.publicArea, template):
                    self._srk, self._srk_persistent = handle, True
                else:
                    ectx.tr_close(handle)
        if self._srk is None:
            ectx.tr_set_auth(_esys_tr().OWNER, self._owner_auth)
            with self._tpm("creating the storage key (needs owner auth)"):
                self._srk, *_ = ectx.create_primary(
                    None, TPM2B_PUBLIC(publicArea=template), _esys_tr().OWNER
                )
        with self._tpm("reading the storage key's name"):
            self._srk_name = bytes(ectx.tr_get_name(self._srk)).hex()
        return self._srk

    def _persistent_handles(self) -> set[int]:
        from tpm2_pytss import TPM2_CAP

        _, data = self._ectx.get_capability(TPM2_CAP.HANDLES, SRK_PERSISTENT_HANDLE, 1)
        return {int(h) for h in data.data.handles}

    def _auth_session(self, secret: bool, *, encrypt: bool = False, decrypt: bool = False) -> Any:
        """The session for one command. With a secret (a PIN auth value, or with
        ``encrypt``/``decrypt`` a secret parameter), one HMAC session per instance,
        salted to the storage key: the PIN never crosses the bus and the first
        command/response parameter travels AES-128-CFB encrypted. Without one, a
        plain password session with the empty auth: ESYS spends about 2.5 ms of
        host CPU per command on an HMAC session, for nothing to protect."""
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2_SE,
            TPMA_SESSION,
            TPMT_SYM_DEF,
            TPMU_SYM_KEY_BITS,
            TPMU_SYM_MODE,
        )

        ectx = self._ectx
        if not (secret or encrypt or decrypt):
            return _esys_tr().PASSWORD
        if self._session is None:
            srk = self._storage_key()
            symmetric = TPMT_SYM_DEF(
                algorithm=TPM2_ALG.AES,
                keyBits=TPMU_SYM_KEY_BITS(aes=128),
                mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
            )
            with self._tpm("starting an auth session"):
                self._session = ectx.start_auth_session(
                    srk, _esys_tr().NONE, TPM2_SE.HMAC, symmetric, TPM2_ALG.SHA256
                )
        attrs = TPMA_SESSION.CONTINUESESSION
        if encrypt:
            attrs |= TPMA_SESSION.ENCRYPT
        if decrypt:
            attrs |= TPMA_SESSION.DECRYPT
        ectx.trsess_set_attributes(self._session, attrs)
        return self._session

    # --- internals: objects -----------------------------------------------------

    def _new_auth(self, auth: Authorization) -> bytearray:
        """The auth value for a new object, by the ``auth`` setting."""
        if self._auth_mode == "none":
            return bytearray()
        if auth.pin is None:
            if self._auth_mode == "pin":
                raise PinRequired("the tpm2 backend is set to auth = 'pin' and no PIN was given")
            return bytearray()
        return _pin_bytes(auth.pin)

    def _use_auth(self, record: _Record, auth: Authorization) -> bytes:
        if not record.has_pin:
            return b""
        if auth.pin is None:
            raise PinRequired(f"{record.label!r} needs the offline PIN")
        return bytes(_pin_bytes(auth.pin))

    def _create(
        self,
        label: str,
        kind: KeyKind,
        public: Any,
        auth: Authorization,
        data: bytearray | None,
    ) -> str:
        record = self._create_record(label, kind, public, auth, data)
        self._write(record)
        return self._uri(record)

    def _create_record(
        self,
        label: str,
        kind: KeyKind,
        public: Any,
        auth: Authorization,
        data: bytearray | None,
    ) -> _Record:
        """TPM2_Create under the storage key; the blob, not yet written anywhere."""
        from tpm2_pytss import (
            TPM2B_AUTH,
            TPM2B_SENSITIVE_CREATE,
            TPMA_OBJECT,
            TPMS_SENSITIVE_CREATE,
        )
        from tpm2_pytss import TPM2B_SENSITIVE_DATA as Data

        pin = self._new_auth(auth)
        has_pin = bool(pin)
        secret = has_pin or data is not None
        area = public.publicArea
        area.objectAttributes = _dictionary_attack_rule(
            area.objectAttributes, TPMA_OBJECT.NODA, pin
        )
        srk = self._storage_key()
        sensitive = TPM2B_SENSITIVE_CREATE(
            TPMS_SENSITIVE_CREATE(
                userAuth=TPM2B_AUTH(bytes(pin)),
                data=Data(bytes(data)) if data is not None else Data(),
            )
        )
        try:
            self._make_room(1)
            with self._tpm(f"creating the {kind.value} key"):
                private, public_out, *_ = self._ectx.create(
                    srk, sensitive, public, session1=self._auth_session(secret, decrypt=secret)
                )
        finally:
            _wipe(pin)
            del sensitive
        return _Record(
            id=secrets.token_hex(8),
            kind=kind,
            label=label,
            has_pin=has_pin,
            parent=self._srk_name,
            public=bytes(public_out.marshal()),
            private=bytes(private.marshal()),
        )

    def _load(self, record: _Record, auth: Authorization) -> Any:
        from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC

        value = self._use_auth(record, auth)
        handle = self._loaded.get(record.id)
        if handle is None:
            srk = self._storage_key()
            if record.parent != self._srk_name:
                raise BackendError(
                    f"the key blob {record.label!r} was made by another TPM (or before this "
                    "TPM's owner hierarchy was cleared): it cannot be used here"
                )
            public, _ = TPM2B_PUBLIC.unmarshal(record.public)
            private, _ = TPM2B_PRIVATE.unmarshal(record.private)
            self._make_room(1)
            with self._tpm("loading the key", record):
                handle = self._ectx.load(srk, private, public)
            self._loaded[record.id] = handle
        self._loaded.move_to_end(record.id)
        self._ectx.tr_set_auth(handle, value)
        return handle

    def _make_room(self, free: int) -> None:
        while self._loaded and len(self._loaded) + free > self._cache_size:
            _, handle = self._loaded.popitem(last=False)
            with self._tpm("flushing a key"):
                self._ectx.flush_context(handle)

    def _forget(self, record_id: str) -> None:
        for uri in [u for u, r in self._records.items() if r.id == record_id]:
            del self._records[uri]
        handle = self._loaded.pop(record_id, None)
        if handle is not None:
            with self._tpm("flushing a key"):
                self._ectx.flush_context(handle)

    def _zgen(
        self, record: _Record, peer_public: ec.EllipticCurvePublicKey, auth: Authorization
    ) -> bytearray:
        from tpm2_pytss import TPM2B_ECC_POINT, TPMS_ECC_POINT

        if not isinstance(peer_public.curve, ec.SECP256R1):
            raise InvalidInput("the peer key must be on P-256")
        numbers = peer_public.public_numbers()
        point = TPM2B_ECC_POINT(
            TPMS_ECC_POINT(x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
        )
        handle = self._load(record, auth)
        with self._tpm("computing ECDH", record):
            z = self._ectx.ecdh_zgen(handle, point, session1=self._auth_session(True, encrypt=True))
        secret = bytearray(bytes(z.point.x).rjust(32, b"\x00"))
        del z
        return secret

    def _nv_handle(self, record: _Record, auth: Authorization) -> Any:
        value = self._use_auth(record, auth)
        handle = self._nv.get(record.nv_index)
        if handle is None:
            from tpm2_pytss import TPM2_NT, TPMA_NV

            with self._tpm("opening the counter", record):
                handle = self._ectx.tr_from_tpmpublic(record.nv_index)
                public, _ = self._ectx.nv_read_public(handle)
            attrs = int(public.nvPublic.attributes) & ~int(TPMA_NV.WRITTEN)
            # A counter without a PIN is NO_DA, or DA-protected if made before that rule.
            if not record.has_pin:
                attrs &= ~int(TPMA_NV.NO_DA)
            if attrs != int(_COUNTER_ATTRS(TPMA_NV, TPM2_NT)) or public.nvPublic.dataSize != 8:
                raise CounterError(
                    f"NV index 0x{record.nv_index:08x} is not the counter {record.label!r}"
                )
            self._nv[record.nv_index] = handle
        self._ectx.tr_set_auth(handle, value)
        return handle

    def _peek(self, record: _Record, handle: Any) -> int:
        """The counter's value for the offline-use limit, a check that needs neither
        the PIN nor response integrity (a forged value can only refuse, or let the
        TPM-checked increment run). With an empty owner auth it is read as the owner
        (TPMA_NV_OWNERREAD) in a password session, which spares the pin method one
        command's salted-HMAC-session work. Where the owner has a password (not
        configured: that one would need a session of its own) or the owner hierarchy
        is disabled, the TPM refuses without counting a DA failure, and this store
        reads with the index's own auth from then on."""
        if self._owner_reads and not self._owner_auth:
            from tpm2_pytss.constants import TPM2_RC

            owner = _esys_tr().OWNER
            self._ectx.tr_set_auth(owner, b"")
            try:
                data = self._ectx.nv_read(handle, 8, 0, owner, session1=_esys_tr().PASSWORD)
                return int.from_bytes(bytes(data), "big")
            except _tss_exception() as e:
                if _tpm_code(e.rc) not in (TPM2_RC.BAD_AUTH, TPM2_RC.HIERARCHY):
                    raise self._convert(e, "reading the counter", record) from e
                self._owner_reads = False
        with self._tpm("reading the counter", record):
            return self._nv_read(handle, record.has_pin)

    def _nv_read(self, handle: Any, secret: bool) -> int:
        data = self._ectx.nv_read(handle, 8, 0, handle, session1=self._auth_session(secret))
        return int.from_bytes(bytes(data), "big")

    def _undefine_counter(self, record: _Record) -> None:
        ectx = self._ectx
        handle = self._nv.pop(record.nv_index, None)
        ectx.tr_set_auth(_esys_tr().OWNER, self._owner_auth)
        try:
            if handle is None:
                handle = ectx.tr_from_tpmpublic(record.nv_index)
            ectx.nv_undefine_space(
                handle, _esys_tr().OWNER, session1=self._auth_session(bool(self._owner_auth))
            )
        except _tss_exception() as e:
            if _tpm_code(e.rc) != _tpm2_rc().HANDLE:  # already gone
                raise self._convert(e, "deleting the NV counter (needs owner auth)") from e

    # --- internals: state files ---------------------------------------------------

    def _file(self, record_id: str) -> Path:
        if not record_id or not all(c in "0123456789abcdef" for c in record_id):
            raise InvalidInput("the tpm2: URI has no valid id attribute")
        return self._state_dir / f"{record_id}.json"

    def _write(self, record: _Record) -> None:
        try:
            atomic_write(self._file(record.id), record.to_json().encode())
        except OSError as e:
            raise StateError(f"cannot write {self._file(record.id)}: {e.strerror}") from e

    def _read(self, record_id: str) -> _Record:
        path = self._file(record_id)
        check_state(path, missing_ok=True)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise KeyNotFound(f"no tpm2 object with id {record_id} in {self._state_dir}") from None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from e
        except UnicodeDecodeError:
            raise StateError(f"{path} is not a tpm2 object file (not UTF-8)") from None
        try:
            record = _Record.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise StateError(f"{path} is not a tpm2 object file ({e})") from e
        if record.id != record_id:
            raise StateError(f"{path} names another object")
        return record

    def _record(self, uri: str, *kinds: KeyKind) -> _Record:
        """The object a URI names. Its state file is read (and checked) once per open
        store: a record never changes after it is written, and deleting it here
        forgets it (:meth:`_forget`)."""
        record = self._records.get(uri)
        if record is None:
            path, _ = parse_attr_uri(uri, "tpm2")
            record = self._read(path.get("id", ""))
            self._records[uri] = record
        if record.kind not in kinds:
            wanted = " or ".join(k.value for k in kinds)
            raise InvalidInput(f"{record.label!r} is a {record.kind.value} object, not {wanted}")
        return record

    def _uri(self, record: _Record) -> str:
        path = {"id": record.id, "object": record.label, "type": _KIND_TYPE[record.kind]}
        if record.kind is KeyKind.COUNTER:
            path["nv-index"] = f"0x{record.nv_index:08x}"
        return format_attr_uri("tpm2", path, {"tcti": self._tcti})

    # --- internals: errors ----------------------------------------------------------

    @contextlib.contextmanager
    def _tpm(self, what: str, record: _Record | None = None) -> Iterator[None]:
        if self._ectx is None:
            raise BackendError("the tpm2 key store is closed")
        try:
            yield
        except _tss_exception() as e:
            raise self._convert(e, what, record) from e

    def _convert(self, e: Any, what: str, record: _Record | None = None) -> HsmAuthError:
        return convert_tss_error(e, what, tcti=self._tcti, record=record, ectx=self._ectx)


def _agreement_template() -> Any:
    from tpm2_pytss import TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    attrs = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.DECRYPT
    )
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC.parse("ecc256:ecdh-sha256", objectAttributes=attrs)
    )


def _otp_template() -> Any:
    """The imported OTP key: a keyedhash object that can only HMAC-SHA256."""
    from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    template = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.SIGN_ENCRYPT,
    )
    template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.HMAC
    template.parameters.keyedHashDetail.scheme.details.hmac.hashAlg = TPM2_ALG.SHA256
    return TPM2B_PUBLIC(publicArea=template)


def _dictionary_attack_rule(attributes: Any, no_da: Any, auth_value: bytes | bytearray) -> Any:
    """The one owner of the dictionary-attack rule, for every object and NV index this
    backend makes (``no_da`` is ``TPMA_OBJECT.NODA`` or ``TPMA_NV.NO_DA``): with an auth
    value never ``noDA``, so wrong PINs run into the TPM's lockout; with an empty one
    always ``noDA``, since there is nothing to guess and the lockout that wrong PINs
    cause is TPM-wide: it must not stop the PIN-less ``device`` method."""
    if not auth_value:
        return attributes | no_da
    if attributes & no_da:
        raise BackendError("refusing to make a TPM object that has an auth value noDA")
    return attributes


def _COUNTER_ATTRS(tpma_nv: Any, tpm2_nt: Any) -> Any:
    # Read and increment with the index's own auth (the PIN); the owner may read
    # (the value is not secret) and delete. NO_DA by _dictionary_attack_rule; not
    # ORDERLY, so every increment is written to NV before the TPM answers.
    return (
        tpma_nv.AUTHREAD
        | tpma_nv.AUTHWRITE
        | tpma_nv.OWNERREAD
        | (tpm2_nt.COUNTER << tpma_nv.TPM2_NT_SHIFT)
    )


def _retry_after(props: dict[int, int]) -> float | None:
    # The TPM forgets one failure per lockout interval after the last one; the
    # wait can only be shorter than one interval. 0 means only a reset helps.
    from tpm2_pytss.constants import TPM2_PT

    interval = props.get(TPM2_PT.LOCKOUT_INTERVAL, 0)
    return float(interval) if interval else None


def _srk_template() -> Any:
    from tpm2_pytss import TPMA_OBJECT, TPMT_PUBLIC

    attributes = (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
    )
    return TPMT_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes=_dictionary_attack_rule(attributes, TPMA_OBJECT.NODA, b""),
    )


def _same_template(public: Any, template: Any) -> bool:
    """Equal public areas apart from ``unique`` (the key itself)."""
    from tpm2_pytss import TPM2B_PUBLIC

    def strip(area: Any) -> bytes:
        copy, _ = TPM2B_PUBLIC.unmarshal(TPM2B_PUBLIC(publicArea=area).marshal())
        copy.publicArea.unique.ecc.x = b""
        copy.publicArea.unique.ecc.y = b""
        return bytes(copy.marshal())

    return bool(public.type == template.type) and strip(public) == strip(template)


def _ec_public(marshalled: bytes) -> ec.EllipticCurvePublicKey:
    from tpm2_pytss import TPM2B_PUBLIC

    public, _ = TPM2B_PUBLIC.unmarshal(marshalled)
    x = int.from_bytes(bytes(public.publicArea.unique.ecc.x), "big")
    y = int.from_bytes(bytes(public.publicArea.unique.ecc.y), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def _pin_bytes(pin: str) -> bytearray:
    value = bytearray(pin.encode("utf-8"))
    if len(value) > _MAX_AUTH:
        _wipe(value)
        raise InvalidInput(
            f"the PIN is longer than {_MAX_AUTH} bytes, which a TPM auth value holds"
        )
    return value


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def _esys_tr() -> Any:
    from tpm2_pytss import ESYS_TR

    return ESYS_TR


def _tpm2_cap() -> Any:
    from tpm2_pytss import TPM2_CAP

    return TPM2_CAP


def _same_rsa_template(public: Any, template: Any) -> bool:
    """Equal RSA public areas apart from ``unique`` (the modulus)."""
    from tpm2_pytss import TPM2B_PUBLIC

    def strip(area: Any) -> bytes:
        copy, _ = TPM2B_PUBLIC.unmarshal(TPM2B_PUBLIC(publicArea=area).marshal())
        copy.publicArea.unique.rsa = b""
        return bytes(copy.marshal())

    return bool(public.type == template.type) and strip(public) == strip(template)


def _tpm2_rc() -> Any:
    from tpm2_pytss.constants import TPM2_RC

    return TPM2_RC


def _tss_exception() -> Any:
    from tpm2_pytss import TSS2_Exception

    return TSS2_Exception


@contextlib.contextmanager
def _converted(what: str, tcti: str) -> Iterator[None]:
    try:
        yield
    except _tss_exception() as e:
        raise convert_tss_error(e, what, tcti=tcti) from e


class Tpm2EcPrivateKey(ec.EllipticCurvePrivateKey):
    """A TPM-resident P-256 key as a ``cryptography`` private key.

    ``sign()`` runs TPM2_Sign (SHA-256 only, also ``Prehashed(SHA256())``), so
    X.509 builders and other standard code can use it; ``exchange()`` runs
    TPM2_ECDH_ZGen for an agreement key. The private value never leaves the TPM.
    """

    def __init__(
        self,
        store: Tpm2KeyStore,
        uri: str,
        auth: Authorization,
        public: ec.EllipticCurvePublicKey,
    ) -> None:
        self._store = store
        self._uri = uri
        self._auth = auth
        self._public = public

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise MechanismNotSupported("signature algorithms other than ECDSA")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            if not isinstance(algorithm._algorithm, hashes.SHA256):
                raise MechanismNotSupported(f"ECDSA with {algorithm._algorithm.name}")
            return self._store.sign_digest(self._uri, bytes(data), self._auth)
        if not isinstance(algorithm, hashes.SHA256):
            raise MechanismNotSupported(f"ECDSA with {algorithm.name}")
        return self._store.sign(self._uri, bytes(data), self._auth)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        return self._store.ecdh(self._uri, peer_public_key, self._auth)

    def private_numbers(self) -> NoReturn:
        raise MechanismNotSupported("exporting a TPM key's private value")

    def private_bytes(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise MechanismNotSupported("exporting a TPM key's private value")

    def __copy__(self) -> Tpm2EcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Tpm2EcPrivateKey:
        return self
