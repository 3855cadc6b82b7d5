"""The store on both engines: schema migrations, compare-and-swap, lockout
counting, and failing closed when the database is down (nothing half-written)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time

import pytest
from _verifier_device import Clock, enroll

from hsm_auth.audit import AuditRecord, Event
from hsm_auth.errors import InvalidInput, InvalidToken, StateError
from hsm_auth.methods import Method
from hsm_auth.store import Accept, Failure, OfferRecord, SessionRecord, Status, open_store
from hsm_auth.store.postgres import PostgresStore
from hsm_auth.store.sqlite import SqliteStore
from hsm_auth.testing.postgres import postgres_available, postgres_server
from hsm_auth.verifier import Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
NOW = 1_800_000_000


@pytest.fixture(params=ENGINES)
def spec(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "v.db")
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def store(spec):
    s = open_store(spec)
    yield s
    s.close()


def _record(event=Event.ACCEPT, **kw):
    return AuditRecord(NOW, event, **kw)


def _credential(store, user="alice", atc=0):
    from hsm_auth.store import CredentialRecord

    return store.save_credential(
        CredentialRecord(
            user=user,
            method=Method.DEVICE,
            backend="python",
            signing_key=b"\x02" + b"s" * 32,
            agreement_key=b"\x02" + b"a" * 32,
            wrapped_otp_key=None,
            suite="OCRA-1:HOTP-SHA256-8:C-QH64",
            atc=atc,
            created=NOW,
            sealed_otp_key=b"sealed:" + user.encode(),
        ),
        replace=False,
    )


def _session(store, sid=b"S" * 16, user="alice", expires=NOW + 300):
    store.put_session(SessionRecord(sid, user, b"c" * 16, "ctx", (Method.DEVICE,), expires))
    return sid


# --- schema ---------------------------------------------------------------------


def test_fresh_database_reaches_the_latest_version_and_reopening_is_idempotent(spec):
    with open_store(spec) as first:
        assert first.schema_version() == first.latest_version
        assert first.latest_version == len(SqliteStore.MIGRATIONS)  # both engines agree
    with open_store(spec) as again:
        assert again.schema_version() == again.latest_version


def test_migration_from_version_1_keeps_the_data(spec):
    with open_store(spec, migrate=False) as old:
        assert old.schema_version() == 0
        assert old.migrate(upto=1) == 1
        assert old.schema_version() == 1
        with old._tx() as db:  # version-1 column names
            user_col = "user" if old.engine == "sqlite" else "user_name"
            db.count(
                f"INSERT INTO credentials ({user_col}, method, backend, signing_key, suite, atc, "
                "created) VALUES (?,?,?,?,?,?,?)",
                ("alice", "device", "python", b"k", "OCRA-1:HOTP-SHA256-8:C-QH64", 7, NOW),
            )
    with open_store(spec) as new:
        assert new.schema_version() == new.latest_version
        [cred] = new.credentials("alice")
        assert (cred.atc, cred.failures, cred.locked, cred.last_used) == (7, 0, False, None)
        assert cred.expires == 0  # a credential from before expiry never expires
        assert (cred.protocol, cred.sealed_otp_key) == (2, None)  # must re-enroll
        assert new.audit_records() == []


def test_a_file_written_by_hsm_auth_0_1_is_upgraded(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in SqliteStore.MIGRATIONS[0]:
        db.execute(statement)
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    db.execute(
        "INSERT INTO sessions (session_id, user, challenge, context, methods, expires) "
        "VALUES (?,?,?,?,?,?)",
        (b"S" * 16, "alice", b"c" * 16, "ctx", "device", NOW),
    )
    db.commit()
    db.close()
    with SqliteStore(path) as store:
        assert store.schema_version() == store.latest_version
        assert store.session(b"S" * 16).user == "alice"


def test_the_sealed_otp_key_and_used_offers_are_stored(spec):
    with open_store(spec) as store:
        _credential(store)
        [cred] = store.credentials("alice")
        assert cred.sealed_otp_key == b"sealed:alice"
        assert "sealed" not in repr(cred)
        for oid in (b"A" * 16, b"B" * 16):
            store.put_offer(OfferRecord(oid, "bob", (Method.DEVICE,), False, NOW + 60, None, b"h"))
        record = dataclasses.replace(cred, user="bob", id=0)
        store.redeem_offer(b"A" * 16, record, now=NOW)
        assert store.used_offers([b"A" * 16, b"B" * 16, b"C" * 16]) == {b"A" * 16}
        assert store.used_offers([]) == set()


def test_a_newer_schema_is_refused(spec):
    with open_store(spec) as store, store._tx() as db:
        db.count("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StateError, match="newer than this hsm-auth"):
        open_store(spec)


# --- compare-and-swap -------------------------------------------------------------


def test_accept_is_a_compare_and_swap_that_burns_the_session(store):
    cred = _credential(store)
    sid = _session(store)
    assert store.accept(sid, cred.id, 0, 3, NOW)
    assert not store.accept(sid, cred.id, 3, 4, NOW)  # session burned
    sid2 = _session(store, b"T" * 16)
    assert not store.accept(sid2, cred.id, 0, 5, NOW)  # ATC is no longer 0
    assert store.session(sid2).used is False  # ... and the session was left unused
    assert store.credentials("alice")[0].atc == 3
    with pytest.raises(InvalidInput):
        store.accept(sid2, cred.id, 3, 3, NOW)  # the ATC never goes backwards or stays


def test_apply_reports_why_a_change_was_not_made(store):
    cred = _credential(store)
    used, stale, expired, locked, gone = (bytes([i]) * 16 for i in range(1, 6))
    for sid in (used, stale, locked, gone):
        _session(store, sid)
    _session(store, expired, expires=NOW - 1)
    results = store.apply(
        [
            Accept(used, cred.id, 0, 1, NOW, _record(user="alice", atc=1)),
            Accept(used, cred.id, 1, 2, NOW, _record(user="alice", atc=2)),
            Accept(stale, cred.id, 0, 2, NOW, _record(user="alice", atc=2)),
            Accept(expired, cred.id, 1, 2, NOW, _record(user="alice", atc=2)),
        ]
    )
    assert [r.status for r in results] == [
        Status.DONE,
        Status.SESSION_GONE,
        Status.STALE,
        Status.SESSION_GONE,
    ]
    assert [r.reason.value for r in results[1].records] == ["replay"]
    assert results[2].records == ()  # a stale read is retried by the verifier, not recorded
    store.apply([Failure((cred.id,), 1, _record(Event.REFUSE, user="alice"))])
    [res] = store.apply([Accept(locked, cred.id, 1, 2, NOW, _record(user="alice"))])
    assert res.status is Status.LOCKED
    store.revoke(cred.id)
    [res] = store.apply([Accept(gone, cred.id, 1, 2, NOW, _record(user="alice"))])
    assert res.status is Status.CREDENTIAL_GONE
    assert store.session(locked).used is False and store.session(gone).used is False


def test_failures_lock_at_the_threshold_once(store):
    cred = _credential(store)
    written = []
    for _ in range(4):
        [res] = store.apply([Failure((cred.id,), 3, _record(Event.REFUSE, user="alice"))])
        written += [r.event for r in res.records]
    assert written.count(Event.LOCKOUT) == 1
    [after] = store.credentials("alice")
    assert (after.failures, after.locked) == (4, True)
    store.unlock(cred.id)
    [after] = store.credentials("alice")
    assert (after.failures, after.locked) == (0, False)


def test_bulk_reads_and_writes(store):
    ids = [bytes([i]) * 16 for i in range(1, 40)]
    store.put_sessions(
        [
            SessionRecord(i, f"u{n % 3}", b"c" * 16, "x", (Method.PIN,), NOW)
            for n, i in enumerate(ids)
        ]
    )
    found = store.sessions([*ids, b"\xff" * 16])
    assert set(found) == set(ids)
    for n in range(3):
        _credential(store, f"u{n}")
    assert {u: len(c) for u, c in store.credentials_of(["u0", "u1", "nobody"]).items()} == {
        "u0": 1,
        "u1": 1,
        "nobody": 0,
    }
    assert store.purge(NOW + 1) == len(ids)


# --- failing closed -----------------------------------------------------------------


def test_sqlite_locked_by_another_writer_fails_closed(tmp_path):
    clock = Clock()
    v = Verifier.init(tmp_path / "v", "V", clock=clock)
    device = enroll(v, "alice")
    s = v.start_session("alice", "ctx")
    otp = device.otp(s)
    v.close()
    v = Verifier(v.identity, v.keys, SqliteStore(tmp_path / "v" / "verifier.db", timeout=0.1),
                 clock=clock)
    blocker = sqlite3.connect(tmp_path / "v" / "verifier.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateError):
            v.verify(s.session_id, otp)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert v.credential("alice", Method.DEVICE).atc == 0  # nothing was written
    assert v.verify(s.session_id, otp).atc == 1  # and the OTP still works afterwards
    v.close()


def test_unreachable_postgres_is_a_state_error(tmp_path):
    dsn = f"postgresql://nobody@/none?host={tmp_path}&port=1"
    with pytest.raises(StateError, match="unreachable"):
        open_store(dsn)


@pytest.mark.postgres
def test_postgres_connection_killed_mid_use_fails_closed_then_reconnects(
    tmp_path, postgres_server, postgres_dsn
):
    clock = Clock()
    v = Verifier.init(tmp_path / "v", "V", clock=clock, database=postgres_dsn)
    try:
        device = enroll(v, "alice")
        s = v.start_session("alice", "ctx")
        otp = device.otp(s)
        assert isinstance(v.store, PostgresStore)
        postgres_server.execute(f"SELECT pg_terminate_backend({v.store.backend_pid()})")
        with pytest.raises(StateError):
            v.verify(s.session_id, otp)
        assert v.verify(s.session_id, otp).atc == 1  # reconnected; nothing was half-done
        with pytest.raises(InvalidToken):
            v.verify(s.session_id, otp)
    finally:
        v.close()


@pytest.mark.postgres
def test_postgres_server_down_fails_closed_and_nothing_is_half_written(tmp_path):
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    clock = Clock()
    with postgres_server() as server:
        dsn = server.dsn()
        v = Verifier.init(tmp_path / "v", "V", clock=clock, database=dsn)
        try:
            device = enroll(v, "alice")
            s = v.start_session("alice", "ctx")
            otp = device.otp(s)
            server.stop()
            with pytest.raises(StateError):
                v.verify(s.session_id, otp)
            with pytest.raises(StateError):
                v.start_session("alice", "ctx")
            with pytest.raises(StateError):
                Verifier.open(tmp_path / "v", clock=clock, database=dsn)
            server.start()
            started = time.monotonic()
            assert v.credential("alice", Method.DEVICE).atc == 0
            assert v.store.session(s.session_id).used is False
            assert v.verify(s.session_id, otp).atc == 1
            assert time.monotonic() - started < 10
        finally:
            v.close()
