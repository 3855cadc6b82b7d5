"""Many worker processes against one store: one valid OTP submitted by 64
processes at once is accepted exactly once, on SQLite and on PostgreSQL, and
the stored ATC never goes backwards while workers race with different OTPs."""

from __future__ import annotations

import multiprocessing
import random

import pytest
from _verifier_device import enroll, verify_worker

from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WORKERS = 64
# fork: the workers start in milliseconds. The parent holds no database
# connection while it forks (every Verifier below is closed first).
CTX = multiprocessing.get_context("fork")


@pytest.fixture(params=ENGINES)
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")


def _run_workers(directory, database, jobs):
    """jobs: (session id, OTP) per worker; all submit after one barrier."""
    barrier = CTX.Barrier(len(jobs))
    results = CTX.Queue()
    procs = [
        CTX.Process(target=verify_worker, args=(directory, database, sid, otp, barrier, results))
        for sid, otp in jobs
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_one_otp_from_64_processes_is_accepted_exactly_once(tmp_path, database):
    directory = tmp_path / "verifier"
    v = Verifier.init(directory, "V", database=database)
    device = enroll(v, "alice")
    session = v.start_session("alice", "Pay 100 EUR")
    otp = device.otp(session)
    v.close()

    out = _run_workers(directory, database, [(session.session_id, otp)] * WORKERS)

    errors = [detail for kind, detail in out if kind == "error"]
    assert errors == []
    assert [kind for kind, _ in out].count("accepted") == 1
    assert [kind for kind, _ in out].count("refused") == WORKERS - 1
    with Verifier.open(directory, database=database) as v:
        cred = v.credential("alice", Method.DEVICE)
        assert (cred.atc, cred.failures, cred.locked) == (1, 0, False)
        accepts = [r for r in v.store.audit_records("alice", 1000) if r.event.value == "accept"]
        assert len(accepts) == 1


def test_racing_otps_never_move_the_atc_backwards(tmp_path, database):
    directory = tmp_path / "verifier"
    v = Verifier.init(directory, "V", database=database)
    device = enroll(v, "alice")
    jobs = []
    for atc in range(1, 33):  # 32 sessions, one OTP each, counters 1..32 in random order
        s = v.start_session("alice", f"op {atc}")
        jobs.append((s.session_id, device.otp(s, atc=atc)))
    random.Random(7).shuffle(jobs)
    v.close()

    out = _run_workers(directory, database, jobs)

    assert [detail for kind, detail in out if kind == "error"] == []
    accepted = sorted(atc for kind, atc in out if kind == "accepted")
    assert accepted, "at least the first committed OTP is accepted"
    assert len(set(accepted)) == len(accepted)  # no counter value accepted twice
    with Verifier.open(directory, database=database) as v:
        assert v.credential("alice", Method.DEVICE).atc == accepted[-1]
        trail = [r.atc for r in v.store.audit_records("alice", 1000) if r.event.value == "accept"]
    # In commit order (the audit table is written in the same transaction, under the
    # row lock of the credential), every accepted ATC is above the previous one.
    assert trail == sorted(trail) and sorted(trail) == accepted
