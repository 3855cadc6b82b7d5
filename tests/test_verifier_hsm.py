"""The verifier's own keys in a PKCS#11 HSM (SoftHSM): generated there, not
extractable, no key file; each check derives the OTP key inside the HSM as a
session key, HMACs there and destroys it."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from _verifier_device import Clock, enroll

from hsm_auth import cli
from hsm_auth.errors import InvalidToken
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier
from hsm_auth.verifier_keys import Pkcs11VerifierKeys

pytestmark = pytest.mark.softhsm

HSM_PIN = "hsm-verifier-pin-4711"


@pytest.fixture
def hsm_uri(softhsm_env, tmp_path):
    token = init_token(unique_label("verifier"), so_pin="12345678", user_pin=HSM_PIN)
    pin_file = tmp_path / "hsm.pin"
    pin_file.write_text(HSM_PIN)
    pin_file.chmod(0o600)
    return str(
        Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    )


@pytest.fixture
def verifier(tmp_path, hsm_uri):
    v = Verifier.init(tmp_path / "verifier", "HSM verifier", clock=Clock(), hsm=hsm_uri)
    yield v
    v.close()


def _objects(keys: Pkcs11VerifierKeys, object_class):
    p11, _ = keys._derive_session()
    return list(keys._session.get_objects({p11.Attribute.CLASS: object_class}))


def test_keys_live_in_the_hsm_and_are_not_extractable(tmp_path, verifier):
    assert isinstance(verifier.keys, Pkcs11VerifierKeys)
    assert not (tmp_path / "verifier" / "keys.pem").exists()
    identity = (tmp_path / "verifier" / "identity.json").read_text()
    assert HSM_PIN not in identity
    assert json.loads(identity)["keys"]["type"] == "pkcs11"
    import pkcs11

    privates = _objects(verifier.keys, pkcs11.ObjectClass.PRIVATE_KEY)
    assert len(privates) == 2
    for key in privates:
        assert key[pkcs11.Attribute.SENSITIVE] is True
        assert key[pkcs11.Attribute.EXTRACTABLE] is False


def test_otp_checks_run_in_the_hsm_and_leave_no_key_behind(tmp_path, verifier):
    import pkcs11

    device = enroll(verifier, "alice")
    cred = verifier.credential("alice", Method.DEVICE)
    data = b"ocra data input"
    assert verifier.keys.otp_mac(cred, data) == hmac.digest(device.otp_key, data, hashlib.sha256)
    s = verifier.start_session("alice", "Log in")
    otp = device.otp(s)
    assert verifier.verify(s.session_id, otp).atc == 1
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, otp)
    # Neither token nor session secret keys remain: the per-check keys were destroyed.
    assert _objects(verifier.keys, pkcs11.ObjectClass.SECRET_KEY) == []


def test_wrapped_keys_and_reopening_with_the_recorded_token(tmp_path, verifier):
    fido = enroll(verifier, "bob", Method.FACE, wrapped=True)
    verifier.close()
    with Verifier.open(tmp_path / "verifier", clock=Clock()) as again:
        assert again.keys.kind == "pkcs11"
        s = again.start_session("bob", "ctx")
        assert again.verify(s.session_id, fido.otp(s)).method is Method.FACE


def test_cli_init_with_hsm_and_admin_commands(tmp_path, hsm_uri, capsys):
    home = str(tmp_path / "home")
    assert cli.main(["--home", home, "verifier", "init", "--hsm", hsm_uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["keys"], out["database"]) == ("pkcs11", "sqlite")
    with Verifier.open(tmp_path / "home" / "verifier") as v:
        enroll(v, "carol")
    assert cli.main(["--home", home, "verifier", "show", "--user", "carol", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["credentials"][0]["failures_until_lockout"] == 10
