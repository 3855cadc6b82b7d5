"""Protocol messages (docs/PROTOCOL.md): compact, versioned, signed CBOR.

Wire form of every message: ``CBOR([body, signature])`` where ``body`` is the
CBOR encoding of ``[VERSION, type, field, ...]`` and ``signature`` is the raw
ECDSA P-256 (r||s, 64 bytes) over exactly those body bytes. Keeping the signed
bytes wrapped (as COSE_Sign1 does) means no canonical re-encoding is needed to
check a signature. Text form: :mod:`hsm_auth.textcode` (base32, QR alphanumeric).

Decoders accept arbitrary bytes and raise only :class:`DecodeError` (or its
subclass :class:`UnsupportedVersion`); signatures are checked by the caller,
which knows which key to trust.

This module holds the envelope, the field checks, the shared message base and
the one message ``hsm-auth start`` reads (:class:`VerificationData`): start-up
time is part of the interface (``bench/startup.py``). The other messages live
in :mod:`hsm_auth.enrollment_messages` (offer, response, result) and
:mod:`hsm_auth.sync_messages` (sync message, sync report); their names are
still importable from here, loaded on first use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import cbor2

from . import cbor, display, ec, textcode
from . import transaction as _transaction
from .errors import DecodeError, UnsupportedVersion
from .methods import Method

if TYPE_CHECKING:  # the moved names, for type checkers (see __getattr__ below)
    from .enrollment_messages import ACTIVATION_MAC_BYTES as ACTIVATION_MAC_BYTES
    from .enrollment_messages import MAX_CA_CERTIFICATE as MAX_CA_CERTIFICATE
    from .enrollment_messages import MAX_CERTIFICATE as MAX_CERTIFICATE
    from .enrollment_messages import WRAPPED_OTP_KEY_BYTES as WRAPPED_OTP_KEY_BYTES
    from .enrollment_messages import EnrollmentOffer as EnrollmentOffer
    from .enrollment_messages import EnrollmentResponse as EnrollmentResponse
    from .enrollment_messages import EnrollmentResult as EnrollmentResult
    from .sync_messages import SYNC_MAC_BYTES as SYNC_MAC_BYTES
    from .sync_messages import SyncMessage as SyncMessage
    from .sync_messages import SyncReport as SyncReport

#: 2: the enrollment offer names the methods the user has enrolled at the verifier.
#: 3: key confirmation in the enrollment response, the user in the verification data,
#: identities in the OTP question, AES key wrap for the FIDO2 key (docs/PROTOCOL.md).
VERSION = 3
MAX_MESSAGE = 4096
MAX_CONTEXT = display.MAX_CONTEXT

#: Signs the body bytes and returns a raw r||s signature.
RawSigner = Callable[[bytes], bytes]


class MessageType(enum.IntEnum):
    ENROLLMENT_OFFER = 1
    ENROLLMENT_RESPONSE = 2
    VERIFICATION_DATA = 3
    SYNC = 4
    SYNC_REPORT = 5
    ENROLLMENT_RESULT = 6
    ATC_ACK = 7  # docs/PROTOCOL.md §18 (hsm_auth.sync_messages)


@dataclass(frozen=True)
class Signed:
    """A decoded envelope: the body bytes, the parsed body and the signature."""

    body: bytes
    fields: list[Any]
    signature: bytes


def _decode_envelope(data: bytes) -> Signed:
    if not isinstance(data, bytes | bytearray) or not data:
        raise DecodeError("empty message")
    if len(data) > MAX_MESSAGE:
        raise DecodeError("message too large")
    outer = _loads(bytes(data))
    if not (isinstance(outer, list) and len(outer) == 2):
        raise DecodeError("not an hsm-auth message")
    body, signature = outer
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise DecodeError("not an hsm-auth message")
    parsed = _loads(body)
    if not (isinstance(parsed, list) and len(parsed) >= 2):
        raise DecodeError("malformed message body")
    version = parsed[0]
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError("malformed message version")
    if version != VERSION:
        hint = " (made by an older hsm-auth: enroll again)" if version < VERSION else ""
        raise UnsupportedVersion(
            f"unsupported message version {version} (this side speaks {VERSION}){hint}"
        )
    return Signed(body, parsed, signature)


def _loads(data: bytes) -> Any:
    # No semantic tags, no maps, integers within ±2**64, bounded depth.
    return cbor.loads(data)


def _body(kind: MessageType, values: Sequence[Any]) -> bytes:
    return cbor2.dumps([VERSION, int(kind), *values])


def _encode(kind: MessageType, values: Sequence[Any], sign: RawSigner | None) -> bytes:
    body = _body(kind, values)
    signature = sign(body) if sign is not None else b""
    return cbor2.dumps([body, signature])


# --- field checks (each raises DecodeError) ---------------------------------


def _bytes(v: Any, name: str, *, min_len: int = 0, max_len: int = 1024) -> bytes:
    if not isinstance(v, bytes) or not min_len <= len(v) <= max_len:
        raise DecodeError(f"bad field {name}")
    return v


def _opt_bytes(v: Any, name: str, *, max_len: int = 2048) -> bytes | None:
    return None if v is None else _bytes(v, name, max_len=max_len)


def _text(v: Any, name: str, *, max_len: int = 256) -> str:
    # Every text field may be shown: the display-text policy (hsm_auth.display).
    if not isinstance(v, str):
        raise DecodeError(f"bad field {name}")
    why = display.problem(v, max_len=max_len)
    if why is not None:
        raise DecodeError(f"bad field {name}: it {why}")
    return v


def _int(v: Any, name: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise DecodeError(f"bad field {name}")
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise DecodeError(f"bad field {name}")
    return v


def _opt_tenant(v: Any, name: str = "tenant") -> str | None:
    """A tenant name or null (docs/PROTOCOL.md §17): 1..64, display text, no whitespace."""
    if v is None:
        return None
    why = _transaction.tenant_problem(v)
    if why is not None:
        raise DecodeError(f"bad field {name}: it {why}")
    return str(v)


def _opt_transaction(v: Any) -> _transaction.Transaction | None:
    """Transaction data or null: 1..8 ``[label, value]`` pairs (docs/PROTOCOL.md §17)."""
    if v is None:
        return None
    why = _transaction.problem(v)
    if why is not None:
        raise DecodeError(f"bad field transaction: it {why}")
    return tuple((label, value) for label, value in v)


def _methods(v: Any) -> tuple[Method, ...]:
    if not isinstance(v, list) or not 1 <= len(v) <= len(Method):
        raise DecodeError("bad field methods")
    try:
        out = tuple(Method.from_code(_int(c, "methods", hi=255)) for c in v)
    except DecodeError:
        raise
    except Exception:
        raise DecodeError("bad field methods") from None
    if len(set(out)) != len(out):
        raise DecodeError("bad field methods (duplicates)")
    return out


def _method_set(v: Any, name: str) -> tuple[Method, ...]:
    """Like :func:`_methods`, but the set may be empty."""
    if not isinstance(v, list) or len(v) > len(Method):
        raise DecodeError(f"bad field {name}")
    try:
        return _methods(v) if v else ()
    except DecodeError:
        raise DecodeError(f"bad field {name}") from None


def _method(v: Any) -> Method:
    return _methods([v])[0]


def _point(v: Any, name: str) -> bytes:
    data = _bytes(v, name, min_len=33, max_len=65)
    ec.decode_point(data)  # validates: on the curve
    return data


_M = TypeVar("_M", bound="_Message")


class _Message:
    """Shared encode/decode for the dataclass messages below."""

    KIND: ClassVar[MessageType]

    def _values(self) -> list[Any]:
        out: list[Any] = []
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "signature":
                continue
            v = getattr(self, f.name)
            if isinstance(v, Method):
                v = v.code
            elif isinstance(v, tuple) and all(isinstance(m, Method) for m in v):
                v = [m.code for m in v]
            elif isinstance(v, tuple):  # transaction data: pairs as arrays
                v = [list(pair) for pair in v]
            out.append(v)
        return out

    def encode(self, sign: RawSigner | None) -> bytes:
        return _encode(self.KIND, self._values(), sign)

    def body(self) -> bytes:
        """The body bytes that :meth:`encode` signs (deterministic for given fields)."""
        return _body(self.KIND, self._values())

    def to_text(self, sign: RawSigner | None) -> str:
        return textcode.encode(self.encode(sign))

    @classmethod
    def _check(cls, signed: Signed) -> list[Any]:
        kind = signed.fields[1]
        if kind != int(cls.KIND):
            raise DecodeError(f"expected {cls.KIND.name.lower().replace('_', ' ')}")
        values = signed.fields[2:]
        expected = len([f for f in fields(cls) if f.name != "signature"])  # type: ignore[arg-type]
        if len(values) != expected:
            raise DecodeError("wrong number of fields")
        return values

    @classmethod
    def decode(cls: type[_M], data: bytes) -> tuple[_M, Signed]:
        """Parse bytes into the message and its envelope (for the signature check)."""
        signed = _decode_envelope(data)
        return cls._from_values(cls._check(signed), signed.signature), signed

    @classmethod
    def from_text(cls: type[_M], text: str) -> tuple[_M, Signed]:
        return cls.decode(textcode.decode(text))

    @classmethod
    def _from_values(cls: type[_M], v: list[Any], signature: bytes) -> _M:
        raise NotImplementedError


@dataclass(frozen=True)
class VerificationData(_Message):
    """Verifier → authenticator, shown as a QR code: what to approve, signed.

    It carries no session id: the authenticator needs none (the OTP is bound to
    the challenge and the context), and every byte makes the QR code denser.
    The verifier keeps its session id beside the challenge. ``user`` names whose
    session it is: the authenticator shows it and answers only for a user it
    holds an enrollment of, and the OTP question binds it. ``tenant`` (or None)
    names the user's tenant at the verifier; ``transaction`` (or None) is the
    signed transaction data shown with the context; ``user_data`` is how many
    characters the user may enter on the authenticator (0: none). All three are
    bound by the question (docs/PROTOCOL.md §17)."""

    KIND: ClassVar[MessageType] = MessageType.VERIFICATION_DATA

    verifier_id: bytes
    user: str
    challenge: bytes
    context: str
    methods: tuple[Method, ...]
    expires: int
    tenant: str | None = None
    transaction: _transaction.Transaction | None = None
    user_data: int = 0
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> VerificationData:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            user=_text(v[1], "user", max_len=display.MAX_NAME),
            challenge=_bytes(v[2], "challenge", min_len=16, max_len=64),
            context=_text(v[3], "context", max_len=MAX_CONTEXT),
            methods=_methods(v[4]),
            expires=_int(v[5], "expires"),
            tenant=_opt_tenant(v[6]),
            transaction=_opt_transaction(v[7]),
            user_data=_int(v[8], "user_data", hi=_transaction.MAX_USER_DATA),
            signature=signature,
        )


def message_kind(data: bytes) -> MessageType:
    """Which message ``data`` holds (no signature check)."""
    kind = _decode_envelope(data).fields[1]
    try:
        return MessageType(kind)
    except (ValueError, TypeError):
        raise DecodeError("unknown message type") from None


#: Names that moved to their own modules, still importable from here (loaded on first use).
_MOVED = {
    "WRAPPED_OTP_KEY_BYTES": "enrollment_messages",
    "ACTIVATION_MAC_BYTES": "enrollment_messages",
    "MAX_CERTIFICATE": "enrollment_messages",
    "MAX_CA_CERTIFICATE": "enrollment_messages",
    "EnrollmentOffer": "enrollment_messages",
    "EnrollmentResponse": "enrollment_messages",
    "EnrollmentResult": "enrollment_messages",
    "SYNC_MAC_BYTES": "sync_messages",
    "SyncMessage": "sync_messages",
    "SyncReport": "sync_messages",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __package__), name)
