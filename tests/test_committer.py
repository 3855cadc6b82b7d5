"""The service's group-commit thread (hsm_auth.service.committer) on a real
verifier and a real SQLite file (and PostgreSQL): requests that arrive together
share one verify_many; nobody hears a result before its commit; a database
failure fails the whole batch with nothing accepted; per-request refusals stay
per request; 64 submissions of one OTP are accepted exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from _verifier_device import enroll

from hsm_auth import api_keys
from hsm_auth.errors import InvalidInput, InvalidToken, StateError
from hsm_auth.methods import Method
from hsm_auth.service.committer import Committer, CommitterBusy
from hsm_auth.store.sqlite import SqliteStore
from hsm_auth.verifier import SQLITE_FILE, Acceptance, Verifier


@pytest.fixture
def verifier(tmp_path):
    v = Verifier.init(tmp_path / "v", "V")
    yield v
    v.close()


def _sessions(v, device, user, n):
    out = []
    for i in range(n):
        s = v.start_session(user, f"op {i}")
        out.append((s.session_id, device.otp(s)))
    return out


def _one_each(v, n):
    """n users, one session and its valid OTP each (one credential in a batch once:
    the same credential twice in one batch is contention, see Verifier._run)."""
    out = []
    for i in range(n):
        out += _sessions(v, enroll(v, f"u{i}"), f"u{i}", 1)
    return out


def _atcs(v, n):
    return [v.credential(f"u{i}", Method.DEVICE).atc for i in range(n)]


def _used(v, session_id) -> bool:
    sessions, _ = v.store.snapshot([session_id])
    return sessions[session_id].used


async def _gather(committer, jobs):
    return await asyncio.gather(
        *(committer.verify(sid, otp) for sid, otp in jobs), return_exceptions=True
    )


def test_requests_that_arrive_together_share_one_commit(verifier):
    jobs = _one_each(verifier, 100)
    with Committer(verifier) as committer:

        async def run():
            # The store's lock held: the first batch cannot commit, so everything
            # else queues behind it and goes into the next verify_many.
            verifier.store._lock.acquire()
            tasks = [asyncio.ensure_future(committer.verify(s, o)) for s, o in jobs]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in tasks), "a result before its commit"
            verifier.store._lock.release()
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
        stats = committer.stats
    assert all(isinstance(r, Acceptance) for r in results), results
    assert [r.user for r in results] == [f"u{i}" for i in range(100)]
    assert stats.requests == 100
    assert stats.batches <= 2 and stats.largest >= 99
    assert _atcs(verifier, 100) == [1] * 100


def test_each_request_gets_its_own_outcome_in_a_shared_batch(verifier):
    alice = enroll(verifier, "alice")
    bob = enroll(verifier, "bob")
    [(good_sid, good)] = _sessions(verifier, alice, "alice", 1)
    [(bob_sid, bob_otp)] = _sessions(verifier, bob, "bob", 1)
    wrong = str((int(bob_otp) + 1) % 10 ** len(bob_otp)).zfill(len(bob_otp))
    jobs = [
        (good_sid, good),
        (good_sid, good),  # the same OTP again in the same batch: a replay
        (bob_sid, wrong),  # a wrong OTP
        (b"\x00" * 16, good),  # an unknown session
        (bob_sid, "12"),  # malformed: InvalidInput, not a failed attempt
    ]
    with Committer(verifier) as committer:

        async def run():
            verifier.store._lock.acquire()
            tasks = [asyncio.ensure_future(committer.verify(s, o)) for s, o in jobs]
            await asyncio.sleep(0.1)
            verifier.store._lock.release()
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
    assert isinstance(results[0], Acceptance) and results[0].user == "alice"
    assert [type(r) for r in results[1:]] == [InvalidToken, InvalidToken, InvalidToken,
                                              InvalidInput]
    bob_cred = verifier.credential("bob", Method.DEVICE)
    assert (bob_cred.atc, bob_cred.failures) == (0, 1)
    assert not _used(verifier, bob_sid)
    reasons = [r.reason.value for r in verifier.store.audit_records("bob", 10) if r.reason]
    assert "no-match" in reasons


def test_a_database_failure_fails_the_whole_batch_and_accepts_nothing(tmp_path):
    directory = tmp_path / "v"
    Verifier.init(directory, "V").close()
    base = Verifier.open(directory)
    jobs = _one_each(base, 20)
    # The same verifier with a store that waits only 0.2 s for SQLite's write lock.
    v = Verifier(base.identity, base.keys, SqliteStore(directory / SQLITE_FILE, timeout=0.2))
    other = sqlite3.connect(directory / SQLITE_FILE, isolation_level=None)
    with Committer(v) as committer:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        results = asyncio.run(_gather(committer, jobs))
        assert all(type(r) is StateError for r in results), results
        assert len({id(r) for r in results}) == len(results)  # one exception object each
        assert committer.stats.failed_batches >= 1
        assert not any(_used(base, sid) for sid, _ in jobs)
        assert _atcs(base, 20) == [0] * 20
        other.execute("ROLLBACK")
        # The same OTPs, now that the database answers: all accepted, none lost.
        results = asyncio.run(_gather(committer, jobs))
    other.close()
    assert all(isinstance(r, Acceptance) for r in results), results
    assert _atcs(base, 20) == [1] * 20
    v.store.close()
    base.close()


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_one_otp_submitted_64_times_at_once_is_accepted_once(tmp_path, engine, request):
    dsn = None if engine == "sqlite" else request.getfixturevalue("postgres_dsn")
    v = Verifier.init(tmp_path / "v", "V", database=dsn)
    try:
        device = enroll(v, "alice")
        [(sid, otp)] = _sessions(v, device, "alice", 1)
        with Committer(v, max_batch=8) as committer:  # several batches race too
            results = asyncio.run(_gather(committer, [(sid, otp)] * 64))
        assert [type(r) for r in results].count(Acceptance) == 1
        assert [type(r) for r in results].count(InvalidToken) == 63
        accepts = [r for r in v.store.audit_records("alice", 200) if r.event.value == "accept"]
        assert len(accepts) == 1
        assert v.credential("alice", Method.DEVICE).atc == 1
    finally:
        v.close()


def test_blocking_callers_from_threads(verifier):
    jobs = _one_each(verifier, 16)
    out: list[object] = []
    with Committer(verifier) as committer:

        def call(sid, otp):
            try:
                out.append(committer.verify_blocking(sid, otp))
            except InvalidToken as e:
                out.append(e)

        threads = [threading.Thread(target=call, args=j) for j in jobs + jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(isinstance(r, Acceptance) for r in out) == 16
    assert sum(isinstance(r, InvalidToken) for r in out) == 16


def test_overload_is_refused_at_once_not_queued(verifier):
    jobs = _one_each(verifier, 10)
    with Committer(verifier, max_pending=3) as committer:

        async def run():
            verifier.store._lock.acquire()
            tasks = [asyncio.ensure_future(committer.verify(s, o)) for s, o in jobs]
            await asyncio.sleep(0.1)
            verifier.store._lock.release()
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
    busy = [r for r in results if isinstance(r, CommitterBusy)]
    accepted = [r for r in results if isinstance(r, Acceptance)]
    assert len(busy) + len(accepted) == 10
    assert 1 <= len(accepted) <= 4 and len(busy) >= 6  # the one in flight + 3 queued
    assert isinstance(busy[0], StateError)
    # The refused ones changed nothing: their sessions are unused, their ATCs where they were.
    assert sorted(_atcs(verifier, 10)) == [0] * len(busy) + [1] * len(accepted)
    assert sum(_used(verifier, sid) for sid, _ in jobs) == len(accepted)


def test_bad_items_are_refused_before_the_batch_and_close_drains(verifier):
    device = enroll(verifier, "alice")
    [(sid, otp)] = _sessions(verifier, device, "alice", 1)
    committer = Committer(verifier).start()

    async def run():
        with pytest.raises(InvalidInput):
            await committer.verify(sid.hex(), otp)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await committer.verify(sid, int(otp))  # type: ignore[arg-type]
        verifier.store._lock.acquire()
        task = asyncio.ensure_future(committer.verify(sid, otp))
        await asyncio.sleep(0.05)
        closer = threading.Thread(target=committer.close)
        closer.start()  # close() commits what was queued before it returns
        verifier.store._lock.release()
        result = await task
        closer.join()
        return result

    assert isinstance(asyncio.run(run()), Acceptance)
    with pytest.raises(StateError):
        committer.verify_blocking(sid, otp)


def test_api_keys_are_checked_with_the_batch_and_a_revocation_holds_at_once(verifier):
    jobs = _one_each(verifier, 4)
    now = 1_800_000_000
    good = api_keys.create(verifier.store, "good", ["verify"], now=now)
    other = api_keys.create(verifier.store, "other", ["verify"], now=now)
    enroll_only = api_keys.create(verifier.store, "enroll", ["enroll"], now=now)
    with Committer(verifier) as committer:

        async def run():
            verifier.store._lock.acquire()  # all four in one batch
            keys = [good.key, other.key, enroll_only.key, f"{good.key[:-1]}x"]
            tasks = [
                asyncio.ensure_future(committer.verify(s, o, api_key=k))
                for (s, o), k in zip(jobs, keys, strict=True)
            ]
            await asyncio.sleep(0.1)
            api_keys.revoke(verifier.store, other.record.key_id, now=now)  # before the batch
            verifier.store._lock.release()
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(run())
    assert isinstance(results[0], Acceptance)
    assert type(results[1]) is api_keys.ApiKeyRefused  # revoked while it waited
    assert type(results[2]) is api_keys.ScopeRefused
    assert type(results[3]) is api_keys.ApiKeyRefused  # a wrong secret
    assert _atcs(verifier, 4) == [1, 0, 0, 0]
    assert [_used(verifier, sid) for sid, _ in jobs] == [True, False, False, False]
