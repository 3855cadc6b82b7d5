"""Expired sessions and offers are purged: on demand (``Verifier.purge``,
``hsm-auth verifier purge``) and now and then on write, on both store engines."""

from __future__ import annotations

import pytest
from _verifier_device import Clock, PythonDevice

from hsm_auth import verifier as verifier_module
from hsm_auth.cli import main
from hsm_auth.errors import InvalidInput, InvalidToken
from hsm_auth.methods import Method
from hsm_auth.verifier import PURGE_GRACE, Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock, database):
    v = Verifier.init(tmp_path / "verifier", "Purge verifier", clock=clock, database=database)
    v.purge_every = 0  # only the tests that want it purge on write
    yield v
    v.close()


def _rows(v: Verifier) -> tuple[int, int]:
    with v.store._read() as db:  # type: ignore[attr-defined]
        sessions = db.one("SELECT count(*) FROM sessions")
        offers = db.one("SELECT count(*) FROM offers")
    assert sessions is not None and offers is not None
    return int(sessions[0]), int(offers[0])


def test_purge_deletes_only_what_expired_before_the_grace(verifier, clock):
    device = PythonDevice()
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))  # a used offer
    verifier.create_offer("bob")  # never used
    used = verifier.start_session("alice", "used")
    verifier.verify(used.session_id, device.otp(used))
    late = verifier.start_session("alice", "never answered")
    assert _rows(verifier) == (2, 2)

    assert verifier.purge() == 0  # nothing has expired yet
    ttl = max(verifier.identity.session_ttl, verifier.identity.offer_ttl)
    clock.now += ttl + 1
    assert verifier.purge() == 0  # expired, but within the grace: still audited as expired
    fresh = verifier.start_session("alice", "fresh")
    clock.now += PURGE_GRACE
    assert verifier.purge() == 4
    assert _rows(verifier) == (1, 0)  # ``fresh`` expired within the grace: kept
    with pytest.raises(InvalidToken):  # a purged session is refused like an unknown one
        verifier.verify(late.session_id, device.otp(late))
    assert [s.session_id for s in [fresh] if verifier.store.session(s.session_id)] == [
        fresh.session_id
    ]
    with pytest.raises(InvalidInput):
        verifier.purge(grace=-1)
    with pytest.raises(InvalidInput):
        verifier.purge(grace=10**30)


def test_writes_purge_now_and_then(verifier, clock, monkeypatch):
    verifier.create_offer("alice")
    device = PythonDevice()
    offer = verifier.create_offer("carol", methods=[Method.DEVICE])
    verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))
    for context in ("a", "b", "c"):
        verifier.start_session("carol", context)
    assert _rows(verifier) == (3, 2)
    clock.now += 10 * PURGE_GRACE
    verifier.purge_every = 1  # every write purges
    verifier.start_session("carol", "d")
    assert _rows(verifier) == (1, 0)
    verifier.purge_every = verifier_module.PURGE_EVERY
    calls = []
    monkeypatch.setattr(verifier.store, "purge", lambda now: calls.append(now) or 0)
    for i in range(20 * verifier_module.PURGE_EVERY):
        verifier.start_session("carol", f"s{i}")
    # about 20 purges expected; far fewer than one per write, and not none
    assert 3 <= len(calls) <= 60


def test_cli_verifier_purge(tmp_path, capsys):
    home = tmp_path / "home"
    assert main(["--home", str(home), "verifier", "init", "--name", "P"]) == 0
    code = str(tmp_path / "code")
    assert main(["--home", str(home), "verifier", "offer", "--user", "alice",
                 "--activation-code-file", code]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["--home", str(home), "--json", "verifier", "purge"]) == 0
    assert capsys.readouterr().out.strip() == '{"purged": 0}'
    v = Verifier.open(home / "verifier", clock=lambda: 2**40)
    assert v.purge(grace=0) == 1
    v.close()
    assert main(["--home", str(home), "verifier", "purge", "--grace", "-5"]) == 2
    assert "hsm-auth: error: the purge grace period" in capsys.readouterr().err
