"""A session's tenant, transaction data and user-data length are stored with it
(docs/PROTOCOL.md §17) on both engines, and sessions from before have none."""

from __future__ import annotations

import pytest

from hsm_auth.methods import Method
from hsm_auth.store import SessionRecord, open_store

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
NOW = 1_800_000_000
PAY = (("Amount", "120,00 €"), ("Empfänger", "DE89 3704 0044 0532 0130 00"))


@pytest.fixture(params=ENGINES)
def spec(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "v.db")
    return request.getfixturevalue("postgres_dsn")


def _added_in(store) -> int:  # type: ignore[no-untyped-def]
    """The schema version whose migration added the sessions' transaction columns."""
    return next(
        i for i, step in enumerate(store.MIGRATIONS) if any("transaction_items" in s for s in step)
    )


def test_a_session_keeps_its_transaction(spec):
    with open_store(spec) as store:
        full = SessionRecord(b"\x01" * 16, "alice", b"c" * 16, "Pay", (Method.DEVICE,), NOW,
                             tenant="retail", transaction=PAY, user_data=8)
        plain = SessionRecord(b"\x02" * 16, "alice", b"c" * 16, "Log in", (Method.PIN,), NOW)
        store.put_sessions([full, plain])
        assert store.session(full.session_id) == full
        assert store.session(plain.session_id) == plain
        assert (plain.tenant, plain.transaction, plain.user_data) == (None, None, 0)


def test_a_session_from_before_has_no_transaction(spec):
    with open_store(spec, migrate=False) as old:
        version = _added_in(old)
        assert old.migrate(upto=version) == version
        with old._tx() as db:
            db.count(
                "INSERT INTO sessions (session_id, user_name, challenge, context, methods, "
                "expires) VALUES (?,?,?,?,?,?)",
                (b"\x03" * 16, "alice", b"c" * 16, "ctx", "device", NOW),
            )
    with open_store(spec) as new:
        session = new.session(b"\x03" * 16)
        assert session is not None and session.context == "ctx"
        assert (session.tenant, session.transaction, session.user_data) == (None, None, 0)
