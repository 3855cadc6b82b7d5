"""The PIN cached on request (issue 14): ``[offline.pin] pin_cache = 60`` in the
verifier's policy, stated in the enrollment result, lets the agent hold the pin
method's token unlocked for 60 s after the PIN was typed.

Real parts: SoftHSM tokens (the held state is a logged-in PKCS#11 session) and
swtpm (the held state is the TPM keys' auth value), a real verifier checking every
OTP. The agent's logic runs in process on a fake clock (the 60 s); a real
``hsm-auth agent`` process with ``hsm-auth finish`` and a private D-Bus shows the
CLI path and the screen-lock wipe. A wrong PIN typed into the agent is read back
from the token itself: ``CKF_USER_PIN_COUNT_LOW`` through python-pkcs11, the TPM's
dictionary-attack counter through tpm2-pytss.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hsm_auth.agent import Agent
from hsm_auth.attestation import VerifierPolicy
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    ConfigError,
    InvalidToken,
    PinInvalid,
    PinRequired,
    UntrustedMessage,
)
from hsm_auth.methods import Method
from hsm_auth.pin_cache import SleepDetector
from hsm_auth.testing.agent import running_agent
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.unlocked import Unlocked
from hsm_auth.verifier import Verifier

PIN = "482916"
WRONG = "000000"
_CKF_USER_PIN_COUNT_LOW = 0x10000


class FakeClock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def notify(self, summary: str, body: str) -> None:
        pass

    def line(self, text: str) -> None:
        self.lines.append(text)


def write_policy(directory: Path, text: str) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / "policy.toml").write_text(text)
    (directory / "policy.toml").chmod(0o600)


def enroll(verifier: Verifier, a: Authenticator, user: str = "alice") -> None:
    offer = verifier.create_offer(user, methods=[Method.PIN])
    response = a.add_or_update(Method.PIN, offer.text, activation_code=offer.activation_code,
                               pin=PIN)
    a.store_result(verifier.enrollment_result(verifier.accept_enrollment(response)))


@dataclass
class World:
    verifier: Verifier
    agent: Agent
    clock: FakeClock
    home: Path
    config: Config
    token: Any  # SoftHsmToken (or None for the TPM world)

    def otp(self, pin: str | None, context: str = "Log in to ws-7") -> dict[str, Any]:
        """One ``finish`` through the agent, checked by the verifier."""
        session = self.verifier.start_session("alice", context, methods=[Method.PIN])
        reply = self.agent.otp(session.text, "pin", pin)
        assert reply["otp"] is not None
        assert self.verifier.verify(session.session_id, reply["otp"]).atc == reply["atc"]
        return reply


def _token_flags(token: Any) -> int:
    import pkcs11

    lib = pkcs11.lib(token.module_path)
    return int(lib.get_token(token_label=token.label).flags)


def _pkcs11_config(token: Any) -> Config:
    return Config(methods={Method.PIN: MethodConfig(
        "pkcs11", {"uri": token.uri, "allow_unenforced_pin": True})})


@pytest.fixture
def pkcs11_world(softhsm_env: Any, tmp_path: Path) -> Iterator[World]:
    token = init_token(unique_label("cache"), so_pin="12345678", user_pin=PIN)
    write_policy(tmp_path / "verifier", "[offline.pin]\npin_cache = 60\n")
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    config = _pkcs11_config(token)
    home = tmp_path / "auth"
    with Authenticator(home, config) as a:
        enroll(verifier, a)
        assert a.enrolled[0].pin_cache == 60  # stated by the verifier, stored here
    clock = FakeClock()
    offline = Authenticator(home, config)
    agent = Agent([], notify=Quiet(), offline=offline, unlocked=Unlocked(clock))
    try:
        yield World(verifier, agent, clock, home, config, token)
    finally:
        agent.wipe("test over")
        offline.close()
        verifier.close()


# --- the policy --------------------------------------------------------------------------


def test_policy_pin_cache_is_parsed_bounded_and_for_the_pin_method_only() -> None:
    p = VerifierPolicy.parse({"offline": {"validity_days": 90, "pin": {"pin_cache": 60}}})
    assert p.pin_cache_for(Method.PIN) == 60 and p.pin_cache_for(Method.DEVICE) == 0
    assert VerifierPolicy.parse({}).pin_cache_for(Method.PIN) == 0  # default: every use
    for bad, words in (
        ({"pin": {"pin_cache": 3601}}, "whole seconds"),
        ({"pin": {"pin_cache": -1}}, "whole seconds"),
        ({"pin": {"pin_cache": 1.5}}, "whole seconds"),
        ({"pin": {"pin_cache": True}}, "whole seconds"),
        ({"pin": {"pin_cach": 60}}, "unknown key"),
        ({"biometric": {"pin_cache": 60}}, "never cached"),
        ({"device": {"pin_cache": 60}}, "asks for nothing"),
        ({"fingers": {"pin_cache": 60}}, "unknown table"),
        ({"pin_cache": 60}, r"per method: \[offline.pin\]"),
    ):
        with pytest.raises(ConfigError, match=words):
            VerifierPolicy.parse({"offline": bad})


def test_without_a_pin_cache_the_agent_leaves_the_otp_to_the_caller(
    softhsm_env: Any, tmp_path: Path
) -> None:
    """pin_cache = 0 (the default): the agent computes nothing and touches no token;
    the caller asks for the PIN as without an agent."""
    token = init_token(unique_label("nocache"), so_pin="12345678", user_pin=PIN)
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    config = _pkcs11_config(token)
    with Authenticator(tmp_path / "auth", config) as a:
        enroll(verifier, a)
        assert a.enrolled[0].pin_cache == 0
    with Authenticator(tmp_path / "auth", config) as offline:
        agent = Agent([], notify=Quiet(), offline=offline, unlocked=Unlocked(FakeClock()))
        session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
        assert agent.otp(session.text, "pin", PIN) == {"otp": None, "every_use": True}
        assert agent.otp(session.text, "pin", WRONG) == {"otp": None, "every_use": True}
        assert not _token_flags(token) & _CKF_USER_PIN_COUNT_LOW  # the wrong PIN went nowhere
        assert agent.unlocked.status() == []
    verifier.close()


# --- PKCS#11: a logged-in session held for 60 s ------------------------------------------


@pytest.mark.softhsm
def test_second_finish_within_60_s_asks_no_pin_and_after_60_s_asks_again(
    pkcs11_world: World,
) -> None:
    w = pkcs11_world
    session = w.verifier.start_session("alice", "ctx", methods=[Method.PIN])
    with pytest.raises(PinRequired):  # nothing held yet
        w.agent.otp(session.text, "pin", None)
    first = w.otp(PIN)
    assert first["held"] is False
    assert [round(e.seconds_left) for e in w.agent.unlocked.status()] == [60]
    w.clock.now += 30
    second = w.otp(None)  # no PIN: the held session answered
    assert second["held"] is True and second["atc"] == first["atc"] + 1
    w.clock.now += 29.5  # 59.5 s after the PIN was typed; use does not extend it
    assert w.otp(None)["held"] is True
    w.clock.now += 0.5  # 60 s
    session = w.verifier.start_session("alice", "ctx", methods=[Method.PIN])
    with pytest.raises(PinRequired):
        w.agent.otp(session.text, "pin", None)
    assert w.agent.unlocked.status() == []
    assert w.otp(PIN)["held"] is False  # typed again: held again, for 60 s from now
    assert w.otp(None)["held"] is True


@pytest.mark.softhsm
def test_screen_lock_agent_lock_and_suspend_drop_the_held_session(pkcs11_world: World) -> None:
    w = pkcs11_world
    w.otp(PIN)
    assert w.otp(None)["held"] is True
    assert w.agent.wipe("screen locked") == 1  # what the session watch calls on Lock
    session = w.verifier.start_session("alice", "ctx", methods=[Method.PIN])
    with pytest.raises(PinRequired):
        w.agent.otp(session.text, "pin", None)
    w.otp(PIN)
    assert w.agent.lock() == {"wiped": 1}  # hsm-auth agent --lock
    with pytest.raises(PinRequired):
        w.agent.otp(session.text, "pin", None)
    w.otp(PIN)
    boot, mono = FakeClock(100.0), FakeClock(100.0)
    detector = SleepDetector(boottime=boot, monotonic=mono)
    w.agent.housekeeping(detector)
    assert w.otp(None)["held"] is True  # awake: kept
    boot.now += 600  # BOOTTIME counted a suspend that MONOTONIC did not
    w.agent.housekeeping(detector)  # the agent's once-a-second pass
    with pytest.raises(PinRequired):
        w.agent.otp(session.text, "pin", None)


@pytest.mark.softhsm
def test_a_wrong_pin_typed_into_the_agent_counts_on_the_token(pkcs11_world: World) -> None:
    """While a session is held, a PIN typed anyway still goes to C_Login: the held
    session is closed first, so the token (not a hash on the host) judges it, and
    SoftHSM flags the failed login (CKF_USER_PIN_COUNT_LOW), read here through
    python-pkcs11 directly."""
    w = pkcs11_world
    w.otp(PIN)
    assert not _token_flags(w.token) & _CKF_USER_PIN_COUNT_LOW
    session = w.verifier.start_session("alice", "ctx", methods=[Method.PIN])
    with pytest.raises(PinInvalid):
        w.agent.otp(session.text, "pin", WRONG)
    assert _token_flags(w.token) & _CKF_USER_PIN_COUNT_LOW  # the token counted it
    assert w.agent.unlocked.status() == []  # and nothing stays unlocked
    with pytest.raises(PinRequired):
        w.agent.otp(session.text, "pin", None)
    w.otp(PIN)
    assert not _token_flags(w.token) & _CKF_USER_PIN_COUNT_LOW  # the right PIN cleared it


@pytest.mark.softhsm
def test_the_held_session_serves_only_its_request(pkcs11_world: World) -> None:
    """An OTP made from a held session verifies only for the session it was made for
    (the hold changes nothing of what the token computes), and a forged request is
    refused before the held token is used."""
    w = pkcs11_world
    w.otp(PIN)
    one = w.verifier.start_session("alice", "Pay 10 EUR", methods=[Method.PIN])
    two = w.verifier.start_session("alice", "Pay 9000 EUR", methods=[Method.PIN])
    reply = w.agent.otp(one.text, "pin", None)
    with pytest.raises(InvalidToken):
        w.verifier.verify(two.session_id, reply["otp"])
    assert w.verifier.verify(one.session_id, reply["otp"]).atc == reply["atc"]
    import cbor2

    from hsm_auth import textcode

    three = w.verifier.start_session("alice", "Pay 10 EUR", methods=[Method.PIN])
    body, signature = cbor2.loads(textcode.decode(three.text))
    forged = textcode.encode(cbor2.dumps([body.replace(b"Pay 10", b"Pay 90"), signature]))
    atc = reply["atc"]
    with pytest.raises(UntrustedMessage):
        w.agent.otp(forged, "pin", None)
    assert w.otp(None)["atc"] == atc + 1  # the forgery moved no counter


# --- TPM 2.0: the auth value held in the agent ------------------------------------------


def _da_state(tcti: str) -> tuple[int, int]:
    """The TPM's dictionary-attack (failures counted, failures allowed), read directly."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    with ESAPI(tcti) as ectx:
        _, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 2)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
    return props[TPM2_PT.LOCKOUT_COUNTER], props[TPM2_PT.MAX_AUTH_FAIL]


@pytest.mark.swtpm
def test_tpm_auth_value_held_for_60_s_and_a_wrong_pin_counts_on_the_tpm(
    swtpm: Any, tmp_path: Path
) -> None:
    write_policy(tmp_path / "verifier", "[offline.pin]\npin_cache = 60\n")
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    config = Config(methods={Method.PIN: MethodConfig("tpm2", {
        "tcti": swtpm.tcti, "state_dir": str(tmp_path / "tpm-state")})})
    with Authenticator(tmp_path / "auth", config) as a:
        enroll(verifier, a)
    clock = FakeClock()
    offline = Authenticator(tmp_path / "auth", config)
    agent = Agent([], notify=Quiet(), offline=offline, unlocked=Unlocked(clock))
    w = World(verifier, agent, clock, tmp_path / "auth", config, None)
    try:
        assert w.otp(PIN)["held"] is False
        assert agent.unlocked.locked_in_memory()  # the auth value is mlocked
        clock.now += 59
        assert w.otp(None)["held"] is True
        clock.now += 1
        session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
        with pytest.raises(PinRequired):
            agent.otp(session.text, "pin", None)
        w.otp(PIN)
        offline.close()  # the TPM serves one client at a time: free it for the read
        before, most = _da_state(swtpm.tcti)
        with pytest.raises(PinInvalid) as wrong:
            agent.otp(session.text, "pin", WRONG)
        offline.close()
        counted, _ = _da_state(swtpm.tcti)
        assert counted == before + 1  # the TPM counted it
        assert wrong.value.retry.retries_left == most - counted  # and said what is left
        with pytest.raises(PinRequired):  # the typed PIN replaced what was held
            agent.otp(session.text, "pin", None)
    finally:
        agent.wipe("test over")
        offline.close()
        verifier.close()


# --- the real agent process and hsm-auth finish -----------------------------------------


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    if not (shutil.which("dbus-daemon") and shutil.which("dbus-monitor")
            and shutil.which("gdbus")):
        pytest.skip("needs dbus-daemon, dbus-monitor and gdbus")
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1",
         f"--address=unix:path={tmp_path / 'bus'}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def _pin_fd(pin: str) -> int:
    read, write = os.pipe()
    os.write(write, pin.encode() + b"\n")
    os.close(write)
    return read


@pytest.mark.softhsm
def test_hsm_auth_finish_through_the_agent_and_the_screen_lock(
    softhsm_env: Any, tmp_path: Path, private_bus: str
) -> None:
    token = init_token(unique_label("cli-cache"), so_pin="12345678", user_pin=PIN)
    write_policy(tmp_path / "verifier", "[offline.pin]\npin_cache = 60\n")
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(
        f"[methods.pin]\nbackend = \"pkcs11\"\nuri = {json.dumps(token.uri)}\n"
        "allow_unenforced_pin = true\n")
    (home / "config.toml").chmod(0o600)
    from hsm_auth.config import Paths

    with Authenticator(Paths(home).authenticator_dir, _pkcs11_config(token)) as a:
        enroll(verifier, a)
    sock = tmp_path / "run" / "agent.sock"
    with running_agent(home, sock, env={"DBUS_SYSTEM_BUS_ADDRESS": private_bus}) as agent:

        def finish(*options: str, pin: str | None = None) -> subprocess.CompletedProcess[str]:
            session = verifier.start_session("alice", "Log in to ws-7", methods=[Method.PIN])
            fds: tuple[int, ...] = ()
            argv = ["--json", "finish", "--method", "pin", *options]
            if pin is not None:
                fd = _pin_fd(pin)
                fds, argv = (fd,), [*argv, "--pin-fd", str(fd)]
            try:
                r = agent.cli(*argv, session.text, pass_fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if r.returncode == 0:
                doc = json.loads(r.stdout)
                assert verifier.verify(session.session_id, doc["otp"]).atc == doc["atc"]
                otps.append(doc["otp"])
            return r

        otps: list[str] = []

        no_pin = finish()  # nothing held, no terminal to ask on
        assert no_pin.returncode == 31 and "PIN" in no_pin.stderr
        first = finish(pin=PIN)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["pin_asked"] is True
        second = finish()  # within 60 s: no PIN, none asked for (no terminal, no fd)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout) | {"otp": "x"} == {
            "otp": "x", "method": "pin", "atc": json.loads(first.stdout)["atc"] + 1,
            "agent": True, "pin_asked": False}
        assert finish("--no-agent").returncode == 31  # without the agent: asked, as always
        # Transaction data and what the user enters reach the agent's OTP (§17).
        paying = verifier.start_session(
            "alice", "Pay", methods=[Method.PIN],
            transaction=[("Amount", "120.00 EUR"), ("To", "DE89 3704 0044 0532 0130 00")],
            user_data=8)
        r = agent.cli("--json", "finish", "--method", "pin", "--data", "4711", paying.text)
        assert r.returncode == 0, r.stderr
        paid = json.loads(r.stdout)
        assert paid["agent"] is True and paid["pin_asked"] is False
        with pytest.raises(InvalidToken):
            verifier.verify(paying.session_id, paid["otp"], data="4712")
        assert verifier.verify(paying.session_id, paid["otp"], data="4711").atc == paid["atc"]
        status = agent.status()
        assert [round(u["seconds_left"]) <= 60 for u in status["unlocked"]] == [True]
        deadline = time.monotonic() + 20
        while agent.status()["unlocked"]:  # a session Lock on the bus wipes it
            assert time.monotonic() < deadline, "the Lock signal never dropped the session"
            subprocess.run(
                ["gdbus", "emit", "--address", private_bus, "--object-path",
                 "/org/freedesktop/login1/session/_3", "--signal",
                 "org.freedesktop.login1.Session.Lock"],
                check=True, timeout=10, capture_output=True)
            time.sleep(0.1)
        after = finish()
        assert after.returncode == 31, after.stderr  # asked again
        wrong = finish(pin=WRONG)
        assert wrong.returncode == 32, wrong.stderr
        assert json.loads(wrong.stdout) == {  # the token's retry data, through the agent
            "error": "wrong PIN", "type": "PinInvalid", "retries_left": None,
            "retry_after": None, "locked": False}  # SoftHSM counts no tries
        assert _token_flags(token) & _CKF_USER_PIN_COUNT_LOW  # counted on the token
        log = agent.log()
    assert "Traceback" not in log and PIN not in log
    assert otps and not any(otp in log for otp in otps)  # nor an OTP it made
    verifier.close()


@pytest.mark.softhsm
def test_the_agent_sees_an_enrollment_made_after_it_started(
    softhsm_env: Any, tmp_path: Path
) -> None:
    token = init_token(unique_label("later"), so_pin="12345678", user_pin=PIN)
    write_policy(tmp_path / "verifier", "[offline.pin]\npin_cache = 60\n")
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    config = _pkcs11_config(token)
    with Authenticator(tmp_path / "auth", config) as offline:
        agent = Agent([], notify=Quiet(), offline=offline, unlocked=Unlocked(FakeClock()))
        with Authenticator(tmp_path / "auth", config) as a:  # `hsm-auth enroll` meanwhile
            enroll(verifier, a)
        w = World(verifier, agent, FakeClock(), tmp_path / "auth", config, token)
        assert w.otp(PIN)["held"] is False and w.otp(None)["held"] is True
        agent.wipe("test over")
    verifier.close()


class _TokenApprovals:
    """An online source whose approvals are signed in the pin token itself (the
    online service is not part of this test): what the agent's approve runs."""

    name = "Example Bank"
    verifier_id = b"\x01" * 8
    user = "alice"
    url = "http://127.0.0.1:1"

    def __init__(self, uri: str, key: str) -> None:
        self._uri, self._key = uri, key

    def methods(self) -> Any:
        from hsm_auth.agent import CredentialPolicy

        return {Method.PIN: CredentialPolicy("c-approval", timeout=0)}

    def pending(self, *args: Any) -> list[Any]:
        return []

    def owns_claim(self, claim: str) -> bool:
        return False

    def claim(self, *args: Any) -> Any:
        raise AssertionError("no claims here")

    def answer(self, challenge: Any, approve: bool, method: Method, auth: Any,
               authorized_at: float | None) -> None:
        from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

        with Pkcs11KeyStore.open({"uri": self._uri, "allow_unenforced_pin": True}) as store:
            store.sign(self._key, challenge.challenge_id.encode(), auth)


@pytest.mark.softhsm
def test_a_pin_typed_for_an_approval_reaches_the_token_while_an_otp_session_is_held(
    pkcs11_world: World,
) -> None:
    """PKCS#11 login is per process: while the agent holds a logged-in session, a
    store it opens on that token would compare a PIN with the one logged in, on the
    host. A PIN typed for an approval closes the held sessions first, so the token
    judges it (a wrong one is counted there) and nothing stays unlocked."""
    from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

    from hsm_auth.agent import ChallengeView
    from hsm_auth.keystore import Authorization, KeyKind

    w = pkcs11_world
    settings = {"uri": w.token.uri, "allow_unenforced_pin": True}
    with Pkcs11KeyStore.open(settings) as store:
        key = store.generate_key("approval/sign", KeyKind.SIGNING, Authorization(pin=PIN))
    agent = Agent([_TokenApprovals(w.token.uri, key)], notify=Quiet(), offline=w.agent.offline,
                  unlocked=w.agent.unlocked)
    w.agent = agent
    w.otp(PIN)
    assert len(agent.unlocked.status()) == 1
    challenge = ChallengeView("00112233445566778899aabbccddeeff", "push", "pending",
                              2_000_000_000, "alice", "Sign in")
    agent._merge(agent._sources[0], [challenge])
    with pytest.raises(PinInvalid):
        agent.answer(challenge.challenge_id, True, "pin", WRONG)
    assert _token_flags(w.token) & _CKF_USER_PIN_COUNT_LOW  # the token judged it
    assert agent.unlocked.status() == []
    assert agent.answer(challenge.challenge_id, True, "pin", PIN)["state"] == "approved"
