"""Counter resync at online login (issue 14, docs/PROTOCOL.md §18), over a real
``hsm-auth serve`` with real SoftHSM tokens behind the authenticator's OnlineClient.

The verifier's window is 25 here, so 25 OTPs made offline and never submitted use up
the authenticator's offline allowance exactly (a 26th is "login required") and put
the token beyond the verifier's look-ahead. Then an online sync (a signed request
opens the sync session, the token's ATC report answers it, the verifier's signed
acknowledgement resets the offline count) and the next offline OTP is accepted,
with no "login required" on the way. Then the attacks: a report with a lower ATC
changes nothing; forged, altered, replayed and re-targeted reports and forged
acknowledgements are refused; a kill -9 between the report and the acknowledgement
loses nothing (the offline count stays until the acknowledgement arrives)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from _cli import cli_env, cli_ok, code_file, error_line, run_cli
from _online import make_authenticator, response_for, softhsm_methods
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import api_keys, ec, textcode
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import MethodConfig, Paths
from hsm_auth.demo import prepare
from hsm_auth.errors import (
    InvalidInput,
    InvalidToken,
    LoginRequired,
    UnknownMethod,
    UntrustedMessage,
)
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient
from hsm_auth.sync_messages import AtcAck, SyncMessage
from hsm_auth.testing.service import RunningService, running_service
from hsm_auth.testing.softhsm import softhsm_available
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

WINDOW = 25
KILLEE = Path(__file__).resolve().parent / "_sync_killee.py"


@dataclass
class World:
    root: Path
    service: RunningService
    api: httpx.Client  # the provider's backend (verify + admin scopes)
    alice: Authenticator
    client: OnlineClient
    methods: dict[Method, MethodConfig]
    verifier_id: bytes

    @property
    def enrolled(self) -> Any:
        return self.alice.online_method(self.verifier_id, Method.DEVICE)

    def credential(self) -> dict[str, Any]:
        r = self.api.get(f"/v1/credentials/{self.enrolled.credential_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def offline_otp(self, context: str = "Log in to Example Bank") -> tuple[str, str, int]:
        """A session started by the provider (HTTP) and its OTP made offline."""
        r = self.api.post("/v1/sessions", json={"user": "alice", "context": context})
        assert r.status_code == 201, r.text
        request = self.alice.start_offline_authentication(r.json()["data"])
        made = self.alice.finish_offline_authentication(request, Method.DEVICE)
        return r.json()["session_id"], made.otp, made.atc

    def submit(self, session_id: str, otp: str) -> httpx.Response:
        return self.api.post("/v1/verify", json={"session_id": session_id, "otp": otp})

    def unsubmitted(self, count: int) -> None:
        """``count`` OTPs made offline and never submitted (consecutive ATCs)."""
        atcs = [self.offline_otp()[2] for _ in range(count)]
        assert atcs == list(range(atcs[0], atcs[0] + count))


@pytest.fixture
def world(softhsm_env, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    verifier_dir = tmp_path / "verifier"
    with contextlib.ExitStack() as stack:
        verifier = Verifier.init(verifier_dir, "Example Bank")
        stack.callback(verifier.close)
        identity = json.loads((verifier_dir / "identity.json").read_text())
        (verifier_dir / "identity.json").write_text(json.dumps({**identity, "window": WINDOW}))
        verifier = Verifier.open(verifier_dir)  # the window the offers state
        stack.callback(verifier.close)
        key = api_keys.create(verifier.store, "tests", ["verify", "admin"], now=int(time.time()))
        methods = softhsm_methods(tmp_path / "tokens")
        alice = stack.enter_context(make_authenticator(tmp_path / "alice", methods))
        # Sessions at the rate a test makes them (the per-user limit is not the subject).
        service = stack.enter_context(running_service(verifier_dir,
                                                      args=["--rate-user", "1000/1000"]))
        api = stack.enter_context(httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {key.key}"}, timeout=40))
        client = OnlineClient(alice, service.url)
        client.enroll(response_for(verifier, alice, "alice", Method.DEVICE))
        yield World(tmp_path, service, api, alice, client, methods,
                    verifier.identity.verifier_id)
        assert "Traceback" not in service.log()


def test_25_unsubmitted_otps_then_an_online_sync_then_the_next_otp_is_accepted(world) -> None:  # type: ignore[no-untyped-def]
    assert world.enrolled.window == WINDOW
    world.unsubmitted(WINDOW)  # all released: no "login required" on the way
    assert world.credential()["atc"] == 0  # the verifier saw none of them

    synced = world.client.sync(Method.DEVICE)  # the online login's ATC report

    assert (synced.atc, synced.unsubmitted) == (WINDOW + 1, WINDOW)  # the report used one
    assert world.enrolled.synced_atc == WINDOW + 1  # reset by the signed acknowledgement
    assert world.credential()["atc"] == WINDOW + 1
    assert world.credential()["failures"] == 0
    session_id, otp, atc = world.offline_otp()
    assert atc == WINDOW + 2
    r = world.submit(session_id, otp)
    assert r.status_code == 200, r.text
    assert r.json()["atc"] == WINDOW + 2
    world.unsubmitted(WINDOW - 1)  # a whole window of offline use again
    with pytest.raises(LoginRequired):
        world.offline_otp()


def test_without_the_acknowledgement_the_next_otp_is_login_required(world) -> None:  # type: ignore[no-untyped-def]
    """The control: with this window the 26th offline OTP is refused, and a report
    that never reaches the verifier (so is never acknowledged) changes nothing."""
    world.unsubmitted(WINDOW)
    with pytest.raises(LoginRequired, match=f"{WINDOW} offline uses"):
        world.offline_otp()
    message = world.client.sync_message(Method.DEVICE)
    world.alice.sync(message)  # the token advances to 26; the report is never submitted
    assert world.enrolled.synced_atc == 0  # no acknowledgement: the count stays
    with pytest.raises(LoginRequired):
        world.offline_otp()
    cred = world.credential()
    assert (cred["atc"], cred["failures"]) == (0, 0)


def test_a_report_with_a_lower_atc_changes_nothing(world) -> None:  # type: ignore[no-untyped-def]
    world.unsubmitted(3)
    first = world.alice.sync(world.client.sync_message(Method.DEVICE))  # ATC 4
    second = world.alice.sync(world.client.sync_message(Method.DEVICE))  # ATC 5
    assert (first.atc, second.atc) == (4, 5)
    ack = world.client.submit_sync_report(second.report)
    assert world.credential()["atc"] == 5
    with pytest.raises(InvalidToken):  # its own session is open, but its ATC is behind
        world.client.submit_sync_report(first.report)
    lowered = _altered(second.report, atc=2)
    with pytest.raises(InvalidToken):
        world.client.submit_sync_report(lowered)
    cred = world.credential()
    assert (cred["atc"], cred["failures"]) == (5, 0)  # nothing moved, nothing counted
    # The authenticator moves forward only, too: an older acknowledgement changes nothing.
    world.alice.apply_sync_ack(ack)
    assert world.enrolled.synced_atc == 5
    third = world.alice.sync(world.client.sync_message(Method.DEVICE))
    newer = world.client.submit_sync_report(third.report)
    world.alice.apply_sync_ack(newer)
    assert world.enrolled.synced_atc == 6
    assert world.alice.apply_sync_ack(ack).synced_atc == 6  # replayed: no step back


def test_a_forged_report_is_refused_and_counts(world) -> None:  # type: ignore[no-untyped-def]
    world.unsubmitted(WINDOW)
    made = world.alice.sync(world.client.sync_message(Method.DEVICE))
    for forged in (
        _forged_mac(made.report),
        _altered(made.report, atc=made.atc + 100),  # push the ATC further than the token
        _altered(made.report, user="bob"),
        _altered(made.report, credential_id=os.urandom(16)),
        _altered(made.report, session_id=os.urandom(16)),
    ):
        with pytest.raises(InvalidToken):
            world.client.submit_sync_report(forged)
    with pytest.raises(InvalidInput):
        world.client.submit_sync_report(_altered(made.report, verifier_id=os.urandom(8)))
    with pytest.raises(InvalidInput):
        world.client.submit_sync_report("HA1:" + "A" * 40)
    cred = world.credential()
    assert cred["atc"] == 0  # nothing moved
    assert cred["failures"] == 2  # the wrong MACs (bad MAC, pushed ATC) count, as OTPs do
    assert world.enrolled.synced_atc == 0
    ack = world.client.submit_sync_report(made.report)  # the genuine one still works
    with pytest.raises(InvalidToken):
        world.client.submit_sync_report(made.report)  # once: the sync session is burned
    assert world.alice.apply_sync_ack(ack).synced_atc == WINDOW + 1


def test_a_forged_acknowledgement_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    world.unsubmitted(4)
    made = world.alice.sync(world.client.sync_message(Method.DEVICE))
    ack_text = world.client.submit_sync_report(made.report)
    ack, _ = AtcAck.from_text(ack_text)
    stranger = cec.generate_private_key(ec.CURVE)
    self_signed = AtcAck(ack.verifier_id, ack.user, ack.method, ack.credential_id,
                         ack.session_id, 10**6).to_text(
        lambda body: ec.der_to_raw(stranger.sign(body, cec.ECDSA(hashes.SHA256()))))
    with pytest.raises(UntrustedMessage):  # not the pinned verifier's signature
        world.alice.apply_sync_ack(self_signed)
    outer = cbor2.loads(textcode.decode(ack_text))
    body = cbor2.loads(outer[0])
    body[2 + 5] = 10**6  # the ATC, after signing
    with pytest.raises(UntrustedMessage):
        world.alice.apply_sync_ack(textcode.encode(cbor2.dumps([cbor2.dumps(body), outer[1]])))
    other_credential = dict(ack.__dict__)
    other_credential["credential_id"] = os.urandom(16)
    with pytest.raises(UnknownMethod):  # signed by the verifier, but for another credential
        world.alice.apply_sync_ack(_resigned(world, AtcAck(**other_credential)))
    with pytest.raises(InvalidInput):  # a sync message is not an acknowledgement
        world.alice.apply_sync_ack(world.client.sync_message(Method.DEVICE))
    assert world.enrolled.synced_atc == 0
    assert world.alice.apply_sync_ack(ack_text).synced_atc == 5


@pytest.mark.parametrize("stage", ["reported", "applied"])
def test_kill_9_between_report_and_acknowledgement_loses_nothing(world, stage) -> None:  # type: ignore[no-untyped-def]
    world.unsubmitted(WINDOW)
    before = (world.alice._state_file).read_bytes()
    config = world.root / "methods.json"
    config.write_text(json.dumps({m.value: [c.backend, dict(c.settings)]
                                  for m, c in world.methods.items()}))
    killee = subprocess.Popen(
        [sys.executable, str(KILLEE), str(world.alice.directory), str(config),
         world.service.url, stage],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert killee.stdout is not None
        line = killee.stdout.readline().decode().strip()
        assert line.startswith(stage + " "), (line, killee.stderr.read() if killee.stderr else "")
        report = line.split(" ", 1)[1]
        os.kill(killee.pid, signal.SIGKILL)  # between the report and the acknowledgement
        assert killee.wait(10) == -signal.SIGKILL
    finally:
        if killee.poll() is None:
            killee.kill()
            killee.wait()
    # Nothing was written on the authenticator's side: the offline count stays.
    assert (world.alice._state_file).read_bytes() == before
    world.alice.close()
    with make_authenticator(world.root / "alice", world.methods) as reopened:
        world.alice = reopened  # what is on disk now
        world.client = OnlineClient(reopened, world.service.url)
        assert world.enrolled.synced_atc == 0
        with pytest.raises(LoginRequired):
            world.offline_otp()
        assert world.credential()["atc"] == (WINDOW + 1 if stage == "applied" else 0)
        if stage == "reported":  # the report the killed process made is still good
            ack = world.client.submit_sync_report(report)
            assert world.alice.apply_sync_ack(ack).synced_atc == WINDOW + 1
        synced = world.client.sync(Method.DEVICE)  # the next online login settles it
        assert world.enrolled.synced_atc == synced.atc == world.credential()["atc"]
        session_id, otp, _ = world.offline_otp()
        assert world.submit(session_id, otp).status_code == 200


# --- helpers ---------------------------------------------------------------------------

_REPORT_FIELDS = ["verifier_id", "session_id", "user", "method", "atc", "credential_id"]


def _altered(report: str, **fields: Any) -> str:
    outer = cbor2.loads(textcode.decode(report))
    body = cbor2.loads(outer[0])
    for name, value in fields.items():
        body[2 + _REPORT_FIELDS.index(name)] = value
    return textcode.encode(cbor2.dumps([cbor2.dumps(body), outer[1]]))


def _forged_mac(report: str) -> str:
    outer = cbor2.loads(textcode.decode(report))
    mac = bytes([outer[1][0] ^ 1]) + outer[1][1:]
    return textcode.encode(cbor2.dumps([outer[0], mac]))


def _resigned(world: World, ack: AtcAck) -> str:
    with Verifier.open(world.service.verifier_dir) as verifier:
        return ack.to_text(verifier.keys.sign_raw)


def test_a_sync_message_names_the_signers_credential(world) -> None:  # type: ignore[no-untyped-def]
    message, _ = SyncMessage.from_text(world.client.sync_message(Method.DEVICE))
    assert message.credential_id.hex() == world.enrolled.credential_id
    assert (message.user, message.method, message.atc) == ("alice", Method.DEVICE, 0)


# --- the command line: hsm-auth sync --online ------------------------------------------


def test_cli_sync_online(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    with prepare(home, tpm=False, fido2=False):
        pass
    cli_ok(home, "verifier", "init", "--name", "CLI")
    offer = cli_ok(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", "device"
    )
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)
    no_url = run_cli(home, "sync", "--online")
    assert "no [online] url" in error_line(no_url, no_url.returncode)
    assert no_url.returncode != 0
    for _ in range(3):  # never submitted
        data = json.loads(cli_ok(home, "--json", "verifier", "session", "--user", "alice",
                                 "--context", "ws"))["data"]
        cli_ok(home, "finish", "--method", "device", data)
    with running_service(Paths.from_env(home).verifier_dir) as service:
        env = {**cli_env(), "HSM_AUTH_ONLINE_URL": service.url}
        out = cli_ok(home, "sync", "--online", env=env)
        assert out == ("synced device: the token reported ATC 4 (3 OTPs were never "
                       "submitted); offline use counts from ATC 4\n"
                       # the offline log goes at this online contact (PROTOCOL.md §19.3)
                       "offline log of device: the verifier holds 3 offline uses (3 new): "
                       "0 submitted, 3 generated, not submitted")
        machine = json.loads(cli_ok(home, "--json", "sync", "--online", "--method", "device",
                                    env=env))
        assert machine == {"synced": [{"method": "device", "atc": 5, "unsubmitted": 0,
                                       "synced_atc": 5, "offline_logs": {}}]}
        assert "Traceback" not in service.log()
    methods = json.loads(cli_ok(home, "--json", "methods"))
    assert [m["synced_atc"] for m in methods["methods"]] == [5]
