"""Verifier storage: one interface (:class:`VerifierStore`), two engines.

* SQLite (the embedded default): a file, e.g. ``<verifier dir>/verifier.db``;
* PostgreSQL: a ``postgresql://`` DSN, for many worker processes.

:func:`open_store` picks the engine from the spec and brings the schema to
the latest version (migrations are idempotent and safe to run concurrently).
"""

from __future__ import annotations

from pathlib import Path

from .base import (
    Accept,
    ApiKeyRecord,
    Applied,
    Change,
    CredentialRecord,
    Failure,
    Note,
    OfferRecord,
    SessionRecord,
    Status,
    VerifierStore,
)

__all__ = [
    "Accept",
    "ApiKeyRecord",
    "Applied",
    "Change",
    "CredentialRecord",
    "Failure",
    "Note",
    "OfferRecord",
    "SessionRecord",
    "Status",
    "VerifierStore",
    "describe_store",
    "open_store",
]


def open_store(spec: str | Path, *, migrate: bool = True) -> VerifierStore:
    """A store for ``spec``: a ``postgresql://`` DSN, else a SQLite file path
    (``sqlite:///abs/path`` or a plain path)."""
    text = str(spec)
    from .postgres import is_postgres_dsn

    if is_postgres_dsn(text):
        from .postgres import PostgresStore

        return PostgresStore(text, migrate=migrate)
    from .sqlite import SqliteStore

    if text.startswith("sqlite://"):
        text = text[len("sqlite://") :]
    return SqliteStore(Path(text), migrate=migrate)


def describe_store(spec: str | Path) -> str:
    """The spec without a password, for messages and ``--json`` output."""
    from .postgres import _redact, is_postgres_dsn

    text = str(spec)
    return _redact(text) if is_postgres_dsn(text) else text
