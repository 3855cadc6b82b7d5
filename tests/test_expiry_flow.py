"""Expiry end to end (docs/PROTOCOL.md §20), with real SoftHSM tokens: the authenticator
keeps the expiry its EnrollmentResult states and refuses at start, finish and sync with
exactly the verifier's line; renewal makes both usable again without moving a counter,
and a replayed older result or one whose expiry is not its certificate's is refused.
Then the command line as a user runs it against a real ``hsm-auth serve``: the same
one error line from ``finish`` and ``verifier verify``, ``hsm-auth renew`` over HTTP,
and the next OTP accepted. The verifier's rules alone: tests/test_expiry.py."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _cli import cli_env, cli_ok, error_line, run_cli
from _online import OFFLINE_PIN, softhsm_methods
from _verifier_device import START, Clock
from cryptography import x509

from hsm_auth import api_keys
from hsm_auth.attestation import POLICY_FILE
from hsm_auth.audit import Event
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, Paths
from hsm_auth.enrollment_messages import EnrollmentResult
from hsm_auth.errors import CREDENTIAL_EXPIRED, CredentialExpired, UntrustedMessage
from hsm_auth.expiry import DAY
from hsm_auth.files import atomic_write, ensure_private_dir
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient
from hsm_auth.request_signing import HEADER
from hsm_auth.testing.service import running_service
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

VALIDITY = 90
POLICY = f"[offline]\nvalidity_days = {VALIDITY}\n".encode()


def _policy(directory: Path) -> None:
    ensure_private_dir(directory)
    atomic_write(directory / POLICY_FILE, POLICY)


def _enroll(verifier: Verifier, authenticator: Authenticator, method: Method) -> str:
    """Enroll ``method`` for alice in the token; store the result; return its text."""
    offer = verifier.create_offer("alice", methods=[method])
    pin = OFFLINE_PIN if method is Method.PIN else None
    response = authenticator.add_or_update(
        method, offer.text, activation_code=offer.activation_code, pin=pin
    )
    result = verifier.enrollment_result(verifier.accept_enrollment(response))
    authenticator.store_result(result)
    return result


def _advice(method: Method, expires: int) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires))
    return CREDENTIAL_EXPIRED.format(method=method.value, date=f"{date} UTC")


def test_an_expired_credential_is_refused_on_both_sides_with_the_same_advice(
    softhsm_env, tmp_path
):
    clock = Clock()
    _policy(tmp_path / "verifier")
    config = Config(methods=softhsm_methods(tmp_path / "tokens"))
    with (
        Verifier.init(tmp_path / "verifier", "Bank", clock=clock) as v,
        Authenticator(tmp_path / "auth", config, clock=clock) as a,
    ):
        first = _enroll(v, a, Method.PIN)
        cred = v.credential("alice", Method.PIN)
        [enrolled] = a.enrolled
        assert cred.expires == int(START) + VALIDITY * DAY
        assert enrolled.offline_expires == cred.expires  # stated in the result, kept
        cert = x509.load_pem_x509_certificate(enrolled.certificate.encode())
        assert int(cert.not_valid_after_utc.timestamp()) == cred.expires

        clock.now = cred.expires  # the last second it is valid
        early = v.start_session("alice", "Log in to ws-1")
        otp = a.finish_offline_authentication(
            a.start_offline_authentication(early.text), Method.PIN, pin=OFFLINE_PIN
        )
        assert otp.atc == 1
        late = v.start_session("alice", "Log in to ws-2")
        late_request = a.start_offline_authentication(late.text)
        sync = v.sync_message("alice", Method.PIN)

        clock.now = cred.expires + 1
        refusals = []
        for refuse in (
            lambda: v.verify(early.session_id, otp.otp),  # the verifier: verify ...
            lambda: v.start_session("alice", "Log in"),  # ... and session start
            lambda: a.start_offline_authentication(late.text),  # the authenticator: start
            lambda: a.finish_offline_authentication(late_request, Method.PIN, pin=OFFLINE_PIN),
            lambda: a.sync(sync, pin=OFFLINE_PIN),
        ):
            with pytest.raises(CredentialExpired) as e:
                refuse()
            refusals.append(str(e.value))
        assert set(refusals) == {_advice(Method.PIN, cred.expires)}
        assert "re-activate online (hsm-auth renew)" in refusals[0]

        # Renewal (what POST /v1/device/renewal runs): both sides usable again; no
        # refusal above moved the token's counter (the next OTP is the second).
        clock.now += 30 * DAY
        renewal = v.renew(v.credential("alice", Method.PIN))
        [renewed] = [a.store_result(renewal.result)]
        assert renewed.offline_expires == renewal.credential.expires == int(clock.now) + 90 * DAY
        assert renewed.credential_id == enrolled.credential_id
        assert renewed.certificate != enrolled.certificate
        session = v.start_session("alice", "Log in to ws-3")
        again = a.finish_offline_authentication(
            a.start_offline_authentication(session.text), Method.PIN, pin=OFFLINE_PIN
        )
        assert again.atc == 2
        assert v.verify(session.session_id, again.otp).atc == 2

        # The first result again (replayed): its certificate is older than the stored one.
        with pytest.raises(UntrustedMessage, match="older than the one stored"):
            a.store_result(first)
        # A result whose expiry is not its certificate's notAfter (signed by the verifier).
        result, _ = EnrollmentResult.from_text(renewal.result)
        stretched = dataclasses.replace(result, offline_expires=result.offline_expires + DAY)
        with pytest.raises(UntrustedMessage, match="notAfter"):
            a.store_result(stretched.to_text(v.keys.sign_raw))
        assert a.enrolled[0].offline_expires == renewal.credential.expires  # unchanged


class _Recording(OnlineClient):
    """The real client, keeping the signature header of each signed request it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signed: list[tuple[str, str]] = []

    def _call(self, method: str, target: str, body: bytes = b"", *,
              signature: str | None = None, timeout: float | None = None) -> Any:
        if signature is not None:
            self.signed.append((target, signature))
        return super()._call(method, target, body, signature=signature, timeout=timeout)


def _write_config(home: Path, config: Config) -> None:
    lines = []
    for method, mc in config.methods.items():
        lines.append(f"[methods.{method.value}]")
        lines.append(f'backend = "{mc.backend}"')
        for key, value in mc.settings.items():
            lines.append(f"{key} = {json.dumps(value)}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def test_the_cli_says_the_same_line_on_both_sides_and_renews_over_http(softhsm_env, tmp_path):
    """Real time: alice's device method was enrolled 90 days and 60 s ago (a verifier
    and an authenticator with that clock), so it expired a minute ago."""
    home = tmp_path / "home"
    paths = Paths.from_env(home)
    _policy(paths.verifier_dir)
    config = Config(methods=softhsm_methods(tmp_path / "tokens"))
    ensure_private_dir(home)
    _write_config(home, config)
    past = time.time() - VALIDITY * DAY - 60
    with (
        Verifier.init(paths.verifier_dir, "CLI Bank", clock=lambda: past) as v,
        Authenticator(paths.authenticator_dir, config, clock=lambda: past) as a,
    ):
        _enroll(v, a, Method.DEVICE)
        expires = v.credential("alice", Method.DEVICE).expires
    before = time.time()
    with (
        Verifier.open(paths.verifier_dir, clock=lambda: expires - 10) as v,
        Authenticator(paths.authenticator_dir, config, clock=lambda: expires - 5) as a,
    ):
        made = v.start_session("alice", "Log in to ws-7")  # before the expiry
        otp = a.finish_offline_authentication(
            a.start_offline_authentication(made.text), Method.DEVICE
        ).otp
    assert time.time() > expires  # the CLI runs after it
    env = {**cli_env(), "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}
    advice = _advice(Method.DEVICE, expires)

    listed = cli_ok(home, "methods", env=env)
    assert "offline use expired on" in listed and "(hsm-auth renew)" in listed
    [row] = json.loads(cli_ok(home, "--json", "methods", env=env))["methods"]
    assert (row["offline_expires"], row["expired"]) == (expires, True)
    assert row["certificate"]["not_after"] == expires
    on_authenticator = error_line(run_cli(home, "finish", "--method", "device", made.text,
                                          env=env), 38)
    on_verifier = error_line(run_cli(home, "verifier", "verify", "--session",
                                     made.session_id.hex(), stdin=otp + "\n", env=env), 38)
    on_session = error_line(run_cli(home, "verifier", "session", "--user", "alice",
                                    "--context", "Log in", env=env), 38)
    assert on_authenticator == on_verifier == on_session == advice
    assert " EXPIRED " in cli_ok(home, "verifier", "credentials", env=env)
    nowhere = error_line(run_cli(home, "renew", "--method", "device", env=env), 8)
    assert nowhere.startswith("no online service to renew at")

    with Verifier.open(paths.verifier_dir) as v:
        key = api_keys.create(v.store, "tests", ["verify"], now=int(time.time())).key
    with running_service(paths.verifier_dir) as service:
        # The provider's session for alice: the same line, as a problem document.
        r = httpx.post(service.url + "/v1/sessions", json={"user": "alice", "context": "x"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 410 and r.json()["detail"] == advice, r.text
        assert r.headers["content-type"] == "application/problem+json"
        # Unsigned, or signed by nobody: refused, nothing renewed.
        r = httpx.post(service.url + "/v1/device/renewal", timeout=30)
        assert r.status_code in (401, 403) and "Traceback" not in r.text, r.text
        renewed = run_cli(home, "renew", "--method", "device", "--url", service.url, env=env)
        assert renewed.returncode == 0, renewed.stderr
        assert "renewed the device method: offline use until" in renewed.stderr
        # A signed renewal replayed (its nonce is used up): refused, nothing renewed.
        with Authenticator(paths.authenticator_dir, config) as a:
            client = _Recording(a, service.url)
            client.renew(Method.DEVICE)
        [(target, header)] = client.signed
        replayed = httpx.post(service.url + target, headers={HEADER: header}, timeout=30)
        assert replayed.status_code in (401, 403), replayed.text
        assert "Traceback" not in service.log()
    with Verifier.open(paths.verifier_dir) as v:
        new = v.credential("alice", Method.DEVICE).expires
        renewals = [r for r in v.store.audit_records("alice") if r.event is Event.RENEW]
    assert len(renewals) == 2  # the CLI's and the client's; not the replay
    assert before + VALIDITY * DAY <= new <= time.time() + VALIDITY * DAY
    [row] = json.loads(cli_ok(home, "--json", "methods", env=env))["methods"]
    assert (row["offline_expires"], row["expired"]) == (new, False)
    assert row["certificate"]["not_after"] == new
    [cred] = json.loads(cli_ok(home, "--json", "verifier", "credentials", env=env))["credentials"]
    assert cred["expires"] == new

    out = json.loads(cli_ok(home, "--json", "verifier", "session", "--user", "alice",
                            "--context", "Log in to ws-8", env=env))
    fresh = cli_ok(home, "finish", "--method", "device", out["data"], env=env)
    accepted = cli_ok(home, "verifier", "verify", "--session", out["session"],
                      stdin=fresh + "\n", env=env)
    assert "accepted" in accepted
