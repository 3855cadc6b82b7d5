"""Push, QR-claim and in-app approvals through a real ``hsm-auth serve`` (uvicorn in a
subprocess on 127.0.0.1), with real SoftHSM tokens and the soft FIDO2 authenticator
behind the authenticator's OnlineClient; and the attacks: replayed, re-targeted and
altered signed requests, another credential's signature, someone else's challenge,
two answers racing, an expired challenge, a forged approval; a removed credential's
keys are gone from the token (python-pkcs11, directly)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _online import OFFLINE_PIN, fido2_method, make_authenticator, response_for, softhsm_methods

from hsm_auth import api_keys
from hsm_auth.authenticator import Authenticator
from hsm_auth.challenges import Challenge, ChallengeState, Decision, context_hash
from hsm_auth.errors import ExpiredMessage, InvalidToken, UnknownMethod
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient
from hsm_auth.request_signing import (
    HEADER,
    approval_message,
    format_header,
    request_message,
    unb64u,
)
from hsm_auth.testing.fido2 import authenticator_factory, write_soft_policy
from hsm_auth.testing.service import RunningService, running_service
from hsm_auth.verifier import Verifier

pytestmark = [pytest.mark.softhsm, pytest.mark.fido2]

PIN = Authorization(pin=OFFLINE_PIN)
CONTEXT = {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (X11; Linux x86_64) kiosk",
           "location": "Berlin, DE", "custom": {"action": "login", "terminal": "kiosk-3"}}


@dataclass
class World:
    service: RunningService
    verifier_dir: Path
    api: httpx.Client  # the provider's backend (API key, scope challenge)
    alice: Authenticator  # device + pin (SoftHSM), biometric (soft FIDO2)
    bob: Authenticator  # device (SoftHSM)
    alice_client: OnlineClient
    bob_client: OnlineClient
    verifier_id: bytes
    #: SoftHSM tokens made with the others, for a test with its own verifier (python-pkcs11
    #: sees tokens made after it was loaded only once this process holds no session)
    spare_methods: dict[Method, Any] | None = None

    def start(self, **body: Any) -> dict[str, Any]:
        r = self.api.post("/v1/challenges", json=body)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def state(self, challenge_id: str, **params: Any) -> dict[str, Any]:
        r = self.api.get(f"/v1/challenges/{challenge_id}", params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
def world(softhsm_env, tmp_path_factory) -> Iterator[World]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("online")
    device = authenticator_factory(root)()
    verifier_dir = root / "verifier"
    write_soft_policy(verifier_dir, [device])
    with contextlib.ExitStack() as stack:
        verifier = Verifier.init(verifier_dir, "Example Bank")
        stack.callback(verifier.close)
        key = api_keys.create(verifier.store, "tests", ["challenge"], now=int(time.time()))
        alice = stack.enter_context(make_authenticator(root / "alice", {
            **softhsm_methods(root / "alice-tokens"),
            Method.BIOMETRIC: fido2_method(device.path, root / "fido2-state"),
        }))
        bob_methods = softhsm_methods(root / "bob-tokens")
        spare = softhsm_methods(root / "spare-tokens")
        bob = stack.enter_context(make_authenticator(root / "bob", {
            Method.DEVICE: bob_methods[Method.DEVICE]}))
        service = stack.enter_context(running_service(verifier_dir))
        api = stack.enter_context(httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {key.key}"}, timeout=40))
        alice_client, bob_client = OnlineClient(alice, service.url), OnlineClient(bob, service.url)
        for method in (Method.DEVICE, Method.PIN, Method.BIOMETRIC):
            alice_client.enroll(response_for(verifier, alice, "alice", method))
        bob_client.enroll(response_for(verifier, bob, "bob", Method.DEVICE))
        yield World(service, verifier_dir, api, alice, bob, alice_client, bob_client,
                    verifier.identity.verifier_id, spare)
        assert "Traceback" not in service.log()


def _pending(client: OnlineClient, challenge_id: str) -> Challenge:
    found = [c for c in client.pending(Method.DEVICE) if c.challenge_id == challenge_id]
    assert len(found) == 1
    return found[0]


# --- the flows -------------------------------------------------------------------------


def test_enrollment_keeps_the_certificate_and_the_policy_and_lists_credentials(world) -> None:  # type: ignore[no-untyped-def]
    methods = {m.method: m for m in world.alice.enrolled}
    assert all(m.certificate for m in methods.values())  # the result was stored
    listed = world.alice_client.credentials(Method.DEVICE)
    assert {c["method"] for c in listed} == {"device", "pin", "biometric"}
    by_method = {c["method"]: c for c in listed}
    assert by_method["device"]["approval"] == {"user_authentication": False, "timeout": 0}
    assert by_method["pin"]["approval"] == {"user_authentication": True, "timeout": 0}
    assert by_method["pin"]["credential_id"] == methods[Method.PIN].credential_id
    assert {c["user"] for c in world.bob_client.credentials(Method.DEVICE)} == {"bob"}


def test_push_approved_with_the_pin_and_the_provider_long_polls_it(world) -> None:  # type: ignore[no-untyped-def]
    started = world.start(user="alice", kind="push", message="Log in to Example Bank",
                          context=CONTEXT)
    assert started["state"] == "pending" and "claim" not in started
    challenge = _pending(world.alice_client, started["challenge_id"])
    assert challenge.message == "Log in to Example Bank"
    assert challenge.context.to_json() == CONTEXT  # what the provider's request carried
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(world.state, started["challenge_id"], wait=20)
        time.sleep(0.3)
        assert not waiting.done()
        world.alice_client.answer(challenge, Decision.APPROVE, Method.PIN, auth=PIN)
        polled = waiting.result(timeout=20)
    assert polled["state"] == "approved" and polled["method"] == "pin"
    pin_cid = next(m.credential_id for m in world.alice.enrolled if m.method is Method.PIN)
    assert polled["credential_id"] == pin_cid and polled["user"] == "alice"
    assert started["challenge_id"] not in {
        c.challenge_id for c in world.alice_client.pending(Method.DEVICE)}


def test_push_rejected_with_fido2_user_verification(world) -> None:  # type: ignore[no-untyped-def]
    started = world.start(user="alice", kind="push", message="Pay 120 EUR to ACME")
    challenge = _pending(world.alice_client, started["challenge_id"])
    world.alice_client.answer(challenge, Decision.REJECT, Method.BIOMETRIC)
    state = world.state(started["challenge_id"])
    assert (state["state"], state["method"]) == ("rejected", "biometric")


def test_a_qr_claim_returns_the_context_and_then_is_approved(world) -> None:  # type: ignore[no-untyped-def]
    started = world.start(kind="qr", message="Log in on the kiosk", context=CONTEXT)
    assert started["claim"].startswith("hsm-auth:claim:v1:")
    assert world.state(started["challenge_id"])["state"] == "pending"
    claimed = world.alice_client.claim(started["claim"], Method.DEVICE)
    assert claimed.context.to_json() == CONTEXT and claimed.user == "alice"
    assert claimed.state is ChallengeState.CLAIMED
    assert world.state(started["challenge_id"])["state"] == "claimed"
    with pytest.raises(UnknownMethod):  # bob cannot take it over: alice's now (404)
        world.bob_client.claim(started["claim"], Method.DEVICE)
    with pytest.raises(ExpiredMessage):  # nor another of alice's credentials (410)
        world.alice_client.claim(started["claim"], Method.PIN, auth=PIN)
    with pytest.raises(InvalidToken):  # only the claiming credential answers (403)
        world.alice_client.answer(claimed, Decision.APPROVE, Method.PIN, auth=PIN)
    world.alice_client.answer(claimed, Decision.APPROVE, Method.DEVICE)
    state = world.state(started["challenge_id"])
    assert (state["state"], state["user"], state["method"]) == ("approved", "alice", "device")


def test_in_app_and_the_agents_long_poll(world) -> None:  # type: ignore[no-untyped-def]
    seen = {c.challenge_id for c in world.alice_client.pending(Method.DEVICE)}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(world.alice_client.pending, Method.DEVICE, wait=20, known=seen)
        time.sleep(0.3)
        assert not waiting.done()  # held while nothing changes
        started = world.start(user="alice", kind="inapp", message="Confirm new payee")
        found = waiting.result(timeout=20)
    [new] = [c for c in found if c.challenge_id not in seen]
    assert new.challenge_id == started["challenge_id"] and new.kind.value == "inapp"
    world.alice_client.answer(new, Decision.APPROVE, Method.DEVICE)
    assert world.state(started["challenge_id"])["state"] == "approved"


# --- attacks on signed requests ---------------------------------------------------------


def _signed(world: World, who: Authenticator, method: Method, verb: str, path: str,
            body: bytes = b"") -> dict[str, str]:
    nonce = unb64u(httpx.get(world.service.url + "/v1/device/nonce").json()["nonce"])
    cid = bytes.fromhex(who.online_method(world.verifier_id, method).credential_id)
    made = who.sign_online(world.verifier_id, method,
                           request_message(verb, path, body, nonce, world.verifier_id, cid),
                           auth=PIN)
    return {HEADER: format_header(made.credential_id, nonce, made.signature),
            "Content-Type": "application/json"}


def _refused(r: httpx.Response, status: int = 403) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_replayed_retargeted_and_altered_requests_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    url = world.service.url
    headers = _signed(world, world.alice, Method.DEVICE, "GET", "/v1/device/credentials")
    _refused(httpx.get(url + "/v1/device/challenges", headers=headers))  # other path
    _refused(httpx.get(url + "/v1/device/credentials?x=1", headers=headers))  # other query
    _refused(httpx.request("DELETE", url + "/v1/device/credentials", headers=headers), 405)
    ok = httpx.get(url + "/v1/device/credentials", headers=headers)  # nothing used it up
    assert ok.status_code == 200
    _refused(httpx.get(url + "/v1/device/credentials", headers=headers))  # replayed
    started = world.start(kind="qr", message="Log in")
    body = json.dumps({"claim": started["claim"]}).encode()
    headers = _signed(world, world.alice, Method.DEVICE, "POST", "/v1/device/claims", body)
    other = world.start(kind="qr", message="Log in elsewhere")
    _refused(httpx.post(url + "/v1/device/claims", headers=headers,  # body altered
                        content=json.dumps({"claim": other["claim"]}).encode()))
    assert world.state(other["challenge_id"])["state"] == "pending"
    # another credential's signature, presented under alice's credential id
    bobs = _signed(world, world.bob, Method.DEVICE, "POST", "/v1/device/claims", body)
    alice_cid = world.alice.online_method(world.verifier_id, Method.DEVICE).credential_id
    forged = bobs[HEADER].replace(bobs[HEADER].split(",")[0], f"credential={alice_cid}")
    _refused(httpx.post(url + "/v1/device/claims", content=body,
                        headers={**bobs, HEADER: forged}))
    _refused(httpx.post(url + "/v1/device/claims", content=body,
                        headers={"Content-Type": "application/json"}))  # not signed at all
    assert world.state(started["challenge_id"])["state"] == "pending"
    ok = httpx.post(url + "/v1/device/claims", headers=headers, content=body)
    assert ok.status_code == 200 and ok.json()["context"] == {}


def _approval(world: World, who: Authenticator, method: Method, challenge: Challenge,
              decision: Decision) -> dict[str, Any]:
    made = who.sign_approval(world.verifier_id, method, challenge, decision, auth=PIN)
    return {"decision": decision.value, "credential": made.credential_id.hex(),
            "approval": made.signature.to_json()}


def _forced_approval(world: World, who: Authenticator, method: Method, challenge: Challenge,
                     decision: Decision) -> dict[str, Any]:
    """An approval signed in ``who``'s token whatever the challenge's user (the
    authenticator itself refuses to sign someone else's challenge)."""
    cid = bytes.fromhex(who.online_method(world.verifier_id, method).credential_id)
    message = approval_message(challenge.id_bytes, context_hash(challenge), decision,
                               world.verifier_id, cid)
    made = who.sign_online(world.verifier_id, method, message, auth=PIN)
    return {"decision": decision.value, "credential": cid.hex(),
            "approval": made.signature.to_json()}


def _answer(world: World, challenge_id: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{world.service.url}/v1/device/challenges/{challenge_id}/answer",
                      json=body, timeout=30)


def test_someone_elses_challenge_and_forged_approvals_change_nothing(world) -> None:  # type: ignore[no-untyped-def]
    started = world.start(user="alice", kind="push", message="Log in")
    challenge = _pending(world.alice_client, started["challenge_id"])
    with pytest.raises(UnknownMethod):  # bob's authenticator will not sign it
        world.bob_client.answer(challenge, Decision.APPROVE, Method.DEVICE)
    # bob answers with a valid approval of his own: the same 404 as an unknown id
    _refused(_answer(world, challenge.challenge_id, _forced_approval(
        world, world.bob, Method.DEVICE, challenge, Decision.APPROVE)), 404)
    _refused(_answer(world, "00" * 16, _approval(world, world.alice, Method.DEVICE, challenge,
                                                 Decision.APPROVE)), 404)
    assert world.bob_client.pending(Method.DEVICE) == [] or all(
        c.user == "bob" for c in world.bob_client.pending(Method.DEVICE))
    # an approval for "reject" sent as "approve"; one over another challenge; random bytes
    rejected = _approval(world, world.alice, Method.DEVICE, challenge, Decision.REJECT)
    _refused(_answer(world, challenge.challenge_id, {**rejected, "decision": "approve"}))
    other = world.start(user="alice", kind="push", message="Pay 5000 EUR")
    elsewhere = _approval(world, world.alice, Method.DEVICE,
                          _pending(world.alice_client, other["challenge_id"]), Decision.APPROVE)
    _refused(_answer(world, challenge.challenge_id, elsewhere))
    random_sig = {**rejected, "approval": {"signature": "A" * 86}}
    _refused(_answer(world, challenge.challenge_id, random_sig))
    with pytest.raises(InvalidToken):  # a context changed after it was shown: refused
        import dataclasses

        shown = dataclasses.replace(challenge, message="Log in (trust me)")
        world.alice_client.answer(shown, Decision.APPROVE, Method.DEVICE)
    for r in (_answer(world, challenge.challenge_id, {**rejected, "extra": 1}),
              _answer(world, challenge.challenge_id, {"decision": "maybe"})):
        _refused(r, 422)
    assert world.state(challenge.challenge_id)["state"] == "pending"
    assert world.state(other["challenge_id"])["state"] == "pending"
    # the right one still works, once
    assert _answer(world, challenge.challenge_id, rejected).status_code == 200
    _refused(_answer(world, challenge.challenge_id, rejected), 410)
    assert world.state(challenge.challenge_id)["state"] == "rejected"


def test_two_answers_racing_one_wins(world) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        started = world.start(user="alice", kind="push", message="Log in")
        challenge = _pending(world.alice_client, started["challenge_id"])
        bodies = [_approval(world, world.alice, Method.DEVICE, challenge, d)
                  for d in (Decision.APPROVE, Decision.REJECT)] * 4
        barrier = threading.Barrier(len(bodies))

        def send(body: dict[str, Any], barrier: threading.Barrier = barrier,
                 challenge_id: str = challenge.challenge_id) -> tuple[int, str]:
            barrier.wait()
            return _answer(world, challenge_id, body).status_code, body["decision"]

        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(send, bodies))
        winners = [d for status, d in results if status == 200]
        assert len(winners) == 1, results
        assert sorted(s for s, _ in results) == [200] + [410] * (len(bodies) - 1)
        assert world.state(challenge.challenge_id)["state"] == (
            "approved" if winners[0] == "approve" else "rejected")


def test_an_expired_challenge_cannot_be_claimed_or_answered(world) -> None:  # type: ignore[no-untyped-def]
    push = world.start(user="alice", kind="push", message="Log in", ttl=10)
    qr = world.start(kind="qr", message="Log in", ttl=10)
    challenge = _pending(world.alice_client, push["challenge_id"])
    body = _approval(world, world.alice, Method.DEVICE, challenge, Decision.APPROVE)
    with sqlite3.connect(world.verifier_dir / "verifier.db") as db:  # the clock moved on
        db.execute("UPDATE challenges SET expires = expires - 3600")
    assert world.state(push["challenge_id"])["state"] == "expired"
    _refused(_answer(world, push["challenge_id"], body), 410)
    with pytest.raises(ExpiredMessage):
        world.alice_client.claim(qr["claim"], Method.DEVICE)
    assert world.state(qr["challenge_id"])["state"] == "expired"
    assert push["challenge_id"] not in {
        c.challenge_id for c in world.alice_client.pending(Method.DEVICE)}


def test_bad_provider_requests_are_problems(world) -> None:  # type: ignore[no-untyped-def]
    url = world.service.url
    _refused(httpx.post(url + "/v1/challenges", json={"kind": "push", "message": "x"}), 401)
    for body, status in (({"kind": "push", "message": "x"}, 400),  # push needs a user
                         ({"user": "nobody", "kind": "push", "message": "x"}, 404),
                         ({"user": "alice", "kind": "mail", "message": "x"}, 422),
                         ({"user": "alice", "kind": "push", "message": "x\u202e"}, 400),
                         ({"user": "alice", "kind": "push", "message": "x", "ttl": 5}, 422),
                         ({"user": "alice", "kind": "push", "message": "x", "extra": 1}, 422)):
        _refused(world.api.post("/v1/challenges", json=body), status)
    _refused(world.api.get("/v1/challenges/" + "0" * 32), 404)
    _refused(world.api.get("/v1/challenges/not-hex"), 404)


# --- removing a credential --------------------------------------------------------------


_LIST_LABELS = """
import json, sys, pkcs11
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
with token.open(user_pin=open(sys.argv[3]).read().strip()) as session:
    print(json.dumps([str(o[pkcs11.Attribute.LABEL]) for o in session.get_objects()]))
"""


def _token_labels(who: Authenticator, method: Method) -> list[str]:
    """Every object label in the method's token, found with python-pkcs11 directly in a
    process of its own (no session or login of this one)."""
    from hsm_auth.uri import Pkcs11Uri

    uri = Pkcs11Uri.parse(str(who.config.method(method).settings["uri"]))
    pin_file = str(uri.pin_source).removeprefix("file:")
    out = subprocess.run(
        [sys.executable, "-c", _LIST_LABELS, str(uri.module_path), str(uri.token), pin_file],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    labels: list[str] = json.loads(out)
    return labels


def test_remove_forgets_the_credential_and_deletes_the_tokens_keys(world) -> None:  # type: ignore[no-untyped-def]
    enrolled = world.bob.online_method(world.verifier_id, Method.DEVICE)
    before = _token_labels(world.bob, Method.DEVICE)
    assert any(label.startswith(enrolled.label) for label in before)
    headers = _signed(world, world.bob, Method.DEVICE, "GET", "/v1/device/credentials")
    # another credential cannot remove bob's
    alice_headers = _signed(world, world.alice, Method.DEVICE, "DELETE",
                            f"/v1/device/credentials/{enrolled.credential_id}")
    _refused(httpx.delete(f"{world.service.url}/v1/device/credentials/{enrolled.credential_id}",
                          headers=alice_headers))
    world.bob_client.remove(Method.DEVICE)
    assert not any(label.startswith(enrolled.label)
                   for label in _token_labels(world.bob, Method.DEVICE))
    assert world.bob.enrolled == []
    # the verifier forgot it: its signatures are refused, its user cannot be challenged
    _refused(httpx.get(world.service.url + "/v1/device/credentials", headers=headers))
    _refused(world.api.post("/v1/challenges",
                            json={"user": "bob", "kind": "push", "message": "x"}), 404)
    with pytest.raises(UnknownMethod):
        world.bob_client.credentials(Method.DEVICE)


# --- two workers on PostgreSQL, and a verifier that requires user authentication ---------


@pytest.mark.postgres
def test_two_postgresql_workers_take_a_signed_request_and_an_answer_once(
    world, tmp_path, postgres_dsn
) -> None:  # type: ignore[no-untyped-def]
    from hsm_auth.approvals import OnlineVerifier
    from hsm_auth.files import atomic_write

    verifier_dir = tmp_path / "verifier"
    verifier = Verifier.init(verifier_dir, "Example Bank", database=postgres_dsn)
    atomic_write(verifier_dir / "policy.toml",
                 b"[approval]\nrequire_user_authentication = true\n")
    with contextlib.ExitStack() as stack:
        stack.callback(verifier.close)
        key = api_keys.create(verifier.store, "tests", ["challenge"], now=int(time.time()))
        assert world.spare_methods is not None
        carol = stack.enter_context(make_authenticator(tmp_path / "carol", world.spare_methods))
        online = OnlineVerifier(verifier)
        for method in (Method.DEVICE, Method.PIN):
            carol.store_result(online.enroll(response_for(verifier, carol, "carol", method)).result)
        service = stack.enter_context(
            running_service(verifier_dir, database=postgres_dsn, workers=2))
        pg = World(service, verifier_dir, httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {key.key}"}, timeout=40),
            carol, carol, OnlineClient(carol, service.url), OnlineClient(carol, service.url),
            verifier.identity.verifier_id)
        stack.callback(pg.api.close)

        headers = _signed(pg, carol, Method.DEVICE, "GET", "/v1/device/credentials")
        barrier = threading.Barrier(16)

        def replay(_: int) -> int:
            barrier.wait()
            return httpx.get(service.url + "/v1/device/credentials", headers=headers,
                             timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = sorted(pool.map(replay, range(16)))
        assert statuses == [200] + [403] * 15

        started = pg.start(user="carol", kind="push", message="Log in", context=CONTEXT)
        challenge = _pending(pg.alice_client, started["challenge_id"])
        # possession only: this verifier refuses the device method's approvals
        refused = _answer(pg, challenge.challenge_id, _approval(
            pg, carol, Method.DEVICE, challenge, Decision.APPROVE))
        _refused(refused)
        assert "possession only" in refused.json()["detail"]
        bodies = [_approval(pg, carol, Method.PIN, challenge, Decision.APPROVE)
                  for _ in range(8)]
        gate = threading.Barrier(len(bodies))

        def send(body: dict[str, Any]) -> int:
            gate.wait()
            return _answer(pg, challenge.challenge_id, body).status_code

        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            answers = sorted(pool.map(send, bodies))
        assert answers == [200] + [410] * 7
        state = pg.state(started["challenge_id"])
        assert (state["state"], state["method"]) == ("approved", "pin")
        assert "Traceback" not in service.log()
