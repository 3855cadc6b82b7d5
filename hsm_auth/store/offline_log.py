"""The verifier's copy of the authenticators' offline logs (docs/PROTOCOL.md §19;
:mod:`hsm_auth.offline_audit` checks and reconciles them): one row per entry
received, keyed by the protocol credential id and the entry's seq, so that an
entry once received can never be replaced by another with the same seq.

A mixin of :class:`~hsm_auth.store.sql.SqlStore` (both engines); its schema is one
migration, :data:`SQLITE_MIGRATION` / :data:`POSTGRES_MIGRATION`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..audit import AuditRecord

if TYPE_CHECKING:
    from .sql import Cursor

__all__ = ["POSTGRES_MIGRATION", "SQLITE_MIGRATION", "OfflineLogSql", "StoredEntry"]

_TABLE = (
    "CREATE TABLE offline_log (credential_id {b} NOT NULL, seq {i} NOT NULL,"
    " entry_hash {b} NOT NULL, at {i} NOT NULL, atc {i} NOT NULL, user_name TEXT NOT NULL,"
    " tenant TEXT, method TEXT NOT NULL, data_hash {b} NOT NULL, signed INTEGER NOT NULL,"
    " received {i} NOT NULL, PRIMARY KEY (credential_id, seq))"
)
#: Issue 14 (D): the offline log entries received from authenticators.
SQLITE_MIGRATION = (_TABLE.format(b="BLOB", i="INTEGER"),)
POSTGRES_MIGRATION = (_TABLE.format(b="BYTEA", i="BIGINT"),)

_COLS = "seq, entry_hash, at, atc, user_name, tenant, method, data_hash, signed, received"
_AUDIT_COLS = "at, event, user_name, method, session, reason, atc, detail"


@dataclass(frozen=True)
class StoredEntry:
    """One entry of a credential's offline log as the verifier received it."""

    seq: int
    entry_hash: bytes
    time: int
    atc: int
    user: str
    tenant: str | None
    method: str
    data_hash: bytes
    signed: bool  # its own head signature verified (FIDO2: the submission's request)
    received: int


class OfflineLogSql:
    """The offline log's statements (see the module docstring)."""

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Cursor]: ...

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]: ...

    def offline_entries(self, credential_id: bytes) -> list[StoredEntry]:
        """The credential's received entries, by seq."""
        with self._read() as db:
            rows = db.rows(
                f"SELECT {_COLS} FROM offline_log WHERE credential_id=? ORDER BY seq",  # noqa: S608
                (credential_id,),
            )
        return [
            StoredEntry(int(r[0]), bytes(r[1]), int(r[2]), int(r[3]), str(r[4]),
                        None if r[5] is None else str(r[5]), str(r[6]), bytes(r[7]),
                        bool(r[8]), int(r[9]))
            for r in rows
        ]

    def put_offline_entries(
        self, credential_id: bytes, entries: Sequence[StoredEntry],
        audits: Iterable[AuditRecord] = (),
    ) -> int:
        """Keep the entries whose seq is new (one transaction, with ``audits``);
        returns how many were new. An entry with a seq received before is kept as it
        was first received."""
        from .sql import AUDIT_INSERT, audit_args

        new = 0
        with self._tx() as db:
            for e in entries:
                new += db.count(
                    f"INSERT INTO offline_log (credential_id, {_COLS}) "  # noqa: S608
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (credential_id, e.seq, e.entry_hash, e.time, e.atc, e.user, e.tenant,
                     e.method, e.data_hash, int(e.signed), e.received),
                )
            for record in audits:
                db.count(AUDIT_INSERT, audit_args(record))
        return new

    def audit_events(
        self, user: str, method: str, events: Sequence[str], *, since: int = 0
    ) -> list[AuditRecord]:
        """Every audit record of ``user``'s ``method`` with one of ``events`` at or after
        ``since``, oldest first (the reconciliation reads the ATCs accepted)."""
        marks = ",".join("?" for _ in events)
        with self._read() as db:
            rows = db.rows(
                f"SELECT {_AUDIT_COLS} FROM audit WHERE user_name=? AND method=? "  # noqa: S608
                f"AND event IN ({marks}) AND at>=? ORDER BY id",
                (user, method, *events, since),
            )
        return [AuditRecord.from_row(*r) for r in rows]
