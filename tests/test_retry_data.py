"""Uniform retry data (issue 14): every authorization failure carries one
``RetryStatus(retries_left, retry_after, locked)`` from the hardware, and ``--json``
and the agent's replies carry its three fields (KOBIL's ``retryCounter`` /
``retryDelay``).

Per backend, against the real parts: PKCS#11 on SoftHSM (whose only count is
``CKF_USER_PIN_COUNT_LOW``: no number, said as unknown) and the flag reading every
PKCS#11 error goes through; TPM 2.0 on swtpm (the dictionary-attack counter, and
the lockout's recovery time as ``retry_after``) directly and through the agent's
socket; FIDO2 on the software authenticator (its PIN retries and UV retries, read
from the authenticator after each failure). The CLI's ``--json`` of each backend is
tests/test_cli_errors.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hsm_auth import agent as agentmod
from hsm_auth.agent import Agent
from hsm_auth.agent_client import AgentClient, error_from_json, error_to_json
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    AuthorizationError,
    LockedOut,
    PinInvalid,
    PinLocked,
    RetryStatus,
    UserVerificationFailed,
)
from hsm_auth.keystore import Authorization, KeyKind
from hsm_auth.methods import Method
from hsm_auth.unlocked import Unlocked
from hsm_auth.verifier import Verifier

PIN = "482916"


def test_pkcs11_token_flags_are_read_one_way() -> None:
    from hsm_auth_backends.pkcs11 import (
        _CKF_USER_PIN_COUNT_LOW,
        _CKF_USER_PIN_FINAL_TRY,
        _CKF_USER_PIN_LOCKED,
        retry_status,
    )

    assert retry_status(0) == RetryStatus()
    assert retry_status(_CKF_USER_PIN_COUNT_LOW) == RetryStatus()  # "some failed": no count
    final = retry_status(_CKF_USER_PIN_COUNT_LOW | _CKF_USER_PIN_FINAL_TRY)
    assert final == RetryStatus(retries_left=1) and final.final_try
    assert retry_status(_CKF_USER_PIN_LOCKED | _CKF_USER_PIN_FINAL_TRY) == RetryStatus(
        retries_left=0, locked=True)


@pytest.mark.softhsm
def test_pkcs11_every_wrong_pin_carries_the_tokens_status(softhsm_token: Any) -> None:
    """A wrong PIN at C_Login, and one given to a store of a process already logged
    in (compared on the host: the token would not check it again), both carry what
    the token's flags say; SoftHSM says "some tries failed" and no number."""
    import pkcs11
    from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

    settings = {"uri": softhsm_token.uri, "allow_unenforced_pin": True}
    with Pkcs11KeyStore.open(settings) as store, pytest.raises(PinInvalid) as at_login:
        store.generate_key("retry/sign", KeyKind.SIGNING, Authorization(pin="0000"))
    assert at_login.value.retry == RetryStatus() and at_login.value.native_code == 0xA0
    flags = int(pkcs11.lib(softhsm_token.module_path).get_token(
        token_label=softhsm_token.label).flags)
    assert flags & 0x10000  # CKF_USER_PIN_COUNT_LOW: the token counted it
    with Pkcs11KeyStore.open(settings) as held:
        held.generate_key("retry/sign", KeyKind.SIGNING, Authorization(pin="1234"))
        with Pkcs11KeyStore.open(settings) as second, pytest.raises(PinInvalid) as on_host:
            second.list_keys(Authorization(pin="0000"))
        assert on_host.value.retry == RetryStatus()


def test_the_agent_carries_retry_data_both_ways() -> None:
    for error in (
        PinInvalid(retry=RetryStatus(retries_left=2)),
        PinLocked("locked", retry=RetryStatus(retries_left=0, retry_after=2.0)),
        LockedOut(retry=RetryStatus(retries_left=0, retry_after=7.5)),
        UserVerificationFailed(retry=RetryStatus(retries_left=0, locked=True)),
    ):
        doc = error_to_json(error)
        assert {k: doc[k] for k in ("retries_left", "retry_after", "locked")} == {
            "retries_left": error.retry.retries_left, "retry_after": error.retry.retry_after,
            "locked": error.retry.locked}
        back = error_from_json(doc)
        assert type(back) is type(error) and isinstance(back, AuthorizationError)
        assert back.retry == error.retry


class _Quiet:
    def notify(self, summary: str, body: str) -> None:
        pass

    def line(self, text: str) -> None:
        pass


@pytest.fixture
def tpm_agent(swtpm: Any, tmp_path: Path) -> Iterator[tuple[Verifier, Path, Any]]:
    """An agent process-in-a-thread on a socket, its authenticator's pin method on
    swtpm (3 tries, 2 s recovery), the verifier caching the PIN 60 s."""
    from hsm_auth.testing.swtpm import set_da_parameters

    set_da_parameters(swtpm.tcti, max_tries=3, recovery_time=2)
    (tmp_path / "verifier").mkdir(mode=0o700)
    (tmp_path / "verifier" / "policy.toml").write_text("[offline.pin]\npin_cache = 60\n")
    (tmp_path / "verifier" / "policy.toml").chmod(0o600)
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    config = Config(methods={Method.PIN: MethodConfig("tpm2", {
        "tcti": swtpm.tcti, "state_dir": str(tmp_path / "tpm-state"), "auth": "pin"})})
    with Authenticator(tmp_path / "auth", config) as a:
        offer = verifier.create_offer("alice", methods=[Method.PIN])
        response = a.add_or_update(Method.PIN, offer.text,
                                   activation_code=offer.activation_code, pin=PIN)
        a.store_result(verifier.enrollment_result(verifier.accept_enrollment(response)))
    offline = Authenticator(tmp_path / "auth", config)
    agent = Agent([], notify=_Quiet(), offline=offline, unlocked=Unlocked())
    sock = tmp_path / "run" / "agent.sock"
    server = agentmod.Server(agent, agentmod.bind_socket(sock), sock)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield verifier, sock, swtpm
    finally:
        agent.stopping.set()
        thread.join(timeout=5)
        server.close()
        agent.wipe("test over")
        offline.close()
        verifier.close()


@pytest.mark.swtpm
def test_tpm_wrong_pins_through_the_agent_count_down_then_say_when(
    tpm_agent: tuple[Verifier, Path, Any],
) -> None:
    verifier, sock, _ = tpm_agent
    text = verifier.start_session("alice", "ctx", methods=[Method.PIN]).text
    seen = []
    with AgentClient(sock) as client:
        for _ in range(3):
            with pytest.raises((PinInvalid, PinLocked)) as caught:
                client.call("otp", request=text, method="pin", pin="000000")
            seen.append((type(caught.value).__name__, caught.value.retry))
    assert seen[:2] == [("PinInvalid", RetryStatus(retries_left=2)),
                        ("PinInvalid", RetryStatus(retries_left=1))]
    name, locked = seen[2]
    assert name == "PinLocked" and locked.locked and locked.retries_left == 0
    assert locked.retry_after is not None and 0 < locked.retry_after <= 2


@pytest.mark.fido2
def test_fido2_uv_failures_count_down_to_locked(soft_fido2: Any, tmp_path: Path) -> None:
    """The software authenticator's UV retries, as the backend reads them after each
    failure: the failure that uses the last try is reported locked, with 0 left (the
    PIN's count: tests/test_fido2_backend.py)."""
    from hsm_auth_backends.fido2 import Fido2KeyStore

    from hsm_auth.testing.soft_fido2 import MAX_UV_RETRIES

    settings = {"device": f"soft:{soft_fido2.path}", "state_dir": str(tmp_path / "fido2"),
                "prompts": False, "allow_software_authenticator": True}
    with Fido2KeyStore.open(settings) as store:
        counter = store.create_counter("retry/atc", Authorization())
        soft_fido2.configure(uv_outcome="fail")
        seen = []
        for _ in range(MAX_UV_RETRIES + 1):
            with pytest.raises(UserVerificationFailed) as uv:
                store.counter_increment(counter, Authorization())
            seen.append(uv.value.retry)
    assert seen[:-2] == [RetryStatus(retries_left=n) for n in range(MAX_UV_RETRIES - 1, 0, -1)]
    assert seen[-2:] == [RetryStatus(retries_left=0, locked=True)] * 2
