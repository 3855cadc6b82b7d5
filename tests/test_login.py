"""Local login verification (hsm_auth.login) on real SoftHSM tokens: enroll,
challenge signed in the token, checked against the enrolled key, counter
forward; the authfile's safety checks; the FIDO2 assertion format."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_auth import login as L
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    AlreadyEnrolled,
    InvalidInput,
    InvalidToken,
    PinInvalid,
    StateError,
    UnknownMethod,
)
from hsm_auth.methods import Method
from hsm_auth.pam import read_config
from hsm_auth.registry import load_backend
from hsm_auth.testing.softhsm import init_token, unique_label

PIN = "135790"


@pytest.fixture
def authdir(tmp_path):
    d = tmp_path / "login"
    with L.AuthDir(d, create=True) as a:
        yield a


@pytest.fixture
def config(softhsm_env):
    token = init_token(unique_label("login"), so_pin="12345678", user_pin=PIN)
    return Config({Method.PIN: MethodConfig("pkcs11", {"uri": token.uri,
                                                       "allow_unenforced_pin": True})})


@pytest.mark.softhsm
def test_enroll_records_public_key_and_login_moves_counter(authdir, config):
    cred = L.enroll(authdir, "alice", Method.PIN, config, pin=PIN)
    stored = authdir.read("alice")
    assert stored == [cred] and cred.format == L.ECDSA_P256_SHA256 and cred.counter >= 1
    with load_backend("pkcs11").open(cred.settings) as store:
        token_key = store.public_key(cred.signing_key, L.Authorization(pin=PIN))
    assert token_key.public_bytes(serialization.Encoding.X962,
                                  serialization.PublicFormat.UncompressedPoint) == cred.public_key
    mode = os.stat(authdir.path / "alice").st_mode & 0o777
    assert mode == 0o644
    first = L.login(authdir, "alice", pin=PIN)
    second = L.login(authdir, "alice", pin=PIN)
    assert cred.counter < first.counter < second.counter
    assert authdir.read("alice")[0].counter == second.counter  # type: ignore[index]


@pytest.mark.softhsm
def test_wrong_pin_unenrolled_and_reenroll(authdir, config):
    L.enroll(authdir, "alice", Method.PIN, config, pin=PIN)
    before = authdir.read("alice")
    with pytest.raises(PinInvalid):
        L.login(authdir, "alice", pin="000000")
    assert authdir.read("alice") == before
    with pytest.raises(UnknownMethod):
        L.login(authdir, "bob", pin=PIN)
    with pytest.raises(UnknownMethod):
        L.login(authdir, "alice", pin=PIN, method=Method.DEVICE)
    with pytest.raises(AlreadyEnrolled):
        L.enroll(authdir, "alice", Method.PIN, config, pin=PIN)
    new = L.enroll(authdir, "alice", Method.PIN, config, pin=PIN, replace_existing=True)
    assert authdir.read("alice") == [new] and new.signing_key != before[0].signing_key  # type: ignore[index]
    assert L.login(authdir, "alice", pin=PIN).counter > new.counter


@pytest.mark.softhsm
def test_proof_is_bound_to_host_user_challenge_and_counter(authdir, config):
    cred = L.enroll(authdir, "alice", Method.PIN, config, pin=PIN)
    challenge = os.urandom(L.CHALLENGE_BYTES)
    host = socket.gethostname()
    with load_backend("pkcs11").open(cred.settings) as store:
        proof = L.make_proof(store, cred, host, "alice", challenge, L.Authorization(pin=PIN))
    assert L.verify_proof(cred, host, "alice", challenge, proof) == proof.counter
    for args in [("other-host", "alice", challenge), (host, "mallory", challenge),
                 (host, "alice", os.urandom(32))]:
        with pytest.raises(InvalidToken, match="signature"):
            L.verify_proof(cred, *args, proof)
    with pytest.raises(InvalidToken, match="signature"):
        L.verify_proof(cred, host, "alice", challenge, replace(proof, counter=proof.counter + 1))
    with pytest.raises(InvalidToken, match="counter"):  # replay after the counter was stored
        L.verify_proof(replace(cred, counter=proof.counter), host, "alice", challenge, proof)
    rogue = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    with pytest.raises(InvalidToken):
        L.verify_proof(replace(cred, public_key=rogue), host, "alice", challenge, proof)


def test_message_layout_and_short_challenge():
    msg = L.login_message("ws", "al", b"\x01" * 16, 5)
    assert msg == L.DOMAIN + b"\x00\x02ws" + b"\x00\x02al" + b"\x00\x10" + b"\x01" * 16 + (
        (5).to_bytes(8, "big"))
    with pytest.raises(InvalidInput):
        L.login_message("ws", "al", b"\x01" * 15, 5)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 70, "al ice", "a\x00"])
def test_bad_user_names_are_refused(authdir, name):
    with pytest.raises(InvalidInput):
        authdir.read(name)


def _write(authdir, user, text, mode=0o644):
    path = authdir.path / user
    path.write_text(text)
    path.chmod(mode)
    return path


def test_unsafe_or_malformed_authfiles_are_refused(authdir, tmp_path):
    ok = json.dumps({"version": 1, "user": "carol", "credentials": []})
    _write(authdir, "carol", ok)
    assert authdir.read("carol") == []
    _write(authdir, "carol", ok, 0o666)
    with pytest.raises(StateError, match="writable"):
        authdir.read("carol")
    os.unlink(authdir.path / "carol")
    target = tmp_path / "elsewhere"
    target.write_text(ok)
    (authdir.path / "carol").symlink_to(target)
    with pytest.raises(StateError, match="cannot open"):
        authdir.read("carol")
    os.unlink(authdir.path / "carol")
    for bad in ["{", json.dumps({"version": 1, "user": "dave", "credentials": []}),
                json.dumps({"version": 2, "user": "carol", "credentials": []}),
                json.dumps({"version": 1, "user": "carol", "credentials": [{"method": "pin"}]})]:
        _write(authdir, "carol", bad)
        with pytest.raises(StateError):
            authdir.read("carol")


def test_unsafe_directories_are_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(StateError, match="writable"):
        L.AuthDir(d)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "open")
    with pytest.raises(StateError):
        L.AuthDir(link)
    with pytest.raises(StateError, match="does not exist"):
        L.AuthDir(tmp_path / "missing")


def test_config_symlinks_and_writable_configs_refused(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("[login]\ntimeout = 5\n")
    assert read_config(real)["login"]["timeout"] == 5
    (tmp_path / "link.toml").symlink_to(real)
    with pytest.raises(StateError):
        read_config(tmp_path / "link.toml")
    real.chmod(0o666)
    with pytest.raises(StateError, match="writable"):
        read_config(real)


def _fido_cred(method: Method, counter: int = 3):
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    cred = L.LoginCredential(method, "fido2", {"rp_id": "hsm-auth"}, "fido2:cred", None, public,
                             L.FIDO2_ASSERTION, counter, 0)
    return key, cred


def _assert(key, host, user, challenge, *, counter=9, flags=0x05, rp="hsm-auth"):
    auth_data = hashlib.sha256(rp.encode()).digest() + bytes([flags]) + counter.to_bytes(4, "big")
    client = hashlib.sha256(L.login_message(host, user, challenge, None)).digest()
    sig = key.sign(auth_data + client, ec.ECDSA(hashes.SHA256()))
    return L.LoginProof(counter, sig, auth_data)


def test_fido2_assertion_format():
    """The verifier side of the format a FIDO2 backend plugs into (CTAP2 assertion layout)."""
    key, cred = _fido_cred(Method.BIOMETRIC)
    ch = os.urandom(32)
    assert L.verify_proof(cred, "ws", "al", ch, _assert(key, "ws", "al", ch)) == 9
    bad = [
        (_assert(key, "ws", "al", ch, rp="evil"), "relying party"),
        (_assert(key, "ws", "al", ch, flags=0x04), "presence"),
        (_assert(key, "ws", "al", ch, flags=0x01), "verification"),
        (_assert(key, "ws", "al", ch, counter=3), "counter"),
        (_assert(key, "ws", "bob", ch), "signature"),
    ]
    for proof, reason in bad:
        with pytest.raises(InvalidToken, match=reason):
            L.verify_proof(cred, "ws", "al", ch, proof)
    _, device = _fido_cred(Method.DEVICE)
    device = replace(device, public_key=cred.public_key)
    assert L.verify_proof(device, "ws", "al", ch, _assert(key, "ws", "al", ch, flags=0x01)) == 9


@pytest.mark.softhsm
def test_cli_login_enroll_and_check(tmp_path, softhsm_env):
    token = init_token(unique_label("cli"), so_pin="12345678", user_pin=PIN)
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[methods.pin]\nbackend = "pkcs11"\nuri = "{token.uri}"\nallow_unenforced_pin = true\n'
        f'[environment]\nSOFTHSM2_CONF = "{softhsm_env.conf}"\n'
        f'[login]\nauthdir = "{tmp_path / "authdir"}"\n'
    )
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hsm_auth", "--home", str(home), "--json",
                               "login", *args], capture_output=True, text=True, env=env,
                              timeout=60, check=False)

    r = cli("enroll", "--user", "erin", "--method", "pin", "--pin-file", str(pin_file))
    assert r.returncode == 0, r.stderr
    start = json.loads(r.stdout)["counter"]
    r = cli("check", "--user", "erin", "--pin-file", str(pin_file))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counter"] > start
    bad = tmp_path / "bad"
    bad.write_text("000000")
    bad.chmod(0o600)
    r = cli("check", "--user", "erin", "--pin-file", str(bad))
    assert r.returncode == 32 and "Traceback" not in r.stderr
    r = cli("check", "--user", "nobody", "--pin-file", str(pin_file))
    assert r.returncode == UnknownMethod.exit_code
