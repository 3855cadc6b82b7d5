"""SQLite engine: the embedded default. One file, WAL, ``synchronous=FULL`` so a
counter change is on disk when :meth:`SqliteStore.accept` returns."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AlreadyEnrolled, StateError
from ..methods import Method
from .base import CredentialRecord, OfferRecord, SessionRecord, VerifierStore

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offers (
    offer_id BLOB PRIMARY KEY, user TEXT NOT NULL, methods TEXT NOT NULL,
    replace INTEGER NOT NULL, expires INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS credentials (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, method TEXT NOT NULL, backend TEXT NOT NULL,
    signing_key BLOB NOT NULL, agreement_key BLOB, wrapped_otp_key BLOB, suite TEXT NOT NULL,
    atc INTEGER NOT NULL, failures INTEGER NOT NULL DEFAULT 0, locked INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL, UNIQUE (user, method));
CREATE TABLE IF NOT EXISTS sessions (
    session_id BLOB PRIMARY KEY, user TEXT NOT NULL, challenge BLOB NOT NULL, context TEXT NOT NULL,
    methods TEXT NOT NULL, expires INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0);
"""


def _methods_text(methods: tuple[Method, ...]) -> str:
    return ",".join(m.value for m in methods)


def _methods_parse(text: str) -> tuple[Method, ...]:
    return tuple(Method(m) for m in text.split(",") if m)


class SqliteStore(VerifierStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except sqlite3.Error as e:
            raise StateError(f"verifier database {path}: {e}") from e
        path.chmod(0o600)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StateError(f"verifier database: {e}") from e
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StateError(f"verifier database: {e}") from e

    # --- offers -------------------------------------------------------------
    def put_offer(self, offer: OfferRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO offers (offer_id, user, methods, replace, expires) VALUES (?,?,?,?,?)",
                (
                    offer.offer_id,
                    offer.user,
                    _methods_text(offer.methods),
                    offer.replace,
                    offer.expires,
                ),
            )

    def take_offer(self, offer_id: bytes) -> OfferRecord | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT user, methods, replace, expires FROM offers WHERE offer_id=? AND used=0",
                (offer_id,),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE offers SET used=1 WHERE offer_id=?", (offer_id,))
        return OfferRecord(offer_id, row[0], _methods_parse(row[1]), bool(row[2]), row[3])

    # --- credentials --------------------------------------------------------
    _CRED_COLS = (
        "id, user, method, backend, signing_key, agreement_key, wrapped_otp_key, suite, atc, "
        "failures, locked, created"
    )

    @staticmethod
    def _cred(row: tuple[Any, ...]) -> CredentialRecord:
        return CredentialRecord(
            id=row[0],
            user=row[1],
            method=Method(row[2]),
            backend=row[3],
            signing_key=row[4],
            agreement_key=row[5],
            wrapped_otp_key=row[6],
            suite=row[7],
            atc=row[8],
            failures=row[9],
            locked=bool(row[10]),
            created=row[11],
        )

    def save_credential(self, record: CredentialRecord, *, replace: bool) -> CredentialRecord:
        with self._tx() as db:
            exists = db.execute(
                "SELECT id FROM credentials WHERE user=? AND method=?",
                (record.user, record.method.value),
            ).fetchone()
            if exists and not replace:
                raise AlreadyEnrolled(
                    f"{record.user!r} has the {record.method.value} method enrolled already"
                )
            if exists:
                db.execute("DELETE FROM credentials WHERE id=?", (exists[0],))
            cur = db.execute(
                "INSERT INTO credentials (user, method, backend, signing_key, agreement_key, "
                "wrapped_otp_key, suite, atc, created) VALUES (?,?,?,?,?,?,?,?,?)",
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
                ),
            )
            new_id = cur.lastrowid
        assert new_id is not None
        return CredentialRecord(**{**record.__dict__, "id": new_id})

    def credentials(self, user: str) -> list[CredentialRecord]:
        rows = self._query(
            f"SELECT {self._CRED_COLS} FROM credentials WHERE user=? ORDER BY method",  # noqa: S608
            (user,),
        )
        return [self._cred(r) for r in rows]

    def all_credentials(self) -> list[CredentialRecord]:
        rows = self._query(
            f"SELECT {self._CRED_COLS} FROM credentials ORDER BY user, method",  # noqa: S608
            (),
        )
        return [self._cred(r) for r in rows]

    # --- sessions -----------------------------------------------------------
    def put_session(self, session: SessionRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sessions (session_id, user, challenge, context, methods, expires) "
                "VALUES (?,?,?,?,?,?)",
                (
                    session.session_id,
                    session.user,
                    session.challenge,
                    session.context,
                    _methods_text(session.methods),
                    session.expires,
                ),
            )

    def session(self, session_id: bytes) -> SessionRecord | None:
        rows = self._query(
            "SELECT session_id, user, challenge, context, methods, expires, used FROM sessions "
            "WHERE session_id=?",
            (session_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return SessionRecord(r[0], r[1], r[2], r[3], _methods_parse(r[4]), r[5], bool(r[6]))

    # --- counters and lockout -----------------------------------------------
    def accept(self, session_id: bytes, credential_id: int, old_atc: int, new_atc: int) -> bool:
        with self._tx() as db:  # BEGIN IMMEDIATE: we hold the write lock from here
            session = db.execute(
                "SELECT used FROM sessions WHERE session_id=?", (session_id,)
            ).fetchone()
            cred = db.execute(
                "SELECT atc, locked FROM credentials WHERE id=?", (credential_id,)
            ).fetchone()
            if (
                session is None
                or session[0]
                or cred is None
                or cred[0] != old_atc
                or cred[1]
                or new_atc <= old_atc
            ):
                return False
            db.execute("UPDATE sessions SET used=1 WHERE session_id=?", (session_id,))
            db.execute(
                "UPDATE credentials SET atc=?, failures=0 WHERE id=?", (new_atc, credential_id)
            )
        return True

    def record_failure(self, credential_ids: list[int], lock_after: int) -> None:
        with self._tx() as db:
            for cid in credential_ids:
                db.execute(
                    "UPDATE credentials SET failures=failures+1, "
                    "locked=CASE WHEN failures+1 >= ? THEN 1 ELSE locked END WHERE id=?",
                    (lock_after, cid),
                )

    def unlock(self, credential_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE credentials SET failures=0, locked=0 WHERE id=?", (credential_id,))
