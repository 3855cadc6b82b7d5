"""The signed offline log (issue 14, docs/PROTOCOL.md §19) end to end: real SoftHSM
tokens behind the Authenticator, a real ``hsm-auth serve`` (uvicorn subprocess on
127.0.0.1) taking the log over signed requests, and the verifier's reconciliation
with the OTPs it accepted.

Must show: 20 offline uses of which 15 were submitted are reported as 5 "generated,
not submitted"; a deleted, reordered or edited entry (and an entry changed after it
was submitted, and a re-chained log) is an alert; the log never holds an OTP or PIN.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _online import OFFLINE_PIN, fido2_method, make_authenticator, response_for, softhsm_methods

from hsm_auth.authenticator import Authenticator, OfflineOtp
from hsm_auth.config import MethodConfig, Paths
from hsm_auth.errors import InvalidToken
from hsm_auth.files import atomic_write_json, read_json
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.offline_audit import OfflineAudit
from hsm_auth.offline_log import LogEntry, OfflineLog, data_hash
from hsm_auth.online_client import OnlineClient
from hsm_auth.protocol import VerificationData
from hsm_auth.testing.agent import running_agent
from hsm_auth.testing.fido2 import authenticator_factory, write_soft_policy
from hsm_auth.testing.service import RunningService, running_service
from hsm_auth.tokens import update_config
from hsm_auth.verifier import Verifier

pytestmark = [pytest.mark.softhsm, pytest.mark.fido2]


@dataclass
class World:
    root: Path
    service: RunningService
    verifier: Verifier
    methods: dict[Method, MethodConfig]
    #: closes the authenticators at the end (python-pkcs11 sees tokens made later, as
    #: other tests' are, only once this process holds no session)
    stack: contextlib.ExitStack


@dataclass
class User:
    name: str
    auth: Authenticator
    client: OnlineClient
    world: World

    def use(
        self, method: Method = Method.DEVICE, context: str = "Log in"
    ) -> tuple[bytes, OfflineOtp]:
        """One offline use: a session at the verifier, the OTP made here (not submitted)."""
        session = self.world.verifier.start_session(self.name, context, methods=[method])
        request = self.auth.start_offline_authentication(session.text)
        pin = OFFLINE_PIN if method is Method.PIN else None
        return session.session_id, self.auth.finish_offline_authentication(request, method, pin=pin)

    def log_path(self, method: Method = Method.DEVICE) -> Path:
        cid = bytes.fromhex(next(m.credential_id for m in self.auth.enrolled if m.method is method))
        return OfflineLog(self.auth.directory).path(cid)

    def submit(self, method: Method = Method.DEVICE) -> dict[str, Any]:
        auth = Authorization(pin=OFFLINE_PIN) if method is Method.PIN else None
        report = self.client.submit_log(method, auth=auth)
        assert report is not None
        return report


@pytest.fixture(scope="module")
def world(softhsm_env, tmp_path_factory) -> Iterator[World]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("offline-log")
    verifier_dir = Paths.from_env(root / "home").verifier_dir  # `hsm-auth verifier` finds it
    Verifier.init(verifier_dir, "Example Bank").close()
    identity = read_json(verifier_dir / "identity.json")
    atomic_write_json(verifier_dir / "identity.json", {**identity, "window": 30})  # 20 uses
    device = authenticator_factory(root)()
    write_soft_policy(verifier_dir, [device])
    methods = {**softhsm_methods(root / "tokens"),
               Method.BIOMETRIC: fido2_method(device.path, root / "fido2-state")}
    with contextlib.ExitStack() as stack:
        verifier = Verifier.open(verifier_dir)
        stack.callback(verifier.close)
        service = stack.enter_context(running_service(verifier_dir))
        yield World(root, service, verifier, methods, stack)
        assert "Traceback" not in service.log()


_users = iter(range(1000))


def user(world: World, *methods: Method) -> User:
    """A new user of the verifier with their own authenticator (keys in the shared
    SoftHSM tokens), enrolled online with ``methods``."""
    name = f"user{next(_users)}"
    auth = world.stack.enter_context(
        make_authenticator(world.root / name, {m: world.methods[m] for m in methods}))
    client = OnlineClient(auth, world.service.url)
    for method in methods or (Method.DEVICE,):
        client.enroll(response_for(world.verifier, auth, name, method))
    return User(name, auth, client, world)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _codes(report: dict[str, Any]) -> set[str]:
    return {a["code"] for a in report["alerts"]}


# --- the reconciliation ------------------------------------------------------------


def test_20_offline_uses_15_submitted_are_reported_5_not_submitted(world) -> None:  # type: ignore[no-untyped-def]
    alice = user(world, Method.DEVICE)
    uses = [alice.use(context=f"Log in #{i}") for i in range(20)]
    skipped = {3, 7, 8, 14, 19}  # never typed in anywhere
    for i, (session_id, otp) in enumerate(uses):
        if i not in skipped:
            assert world.verifier.verify(session_id, otp.otp).atc == otp.atc
    report = alice.submit()
    assert report["entries"] == report["received"] == 20
    assert report["submitted"] == 15
    assert report["not_submitted"] == [uses[i][1].atc for i in sorted(skipped)]
    assert report["alerts"] == []
    # What the verifier shows later, reconciled again: the same.
    cred = next(c for c in world.verifier.store.credentials(alice.name))
    shown = OfflineAudit(world.verifier.store, world.verifier.identity.verifier_id).report(cred)
    assert len(shown.not_submitted) == 5 and shown.alerts == ()
    # Submitting again sends nothing new; one more use is one more entry.
    assert alice.client.submit_log(Method.DEVICE) is None
    alice.use()
    again = alice.submit()
    assert (again["entries"], again["received"], len(again["not_submitted"])) == (21, 1, 6)
    # Nothing secret in the log: no OTP, the context only as a hash.
    text = alice.log_path().read_text()
    assert not any(otp.otp in text for _, otp in uses) and "Log in" not in text


def test_the_pin_method_signs_the_head_with_the_same_pin(world) -> None:  # type: ignore[no-untyped-def]
    bob = user(world, Method.PIN)
    for _ in range(3):
        bob.use(Method.PIN)
    entries = [json.loads(x) for x in _lines(bob.log_path(Method.PIN))]
    assert [e["seq"] for e in entries] == [0, 1, 2] and all(e["sig"] for e in entries)
    report = bob.submit(Method.PIN)
    assert report["alerts"] == [] and len(report["not_submitted"]) == 3
    assert OFFLINE_PIN not in bob.log_path(Method.PIN).read_text()


def test_an_entry_binds_the_transaction_and_the_user_data_as_hashes(world) -> None:  # type: ignore[no-untyped-def]
    erin = user(world, Method.DEVICE)
    pay = (("Amount", "120.00 EUR"), ("Payee", "DE89 3704 0044 0532 0130 00"))
    verifier = world.verifier
    data = VerificationData(
        verifier_id=verifier.identity.verifier_id, user=erin.name, challenge=os.urandom(16),
        context="Pay ACME", methods=(Method.DEVICE,), expires=int(time.time()) + 60,
        transaction=pay, user_data=8,
    )
    request = erin.auth.start_offline_authentication(data.to_text(verifier.keys.sign_raw))
    otp = erin.auth.finish_offline_authentication(request, Method.DEVICE, data=" ref-XY ")
    [entry] = OfflineLog(erin.auth.directory).entries(
        bytes.fromhex(erin.auth.enrolled[0].credential_id))
    assert entry.atc == otp.atc
    assert entry.data == data_hash("Pay ACME", pay, "ref-XY")  # as the question binds it
    assert entry.data not in (data_hash("Pay ACME", pay), data_hash("Pay ACME", None, "ref-XY"))
    text = erin.log_path().read_text()
    assert "ref-XY" not in text and "DE89" not in text and "ACME" not in text


# --- tampering -----------------------------------------------------------------------


def _tampered(
    world: World, edit: Any, uses: int = 5, accept: tuple[int, ...] = ()
) -> dict[str, Any]:
    """``uses`` offline uses (those at the indexes ``accept`` submitted), then ``edit``
    applied to the log's lines before it is submitted: the service's report."""
    victim = user(world, Method.DEVICE)
    made = [victim.use() for _ in range(uses)]
    for i in accept:
        world.verifier.verify(made[i][0], made[i][1].otp)
    path = victim.log_path()
    path.write_text("".join(edit(_lines(path))))
    return victim.submit()


def test_an_untouched_log_has_no_alert(world) -> None:  # type: ignore[no-untyped-def]
    assert _tampered(world, lambda lines: lines)["alerts"] == []


def test_a_deleted_entry_is_detected(world) -> None:  # type: ignore[no-untyped-def]
    report = _tampered(world, lambda lines: lines[:2] + lines[3:])
    assert {"missing", "gap"} <= _codes(report)
    assert report["entries"] == 4


def test_a_deleted_entry_of_a_submitted_otp_is_detected(world) -> None:  # type: ignore[no-untyped-def]
    report = _tampered(world, lambda lines: lines[:2] + lines[3:], accept=(1, 2, 3))
    assert {"missing", "not-logged"} <= _codes(report)


def test_a_deleted_last_entry_shows_at_the_next_use(world) -> None:  # type: ignore[no-untyped-def]
    victim = user(world, Method.DEVICE)
    for _ in range(3):
        victim.use()
    path = victim.log_path()
    path.write_text("".join(_lines(path)[:-1]))  # the tail: the chain itself is intact
    victim.use()
    assert "gap" in _codes(victim.submit())


def test_reordered_entries_are_detected(world) -> None:  # type: ignore[no-untyped-def]
    report = _tampered(world, lambda lines: [lines[0], lines[2], lines[1], *lines[3:]])
    alerts = {(a["code"], a["seq"]) for a in report["alerts"]}
    assert ("order", 1) in alerts  # entry 1 after entry 2: its seq and its ATC go back
    assert report["entries"] == 5  # each entry itself is genuine (signed)


def test_an_edited_entry_is_detected(world) -> None:  # type: ignore[no-untyped-def]
    def edit(lines: list[str]) -> list[str]:
        entry = json.loads(lines[2])
        entry["data"] = "00" * 32  # another context
        return [*lines[:2], json.dumps(entry) + "\n", *lines[3:]]

    report = _tampered(world, edit)
    alerts = {(a["code"], a["seq"]) for a in report["alerts"]}
    assert ("bad-signature", 2) in alerts and ("broken-chain", 3) in alerts


def test_a_rechained_log_fails_its_signatures(world) -> None:  # type: ignore[no-untyped-def]
    """The attacker deletes entry 1 and recomputes every hash after it (no key
    needed): the chain is whole again, but the heads no longer verify."""

    def rechain(lines: list[str]) -> list[str]:
        entries = [LogEntry.from_json(json.loads(x)) for x in lines]
        kept = [entries[0]]
        for e in entries[2:]:
            kept.append(LogEntry(**{**e.__dict__, "seq": kept[-1].seq + 1,
                                    "prev": kept[-1].entry_hash()}))
        return [json.dumps(e.to_json()) + "\n" for e in kept]

    report = _tampered(world, rechain)
    assert {a["seq"] for a in report["alerts"] if a["code"] == "bad-signature"} == {1, 2, 3}
    assert "gap" in _codes(report)


def test_an_entry_changed_after_submission_is_detected(world) -> None:  # type: ignore[no-untyped-def]
    victim = user(world, Method.DEVICE)
    victim.use()
    victim.use()
    assert victim.submit()["alerts"] == []
    path = victim.log_path()
    lines = _lines(path)
    entry = json.loads(lines[1])
    entry["time"] += 3600
    path.write_text(lines[0] + json.dumps(entry) + "\n")
    OfflineLog(victim.auth.directory).mark_sent(
        bytes.fromhex(entry["credential"]), -1)  # send everything again
    report = victim.submit()
    assert ("changed", 1) in {(a["code"], a["seq"]) for a in report["alerts"]}
    assert report["received"] == 0  # the entry as first received is kept


def test_alerts_are_audited_and_shown_by_verifier_audit(world, tmp_path) -> None:  # type: ignore[no-untyped-def]
    victim = user(world, Method.DEVICE)
    for _ in range(3):
        victim.use()
    path = victim.log_path()
    lines = _lines(path)
    path.write_text(lines[0] + lines[2])
    victim.submit()
    events = [r for r in world.verifier.store.audit_records(victim.name, 50)
              if r.event.value == "offline-alert"]
    assert events and all(r.detail and "credential" in r.detail for r in events)
    shown = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--json", "verifier", "audit", "--offline",
         "--user", victim.name],
        capture_output=True, text=True, check=False,
        env={**os.environ, "HSM_AUTH_HOME": str(world.root / "home")},
    )
    assert shown.returncode == 0, shown.stderr
    [report] = json.loads(shown.stdout)["offline"]
    assert report["entries"] == 2 and "missing" in {a["code"] for a in report["alerts"]}


def test_a_fido2_log_is_signed_by_the_submission(world) -> None:  # type: ignore[no-untyped-def]
    carol = user(world, Method.BIOMETRIC)
    made = [carol.use(Method.BIOMETRIC) for _ in range(3)]
    world.verifier.verify(made[1][0], made[1][1].otp)
    entries = [json.loads(x) for x in _lines(carol.log_path(Method.BIOMETRIC))]
    assert [e["sig"] for e in entries] == [None] * 3  # no second user verification per use
    report = carol.submit(Method.BIOMETRIC)  # one assertion (UV) over the request and body
    assert report["alerts"] == [] and report["submitted"] == 1
    assert report["not_submitted"] == [made[0][1].atc, made[2][1].atc]


def test_log_show_and_submit_on_the_command_line(world) -> None:  # type: ignore[no-untyped-def]
    home = world.root / "cli-home"
    paths = Paths.from_env(home)
    update_config(paths.writable_config_file, {
        "methods.device": {"backend": "pkcs11", **world.methods[Method.DEVICE].settings},
        "online": {"url": world.service.url},
    })
    dave = User("dave", world.stack.enter_context(make_authenticator(paths.authenticator_dir, {
        Method.DEVICE: world.methods[Method.DEVICE]})), None, world)  # type: ignore[arg-type]
    dave.client = OnlineClient(dave.auth, world.service.url)
    dave.client.enroll(response_for(world.verifier, dave.auth, "dave", Method.DEVICE))
    for _ in range(2):
        dave.use()
    env = {**os.environ, "HSM_AUTH_HOME": str(home)}

    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "hsm_auth", "--json", *args],
                              capture_output=True, text=True, check=False, env=env)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return dict(json.loads(done.stdout))

    [shown] = cli("log", "show")["logs"]
    assert (shown["user"], shown["method"], len(shown["entries"]), shown["sent"]) == (
        "dave", "device", 2, 0)
    report = cli("log", "submit", "--method", "device")["report"]
    assert (report["entries"], len(report["not_submitted"]), report["alerts"]) == (2, 2, [])
    assert cli("log", "show")["logs"][0]["sent"] == 2
    assert cli("log", "submit", "--method", "device")["report"] is None
    refused = subprocess.run([sys.executable, "-m", "hsm_auth", "log", "submit", "--method",
                              "face"], capture_output=True, text=True, check=False, env=env)
    assert refused.returncode != 0 and refused.stderr.startswith("hsm-auth: error: ")
    assert len(refused.stderr.splitlines()) == 1


def test_another_credential_of_the_user_carries_a_self_signed_log(world) -> None:  # type: ignore[no-untyped-def]
    gina = user(world, Method.DEVICE, Method.PIN, Method.BIOMETRIC)
    gina.use(Method.PIN)
    gina.use(Method.BIOMETRIC)
    # The pin log (each head signed by the pin key) in a request signed by the device key:
    # no PIN needed.
    report = gina.client.submit_log(Method.PIN, signer=Method.DEVICE)
    assert report is not None and report["entries"] == 1 and report["alerts"] == []
    pin_cid = next(m.credential_id for m in gina.auth.enrolled if m.method is Method.PIN)
    assert report["credential_id"] == pin_cid
    # A FIDO2 log is signed only by its own submission.
    with pytest.raises(InvalidToken):
        gina.client.submit_log(Method.BIOMETRIC, signer=Method.DEVICE)
    # Nor may a credential carry another user's log.
    other = user(world, Method.DEVICE)
    other.use()
    cid = next(m.credential_id for m in other.auth.enrolled)
    with pytest.raises(InvalidToken):
        gina.client._signed("POST", "/v1/device/offline-log", Method.DEVICE, body={
            "credential": cid,
            "entries": OfflineLog(other.auth.directory).raw_entries(bytes.fromhex(cid))})


def test_the_agent_submits_the_logs_at_its_online_contact(world) -> None:  # type: ignore[no-untyped-def]
    home = world.root / "agent-home"
    paths = Paths.from_env(home)
    update_config(paths.writable_config_file, {
        "methods.device": {"backend": "pkcs11", **world.methods[Method.DEVICE].settings},
        "methods.pin": {"backend": "pkcs11", **world.methods[Method.PIN].settings},
    })
    auth = world.stack.enter_context(make_authenticator(paths.authenticator_dir, {
        m: world.methods[m] for m in (Method.DEVICE, Method.PIN)}))
    hank = User("hank", auth, OnlineClient(auth, world.service.url), world)
    for method in (Method.DEVICE, Method.PIN):
        hank.client.enroll(response_for(world.verifier, auth, "hank", method))
    made = [hank.use(Method.DEVICE), hank.use(Method.PIN), hank.use(Method.PIN)]
    world.verifier.verify(made[1][0], made[1][1].otp)
    store = world.verifier.store
    cids = {m.method: bytes.fromhex(m.credential_id) for m in auth.enrolled}
    with running_agent(home, world.root / "run" / "agent.sock",
                       online_url=world.service.url) as agent:
        deadline = time.monotonic() + 60
        while (len(store.offline_entries(cids[Method.DEVICE])),
               len(store.offline_entries(cids[Method.PIN]))) != (1, 2):
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        assert "Traceback" not in agent.log() and OFFLINE_PIN not in agent.log()
    audit = OfflineAudit(store, world.verifier.identity.verifier_id)
    [pin_cred] = [c for c in store.credentials("hank") if c.method is Method.PIN]
    shown = audit.report(pin_cred)
    assert (shown.submitted, shown.not_submitted, shown.alerts) == (
        (made[1][1].atc,), (made[2][1].atc,), ())
