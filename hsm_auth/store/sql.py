"""The SQL shared by both engines: one schema shape, versioned migrations, and
the compare-and-swap statements. Engines supply connections and transactions.

Statements are written with ``?`` placeholders; an engine that uses another
style translates them. Booleans are integers 0/1 in both engines.

Compare-and-swap. :class:`~hsm_auth.store.base.Accept` runs, inside one
transaction, ``UPDATE sessions SET used=1 WHERE session_id=? AND used=0 AND
expires>=?`` and then ``UPDATE credentials SET atc=new WHERE id=? AND atc=old
AND locked=0``; if the second matches no row, the first is undone (the
transaction holds that session row's lock, so the undo restores exactly what
was there). PostgreSQL re-checks an UPDATE's WHERE clause on the newest row
version after waiting for a concurrent writer (READ COMMITTED), SQLite holds
the database's single write lock (``BEGIN IMMEDIATE``): either way, of N
workers presenting the same OTP exactly one sees its UPDATEs match.
"""

from __future__ import annotations

import dataclasses
import json
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Protocol

from .. import transcript
from ..audit import AuditRecord, Event, Reason
from ..challenges import Challenge, ChallengeKind, ChallengeState, context_from_text, context_text
from ..errors import AlreadyEnrolled, ExpiredMessage, InvalidInput, StateError, UnknownMethod
from ..methods import Method
from .base import (
    MAX_ATC,
    Accept,
    ActivationFailure,
    ApiKeyRecord,
    Applied,
    Change,
    Consumed,
    CredentialRecord,
    Failure,
    Note,
    OfferRecord,
    SessionRecord,
    Status,
    VerifierStore,
)
from .offline_log import OfflineLogSql

_CHUNK = 500  # ids per IN (...) list
#: After an acceptance: the consecutive failures of the user's other unlocked
#: credentials (same tenant) are reset too. A wrong OTP counts against every
#: credential it was checked against (it cannot say which token made it), so a typo
#: on the main token must not add up to locking the backup token (one user, one count
#: of consecutive failures, as with one token); a locked credential stays locked.
_RESET_SIBLINGS = (
    "UPDATE credentials SET failures=0 WHERE id<>? AND failures>0 AND locked=0 "
    "AND (tenant, user_name) = (SELECT tenant, user_name FROM credentials WHERE id=?)"
)


class Cursor(Protocol):
    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...

    def count(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Execute and return the number of rows changed."""
        ...

    def many(self, sql: str, args: Sequence[Sequence[Any]]) -> None: ...


def methods_text(methods: Iterable[Method]) -> str:
    return ",".join(m.value for m in methods)


def methods_parse(text: str) -> tuple[Method, ...]:
    try:
        return tuple(Method(m) for m in text.split(",") if m)
    except ValueError:
        raise StateError("the verifier database holds an unknown method name") from None


_CRED_COLS = (
    "id, user_name, method, backend, signing_key, agreement_key, wrapped_otp_key, suite, atc, "
    "failures, locked, created, last_used, protocol, sealed_otp_key, attestation, certificate, "
    "sign_count, expires, tenant, label"
)
_CHALLENGE_COLS = (
    "challenge_id, kind, user_name, message, context, state, created, expires, claimed_by, "
    "method, credential_id, answered"
)
_SESSION_COLS = (
    "session_id, user_name, challenge, context, methods, expires, used, tenant, "
    "transaction_items, user_data"
)
AUDIT_INSERT = (
    "INSERT INTO audit (at, event, user_name, method, session, reason, atc, detail) "
    "VALUES (?,?,?,?,?,?,?,?)"
)


def _cred(row: Sequence[Any]) -> CredentialRecord:
    return CredentialRecord(
        id=int(row[0]),
        user=row[1],
        method=Method(row[2]),
        backend=row[3],
        signing_key=bytes(row[4]),
        agreement_key=None if row[5] is None else bytes(row[5]),
        wrapped_otp_key=None if row[6] is None else bytes(row[6]),
        suite=row[7],
        atc=int(row[8]),
        failures=int(row[9]),
        locked=bool(row[10]),
        created=int(row[11]),
        last_used=None if row[12] is None else int(row[12]),
        protocol=int(row[13]),
        sealed_otp_key=None if row[14] is None else bytes(row[14]),
        attestation=None if row[15] is None else str(row[15]),
        certificate=None if row[16] is None else bytes(row[16]),
        sign_count=int(row[17]),
        expires=int(row[18]),
        tenant=str(row[19]),
        label=str(row[20]),
    )


def _challenge(row: Sequence[Any]) -> Challenge:
    return Challenge(
        challenge_id=bytes(row[0]).hex(),
        kind=ChallengeKind(row[1]),
        user=row[2],
        message=row[3],
        context=context_from_text(row[4]),
        state=ChallengeState(row[5]),
        created=int(row[6]),
        expires=int(row[7]),
        claimed_by=None if row[8] is None else bytes(row[8]).hex(),
        method=None if row[9] is None else Method(row[9]),
        credential_id=None if row[10] is None else bytes(row[10]).hex(),
        answered=None if row[11] is None else int(row[11]),
    )


class _Rollback(Exception):
    """Undo a transaction whose compare-and-swap lost (caught by the caller)."""


def _session(row: Sequence[Any]) -> SessionRecord:
    return SessionRecord(
        bytes(row[0]),
        row[1],
        bytes(row[2]),
        row[3],
        methods_parse(row[4]),
        int(row[5]),
        bool(row[6]),
        row[7],
        _transaction_parse(row[8]),
        int(row[9]),
    )


def _transaction_text(items: tuple[tuple[str, str], ...] | None) -> str | None:
    return None if items is None else json.dumps([list(p) for p in items], ensure_ascii=False)


def _transaction_parse(text: str | None) -> tuple[tuple[str, str], ...] | None:
    if text is None:
        return None
    try:
        return tuple((str(label), str(value)) for label, value in json.loads(text))
    except (ValueError, TypeError):
        raise StateError("the database holds a malformed session transaction") from None


def audit_args(r: AuditRecord) -> tuple[Any, ...]:
    return (
        r.time,
        r.event.value,
        r.user,
        r.method,
        r.session,
        r.reason.value if r.reason else None,
        r.atc,
        r.detail,
    )


def lockout_record(c: Failure, user: str, method: str) -> AuditRecord:
    return AuditRecord(
        c.record.time,
        Event.LOCKOUT,
        user,
        method,
        c.record.session,
        detail=f"{c.lock_after} consecutive failures",
    )


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _replaced(db: Cursor, record: CredentialRecord, replace: bool) -> tuple[int | None, str]:
    """The row id a new credential replaces (None: it is added) and its label
    (:meth:`VerifierStore.save_credential` says which)."""
    who, method = (record.tenant, record.user), record.method.value
    if record.label:
        row = db.one(
            "SELECT id, method FROM credentials WHERE tenant=? AND user_name=? AND label=?",
            (*who, record.label),
        )
        if row is None:
            return None, record.label
        if not replace:
            raise AlreadyEnrolled(
                f"{record.user!r} has a credential labelled {record.label!r} already"
            )
        if row[1] != method:
            raise InvalidInput(
                f"the label {record.label!r} names {record.user!r}'s {row[1]} credential, "
                f"not a {method} one"
            )
        return int(row[0]), record.label
    rows = db.rows(
        "SELECT id, label FROM credentials WHERE tenant=? AND user_name=? AND method=?",
        (*who, method),
    )
    if rows and not replace:
        raise AlreadyEnrolled(f"{record.user!r} has the {method} method enrolled already")
    if len(rows) > 1:
        raise InvalidInput(
            f"{record.user!r} has {len(rows)} {method} credentials: name the one to replace "
            "(its label)"
        )
    if rows:
        return int(rows[0][0]), str(rows[0][1])
    taken = {str(r[0]) for r in db.rows(
        "SELECT label FROM credentials WHERE tenant=? AND user_name=?", who
    )}
    return None, next(
        label for n in range(1, len(taken) + 2)
        if (label := method if n == 1 else f"{method}-{n}") not in taken
    )


class SqlStore(OfflineLogSql, VerifierStore):
    """Everything but connections: see :mod:`hsm_auth.store.sqlite` and
    :mod:`hsm_auth.store.postgres`."""

    #: MIGRATIONS[v] takes the schema from version v to v + 1 (a list of statements).
    MIGRATIONS: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: Engine errors after which the whole transaction is retried (deadlocks).
    _RETRY_ATTEMPTS: ClassVar[int] = 5

    # --- engine hooks --------------------------------------------------------
    @abstractmethod
    def _tx(self) -> AbstractContextManager[Cursor]:
        """A write transaction, committed durably when the block ends without error;
        engine errors become :class:`StateError`."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for reads (no write lock); engine errors become StateError."""

    @abstractmethod
    def _snapshot(self) -> AbstractContextManager[Cursor]:
        """A read-only transaction: every read in it sees one consistent snapshot."""

    @abstractmethod
    def _has_table(self, db: Cursor, name: str) -> bool: ...

    def _lock_schema(self, db: Cursor) -> None:
        """Serialise migrations between workers (inside the migration transaction)."""

    def _is_retryable(self, error: BaseException) -> bool:
        return False

    # --- schema --------------------------------------------------------------
    @property
    def latest_version(self) -> int:
        return len(self.MIGRATIONS)

    def migrate(self, upto: int | None = None) -> int:
        """Bring the schema to version ``upto`` (default: the latest); returns it."""
        target = self.latest_version if upto is None else upto
        with self._read() as db:
            if self._version(db) == target == self.latest_version:
                return target  # nothing to do: no write lock needed
        with self._tx() as db:
            self._lock_schema(db)
            current = self._version(db)
            if current > self.latest_version:
                raise StateError(
                    f"the verifier database has schema version {current}, newer than this "
                    f"hsm-auth knows ({self.latest_version}): upgrade hsm-auth"
                )
            for version in range(current, target):
                for statement in self.MIGRATIONS[version]:
                    db.count(statement)
                if version == 0 and not self._has_table(db, "meta"):
                    raise StateError("migration 1 did not create the meta table")
                if not db.count(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(version + 1),)
                ):
                    db.count(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(version + 1),),
                    )
            return max(current, target)

    def _version(self, db: Cursor) -> int:
        if not self._has_table(db, "meta"):
            return 0
        row = db.one("SELECT value FROM meta WHERE key='schema_version'")
        try:
            return int(row[0]) if row else 0
        except ValueError:
            raise StateError("the verifier database has a malformed schema version") from None

    def schema_version(self) -> int:
        with self._read() as db:
            return self._version(db)

    # --- offers -------------------------------------------------------------
    def put_offer(self, offer: OfferRecord, audit: AuditRecord | None = None) -> None:
        with self._tx() as db:
            db.count(
                "INSERT INTO offers (offer_id, user_name, methods, allow_replace, expires, suite,"
                " offer_hash, tenant, label) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    offer.offer_id,
                    offer.user,
                    methods_text(offer.methods),
                    int(offer.replace),
                    offer.expires,
                    offer.suite,
                    offer.offer_hash,
                    offer.tenant,
                    offer.label,
                ),
            )
            self._audit(db, audit)

    def offer(self, offer_id: bytes) -> OfferRecord | None:
        with self._read() as db:
            row = db.one(
                "SELECT user_name, methods, allow_replace, expires, suite, offer_hash, "
                "failed_activations, tenant, label FROM offers WHERE offer_id=? AND used=0",
                (offer_id,),
            )
        if row is None:
            return None
        return OfferRecord(
            offer_id,
            row[0],
            methods_parse(row[1]),
            bool(row[2]),
            int(row[3]),
            None if row[4] is None else str(row[4]),
            None if row[5] is None else bytes(row[5]),
            int(row[6]),
            str(row[7]),
            None if row[8] is None else str(row[8]),
        )

    def fail_activation(
        self, offer_id: bytes, *, limit: int, record: AuditRecord
    ) -> ActivationFailure | None:
        with self._tx() as db:
            # One UPDATE counts and burns: of racing wrong tries each sees its own count,
            # and exactly the one that reaches the limit burns the offer.
            row = db.one(
                "UPDATE offers SET failed_activations=failed_activations+1, "
                "used=CASE WHEN failed_activations+1 >= ? THEN 1 ELSE used END "
                "WHERE offer_id=? AND used=0 RETURNING failed_activations",
                (limit, offer_id),
            )
            if row is None:
                return None
            tries = int(row[0])
            written = [dataclasses.replace(record, detail=f"{tries} of {limit}")]
            if tries >= limit:
                written.append(
                    dataclasses.replace(
                        record,
                        event=Event.OFFER_BURNED,
                        detail=f"{tries} wrong activation codes",
                    )
                )
            for entry in written:
                self._audit(db, entry)
            return ActivationFailure(tries, tries >= limit, tuple(written))

    def used_offers(self, offer_ids: Iterable[bytes]) -> set[bytes]:
        used: set[bytes] = set()
        with self._read() as db:
            for chunk in _chunks(list(dict.fromkeys(offer_ids))):
                marks = ",".join("?" * len(chunk))
                rows = db.rows(
                    f"SELECT offer_id FROM offers WHERE used=1 AND offer_id IN ({marks})",  # noqa: S608
                    tuple(chunk),
                )
                used.update(bytes(row[0]) for row in rows)
        return used

    def redeem_offer(
        self,
        offer_id: bytes,
        record: CredentialRecord,
        *,
        now: int,
        audit: AuditRecord | None = None,
    ) -> CredentialRecord:
        with self._tx() as db:
            # The UPDATE takes the offer row's lock (PostgreSQL) or runs under the
            # database's write lock (SQLite): of two racing redemptions one sees used=0.
            # Any refusal below raises, and the transaction undoes the burn.
            row = db.one(
                "UPDATE offers SET used=1 WHERE offer_id=? AND used=0 "
                "RETURNING user_name, methods, allow_replace, expires, suite, tenant, label",
                (offer_id,),
            )
            if row is None:
                raise InvalidInput("unknown or already used enrollment offer")
            if int(row[3]) < now:
                raise ExpiredMessage("the enrollment offer has expired")
            if row[0] != record.user:
                raise InvalidInput("enrollment response is for another user")
            if record.method not in methods_parse(row[1]):
                raise UnknownMethod(f"the offer does not allow the {record.method.value} method")
            if row[4] is not None:  # the suite the authenticator enrolled with
                record = dataclasses.replace(record, suite=str(row[4]))
            # The offer names the tenant and the label (the response carries neither).
            record = dataclasses.replace(record, tenant=str(row[5]), label=str(row[6] or ""))
            return self._save_credential(db, record, replace=bool(row[2]), audit=audit)

    # --- credentials --------------------------------------------------------
    def save_credential(
        self, record: CredentialRecord, *, replace: bool, audit: AuditRecord | None = None
    ) -> CredentialRecord:
        with self._tx() as db:
            return self._save_credential(db, record, replace=replace, audit=audit)

    def _save_credential(
        self, db: Cursor, record: CredentialRecord, *, replace: bool, audit: AuditRecord | None
    ) -> CredentialRecord:
        if not 0 <= record.atc <= MAX_ATC:
            raise InvalidInput("the initial ATC is out of range")
        target, label = _replaced(db, record, replace)
        if target is not None:
            db.count("DELETE FROM credentials WHERE id=?", (target,))
        record = dataclasses.replace(record, label=label)
        row = db.one(
            "INSERT INTO credentials (user_name, method, backend, signing_key, agreement_key, "
            "wrapped_otp_key, suite, atc, created, protocol, sealed_otp_key, attestation, "
            "certificate, credential_id, expires, tenant, label) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "RETURNING id",
            (
                record.user,
                record.method.value,
                record.backend,
                record.signing_key,
                record.agreement_key,
                record.wrapped_otp_key,
                record.suite,
                record.atc,
                record.created,
                record.protocol,
                record.sealed_otp_key,
                record.attestation,
                record.certificate,
                transcript.credential_id(record.signing_key),
                record.expires,
                record.tenant,
                record.label,
            ),
        )
        self._audit(db, audit)
        assert row is not None
        return CredentialRecord(
            **{**record.__dict__, "id": int(row[0]), "failures": 0, "locked": False,
               "sign_count": 0}
        )

    def credentials(self, user: str) -> list[CredentialRecord]:
        return self.credentials_of([user])[user]

    def credentials_of(self, users: Iterable[str]) -> dict[str, list[CredentialRecord]]:
        with self._read() as db:
            return self._credentials_of(db, users)

    @staticmethod
    def _credentials_of(db: Cursor, users: Iterable[str]) -> dict[str, list[CredentialRecord]]:
        wanted = list(dict.fromkeys(users))
        found: dict[str, list[CredentialRecord]] = {u: [] for u in wanted}
        for chunk in _chunks(wanted):
            marks = ",".join("?" * len(chunk))
            for row in db.rows(
                f"SELECT {_CRED_COLS} FROM credentials "  # noqa: S608 - fixed columns
                f"WHERE user_name IN ({marks}) ORDER BY method, id",
                tuple(chunk),
            ):
                found[row[1]].append(_cred(row))
        return found

    def credential_by_id(self, credential_id: bytes) -> CredentialRecord | None:
        select = f"SELECT {_CRED_COLS} FROM credentials WHERE credential_id=?"  # noqa: S608
        with self._read() as db:
            row = db.one(select, (credential_id,))
            unnamed = row is None and db.one(
                "SELECT 1 FROM credentials WHERE credential_id IS NULL LIMIT 1"
            )
        if row is not None:
            return _cred(row)
        if not unnamed:
            return None
        with self._tx() as db:  # rows saved before schema version 8: name them once
            for cid, key in db.rows(
                "SELECT id, signing_key FROM credentials WHERE credential_id IS NULL"
            ):
                db.count(
                    "UPDATE credentials SET credential_id=? WHERE id=?",
                    (transcript.credential_id(bytes(key)), cid),
                )
            row = db.one(select, (credential_id,))
        return None if row is None else _cred(row)

    def all_credentials(self) -> list[CredentialRecord]:
        with self._read() as db:
            rows = db.rows(
                f"SELECT {_CRED_COLS} FROM credentials "  # noqa: S608
                "ORDER BY tenant, user_name, method, id"
            )
        return [_cred(r) for r in rows]

    # --- sessions -----------------------------------------------------------
    def put_session(self, session: SessionRecord, audit: AuditRecord | None = None) -> None:
        self.put_sessions([session], [audit] if audit else [])

    def put_sessions(
        self, sessions: Sequence[SessionRecord], audits: Sequence[AuditRecord] = ()
    ) -> None:
        with self._tx() as db:
            db.many(
                "INSERT INTO sessions (session_id, user_name, challenge, context, methods, "
                "expires, tenant, transaction_items, user_data) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        s.session_id,
                        s.user,
                        s.challenge,
                        s.context,
                        methods_text(s.methods),
                        s.expires,
                        s.tenant,
                        _transaction_text(s.transaction),
                        s.user_data,
                    )
                    for s in sessions
                ],
            )
            if audits:
                db.many(AUDIT_INSERT, [audit_args(a) for a in audits])

    def session(self, session_id: bytes) -> SessionRecord | None:
        return self.sessions([session_id]).get(session_id)

    def sessions(self, session_ids: Iterable[bytes]) -> dict[bytes, SessionRecord]:
        with self._read() as db:
            return self._sessions(db, session_ids)

    def snapshot(
        self, session_ids: Iterable[bytes]
    ) -> tuple[dict[bytes, SessionRecord], dict[str, list[CredentialRecord]]]:
        with self._snapshot() as db:
            sessions = self._sessions(db, session_ids)
            return sessions, self._credentials_of(db, (s.user for s in sessions.values()))

    @staticmethod
    def _sessions(db: Cursor, session_ids: Iterable[bytes]) -> dict[bytes, SessionRecord]:
        wanted = list(dict.fromkeys(session_ids))
        found: dict[bytes, SessionRecord] = {}
        for chunk in _chunks(wanted):
            marks = ",".join("?" * len(chunk))
            for row in db.rows(
                f"SELECT {_SESSION_COLS} FROM sessions "  # noqa: S608 - fixed columns
                f"WHERE session_id IN ({marks})",
                tuple(chunk),
            ):
                record = _session(row)
                found[record.session_id] = record
        return found

    # --- counters, lockout, audit -------------------------------------------
    def apply(self, changes: Sequence[Change]) -> list[Applied]:
        for attempt in range(self._RETRY_ATTEMPTS):
            try:
                with self._tx() as db:
                    return [self._apply_one(db, change) for change in changes]
            except StateError as e:
                if attempt + 1 < self._RETRY_ATTEMPTS and self._is_retryable(e.__cause__ or e):
                    continue  # a deadlock rolled everything back: run the batch again
                raise
        raise AssertionError("unreachable")

    def _apply_one(self, db: Cursor, change: Change) -> Applied:
        if isinstance(change, Accept):
            return self._apply_accept(db, change)
        if isinstance(change, Failure):
            return self._apply_failure(db, change)
        if isinstance(change, Note):
            self._audit(db, change.record)
            return Applied(Status.DONE, (change.record,))
        raise TypeError(f"not a store change: {type(change).__name__}")

    def _apply_accept(self, db: Cursor, c: Accept) -> Applied:
        if not c.old_atc < c.new_atc <= MAX_ATC:
            raise InvalidInput("an accepted ATC must move forward and stay in range")
        burned = db.count(
            "UPDATE sessions SET used=1 WHERE session_id=? AND used=0 AND expires>=?",
            (c.session_id, c.now),
        )
        if not burned:
            return self._refusal(db, c.record, Status.SESSION_GONE, Reason.REPLAY)
        moved = db.count(
            "UPDATE credentials SET atc=?, failures=0, last_used=? "
            "WHERE id=? AND atc=? AND locked=0",
            (c.new_atc, c.now, c.credential_id, c.old_atc),
        )
        if moved:
            db.count(_RESET_SIBLINGS, (c.credential_id, c.credential_id))
            self._audit(db, c.record)
            return Applied(Status.DONE, (c.record,))
        return self._cas_lost(db, c)

    def _cas_lost(self, db: Cursor, c: Accept) -> Applied:
        """The session was burned in this transaction but the ATC did not match: undo
        the burn and say why."""
        # We hold the session row since we updated it: this restores it exactly.
        db.count("UPDATE sessions SET used=0 WHERE session_id=?", (c.session_id,))
        row = db.one("SELECT atc, locked FROM credentials WHERE id=?", (c.credential_id,))
        if row is None:
            return self._refusal(db, c.record, Status.CREDENTIAL_GONE, Reason.CREDENTIAL_GONE)
        if row[1]:
            return self._refusal(db, c.record, Status.LOCKED, Reason.LOCKED)
        return Applied(Status.STALE)

    def _refusal(self, db: Cursor, record: AuditRecord, status: Status, why: Reason) -> Applied:
        refused = record.refused(why)
        self._audit(db, refused)
        return Applied(status, (refused,))

    def _apply_failure(self, db: Cursor, c: Failure) -> Applied:
        written = [c.record]
        self._audit(db, c.record)
        for cid in sorted(set(c.credential_ids)):
            row = db.one(
                "UPDATE credentials SET failures=failures+1, "
                "locked=CASE WHEN failures+1 >= ? THEN 1 ELSE locked END WHERE id=? "
                "RETURNING failures, user_name, method",
                (c.lock_after, cid),
            )
            if row is not None and int(row[0]) == c.lock_after:
                lockout = lockout_record(c, row[1], row[2])
                self._audit(db, lockout)
                written.append(lockout)
        return Applied(Status.DONE, tuple(written))

    def unlock(self, credential_id: int, audit: AuditRecord | None = None) -> None:
        with self._tx() as db:
            db.count("UPDATE credentials SET failures=0, locked=0 WHERE id=?", (credential_id,))
            self._audit(db, audit)

    def renew(
        self, credential_id: int, *, expires: int, certificate: bytes,
        audit: AuditRecord | None = None,
    ) -> bool:
        with self._tx() as db:
            done = db.count(
                "UPDATE credentials SET expires=?, certificate=? WHERE id=?",
                (expires, certificate, credential_id),
            )
            if done:
                self._audit(db, audit)
        return bool(done)

    def revoke(self, credential_id: int, audit: AuditRecord | None = None) -> bool:
        with self._tx() as db:
            gone = db.count("DELETE FROM credentials WHERE id=?", (credential_id,))
            if gone:
                self._audit(db, audit)
        return bool(gone)

    def audit_records(self, user: str | None = None, limit: int = 100) -> list[AuditRecord]:
        cols = "at, event, user_name, method, session, reason, atc, detail"
        with self._read() as db:
            if user is None:
                rows = db.rows(
                    f"SELECT {cols} FROM audit ORDER BY id DESC LIMIT ?",  # noqa: S608
                    (limit,),
                )
            else:
                rows = db.rows(
                    f"SELECT {cols} FROM audit WHERE user_name=? "  # noqa: S608
                    "ORDER BY id DESC LIMIT ?",
                    (user, limit),
                )
        return [AuditRecord.from_row(*r) for r in reversed(rows)]

    # --- API keys -------------------------------------------------------------
    _API_KEY_COLS = "key_id, secret_hash, label, scopes, created, revoked"

    @staticmethod
    def _api_key(row: Sequence[Any]) -> ApiKeyRecord:
        return ApiKeyRecord(
            str(row[0]),
            bytes(row[1]),
            str(row[2]),
            tuple(s for s in str(row[3]).split(",") if s),
            int(row[4]),
            None if row[5] is None else int(row[5]),
        )

    def put_api_key(self, record: ApiKeyRecord, audit: AuditRecord | None = None) -> None:
        with self._tx() as db:
            if db.one("SELECT 1 FROM api_keys WHERE key_id=?", (record.key_id,)):
                raise InvalidInput("an API key with this id exists already")
            db.count(
                f"INSERT INTO api_keys ({self._API_KEY_COLS}) VALUES (?,?,?,?,?,?)",  # noqa: S608
                (
                    record.key_id,
                    record.secret_hash,
                    record.label,
                    ",".join(record.scopes),
                    record.created,
                    record.revoked,
                ),
            )
            self._audit(db, audit)

    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._read() as db:
            row = db.one(
                f"SELECT {self._API_KEY_COLS} FROM api_keys WHERE key_id=?",  # noqa: S608
                (key_id,),
            )
        return None if row is None else self._api_key(row)

    def api_keys(self) -> list[ApiKeyRecord]:
        with self._read() as db:
            rows = db.rows(
                f"SELECT {self._API_KEY_COLS} FROM api_keys ORDER BY created, key_id"  # noqa: S608
            )
        return [self._api_key(r) for r in rows]

    def revoke_api_key(self, key_id: str, now: int, audit: AuditRecord | None = None) -> bool:
        with self._tx() as db:
            done = db.count(
                "UPDATE api_keys SET revoked=? WHERE key_id=? AND revoked IS NULL", (now, key_id)
            )
            if done:
                self._audit(db, audit)
        return bool(done)

    def purge(self, now: int) -> int:
        with self._tx() as db:
            return sum(
                db.count(f"DELETE FROM {table} WHERE expires < ?", (now,))  # noqa: S608
                for table in ("sessions", "offers", "challenges", "request_nonces")
            )

    # --- online service: signed requests and challenges ---------------------
    def put_nonce(self, nonce: bytes, expires: int, now: int) -> None:
        with self._tx() as db:
            db.count("DELETE FROM request_nonces WHERE expires < ?", (now,))
            db.count("INSERT INTO request_nonces (nonce, expires) VALUES (?,?)", (nonce, expires))

    def consume_nonce(
        self, nonce: bytes, now: int, *, credential: int, sign_count: int | None = None
    ) -> Consumed:
        try:
            with self._tx() as db:
                # One DELETE: of two workers presenting the same nonce, one deletes the row.
                if not db.count(
                    "DELETE FROM request_nonces WHERE nonce=? AND expires>=?", (nonce, now)
                ):
                    return Consumed.GONE
                if sign_count is not None and not self._advance_sign_count(
                    db, credential, sign_count
                ):
                    raise _Rollback
                return Consumed.DONE
        except _Rollback:
            return Consumed.COUNTER

    @staticmethod
    def _advance_sign_count(db: Cursor, credential: int, sign_count: int) -> bool:
        return bool(db.count(
            "UPDATE credentials SET sign_count=? WHERE id=? AND sign_count<?",
            (sign_count, credential, sign_count),
        ))

    def put_challenge(self, challenge: Challenge, audit: AuditRecord | None = None) -> None:
        with self._tx() as db:
            db.count(
                "INSERT INTO challenges (challenge_id, kind, user_name, message, context, state, "
                "created, expires) VALUES (?,?,?,?,?,?,?,?)",
                (
                    challenge.id_bytes,
                    challenge.kind.value,
                    challenge.user,
                    challenge.message,
                    context_text(challenge.context),
                    challenge.state.value,
                    challenge.created,
                    challenge.expires,
                ),
            )
            self._audit(db, audit)

    def challenge(self, challenge_id: str) -> Challenge | None:
        with self._read() as db:
            return self._challenge(db, bytes.fromhex(challenge_id))

    @staticmethod
    def _challenge(db: Cursor, challenge_id: bytes) -> Challenge | None:
        row = db.one(
            f"SELECT {_CHALLENGE_COLS} FROM challenges WHERE challenge_id=?",  # noqa: S608
            (challenge_id,),
        )
        return None if row is None else _challenge(row)

    def pending_challenges(
        self, user: str, now: int, kinds: Sequence[ChallengeKind]
    ) -> list[Challenge]:
        if not kinds:
            return []
        marks = ",".join("?" * len(kinds))
        with self._read() as db:
            rows = db.rows(
                f"SELECT {_CHALLENGE_COLS} FROM challenges "  # noqa: S608 - fixed columns
                f"WHERE user_name=? AND state='pending' AND expires>=? AND kind IN ({marks}) "
                "ORDER BY created, challenge_id LIMIT 100",
                (user, now, *(k.value for k in kinds)),
            )
        return [_challenge(r) for r in rows]

    def claim_challenge(
        self, challenge_id: str, *, credential_id: bytes, user: str, now: int,
        audit: AuditRecord | None = None,
    ) -> Challenge | None:
        cid = bytes.fromhex(challenge_id)
        with self._tx() as db:
            claimed = db.count(
                "UPDATE challenges SET state='claimed', claimed_by=?, "
                "user_name=COALESCE(user_name, ?) "
                "WHERE challenge_id=? AND kind='qr' AND expires>=? "
                "AND (user_name IS NULL OR user_name=?) "
                "AND (state='pending' OR (state='claimed' AND claimed_by=?))",
                (credential_id, user, cid, now, user, credential_id),
            )
            if not claimed:
                return None
            self._audit(db, audit)
            return self._challenge(db, cid)

    def answer_challenge(
        self, challenge_id: str, *, expected: ChallengeState, decision: ChallengeState,
        user: str, method: Method, credential_id: bytes, credential: int,
        sign_count: int | None, approval: str, now: int, audit: AuditRecord | None = None,
    ) -> Consumed:
        if expected not in (ChallengeState.PENDING, ChallengeState.CLAIMED) or decision not in (
            ChallengeState.APPROVED, ChallengeState.REJECTED
        ):
            raise InvalidInput("a challenge is answered from pending or claimed")
        try:
            with self._tx() as db:
                # The compare-and-swap: of racing answers, one finds the expected state.
                if not db.count(
                    "UPDATE challenges SET state=?, method=?, credential_id=?, answered=?, "
                    "approval=? WHERE challenge_id=? AND state=? AND expires>=? AND user_name=? "
                    "AND (claimed_by IS NULL OR claimed_by=?)",
                    (
                        decision.value, method.value, credential_id, now, approval,
                        bytes.fromhex(challenge_id), expected.value, now, user, credential_id,
                    ),
                ):
                    return Consumed.GONE
                if sign_count is not None and not self._advance_sign_count(
                    db, credential, sign_count
                ):
                    raise _Rollback
                self._audit(db, audit)
                return Consumed.DONE
        except _Rollback:
            return Consumed.COUNTER

    @staticmethod
    def _audit(db: Cursor, record: AuditRecord | None) -> None:
        if record is not None:
            db.count(AUDIT_INSERT, audit_args(record))
