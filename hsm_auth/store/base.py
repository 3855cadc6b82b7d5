"""The verifier store interface.

The store holds no usable secret: public keys, counters, sessions, audit
records, and OTP keys only as ciphertext for the verifier's own key. Every state
change that guards against replay is atomic:

* :class:`Accept` burns the session and advances the stored ATC by
  compare-and-swap (from exactly ``old_atc``), both or neither;
* :class:`Failure` counts one consecutive failure per credential and locks it at
  the threshold, in the same statement;
* :meth:`VerifierStore.redeem_offer` burns an enrollment offer and saves its
  credential, both or neither: a crash in between never costs a new offer;
* :meth:`VerifierStore.apply` commits a whole batch of such changes, with their
  audit records, in one durable transaction (group commit): when it returns,
  every change it reports as done is on disk.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from ..audit import AuditRecord, Event, Reason
from ..challenges import Challenge, ChallengeKind, ChallengeState
from ..methods import Method

#: Stored counters are signed 64-bit integers in both engines.
MAX_ATC = 2**63 - 1


@dataclass(frozen=True)
class OfferRecord:
    offer_id: bytes
    user: str
    methods: tuple[Method, ...]
    replace: bool
    expires: int
    #: The OCRA suite the offer named: the credential redeemed from it keeps this one
    #: (None: an offer stored before schema version 3, which records the caller's).
    suite: str | None = None
    #: SHA-256 of the offer's signed body, which the enrollment transcript covers
    #: (None: an offer stored before schema version 4, which cannot be redeemed).
    offer_hash: bytes | None = None
    #: Enrollment responses refused for a wrong activation code so far (schema 6).
    failed_activations: int = 0
    #: The tenant the offer is for ("" = none) and the label it gives the credential
    #: redeemed from it (None: the method's name, or the label of the credential it
    #: replaces; schema 10).
    tenant: str = ""
    label: str | None = None


@dataclass(frozen=True)
class ActivationFailure:
    """What :meth:`VerifierStore.fail_activation` counted: the offer's wrong activation
    MACs so far, whether this one burned it, and the audit records written."""

    tries: int
    burned: bool
    records: tuple[AuditRecord, ...]


@dataclass(frozen=True)
class CredentialRecord:
    user: str
    method: Method
    backend: str
    signing_key: bytes
    agreement_key: bytes | None
    wrapped_otp_key: bytes | None = field(repr=False)
    suite: str
    atc: int
    created: int
    failures: int = 0
    locked: bool = False
    id: int = 0
    last_used: int | None = None
    #: The protocol the credential was enrolled with: 3 (docs/PROTOCOL.md); an older
    #: one (2: a row from before schema version 4) cannot answer, and must re-enroll.
    protocol: int = 3
    #: The OTP key sealed by the verifier's keys at enrollment
    #: (:meth:`hsm_auth.verifier_keys.VerifierKeys.seal`): ciphertext under the
    #: verifier's key-encryption key, opened (in the HSM, with one) for each check.
    #: None: a row from before schema version 5, which must re-enroll.
    sealed_otp_key: bytes | None = field(default=None, repr=False)
    #: What the verifier established about the token at enrollment: the JSON of an
    #: :class:`hsm_auth.attestation.AttestationResult` (None: a row from before
    #: schema version 6). Never the client's ``backend`` claim.
    attestation: str | None = None
    #: The DER X.509 certificate the verifier issued for the signing key (None: none).
    certificate: bytes | None = field(default=None, repr=False)
    #: FIDO2: the highest signature counter of the credential's signed requests and
    #: approvals so far (schema 9; 0 until its first one).
    sign_count: int = 0
    #: Until when the credential may be used offline (Unix time, inclusive; 0: never;
    #: :mod:`hsm_auth.expiry`, schema 10), set at enrollment and renewal.
    expires: int = 0
    #: The tenant ("" = none) and the credential's label, unique per (tenant, user): a
    #: user may hold several credentials of one method (a backup token), each with its
    #: own ATC and lockout (schema 13; rows from before are labelled with their method).
    tenant: str = ""
    label: str = ""


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key of the online service (:mod:`hsm_auth.api_keys`): its public id, the
    SHA-256 of its secret (never the secret), what it may do, and when it was revoked."""

    key_id: str
    secret_hash: bytes = field(repr=False)
    label: str
    scopes: tuple[str, ...]
    created: int
    revoked: int | None = None


@dataclass(frozen=True)
class SessionRecord:
    session_id: bytes
    user: str
    challenge: bytes
    context: str
    methods: tuple[Method, ...]
    expires: int
    used: bool = False
    #: What else the session's OTP question binds (docs/PROTOCOL.md §17): the tenant,
    #: the transaction's (label, value) pairs and how many characters the user enters.
    tenant: str | None = None
    transaction: tuple[tuple[str, str], ...] | None = None
    user_data: int = 0


class Consumed(enum.Enum):
    """What :meth:`VerifierStore.consume_nonce` and :meth:`VerifierStore.answer_challenge`
    did: done, or nothing because the nonce or challenge was gone (used, expired,
    unknown, answered), or because a FIDO2 signature counter did not move forward."""

    DONE = "done"
    GONE = "gone"
    COUNTER = "counter"


# --- batched state changes ---------------------------------------------------


class Status(enum.Enum):
    DONE = "done"
    SESSION_GONE = "session-gone"  # used or expired meanwhile (or unknown)
    STALE = "stale"  # the ATC is no longer old_atc: re-read and check again
    LOCKED = "locked"
    CREDENTIAL_GONE = "credential-gone"  # revoked or replaced meanwhile


@dataclass(frozen=True)
class Accept:
    """Burn ``session_id`` and move the ATC of ``credential_id`` from ``old_atc`` to
    ``new_atc`` (resetting failures), if the session is unused and not expired at
    ``now``, the credential unlocked and its ATC still ``old_atc``."""

    session_id: bytes
    credential_id: int
    old_atc: int
    new_atc: int
    now: int
    record: AuditRecord


@dataclass(frozen=True)
class Failure:
    """Count one consecutive failure against each credential; lock at ``lock_after``."""

    credential_ids: tuple[int, ...]
    lock_after: int
    record: AuditRecord


@dataclass(frozen=True)
class Note:
    """Only an audit record (a refusal that changes no state)."""

    record: AuditRecord


Change = Accept | Failure | Note


@dataclass(frozen=True)
class Applied:
    """What :meth:`VerifierStore.apply` did with one change, and the audit records it wrote."""

    status: Status
    records: tuple[AuditRecord, ...] = ()


class VerifierStore(ABC):
    """One interface, several engines (SQLite, PostgreSQL): see :func:`open_store`."""

    #: ``"sqlite"`` or ``"postgresql"``.
    engine: str = ""

    @abstractmethod
    def schema_version(self) -> int: ...

    # --- offers -------------------------------------------------------------
    @abstractmethod
    def put_offer(self, offer: OfferRecord, audit: AuditRecord | None = None) -> None: ...

    @abstractmethod
    def redeem_offer(
        self,
        offer_id: bytes,
        record: CredentialRecord,
        *,
        now: int,
        audit: AuditRecord | None = None,
    ) -> CredentialRecord:
        """Burn the offer and save the credential it admits, in **one** transaction.

        The offer must be unused, not expired at ``now``, for ``record.user`` and allow
        ``record.method``; the credential replaces one of (user, method) only where the
        offer allows replacing. Otherwise this raises (InvalidInput, ExpiredMessage,
        UnknownMethod, AlreadyEnrolled) and changes nothing: the offer stays usable.
        A crash at any instant leaves either both changes or neither."""

    @abstractmethod
    def fail_activation(
        self, offer_id: bytes, *, limit: int, record: AuditRecord
    ) -> ActivationFailure | None:
        """Count one wrong activation MAC for the unused offer ``offer_id`` and, at
        ``limit`` of them, burn it (mark it used), in **one** statement and
        transaction with the audit: ``record`` with ``detail`` "n of limit", plus an
        :attr:`Event.OFFER_BURNED` record when this one burned it. None: the
        offer is unknown or used (nothing counted or audited)."""

    @abstractmethod
    def offer(self, offer_id: bytes) -> OfferRecord | None:
        """The offer ``offer_id`` if it exists and is unused (expired or not)."""

    @abstractmethod
    def used_offers(self, offer_ids: Iterable[bytes]) -> set[bytes]:
        """Those of ``offer_ids`` that were redeemed (and not purged yet)."""

    # --- credentials --------------------------------------------------------
    @abstractmethod
    def save_credential(
        self, record: CredentialRecord, *, replace: bool, audit: AuditRecord | None = None
    ) -> CredentialRecord:
        """Insert a credential of (tenant, user, method), or, with ``replace``, overwrite
        one. ``record.label`` names it (unique per tenant and user): a label in use is
        AlreadyEnrolled without ``replace`` (and InvalidInput if it names another
        method's credential). No label: the method's only credential is replaced (with
        ``replace``; several: InvalidInput, name one) or, when it has none, the new one
        is labelled with the method's name (``pin``; ``pin-2`` if taken); a method
        enrolled already is AlreadyEnrolled without ``replace``, as before labels."""

    @abstractmethod
    def credentials(self, user: str) -> list[CredentialRecord]: ...

    def credentials_of(self, users: Iterable[str]) -> dict[str, list[CredentialRecord]]:
        """The credentials of several users at once (one query where the engine can)."""
        return {u: self.credentials(u) for u in dict.fromkeys(users)}

    @abstractmethod
    def all_credentials(self) -> list[CredentialRecord]: ...

    def credential_by_id(self, credential_id: bytes) -> CredentialRecord | None:
        """The credential whose protocol credential id
        (:func:`hsm_auth.transcript.credential_id` of its signing key) is
        ``credential_id``; None when none is. Engines index it (schema version 8);
        this default reads every credential."""
        from ..transcript import credential_id as name_of

        for record in self.all_credentials():
            if name_of(record.signing_key) == credential_id:
                return record
        return None

    # --- sessions -----------------------------------------------------------
    @abstractmethod
    def put_session(self, session: SessionRecord, audit: AuditRecord | None = None) -> None: ...

    def put_sessions(
        self, sessions: Sequence[SessionRecord], audits: Sequence[AuditRecord] = ()
    ) -> None:
        """Store many sessions (one transaction where the engine can)."""
        for i, session in enumerate(sessions):
            self.put_session(session, audits[i] if i < len(audits) else None)

    @abstractmethod
    def session(self, session_id: bytes) -> SessionRecord | None: ...

    def sessions(self, session_ids: Iterable[bytes]) -> dict[bytes, SessionRecord]:
        """Several sessions at once; unknown ids are absent from the result."""
        found = {sid: self.session(sid) for sid in dict.fromkeys(session_ids)}
        return {sid: s for sid, s in found.items() if s is not None}

    def snapshot(
        self, session_ids: Iterable[bytes]
    ) -> tuple[dict[bytes, SessionRecord], dict[str, list[CredentialRecord]]]:
        """The sessions and the credentials of their users, read as of **one** point
        in time, so that a check never pairs an unused session with the counter
        that another worker's acceptance of that very session already moved.
        Engines must override this default, which reads twice."""
        sessions = self.sessions(session_ids)
        return sessions, self.credentials_of(s.user for s in sessions.values())

    # --- counters, lockout, audit -------------------------------------------
    @abstractmethod
    def apply(self, changes: Sequence[Change]) -> list[Applied]:
        """Apply every change in one durable transaction (all or none on error);
        one :class:`Applied` per change, in order."""

    def accept(
        self, session_id: bytes, credential_id: int, old_atc: int, new_atc: int, now: int = 0
    ) -> bool:
        """One :class:`Accept` (compare-and-swap); True if it was done."""
        record = AuditRecord(int(time.time()), Event.ACCEPT, session=session_id.hex(), atc=new_atc)
        [done] = self.apply([Accept(session_id, credential_id, old_atc, new_atc, now, record)])
        return done.status is Status.DONE

    def record_failure(self, credential_ids: list[int], lock_after: int) -> None:
        record = AuditRecord(int(time.time()), Event.REFUSE, reason=Reason.NO_MATCH)
        self.apply([Failure(tuple(credential_ids), lock_after, record)])

    @abstractmethod
    def unlock(self, credential_id: int, audit: AuditRecord | None = None) -> None: ...

    @abstractmethod
    def renew(
        self, credential_id: int, *, expires: int, certificate: bytes,
        audit: AuditRecord | None = None,
    ) -> bool:
        """Set the credential's expiry and certificate (a renewal), with the audit, in
        one transaction; False when the credential is gone (revoked meanwhile)."""

    @abstractmethod
    def revoke(self, credential_id: int, audit: AuditRecord | None = None) -> bool:
        """Delete a credential (public keys, counter, wrapped key). False if absent."""

    @abstractmethod
    def audit_records(self, user: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The newest audit records (of ``user``), oldest first."""

    # --- API keys of the online service (schema version 7) --------------------
    @abstractmethod
    def put_api_key(self, record: ApiKeyRecord, audit: AuditRecord | None = None) -> None:
        """Store a new key (its id must be new: InvalidInput otherwise)."""

    @abstractmethod
    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key ``key_id``, revoked or not; None when unknown."""

    @abstractmethod
    def api_keys(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""

    @abstractmethod
    def revoke_api_key(self, key_id: str, now: int, audit: AuditRecord | None = None) -> bool:
        """Mark the key revoked at ``now``; False when unknown or revoked already."""

    def purge(self, now: int) -> int:
        """Delete sessions and offers that expired before ``now``; returns how many."""
        return 0

    # --- online service: signed requests and challenges (schema 9) ----------
    @abstractmethod
    def put_nonce(self, nonce: bytes, expires: int, now: int) -> None:
        """Store a request nonce valid until ``expires`` (and drop those expired at ``now``)."""

    @abstractmethod
    def consume_nonce(
        self, nonce: bytes, now: int, *, credential: int, sign_count: int | None = None
    ) -> Consumed:
        """Use the nonce once, in **one** transaction with the FIDO2 counter of the
        signing credential (row id ``credential``), moved to ``sign_count`` only
        from below it (compare-and-swap): both or neither."""

    @abstractmethod
    def put_challenge(self, challenge: Challenge, audit: AuditRecord | None = None) -> None: ...

    @abstractmethod
    def challenge(self, challenge_id: str) -> Challenge | None:
        """The challenge as stored (its state not adjusted for the clock)."""

    @abstractmethod
    def pending_challenges(
        self, user: str, now: int, kinds: Sequence[ChallengeKind]
    ) -> list[Challenge]:
        """The user's pending, unexpired challenges of ``kinds``, oldest first."""

    @abstractmethod
    def claim_challenge(
        self, challenge_id: str, *, credential_id: bytes, user: str, now: int,
        audit: AuditRecord | None = None,
    ) -> Challenge | None:
        """pending -> claimed (compare-and-swap) for a QR challenge of ``user`` or of
        nobody yet (it becomes ``user``'s), unexpired at ``now``; claiming again with
        the same credential is allowed. Returns the claimed challenge, or None."""

    @abstractmethod
    def answer_challenge(
        self, challenge_id: str, *, expected: ChallengeState, decision: ChallengeState,
        user: str, method: Method, credential_id: bytes, credential: int,
        sign_count: int | None, approval: str, now: int, audit: AuditRecord | None = None,
    ) -> Consumed:
        """``expected`` -> ``decision`` (approved/rejected) for ``user``'s unexpired
        challenge, which a QR challenge's claimer only may answer; with the FIDO2
        counter of the answering credential (row id ``credential``) in the same
        transaction, as :meth:`consume_nonce`. Of racing answers exactly one is DONE."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> VerifierStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
