"""The service on PostgreSQL with two worker processes: API keys work in both and a
revoked key is refused by both at once; offers, sessions, QR codes and credentials
over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
from _service import bearer, enroll_python_device, make_key, problem, zbar

from hsm_auth import api_keys
from hsm_auth.testing.service import make_verifier
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.postgres


def test_two_workers_on_postgresql(postgres_dsn, tmp_path, service_factory):
    verifier_dir = make_verifier(tmp_path / "verifier", database=postgres_dsn)
    key = make_key(verifier_dir, database=postgres_dsn)
    service = service_factory(verifier_dir, database=postgres_dsn, workers=2)
    h = bearer(key)
    assert "postgresql://" not in " ".join(service.process.args)  # the DSN is not in argv
    device = enroll_python_device(service.url, key, verifier_dir, database=postgres_dsn)
    # one Verifier per worker: health answered once one of them was up; wait for the other
    deadline = time.monotonic() + 30
    while service.log().count("service ready") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.log().count("service ready") == 2, service.log()
    sessions = []
    for _ in range(12):  # fresh connections: the kernel spreads them over both workers
        with httpx.Client() as client:
            r = client.post(service.url + "/v1/sessions",
                            json={"user": "alice", "context": "Log in"}, headers=h)
            assert r.status_code == 201, r.text
            sessions.append(r.json())
    qr = httpx.get(f"{service.url}/v1/sessions/{sessions[0]['session_id']}/qr.png", headers=h)
    assert zbar(qr.content, tmp_path).startswith("HA1:")
    cid = device.credential_id.hex()
    assert httpx.get(f"{service.url}/v1/credentials/{cid}", headers=h).json()["user"] == "alice"

    with Verifier.open(verifier_dir, database=postgres_dsn) as v:
        api_keys.revoke(v.store, key[4:20], now=2)
    for _ in range(20):  # every worker, from the next request on
        with httpx.Client() as client:
            problem(client.post(service.url + "/v1/offers", json={"user": "alice"}, headers=h),
                    401, "unauthorized")
    assert key[21:] not in service.log()
