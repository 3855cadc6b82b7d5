"""The verifier's audit trail: one structured record per enrollment, session,
acceptance, refusal, lockout, resync, unlock and revocation.

Records are written by the store in the same transaction as the state change
they describe (table ``audit``), so the trail and the counters never disagree,
and, once committed, emitted as one JSON line each on the ``hsm_auth.audit``
logger for log shipping. A record never holds a secret: no OTP, PIN or key
material, only who, what, which session (its public id) and why.

Refusal reasons are codes (:class:`Reason`); the caller of the verifier still
sees a single :class:`~hsm_auth.errors.InvalidToken` whatever the reason.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("hsm_auth.audit")

__all__ = ["AuditRecord", "Event", "Reason", "emit"]


class Event(enum.Enum):
    OFFER = "offer"
    ENROLL = "enroll"
    ENROLL_REFUSED = "enroll-refused"
    OFFER_BURNED = "offer-burned"  # too many wrong activation codes: the offer is used up
    SESSION = "session"
    ACCEPT = "accept"
    RESYNC = "resync"
    REFUSE = "refuse"
    LOCKOUT = "lockout"
    UNLOCK = "unlock"
    REVOKE = "revoke"
    SYNC = "sync"  # a sync session opened (after an online login)
    SYNCED = "synced"  # a sync report applied: the ATC moved to the token's
    API_KEY_CREATE = "api-key-create"  # an API key of the online service made (detail: id)
    API_KEY_REVOKE = "api-key-revoke"
    CHALLENGE = "challenge"  # a push / QR / in-app challenge started (session: its id)
    CLAIM = "claim"  # a QR challenge claimed by an authenticator
    APPROVE = "approve"  # a challenge approved (signed in the token)
    REJECT = "reject"  # a challenge rejected (signed in the token)
    RENEW = "renew"  # a credential's offline expiry renewed online (detail: the new expiry)
    #: An authenticator's offline log received (hsm_auth.offline_audit; detail: counts).
    OFFLINE_LOG = "offline-log"
    #: The offline log shows tampering or a use it lacks (detail: what, which entry).
    OFFLINE_ALERT = "offline-alert"


class Reason(enum.Enum):
    MALFORMED_OTP = "malformed-otp"
    UNKNOWN_SESSION = "unknown-session"
    SESSION_USED = "session-used"
    SESSION_EXPIRED = "session-expired"
    LOCKED = "locked"
    NO_MATCH = "no-match"
    RESYNC_NO_PAIR = "resync-no-pair"
    REPLAY = "replay"  # lost the compare-and-swap: the session was burned meanwhile
    CREDENTIAL_GONE = "credential-gone"  # revoked or replaced while checking
    CONTENTION = "contention"  # the ATC kept moving under us
    ALREADY_ENROLLED = "already-enrolled"
    NOT_SYNC = "not-sync"  # an OTP for a sync session, or a sync report for another session
    SYNC_STALE = "sync-stale"  # a sync report at or below the ATC accepted already
    KEY_CONFIRMATION = "key-confirmation"  # an enrollment whose key confirmation failed
    OLD_PROTOCOL = "old-protocol"  # a credential enrolled before protocol 3
    ATTESTATION = "attestation"  # an enrollment whose attestation the policy refuses
    ACTIVATION = "activation"  # an enrollment whose activation MAC was wrong or missing
    EXPIRED = "expired"  # the credential's offline use expired (hsm_auth.expiry; detail: when)
    #: the data submitted with an OTP does not fit the session's user_data (missing,
    #: unexpected, too long; docs/PROTOCOL.md §17): malformed input, not a failed attempt
    MALFORMED_DATA = "malformed-data"


@dataclass(frozen=True)
class AuditRecord:
    """One audit event. ``session`` is the public session id (hex); ``atc`` the
    counter value accepted; ``detail`` short non-secret text (a backend name)."""

    time: int
    event: Event
    user: str | None = None
    method: str | None = None
    session: str | None = None
    reason: Reason | None = None
    atc: int | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"time": self.time, "event": self.event.value}
        for name in ("user", "method", "session", "atc", "detail"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.reason is not None:
            out["reason"] = self.reason.value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def refused(self, reason: Reason) -> AuditRecord:
        """The same subject, recorded as a refusal for ``reason``."""
        return AuditRecord(
            self.time, Event.REFUSE, self.user, self.method, self.session, reason, None, None
        )

    @classmethod
    def from_row(
        cls,
        time: int,
        event: str,
        user: str | None,
        method: str | None,
        session: str | None,
        reason: str | None,
        atc: int | None,
        detail: str | None,
    ) -> AuditRecord:
        return cls(
            int(time),
            Event(event),
            user,
            method,
            session,
            Reason(reason) if reason else None,
            None if atc is None else int(atc),
            detail,
        )


_WARNINGS = (Event.REFUSE, Event.LOCKOUT, Event.OFFER_BURNED, Event.OFFLINE_ALERT)


def emit(records: Iterable[AuditRecord]) -> None:
    """Log committed records as JSON lines (INFO; refusals and lockouts at WARNING)."""
    for record in records:
        level = (
            logging.WARNING
            if record.event in _WARNINGS
            else logging.INFO
        )
        if log.isEnabledFor(level):
            log.log(level, "%s", record.to_json())
