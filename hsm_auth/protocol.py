"""Protocol messages (docs/PROTOCOL.md): compact, versioned, signed CBOR.

Wire form of every message: ``CBOR([body, signature])`` where ``body`` is the
CBOR encoding of ``[VERSION, type, field, ...]`` and ``signature`` is the raw
ECDSA P-256 (r||s, 64 bytes) over exactly those body bytes. Keeping the signed
bytes wrapped (as COSE_Sign1 does) means no canonical re-encoding is needed to
check a signature. Text form: :mod:`hsm_auth.textcode` (base32, QR alphanumeric).

Decoders accept arbitrary bytes and raise only :class:`DecodeError` (or its
subclass :class:`UnsupportedVersion`); signatures are checked by the caller,
which knows which key to trust.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

import cbor2

from . import cbor, display, ec, textcode
from .errors import DecodeError, UnsupportedVersion
from .methods import Method

#: 2: the enrollment offer names the methods the user has enrolled at the verifier.
#: 3: key confirmation in the enrollment response, the user in the verification data,
#: identities in the OTP question, AES key wrap for the FIDO2 key (docs/PROTOCOL.md).
VERSION = 3
MAX_MESSAGE = 4096
MAX_CONTEXT = display.MAX_CONTEXT

#: A FIDO2 wrapped OTP key: E (33) || AES-KW of the 32-byte key (40). The format's
#: owner is :mod:`hsm_auth.key_transport` (not imported here: `start` needs none of it).
WRAPPED_OTP_KEY_BYTES = 73
#: An enrollment response's activation MAC: a full HMAC-SHA256 (hsm_auth.activation).
ACTIVATION_MAC_BYTES = 32

#: Signs the body bytes and returns a raw r||s signature.
RawSigner = Callable[[bytes], bytes]


class MessageType(enum.IntEnum):
    ENROLLMENT_OFFER = 1
    ENROLLMENT_RESPONSE = 2
    VERIFICATION_DATA = 3
    SYNC = 4
    SYNC_REPORT = 5
    ENROLLMENT_RESULT = 6


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
class EnrollmentOffer(_Message):
    """Verifier → authenticator: an invitation to enroll one method (signed, short-lived).

    ``enrolled`` names the methods the user had enrolled at the verifier when it made
    the offer: without ``replace`` the verifier will refuse those, so the
    authenticator refuses them too, before it creates any key."""

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_OFFER

    verifier_id: bytes
    verifier_name: str
    user: str
    offer_id: bytes
    verifier_signing_key: bytes  # SEC1 point
    verifier_agreement_key: bytes  # SEC1 point
    suite: str
    window: int
    methods: tuple[Method, ...]
    replace: bool
    expires: int
    enrolled: tuple[Method, ...] = ()
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentOffer:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            verifier_name=_text(v[1], "verifier_name", max_len=display.MAX_NAME),
            user=_text(v[2], "user", max_len=display.MAX_NAME),
            offer_id=_bytes(v[3], "offer_id", min_len=16, max_len=32),
            verifier_signing_key=_point(v[4], "verifier_signing_key"),
            verifier_agreement_key=_point(v[5], "verifier_agreement_key"),
            suite=_text(v[6], "suite", max_len=64),
            window=_int(v[7], "window", lo=1, hi=1000),
            methods=_methods(v[8]),
            replace=_bool(v[9], "replace"),
            expires=_int(v[10], "expires"),
            enrolled=_method_set(v[11], "enrolled"),
            signature=signature,
        )


@dataclass(frozen=True)
class EnrollmentResponse(_Message):
    """Authenticator → verifier: the public half of one enrolled method.

    Signed with the new signing key (proof of possession) where the backend can
    sign arbitrary data; otherwise ``attestation`` carries the proof.
    ``confirmation`` is the key confirmation: HMAC-SHA256 under the new OTP key,
    made in the token, over the enrollment transcript
    (:func:`hsm_auth.transcript.confirmation_message`). ``activation_mac`` is the
    HMAC over the same transcript keyed from the offer's activation code
    (:mod:`hsm_auth.activation`); None: the authenticator had no code, which the
    verifier refuses as a wrong one.
    """

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_RESPONSE

    verifier_id: bytes
    offer_id: bytes
    user: str
    method: Method
    backend: str
    signing_key: bytes  # SEC1 point
    agreement_key: bytes | None  # SEC1 point: the verifier derives the OTP key by ECDH
    wrapped_otp_key: bytes | None  # or: the OTP key encrypted to the verifier
    initial_atc: int
    attestation: bytes | None
    confirmation: bytes = field(repr=False)
    activation_mac: bytes | None = field(default=None, repr=False)
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentResponse:
        agreement = None if v[6] is None else _point(v[6], "agreement_key")
        wrapped = None if v[7] is None else _bytes(
            v[7], "wrapped_otp_key", min_len=WRAPPED_OTP_KEY_BYTES, max_len=WRAPPED_OTP_KEY_BYTES
        )
        if (agreement is None) == (wrapped is None):
            raise DecodeError("exactly one of agreement_key and wrapped_otp_key must be set")
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            offer_id=_bytes(v[1], "offer_id", min_len=16, max_len=32),
            user=_text(v[2], "user", max_len=display.MAX_NAME),
            method=_method(v[3]),
            backend=_text(v[4], "backend", max_len=32),
            signing_key=_point(v[5], "signing_key"),
            agreement_key=agreement,
            wrapped_otp_key=wrapped,
            initial_atc=_int(v[8], "initial_atc"),
            attestation=_opt_bytes(v[9], "attestation", max_len=2048),
            confirmation=_bytes(v[10], "confirmation", min_len=32, max_len=32),
            activation_mac=None if v[11] is None else _bytes(
                v[11], "activation_mac", min_len=ACTIVATION_MAC_BYTES, max_len=ACTIVATION_MAC_BYTES
            ),
            signature=signature,
        )


@dataclass(frozen=True)
class VerificationData(_Message):
    """Verifier → authenticator, shown as a QR code: what to approve, signed.

    It carries no session id: the authenticator needs none (the OTP is bound to
    the challenge and the context), and every byte makes the QR code denser.
    The verifier keeps its session id beside the challenge. ``user`` names whose
    session it is: the authenticator shows it and answers only for a user it
    holds an enrollment of, and the OTP question binds it."""

    KIND: ClassVar[MessageType] = MessageType.VERIFICATION_DATA

    verifier_id: bytes
    user: str
    challenge: bytes
    context: str
    methods: tuple[Method, ...]
    expires: int
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
            signature=signature,
        )


@dataclass(frozen=True)
class SyncMessage(_Message):
    """Verifier → authenticator after an online login (signed by the verifier).

    ``atc`` is the ATC the verifier has accepted; ``session_id`` names the sync
    session the verifier opened, which the authenticator's :class:`SyncReport`
    answers (once, before ``expires``)."""

    KIND: ClassVar[MessageType] = MessageType.SYNC

    verifier_id: bytes
    user: str
    method: Method
    atc: int
    session_id: bytes
    expires: int
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> SyncMessage:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            user=_text(v[1], "user", max_len=display.MAX_NAME),
            method=_method(v[2]),
            atc=_int(v[3], "atc"),
            session_id=_bytes(v[4], "session_id", min_len=16, max_len=32),
            expires=_int(v[5], "expires"),
            signature=signature,
        )


#: Length of the MAC that authenticates a sync report (HMAC-SHA256, not truncated).
SYNC_MAC_BYTES = 32


@dataclass(frozen=True)
class SyncReport(_Message):
    """Authenticator → verifier, answering a :class:`SyncMessage`: the token's ATC.

    Its ``signature`` field is not an ECDSA signature but the **full** HMAC-SHA256
    that the token computed with the method's OTP key, after advancing its counter
    to ``atc``, over the OCRA data input for counter ``atc`` and the question
    :meth:`hsm_auth.otp_scheme.OtpScheme.sync_question` (session id, user, method).
    The verifier, which derives the same OTP key, recomputes it at exactly
    ``atc``: every body field is bound (``atc`` as the counter, the rest through
    the question), and the same mechanism works on every backend (a FIDO2
    credential signs only assertions)."""

    KIND: ClassVar[MessageType] = MessageType.SYNC_REPORT

    verifier_id: bytes
    session_id: bytes
    user: str
    method: Method
    atc: int
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> SyncReport:
        if len(signature) != SYNC_MAC_BYTES:
            raise DecodeError("bad sync report MAC")
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            session_id=_bytes(v[1], "session_id", min_len=16, max_len=32),
            user=_text(v[2], "user", max_len=display.MAX_NAME),
            method=_method(v[3]),
            atc=_int(v[4], "atc", lo=1),
            signature=signature,
        )


#: Size limits of the certificates an :class:`EnrollmentResult` carries (DER).
MAX_CERTIFICATE = 2048
MAX_CA_CERTIFICATE = 1024


@dataclass(frozen=True)
class EnrollmentResult(_Message):
    """Verifier → authenticator after a recorded enrollment (signed by the verifier's
    signing key, which the authenticator pinned at enrollment): the X.509
    certificate the verifier's device CA issued for the method's signing key, the
    CA certificate, and the attestation result's summary (:mod:`hsm_auth.device_ca`).
    ``credential_id`` names the enrolled credential (docs/PROTOCOL.md §8.3)."""

    KIND: ClassVar[MessageType] = MessageType.ENROLLMENT_RESULT

    verifier_id: bytes
    user: str
    method: Method
    credential_id: bytes
    certificate: bytes  # DER
    ca_certificate: bytes  # DER
    attestation: str
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> EnrollmentResult:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            user=_text(v[1], "user", max_len=display.MAX_NAME),
            method=_method(v[2]),
            credential_id=_bytes(v[3], "credential_id", min_len=16, max_len=16),
            certificate=_bytes(v[4], "certificate", min_len=1, max_len=MAX_CERTIFICATE),
            ca_certificate=_bytes(v[5], "ca_certificate", min_len=1, max_len=MAX_CA_CERTIFICATE),
            attestation=_text(v[6], "attestation", max_len=MAX_CONTEXT),
            signature=signature,
        )


def message_kind(data: bytes) -> MessageType:
    """Which message ``data`` holds (no signature check)."""
    kind = _decode_envelope(data).fields[1]
    try:
        return MessageType(kind)
    except (ValueError, TypeError):
        raise DecodeError("unknown message type") from None
