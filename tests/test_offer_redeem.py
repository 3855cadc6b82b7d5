"""Fault 4 of issue 9: an enrollment offer is burned in the same transaction
that saves its credential, on both engines. A failure (a trigger that aborts the
INSERT) or a ``kill -9`` between the burn and the save leaves the offer usable
and no credential; a success burns it and stores the credential together."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from _verifier_device import PythonDevice

from hsm_auth.errors import AlreadyEnrolled, ExpiredMessage, InvalidInput, StateError, UnknownMethod
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def spec(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "v.db")
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def verifier(tmp_path, spec):
    v = Verifier.init(tmp_path / "verifier", "Bank", database=spec)
    yield v
    v.close()


def _sql(spec: str, *statements: str) -> None:
    """Run statements on the store's database from another connection."""
    if spec.startswith("postgresql:"):
        import psycopg

        with psycopg.connect(spec, autocommit=True) as conn:
            for s in statements:
                conn.execute(s.encode())
    else:
        db = sqlite3.connect(spec)
        try:
            for s in statements:
                db.execute(s)
            db.commit()
        finally:
            db.close()


def _inject_insert_failure(spec: str) -> None:
    if spec.startswith("postgresql:"):
        _sql(
            spec,
            "CREATE FUNCTION injected() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER injected BEFORE INSERT ON credentials "
            "FOR EACH ROW EXECUTE FUNCTION injected()",
        )
    else:
        _sql(
            spec,
            "CREATE TRIGGER injected BEFORE INSERT ON credentials "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )


def _remove_insert_failure(spec: str) -> None:
    if spec.startswith("postgresql:"):
        _sql(spec, "DROP TRIGGER injected ON credentials", "DROP FUNCTION injected()")
    else:
        _sql(spec, "DROP TRIGGER injected")


def _offer_used(spec: str) -> list[int]:
    if spec.startswith("postgresql:"):
        import psycopg

        with psycopg.connect(spec) as conn:
            return [int(r[0]) for r in conn.execute(b"SELECT used FROM offers").fetchall()]
    db = sqlite3.connect(spec)
    try:
        return [int(r[0]) for r in db.execute("SELECT used FROM offers")]
    finally:
        db.close()


def _response(verifier: Verifier, user: str = "alice", method: Method = Method.DEVICE) -> str:
    offer = verifier.create_offer(user, methods=[method])
    return PythonDevice().enroll(offer, method)


def test_a_failure_between_burn_and_save_leaves_the_offer_usable(verifier, spec):
    response = _response(verifier)
    _inject_insert_failure(spec)
    with pytest.raises(StateError):
        verifier.accept_enrollment(response)
    assert verifier.store.all_credentials() == []
    assert _offer_used(spec) == [0]  # the burn was rolled back with the failed INSERT
    _remove_insert_failure(spec)
    saved = verifier.accept_enrollment(response)  # the same offer, no new one needed
    assert [c.id for c in verifier.store.all_credentials()] == [saved.id]
    assert _offer_used(spec) == [1]


def test_a_success_burns_the_offer_and_stores_the_credential(verifier, spec):
    response = _response(verifier)
    saved = verifier.accept_enrollment(response)
    assert _offer_used(spec) == [1]
    assert verifier.store.credentials("alice") == [saved]
    with pytest.raises(InvalidInput, match="already used"):
        verifier.accept_enrollment(response)
    assert verifier.store.credentials("alice") == [saved]


def test_a_refused_enrollment_does_not_burn_the_offer(verifier, spec):
    from _verifier_device import enroll

    enroll(verifier, "alice")  # device enrolled: a second offer without replace is refused
    response = _response(verifier)
    with pytest.raises(AlreadyEnrolled):
        verifier.accept_enrollment(response)
    assert sorted(_offer_used(spec)) == [0, 1]
    verifier.revoke("alice", Method.DEVICE)
    verifier.accept_enrollment(response)  # still good once nothing is in the way
    assert sorted(_offer_used(spec)) == [1, 1]


def test_offer_checks_run_inside_the_transaction(verifier, spec):
    store = verifier.store
    offer_text = verifier.create_offer("alice", methods=[Method.PIN])
    response = PythonDevice().enroll(offer_text, Method.DEVICE)
    with pytest.raises(UnknownMethod):
        verifier.accept_enrollment(response)
    from hsm_auth.protocol import EnrollmentResponse

    decoded, _ = EnrollmentResponse.from_text(response)
    from hsm_auth.store import CredentialRecord

    record = CredentialRecord(
        "mallory", Method.PIN, "python", decoded.signing_key, decoded.agreement_key, None,
        verifier.identity.suite, 0, 0,
    )
    with pytest.raises(InvalidInput, match="another user"):
        store.redeem_offer(decoded.offer_id, record, now=0)
    alice = CredentialRecord(**{**record.__dict__, "user": "alice"})
    with pytest.raises(ExpiredMessage):
        store.redeem_offer(decoded.offer_id, alice, now=2**40)
    with pytest.raises(InvalidInput, match="unknown"):
        store.redeem_offer(b"\0" * 16, alice, now=0)
    assert store.all_credentials() == [] and _offer_used(spec) == [0]
    assert store.redeem_offer(decoded.offer_id, alice, now=0).user == "alice"


_KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
from hsm_auth.store import postgres, sqlite
from hsm_auth.verifier import Verifier

def killed_before_the_credential(one):
    def wrapper(self, sql, args=()):
        if sql.startswith("INSERT INTO credentials"):  # the offer's UPDATE has run
            os.kill(os.getpid(), signal.SIGKILL)
        return one(self, sql, args)
    return wrapper

for cursor in (sqlite._SqliteCursor, postgres._PgCursor):
    cursor.one = killed_before_the_credential(cursor.one)
v = Verifier.open(Path(sys.argv[1]), database=sys.argv[2])
v.accept_enrollment(Path(sys.argv[3]).read_text())
"""


def test_kill_9_between_burn_and_save_leaves_the_offer_usable(verifier, spec, tmp_path):
    response = _response(verifier)
    path = tmp_path / "response.txt"
    path.write_text(response)
    for _ in range(3):  # again and again: each kill leaves the offer as it was
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_CHILD, str(tmp_path / "verifier"), spec, str(path)],
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
        assert verifier.store.all_credentials() == []
        assert _offer_used(spec) == [0]
    saved = verifier.accept_enrollment(response)
    assert verifier.store.all_credentials() == [saved]
    assert _offer_used(spec) == [1]
