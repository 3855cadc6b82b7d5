"""One OTP, many HTTP submissions at once, against a real ``hsm-auth serve``:

* PostgreSQL with 2 worker processes: 64 connections, each submitting the same
  valid OTP at the same moment, and both workers hold some of them (which process
  accepted each connection is read from /proc) -> exactly one 200, 63 refusals
  with one identical problem body, one accept in the audit, the ATC at 1;
* the same on SQLite with 1 worker;
* kill -9 of the whole service while batches are in flight: every OTP answered
  200 is on disk (its session used, its ATC stored), and after a restart no OTP
  is accepted twice (each session's accept is in the audit once at most).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from _service_http import Connection, children, owned, populate, verify_request

from hsm_auth.methods import Method
from hsm_auth.testing.service import (  # noqa: F401
    make_verifier,
    running_service,
    service_factory,
)
from hsm_auth.verifier import Verifier

SUBMISSIONS = 64
REFUSED = {
    "type": "https://hsm-auth.invalid/problems/otp-refused",
    "title": "Forbidden",
    "status": 403,
    "detail": "refused",
}


async def _connections_on_every_worker(url: str, pids: list[int], n: int):
    """``n`` open connections among which every worker in ``pids`` holds at least one
    (the kernel hands connections to whichever worker accepts first: open more, in
    small waves, until each has some)."""
    conns: list[Connection] = []
    owners: dict[int, int] = {}
    for _ in range(32):
        conns += [await Connection.open(url) for _ in range(8)]
        owners = await owned(url, conns, pids)
        if len(conns) >= n and {owners.get(c.port) for c in conns} >= set(pids):
            break
    picked: list[Connection] = []
    for pid in pids:  # one of each worker first, then any
        picked += [c for c in conns if owners.get(c.port) == pid][:1]
    picked += [c for c in conns if c not in picked][: n - len(picked)]
    for c in conns:
        if c not in picked:
            c.close()
    return picked, {owners.get(c.port) for c in picked}


async def _storm(url: str, pids: list[int], request: bytes):
    conns, serving = await _connections_on_every_worker(url, pids, SUBMISSIONS)
    # Everything written before anything is read: the requests are in flight together.
    await asyncio.gather(*(c.send(request) for c in conns))
    answers = await asyncio.gather(*(c.answer() for c in conns))
    for c in conns:
        c.close()
    return answers, serving


def _check_one_acceptance(answers, directory, database, user):
    statuses = [a.status for a in answers]
    assert statuses.count(200) == 1, statuses
    assert statuses.count(403) == SUBMISSIONS - 1, statuses
    accepted = next(a for a in answers if a.status == 200).json()
    assert accepted | {"credential_id": None} == {
        "user": user, "method": "device", "atc": 1, "label": "device", "credential_id": None}
    for a in answers:
        if a.status == 403:
            assert a.headers["content-type"] == "application/problem+json"
            assert a.json() == REFUSED  # the same body, whatever the reason
    with Verifier.open(directory, database=database) as v:
        cred = v.credential(user, Method.DEVICE)
        assert (cred.atc, cred.failures, cred.locked) == (1, 0, False)
        trail = v.store.audit_records(user, 1000)
    assert [r.event.value for r in trail].count("accept") == 1
    refusals = [r for r in trail if r.event.value == "refuse"]
    assert len(refusals) == SUBMISSIONS - 1
    assert {r.reason.value for r in refusals} <= {"session-used", "replay"}


@pytest.mark.postgres
def test_64_submissions_of_one_otp_across_2_postgres_workers_accept_once(
    tmp_path, postgres_dsn, service_factory
):
    directory = make_verifier(tmp_path / "v", database=postgres_dsn)
    [planned], key = populate(directory, postgres_dsn, 1)
    svc = service_factory(directory, database=postgres_dsn, workers=2)
    workers = children(svc.process.pid)
    assert len(workers) >= 2
    answers, serving = asyncio.run(
        _storm(svc.url, workers, verify_request(planned.session_id, planned.otp, key))
    )
    assert len(serving) == 2, "both workers must hold some of the connections"
    _check_one_acceptance(answers, directory, postgres_dsn, planned.user)


def test_64_submissions_of_one_otp_on_sqlite_accept_once(tmp_path, service_factory):
    directory = make_verifier(tmp_path / "v")
    [planned], key = populate(directory, None, 1)
    svc = service_factory(directory)
    answers, _ = asyncio.run(
        _storm(svc.url, [svc.process.pid], verify_request(planned.session_id, planned.otp, key))
    )
    _check_one_acceptance(answers, directory, None, planned.user)


async def _stream_until_killed(url, process, plan, key, *, connections=16, kill_after=40):
    """Submit every planned OTP over ``connections`` connections; SIGKILL the whole
    service (its process group) once ``kill_after`` answers are in. Returns the
    session ids answered 200 and how many requests were still waiting."""
    todo = list(plan)
    acked: list[bytes] = []
    answered = 0
    waiting = 0
    killed = asyncio.Event()

    async def worker(conn: Connection):
        nonlocal answered, waiting
        while todo and not killed.is_set():
            p = todo.pop()
            waiting += 1
            try:
                a = await conn.call(verify_request(p.session_id, p.otp, key))
            except (ConnectionError, asyncio.IncompleteReadError):
                return  # killed with this one in flight: no answer, not acknowledged
            waiting -= 1
            answered += 1
            assert a.status == 200, (a.status, a.body)
            acked.append(p.session_id)
            if answered == kill_after and not killed.is_set():
                killed.set()
                os.killpg(process.pid, signal.SIGKILL)

    conns = [await Connection.open(url) for _ in range(connections)]
    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()
    return acked, waiting


@pytest.mark.parametrize(
    "engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_kill_9_mid_batch_loses_no_acknowledged_otp_and_accepts_none_twice(
    tmp_path, engine, request
):
    database = None if engine == "sqlite" else request.getfixturevalue("postgres_dsn")
    workers = 1 if engine == "sqlite" else 2
    directory = make_verifier(tmp_path / "v", database=database)
    plan, key = populate(directory, database, 120)
    with running_service(directory, database=database, workers=workers) as svc:
        acked, waiting = asyncio.run(_stream_until_killed(svc.url, svc.process, plan, key))
        svc.process.wait(10)
    assert len(acked) >= 40
    assert waiting > 0, "requests must have been in flight when the service died"
    by_session = {p.session_id: p for p in plan}
    with Verifier.open(directory, database=database) as v:
        sessions, _creds = v.store.snapshot(list(by_session))
        for sid in acked:  # acknowledged -> durable
            assert sessions[sid].used
            assert v.credential(by_session[sid].user, Method.DEVICE).atc == 1
        used_before = {sid for sid, s in sessions.items() if s.used}
    # Restart and submit every OTP again: none that was used is accepted again.
    with running_service(directory, database=database, workers=workers) as svc:
        again = asyncio.run(_resubmit(svc.url, plan, key))
    for p, status in zip(plan, again, strict=True):
        if p.session_id in used_before:
            assert status == 403, "an OTP used before the kill was accepted again"
        else:
            assert status == 200, "an OTP never committed must still be accepted"
    with Verifier.open(directory, database=database) as v:
        for p in plan:
            trail = v.store.audit_records(p.user, 100)
            assert [r.event.value for r in trail].count("accept") == 1, p.user
            assert v.credential(p.user, Method.DEVICE).atc == 1


async def _resubmit(url, plan, key):
    conns = [await Connection.open(url) for _ in range(8)]
    statuses: list[int] = [0] * len(plan)

    async def worker(k: int):
        for i in range(k, len(plan), len(conns)):
            a = await conns[k].call(verify_request(plan[i].session_id, plan[i].otp, key))
            statuses[i] = a.status

    await asyncio.gather(*(worker(k) for k in range(len(conns))))
    for c in conns:
        c.close()
    return statuses
