"""Issue 14, must show: an OTP made for "Pay 120.00 EUR to DE89…" is refused for any
other amount, payee, context, tenant or user data (docs/PROTOCOL.md §17), on a real
SoftHSM token through the library, over the real HTTP service, and in the CLI.

The forged verification data below is signed with the verifier's own key: it stands
for an authenticator shown other data than the session's (a compromised display, a
swapped QR code that somehow verified). The signature is not what refuses its OTP;
the question is: the verifier computes it from the data it stored with the session.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from _cli import cli_ok, code_file, run_cli
from _service import bearer, make_key, problem
from _verifier_device import Clock

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.demo import prepare
from hsm_auth.errors import InvalidInput, InvalidToken, UnknownMethod
from hsm_auth.keystore import UserInteraction
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

IBAN = "DE89 3704 0044 0532 0130 00"
PAY = (("Amount", "120.00 EUR"), ("Payee", IBAN))
CONTEXT = "Pay 120.00 EUR to DE89…"


def _config(tmp_path, label: str = "tx") -> Config:
    token = init_token(unique_label(label), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / f"{label}.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    return Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})


@pytest.fixture
def pair(softhsm_env, tmp_path):
    clock = Clock()
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank", clock=clock)
    with Authenticator(tmp_path / "auth", _config(tmp_path), clock=clock) as authenticator:
        offer = verifier.create_offer("alice", methods=[Method.DEVICE])
        verifier.accept_enrollment(authenticator.add_or_update(
            Method.DEVICE, offer.text, activation_code=offer.activation_code))
        yield verifier, authenticator
    verifier.close()


def _otp(authenticator: Authenticator, text: str, data: str | None = None) -> str:
    request = authenticator.start_offline_authentication(text)
    return authenticator.finish_offline_authentication(request, Method.DEVICE, data=data).otp


def _shown(verifier: Verifier, data: VerificationData, **changed: object) -> str:
    """The session's verification data with ``changed`` fields, validly signed."""
    return dataclasses.replace(data, **changed).to_text(verifier.keys.sign_raw)  # type: ignore[arg-type]


def test_an_otp_for_one_payment_is_refused_for_any_other(pair):
    verifier, authenticator = pair
    session = verifier.start_session("alice", CONTEXT, transaction=PAY)
    request = authenticator.start_offline_authentication(session.text)
    assert request.transaction == PAY and request.context == CONTEXT
    others = {
        "amount": dict(transaction=(("Amount", "1200.00 EUR"), ("Payee", IBAN))),
        "payee": dict(transaction=(("Amount", "120.00 EUR"), ("Payee", IBAN[:-1] + "1"))),
        "label": dict(transaction=(("Amount", "120.00 EUR"), ("To", IBAN))),
        "order": dict(transaction=PAY[::-1]),
        "dropped": dict(transaction=PAY[:1]),
        "none": dict(transaction=None),
        "context": dict(context="Pay 120.00 EUR to DE89… today"),
        "tenant": dict(tenant="retail"),
    }
    for what, changed in others.items():
        if what == "tenant":
            continue  # an authenticator answers no data of another tenant (below)
        otp = _otp(authenticator, _shown(verifier, session.data, **changed))
        with pytest.raises(InvalidToken):
            verifier.verify(session.session_id, otp)
        assert verifier.store.session(session.session_id).used is False, what
    with pytest.raises(UnknownMethod, match=r"\(tenant 'retail'\)"):
        authenticator.start_offline_authentication(
            _shown(verifier, session.data, **others["tenant"])
        )
    # The OTP of exactly the data shown is accepted (the session is still live).
    accepted = verifier.verify(session.session_id, _otp(authenticator, session.text))
    assert accepted.user == "alice"


def test_the_otp_binds_what_the_user_entered(pair):
    verifier, authenticator = pair
    session = verifier.start_session("alice", CONTEXT, transaction=PAY, user_data=4)
    assert session.data.user_data == 4
    # The authenticator needs the data, and no more than the session allows.
    request = authenticator.start_offline_authentication(session.text)
    with pytest.raises(InvalidInput, match="needs data"):
        authenticator.finish_offline_authentication(request, Method.DEVICE)
    with pytest.raises(InvalidInput, match="longer than 4"):
        authenticator.finish_offline_authentication(request, Method.DEVICE, data="47110")
    otp = _otp(authenticator, session.text, data=" 4711 ")  # normalized on both sides
    # Missing or unexpected data is malformed input, never a counted failure.
    with pytest.raises(InvalidInput, match="needs data"):
        verifier.verify(session.session_id, otp)
    assert _failures(verifier) == 0
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, otp, data="4712")
    assert _failures(verifier) == 1
    assert verifier.verify(session.session_id, otp, data="4711").user == "alice"
    plain = verifier.start_session("alice", "Log in")
    otp = _otp(authenticator, plain.text)
    with pytest.raises(InvalidInput, match="takes no data"):
        verifier.verify(plain.session_id, otp, data="4711")
    with pytest.raises(InvalidInput, match="takes no data"):
        _otp(authenticator, plain.text, data="4711")
    [ok] = verifier.verify_many([(plain.session_id, otp, None)])
    assert not isinstance(ok, Exception) and ok.user == "alice"
    reasons = [r.reason.value for r in verifier.store.audit_records() if r.reason]
    assert reasons == ["malformed-data", "no-match", "malformed-data"]
    assert "4711" not in repr(verifier.store.audit_records())


def _failures(verifier: Verifier) -> int:
    [cred] = verifier.store.credentials("alice")
    return cred.failures


def test_the_session_checks_its_transaction(pair):
    verifier, _ = pair
    for bad, why in (
        ((), "1 to 8 items"),
        ([("Amount", "1")] * 2, "appears twice"),
        ([("Amount: 5", "1")], "contains ':'"),
        ([("Amount", "1\u202e2")], "U\\+202E"),
    ):
        with pytest.raises(InvalidInput, match=why):
            verifier.start_session("alice", "ctx", transaction=bad)
    for bad_count in (-1, 65):
        with pytest.raises(InvalidInput, match="user data"):
            verifier.start_session("alice", "ctx", user_data=bad_count)
    with pytest.raises(InvalidInput, match="tenant"):
        verifier.start_session("alice", "ctx", tenant="a b")


def test_over_http_the_provider_sends_the_transaction_and_the_data(
    service, softhsm_env, tmp_path
):
    key = make_key(service.verifier_dir, "enroll", "verify")
    h = bearer(key)
    offer = httpx.post(service.url + "/v1/offers", json={"user": "dana",
                       "methods": ["device"]}, headers=h).json()
    with Authenticator(tmp_path / "auth", _config(tmp_path, "http")) as authenticator:
        response = authenticator.add_or_update(
            Method.DEVICE, offer["offer"], activation_code=offer["activation_code"])
        with Verifier.open(service.verifier_dir) as v:
            v.accept_enrollment(response)
        body = {"user": "dana", "context": CONTEXT,
                "transaction": [list(p) for p in PAY], "user_data": 6}
        r = httpx.post(service.url + "/v1/sessions", json=body, headers=h)
        assert r.status_code == 201, r.text
        session = r.json()
        assert session["transaction"] == [list(p) for p in PAY] and session["user_data"] == 6
        # The QR code's text (rebuilt from the store) carries the same transaction.
        qr_text = VerificationData.from_text(session["data"])[0]
        assert qr_text.transaction == PAY
        otp = _otp(authenticator, session["data"], data="Müller")
    verify = service.url + "/v1/verify"
    sid = session["session_id"]
    problem(httpx.post(verify, json={"session_id": sid, "otp": otp}, headers=h),
            400, "invalid-input")
    problem(httpx.post(verify, json={"session_id": sid, "otp": otp, "data": "Muller"},
                       headers=h), 403, "otp-refused")
    r = httpx.post(verify, json={"session_id": sid, "otp": otp, "data": "Mu\u0308ller"},
                   headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "dana"
    for bad in ({"transaction": [["Amount"]]}, {"transaction": [["a:b", "1"]]},
                {"user_data": 65}, {"transaction": []}):
        r = httpx.post(service.url + "/v1/sessions",
                       json={"user": "dana", "context": "ctx", **bad}, headers=h)
        assert r.status_code in (400, 422), r.text
    assert "Müller" not in service.log() and otp not in service.log()


def test_the_cli_shows_the_transaction_and_takes_data_and_a_prompt(softhsm_env, tmp_path):
    home = tmp_path / "home"
    with prepare(home, tpm=False, fido2=False):  # SoftHSM only
        pass
    cli_ok(home, "verifier", "init", "--name", "Example Bank")
    offer = cli_ok(home, "verifier", "offer", *code_file(home), "--user", "alice",
                   "--methods", "device")
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)
    sid = tmp_path / "sid"
    data = cli_ok(home, "verifier", "session", "--user", "alice", "--context", CONTEXT,
                  "--transaction", "Amount=120.00 EUR", "--transaction", f"Payee={IBAN}",
                  "--user-data", "4", "--id-file", str(sid))
    shown = cli_ok(home, "start", data)
    assert "Amount: 120.00 EUR" in shown and f"Payee: {IBAN}" in shown
    assert "up to 4 characters" in shown
    refused = run_cli(home, "finish", "--method", "device", data)
    assert refused.returncode != 0 and "needs data" in refused.stderr
    assert "Traceback" not in refused.stderr
    (tmp_path / "data.txt").write_text("4711\n")
    result = run_cli(home, "finish", "--method", "device", "--data", f"@{tmp_path / 'data.txt'}",
                     "--prompt", "Confirm the payment on your token", data)
    assert result.returncode == 0, result.stderr
    assert "Amount: 120.00 EUR" in result.stderr  # shown before the OTP is made
    otp = result.stdout.strip()
    wrong = run_cli(home, "verifier", "verify", "--session", f"@{sid}", "--otp", otp,
                    "--data", "4712")
    assert wrong.returncode == 40 and "OTP refused" in wrong.stderr
    assert "accepted" in cli_ok(home, "verifier", "verify", "--session", f"@{sid}",
                                "--otp", otp, "--data", "4711")


class _Recorder(UserInteraction):
    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.uv_requests: list[str] = []

    def prompt_up(self, prompt: str) -> None:
        self.prompts.append(prompt)

    def request_uv(self, prompt: str) -> bool:
        self.uv_requests.append(prompt)
        return True


@pytest.mark.fido2
def test_the_callers_prompt_is_shown_before_user_verification(soft_fido2, tmp_path):
    """FIDO2 (a software authenticator): ``prompt`` is what the user is shown while the
    token waits for the fingerprint; the OTP still binds the payment."""
    pytest.importorskip("fido2")
    from hsm_auth.authenticator import PROMPTS
    from hsm_auth.testing.fido2 import write_soft_policy

    settings = {"device": f"soft:{soft_fido2.path}", "state_dir": str(tmp_path / "fido2"),
                "allow_software_authenticator": True}
    config = Config(methods={Method.BIOMETRIC: MethodConfig("fido2", settings)})
    user = _Recorder()
    write_soft_policy(tmp_path / "verifier", [soft_fido2])
    with Verifier.init(tmp_path / "verifier", "Example Bank") as verifier, Authenticator(
        tmp_path / "auth", config, interaction=user
    ) as auth:
        offer = verifier.create_offer("alice", methods=[Method.BIOMETRIC])
        verifier.accept_enrollment(auth.add_or_update(
            Method.BIOMETRIC, offer.text, activation_code=offer.activation_code))
        user.prompts.clear()
        user.uv_requests.clear()
        session = verifier.start_session("alice", CONTEXT, transaction=PAY)
        request = auth.start_offline_authentication(session.text)
        prompt = "Confirm 120.00 EUR to DE89 with your fingerprint"
        with pytest.raises(InvalidInput, match="the prompt contains U\\+202E"):
            auth.finish_offline_authentication(request, Method.BIOMETRIC, prompt="a\u202eb")
        assert user.prompts == []  # refused before the token was asked
        result = auth.finish_offline_authentication(request, Method.BIOMETRIC, prompt=prompt)
        assert set(user.prompts) == {prompt} and set(user.uv_requests) == {prompt}
        forged = _shown(verifier, session.data, transaction=(("Amount", "1.00 EUR"),))
        other = auth.finish_offline_authentication(
            auth.start_offline_authentication(forged), Method.BIOMETRIC)
        assert PROMPTS[Method.BIOMETRIC] in user.prompts  # no prompt given: the method's own
        with pytest.raises(InvalidToken):
            verifier.verify(session.session_id, other.otp)
        assert verifier.verify(session.session_id, result.otp).method is Method.BIOMETRIC
