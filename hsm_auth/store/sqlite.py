"""SQLite engine: the embedded default. One file (mode 0600), WAL, and
``synchronous=FULL``: every commit, so every counter change, is fsynced to the
write-ahead log before :meth:`SqliteStore.apply` returns. Throughput comes from
group commit (many verifications per transaction, see
:meth:`hsm_auth.verifier.Verifier.verify_many`), not from weaker syncing.

Several processes may open the same file: ``BEGIN IMMEDIATE`` takes SQLite's
single write lock, so the compare-and-swap statements of one transaction never
interleave with another's. ``timeout`` is how long a writer waits for that
lock before the operation fails (closed) with :class:`StateError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from ..errors import StateError
from .offline_log import SQLITE_MIGRATION as _V11  # version 11 (issue 14): the offline log
from .sql import Cursor, SqlStore

# Version 1 is the schema of hsm-auth 0.1 (kept verbatim so old files upgrade).
_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS offers ("
    " offer_id BLOB PRIMARY KEY, user TEXT NOT NULL, methods TEXT NOT NULL,"
    " replace INTEGER NOT NULL, expires INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS credentials ("
    " id INTEGER PRIMARY KEY, user TEXT NOT NULL, method TEXT NOT NULL, backend TEXT NOT NULL,"
    " signing_key BLOB NOT NULL, agreement_key BLOB, wrapped_otp_key BLOB, suite TEXT NOT NULL,"
    " atc INTEGER NOT NULL, failures INTEGER NOT NULL DEFAULT 0,"
    " locked INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL, UNIQUE (user, method))",
    "CREATE TABLE IF NOT EXISTS sessions ("
    " session_id BLOB PRIMARY KEY, user TEXT NOT NULL, challenge BLOB NOT NULL,"
    " context TEXT NOT NULL, methods TEXT NOT NULL, expires INTEGER NOT NULL,"
    " used INTEGER NOT NULL DEFAULT 0)",
)
# Version 2: names both engines share (``user`` is reserved in PostgreSQL), the
# audit table, last use of a credential, and an index to purge old sessions.
_V2 = (
    "ALTER TABLE offers RENAME COLUMN user TO user_name",
    'ALTER TABLE offers RENAME COLUMN "replace" TO allow_replace',
    "ALTER TABLE credentials RENAME COLUMN user TO user_name",
    "ALTER TABLE credentials ADD COLUMN last_used INTEGER",
    "ALTER TABLE sessions RENAME COLUMN user TO user_name",
    "CREATE INDEX sessions_expires ON sessions (expires)",
    "CREATE TABLE audit (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, event TEXT NOT NULL,"
    " user_name TEXT, method TEXT, session TEXT, reason TEXT, atc INTEGER, detail TEXT)",
    "CREATE INDEX audit_user ON audit (user_name, id)",
)

# Version 3: the suite an offer named, which the credential redeemed from it keeps.
_V3 = ("ALTER TABLE offers ADD COLUMN suite TEXT",)
# Version 4 (protocol 3): the hash of the offer's signed body, which the enrollment
# transcript covers, and each credential's protocol (rows from before are 2: re-enroll).
_V4 = (
    "ALTER TABLE offers ADD COLUMN offer_hash BLOB",
    "ALTER TABLE credentials ADD COLUMN protocol INTEGER NOT NULL DEFAULT 2",
)
# Version 5: each credential's OTP key sealed by the verifier's key-encryption key
# (hsm_auth.verifier_keys); rows from before have none and must re-enroll.
_V5 = ("ALTER TABLE credentials ADD COLUMN sealed_otp_key BLOB",)
# Version 6 (issue 11): the verified attestation and the issued certificate of each
# credential, and each offer's count of wrong activation codes.
_V6 = (
    "ALTER TABLE credentials ADD COLUMN attestation TEXT",
    "ALTER TABLE credentials ADD COLUMN certificate BLOB",
    "ALTER TABLE offers ADD COLUMN failed_activations INTEGER NOT NULL DEFAULT 0",
)
# Version 7 (issue 13): the online service's API keys (hsm_auth.api_keys): the SHA-256
# of each key's secret, never the secret.
_V7 = (
    "CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_hash BLOB NOT NULL,"
    " label TEXT NOT NULL, scopes TEXT NOT NULL, created INTEGER NOT NULL, revoked INTEGER)",
)
# Version 8 (issue 13): each credential's protocol credential id
# (hsm_auth.transcript.credential_id of its signing key), indexed: the online service
# finds credentials by it. Rows from before get theirs on the first lookup.
_V8 = (
    "ALTER TABLE credentials ADD COLUMN credential_id BLOB",
    "CREATE INDEX credentials_credential_id ON credentials (credential_id)",
)
# Version 9 (issue 13, the online service): the FIDO2 signature counter of each
# credential's signed requests and approvals; single-use request nonces; push / QR /
# in-app challenges.
_V9 = (
    "ALTER TABLE credentials ADD COLUMN sign_count INTEGER NOT NULL DEFAULT 0",
    "CREATE TABLE request_nonces (nonce BLOB PRIMARY KEY, expires INTEGER NOT NULL)",
    "CREATE INDEX request_nonces_expires ON request_nonces (expires)",
    "CREATE TABLE challenges (challenge_id BLOB PRIMARY KEY, kind TEXT NOT NULL,"
    " user_name TEXT, message TEXT NOT NULL, context TEXT NOT NULL, state TEXT NOT NULL,"
    " created INTEGER NOT NULL, expires INTEGER NOT NULL, claimed_by BLOB, method TEXT,"
    " credential_id BLOB, answered INTEGER, approval TEXT)",
    "CREATE INDEX challenges_user ON challenges (user_name, state, expires)",
    "CREATE INDEX challenges_expires ON challenges (expires)",
)

# Version 10 (issue 14): each credential's offline expiry (Unix time; 0: never;
# hsm_auth.expiry), set at enrollment and at each renewal.
_V10 = ("ALTER TABLE credentials ADD COLUMN expires INTEGER NOT NULL DEFAULT 0",)

# Version 12 (issue 14, docs/PROTOCOL.md §17): what a session's OTP question binds
# besides the context: the tenant, the transaction data (JSON [[label, value], ...])
# and how many characters the user enters (0: none). Rows from before have none.
_V12 = (
    "ALTER TABLE sessions ADD COLUMN tenant TEXT",
    "ALTER TABLE sessions ADD COLUMN transaction_items TEXT",
    "ALTER TABLE sessions ADD COLUMN user_data INTEGER NOT NULL DEFAULT 0",
)

# Version 13 (issue 14): several credentials per (tenant, user, method), each with a
# label unique per (tenant, user): SQLite cannot drop the UNIQUE (user, method) of
# version 1, so the table is rebuilt with every column it has (rows keep their id;
# they are labelled with their method), and AUTOINCREMENT: a row id is never reused,
# so a change decided for a revoked credential never lands on one enrolled after it
# (PostgreSQL's identity column never reuses either). Offers name the tenant and the
# label of the credential they make.
_CREDENTIAL_COLUMNS_V12 = (
    "id, user_name, method, backend, signing_key, agreement_key, wrapped_otp_key, suite, atc,"
    " failures, locked, created, last_used, protocol, sealed_otp_key, attestation, certificate,"
    " credential_id, sign_count, expires"
)
_V13 = (
    "CREATE TABLE credentials_v13 ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, user_name TEXT NOT NULL, method TEXT NOT NULL,"
    " backend TEXT NOT NULL, signing_key BLOB NOT NULL, agreement_key BLOB,"
    " wrapped_otp_key BLOB, suite TEXT NOT NULL, atc INTEGER NOT NULL,"
    " failures INTEGER NOT NULL DEFAULT 0, locked INTEGER NOT NULL DEFAULT 0,"
    " created INTEGER NOT NULL, last_used INTEGER, protocol INTEGER NOT NULL DEFAULT 2,"
    " sealed_otp_key BLOB, attestation TEXT, certificate BLOB, credential_id BLOB,"
    " sign_count INTEGER NOT NULL DEFAULT 0, expires INTEGER NOT NULL DEFAULT 0,"
    " tenant TEXT NOT NULL DEFAULT '',"
    " label TEXT NOT NULL, UNIQUE (tenant, user_name, label))",
    f"INSERT INTO credentials_v13 ({_CREDENTIAL_COLUMNS_V12}, tenant, label)"  # noqa: S608
    f" SELECT {_CREDENTIAL_COLUMNS_V12}, '', method FROM credentials",
    "DROP TABLE credentials",
    "ALTER TABLE credentials_v13 RENAME TO credentials",
    "CREATE INDEX credentials_credential_id ON credentials (credential_id)",
    "CREATE INDEX credentials_user ON credentials (user_name, method)",
    "ALTER TABLE offers ADD COLUMN tenant TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE offers ADD COLUMN label TEXT",
)


class _SqliteCursor:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, args).fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        cur = self._db.execute(sql, args)
        row: tuple[Any, ...] | None = cur.fetchone()
        cur.fetchall()  # finish the statement (RETURNING)
        return row

    def count(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    def many(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, args)


class SqliteStore(SqlStore):
    engine = "sqlite"
    MIGRATIONS: ClassVar[tuple[tuple[str, ...], ...]] = (
        _V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10, _V11, _V12, _V13,
    )

    def __init__(self, path: Path, *, timeout: float = 30.0, migrate: bool = True) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except (OSError, ValueError) as e:  # a file where a directory should be, a NUL...
            reason = getattr(e, "strerror", None) or e
            raise StateError(f"verifier database {str(path)[:200]}: {reason}") from None
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                path, isolation_level=None, timeout=timeout, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise StateError(f"verifier database {path}: {e}") from e
        path.chmod(0o600)
        self._cursor = _SqliteCursor(self._db)
        if migrate:
            try:
                self.migrate()
            except BaseException:
                self._db.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Cursor]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StateError(f"verifier database: {e}") from e
            try:
                yield self._cursor
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):  # gone already: nothing was written
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StateError(f"verifier database: {e}") from e
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StateError(f"verifier database: commit failed: {e}") from e

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        with self._lock:
            try:
                yield self._cursor
            except sqlite3.Error as e:
                raise StateError(f"verifier database: {e}") from e

    @contextmanager
    def _snapshot(self) -> Iterator[Cursor]:
        # A deferred transaction: in WAL mode its first read fixes the snapshot.
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    yield self._cursor
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StateError(f"verifier database: {e}") from e

    def _has_table(self, db: Cursor, name: str) -> bool:
        return (
            db.one("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
            is not None
        )
