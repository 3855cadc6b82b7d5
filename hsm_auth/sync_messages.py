"""Sync messages (docs/PROTOCOL.md §5.4, §5.5, §10, §18): the verifier's sync
message after an online login, the authenticator's sync report (the ATC report)
answering it, and the verifier's signed acknowledgement of an applied report.
Wire form, field checks and the shared message base: :mod:`hsm_auth.protocol`;
kept apart from it because ``hsm-auth start`` needs none (``bench/startup.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import display
from .errors import DecodeError
from .methods import Method
from .protocol import MessageType, _bytes, _int, _Message, _method, _text

#: A protocol credential id (docs/PROTOCOL.md §8.3) is 16 bytes.
CREDENTIAL_ID_BYTES = 16


@dataclass(frozen=True)
class SyncMessage(_Message):
    """Verifier → authenticator after an online login (signed by the verifier).

    ``atc`` is the ATC the verifier has accepted; ``session_id`` names the sync
    session the verifier opened, which the authenticator's :class:`SyncReport`
    answers (once, before ``expires``); ``credential_id`` the credential
    (docs/PROTOCOL.md §8.3) whose token must answer: a user may hold several of
    one method."""

    KIND: ClassVar[MessageType] = MessageType.SYNC

    verifier_id: bytes
    user: str
    method: Method
    atc: int
    session_id: bytes
    expires: int
    credential_id: bytes
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
            credential_id=_credential_id(v[6]),
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
    :meth:`hsm_auth.otp_scheme.OtpScheme.sync_question` (session id, user, method,
    credential id).
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
    credential_id: bytes
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
            credential_id=_credential_id(v[5]),
            signature=signature,
        )


@dataclass(frozen=True)
class AtcAck(_Message):
    """Verifier → authenticator, after it applied a :class:`SyncReport` (signed by
    the verifier): its stored ATC of the credential is now ``atc``.

    The only message that resets the authenticator's offline-use count
    (:meth:`hsm_auth.authenticator.Authenticator.apply_sync_ack`), and only forward:
    offline uses count from ``atc`` from then on. An old acknowledgement replayed
    names an ATC the authenticator has counted from already and changes nothing;
    ``session_id`` is the sync session it answers (for the record)."""

    KIND: ClassVar[MessageType] = MessageType.ATC_ACK

    verifier_id: bytes
    user: str
    method: Method
    credential_id: bytes
    session_id: bytes
    atc: int
    signature: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _from_values(cls, v: list[Any], signature: bytes) -> AtcAck:
        return cls(
            verifier_id=_bytes(v[0], "verifier_id", min_len=8, max_len=32),
            user=_text(v[1], "user", max_len=display.MAX_NAME),
            method=_method(v[2]),
            credential_id=_credential_id(v[3]),
            session_id=_bytes(v[4], "session_id", min_len=16, max_len=32),
            atc=_int(v[5], "atc", lo=1),
            signature=signature,
        )


def _credential_id(v: Any) -> bytes:
    return _bytes(v, "credential_id", min_len=CREDENTIAL_ID_BYTES, max_len=CREDENTIAL_ID_BYTES)
