"""The agent end to end: a real ``hsm-auth serve`` (uvicorn subprocess, SQLite), a
real ``hsm-auth agent`` process, SoftHSM tokens and the soft FIDO2 authenticator.

The provider (API key) starts challenges over HTTP; the agent's long-poll receives
them; ``hsm-auth approve`` / ``reject`` / ``claim`` (the CLI, in subprocesses) answer
through the agent and the token; the provider reads the outcome. The PIN cache is
checked against the verifier's approval timeout, ``agent --lock`` and a wrong PIN
(counted by the SoftHSM token, read through python-pkcs11 directly).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from hsm_auth import api_keys
from hsm_auth import config as configmod
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Paths
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient
from hsm_auth.testing.agent import RunningAgent, running_agent
from hsm_auth.testing.fido2 import authenticator_factory, write_soft_policy
from hsm_auth.testing.service import RunningService, running_service
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.verifier import Verifier

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.softhsm, pytest.mark.fido2]

PIN = "482916"
CONTEXT = {"ip": "198.51.100.23", "user_agent": "Mozilla/5.0 (X11; Linux x86_64) kiosk-7",
           "location": "Lisbon, PT", "custom": {"action": "login", "terminal": "kiosk-7"}}
_CKF_USER_PIN_COUNT_LOW = 0x10000


@dataclass
class World:
    service: RunningService
    api: Any  # httpx.Client of the provider's backend
    agent: RunningAgent
    pin_token: Any

    def start(self, **body: Any) -> dict[str, Any]:
        r = self.api.post("/v1/challenges", json=body)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def state(self, challenge_id: str, **params: Any) -> dict[str, Any]:
        r = self.api.get(f"/v1/challenges/{challenge_id}", params=params)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def cli(self, *argv: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
        return self.agent.cli(*argv, pass_fds=pass_fds)

    def held(self) -> dict[str, dict[str, Any]]:
        return self.agent.challenges()

    def received(self, challenge_id: str) -> dict[str, Any]:
        return self.agent.wait_for(challenge_id)


def _toml(value: Any) -> str:
    return json.dumps(value)  # TOML basic strings, numbers and booleans read as JSON


@pytest.fixture(scope="module")
def world(softhsm_env: Any, tmp_path_factory: Any) -> Iterator[World]:
    root = tmp_path_factory.mktemp("agent-e2e")
    device = authenticator_factory(root)()
    verifier_dir = root / "verifier"
    write_soft_policy(verifier_dir, [device])
    with (verifier_dir / "policy.toml").open("a") as f:
        f.write("\n[approval.pin]\nuser_authentication = true\ntimeout = 300\n")
    pin_token = init_token(unique_label("agent-pin"), so_pin="12345678", user_pin=PIN)
    home = root / "home"
    home.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        verifier = Verifier.init(verifier_dir, "Example Bank")
        stack.callback(verifier.close)
        key = api_keys.create(verifier.store, "tests", ["challenge"], now=int(time.time()))
        service = stack.enter_context(running_service(verifier_dir))
        (home / "config.toml").write_text(
            "[online]\n"
            f"url = {_toml(service.url)}\n"
            "[methods.pin]\nbackend = \"pkcs11\"\n"
            f"uri = {_toml(pin_token.uri)}\nallow_unenforced_pin = true\n"
            "[methods.biometric]\nbackend = \"fido2\"\n"
            f"device = {_toml('soft:' + str(device.path))}\n"
            f"state_dir = {_toml(str(root / 'fido2-state'))}\n"
            "prompts = false\nallow_software_authenticator = true\n"
        )
        (home / "config.toml").chmod(0o600)
        paths = Paths(home)
        authenticator = stack.enter_context(
            Authenticator(paths.authenticator_dir, configmod.load(paths))
        )
        client = OnlineClient(authenticator, service.url)
        for method in (Method.BIOMETRIC, Method.PIN):
            offer = verifier.create_offer("alice", methods=[method])
            client.enroll(authenticator.add_or_update(
                method, offer.text, activation_code=offer.activation_code,
                pin=PIN if method is Method.PIN else None,
            ))
        authenticator.close()
        agent = stack.enter_context(
            running_agent(home, root / "run" / "agent.sock", log_path=root / "agent.log")
        )
        api = stack.enter_context(httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {key.key}"}, timeout=40))
        yield World(service, api, agent, pin_token)
        log = agent.log()
        assert "Traceback" not in log and PIN not in log
        assert "Traceback" not in service.log() and PIN not in service.log()


def test_the_agent_polls_the_online_verifier(world: World) -> None:
    r = world.cli("--json", "agent", "--status")
    status = json.loads(r.stdout)
    assert [(s["verifier"], s["user"], s["method"]) for s in status["sources"]] == [
        ("Example Bank", "alice", "biometric")]
    assert status["sources"][0]["url"] == world.service.url


def test_push_received_by_the_long_poll_and_approved_with_uv(world: World) -> None:
    started = world.start(user="alice", kind="push", message="Log in to Example Bank",
                          context=CONTEXT)
    held = world.received(started["challenge_id"])
    assert held["message"] == "Log in to Example Bank"
    assert held["context"]["ip"] == CONTEXT["ip"]
    assert held["context"]["custom"] == CONTEXT["custom"]
    shown = [line for line in world.agent.log().splitlines() if started["challenge_id"] in line]
    assert len(shown) == 1  # shown once, on the agent's terminal (no desktop here)
    assert "Example Bank: push challenge for alice: Log in to Example Bank" in shown[0]
    assert CONTEXT["ip"] in shown[0] and CONTEXT["location"] in shown[0]
    r = world.cli("approve", started["challenge_id"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"approved: {started['challenge_id']}"
    state = world.state(started["challenge_id"])
    assert state["state"] == "approved" and state["method"] == "biometric"
    assert started["challenge_id"] not in world.held()


def test_push_rejected_shows_rejected(world: World) -> None:
    started = world.start(user="alice", kind="push", message="Pay 950 EUR to ACME",
                          context=CONTEXT)
    world.received(started["challenge_id"])
    r = world.cli("reject", started["challenge_id"])
    assert r.returncode == 0 and r.stdout.strip() == f"rejected: {started['challenge_id']}"
    assert world.state(started["challenge_id"])["state"] == "rejected"
    again = world.cli("approve", started["challenge_id"])  # gone from the agent
    assert again.returncode != 0 and "no pending challenge" in again.stderr


def test_claim_shows_the_context_the_page_carried(world: World) -> None:
    started = world.start(kind="qr", message="Log in at the kiosk", context=CONTEXT)
    claim = started["claim"]
    r = world.cli("claim", claim, "--approve")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in (CONTEXT["ip"], CONTEXT["user_agent"], CONTEXT["location"], "terminal: kiosk-7",
                 "action: login", "Log in at the kiosk", "Example Bank"):
        assert text in out, (text, out)
    assert out.strip().splitlines()[-1] == f"approved: {started['challenge_id']}"
    state = world.state(started["challenge_id"])
    assert state["state"] == "approved" and state["method"] == "biometric"


def _token_flags(world: World) -> int:
    import pkcs11

    lib = pkcs11.lib(world.pin_token.module_path)
    return int(lib.get_token(token_label=world.pin_token.label).flags)


def _pin_fd(pin: str) -> int:
    read, write = os.pipe()
    os.write(write, pin.encode() + b"\n")
    os.close(write)
    return read


def test_pin_cache_wrong_pin_then_cached_then_locked(world: World) -> None:
    world.cli("agent", "--lock")
    first = world.start(user="alice", kind="push", message="Log in (pin)", context=CONTEXT)
    world.received(first["challenge_id"])
    no_pin = world.cli("approve", first["challenge_id"], "--method", "pin")
    assert no_pin.returncode == 31 and "PIN" in no_pin.stderr  # no terminal to ask on
    wrong = _pin_fd("000000")
    try:
        r = world.cli("approve", first["challenge_id"], "--method", "pin", "--pin-fd",
                      str(wrong), pass_fds=(wrong,))
    finally:
        os.close(wrong)
    assert r.returncode == 32, r.stderr  # wrong PIN, from the token
    assert _token_flags(world) & _CKF_USER_PIN_COUNT_LOW  # the token counted it
    status = json.loads(world.cli("--json", "agent", "--status").stdout)
    assert status["cache"] == []  # not cached
    right = _pin_fd(PIN)
    try:
        r = world.cli("approve", first["challenge_id"], "--method", "pin", "--pin-fd",
                      str(right), pass_fds=(right,))
    finally:
        os.close(right)
    assert r.returncode == 0, r.stderr
    assert not _token_flags(world) & _CKF_USER_PIN_COUNT_LOW
    assert world.state(first["challenge_id"])["state"] == "approved"
    status = json.loads(world.cli("--json", "agent", "--status").stdout)
    assert len(status["cache"]) == 1 and 0 < status["cache"][0]["seconds_left"] <= 300
    second = world.start(user="alice", kind="push", message="Log in again", context=CONTEXT)
    world.received(second["challenge_id"])
    r = world.cli("approve", second["challenge_id"], "--method", "pin")  # the cached PIN
    assert r.returncode == 0, r.stderr
    assert world.state(second["challenge_id"])["method"] == "pin"
    assert world.cli("agent", "--lock").returncode == 0
    third = world.start(user="alice", kind="push", message="And again", context=CONTEXT)
    world.received(third["challenge_id"])
    r = world.cli("approve", third["challenge_id"], "--method", "pin")
    assert r.returncode == 31  # wiped: the PIN is asked again
    world.cli("reject", third["challenge_id"])

