"""Leak test: after a full run (enrollments of ECDH and FIDO2-style methods and
a real SoftHSM PIN method, sessions, acceptances, replays, wrong and malformed
OTPs, a lockout, an unlock, a resync, an expiry, a revocation), a dump of the
verifier database and of every log line contains none of the run's secrets:
OTP keys, PINs, OTPs, or private keys, in any of the encodings a dump uses."""

from __future__ import annotations

import base64
import logging
import sqlite3
import subprocess

import pytest
from _unattested import allow_unattested_fido2_methods
from _verifier_device import Clock, enroll

from hsm_auth import ec
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import InvalidInput, InvalidToken
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm
ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
OFFLINE_PIN = "Pin-7Q4-leaky"


@pytest.fixture(params=ENGINES)
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def all_logs():
    """Every record of every logger, at DEBUG, formatted as a handler would."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _private_bytes(key) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def _forms(secret: bytes | str) -> list[bytes]:
    """The ways a dump can show a secret: raw, hex (both cases), base64, base32."""
    if isinstance(secret, str):
        return [secret.encode()]
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.b32encode(secret).rstrip(b"="),
    ]


def _dump(verifier: Verifier, directory, database) -> bytes:
    if database is None:
        db = directory / "verifier.db"
        conn = sqlite3.connect(db)
        text = "\n".join(conn.iterdump()).encode()
        conn.close()
        raw = b"".join(p.read_bytes() for p in directory.glob("verifier.db*"))
        return text + b"\n" + raw
    from hsm_auth.testing.postgres import find_bindir

    result = subprocess.run(
        [str(find_bindir() / "pg_dump"), "--no-owner", "-d", database],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def test_no_secret_in_the_database_or_the_logs(tmp_path, database, softhsm_env, all_logs):
    clock = Clock()
    directory = tmp_path / "verifier"
    allow_unattested_fido2_methods(directory)  # bob's face is a software stand-in
    v = Verifier.init(directory, "Leak test", clock=clock, database=database)
    otps: list[str] = []
    try:
        alice = enroll(v, "alice")
        bob = enroll(v, "bob", Method.FACE, wrapped=True)

        # A real PKCS#11 PIN method on SoftHSM, through the authenticator.
        token = init_token(unique_label("leak"), so_pin="so-Secret-93", user_pin=OFFLINE_PIN)
        uri = str(Pkcs11Uri(token=token.label, module_path=token.module_path))
        config = Config(
            methods={Method.PIN: MethodConfig("pkcs11", {"uri": uri, "allow_unenforced_pin": True})}
        )
        with Authenticator(tmp_path / "auth", config, clock=clock, warn=lambda m: None) as auth:
            offer = v.create_offer("carol", methods=[Method.PIN])
            v.accept_enrollment(
                auth.add_or_update(
                    Method.PIN, offer.text, activation_code=offer.activation_code, pin=OFFLINE_PIN
                )
            )
            for _ in range(2):
                s = v.start_session("carol", "Approve payment")
                request = auth.start_offline_authentication(s.text)
                otp = auth.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN).otp
                otps.append(otp)
                v.verify(s.session_id, otp)
                with pytest.raises(InvalidToken):
                    v.verify(s.session_id, otp)

        s = v.start_session("alice", "Log in")
        v.verify(s.session_id, alice.otp(s))
        s = v.start_session("alice", "Log in with a wrong OTP")
        for _ in range(v.identity.lockout_threshold):
            with pytest.raises(InvalidToken):
                v.verify(s.session_id, "00000000")
        s = v.start_session("alice", "Log in again")
        with pytest.raises(InvalidToken):  # locked: the right OTP is refused too
            v.verify(s.session_id, alice.otp(s))
        v.unlock("alice", Method.DEVICE)
        far = alice.atc + v.identity.window + 5
        v.resync(s.session_id, alice.otp(s, atc=far), alice.otp(s, atc=far + 1))
        with pytest.raises(InvalidInput):
            v.verify(s.session_id, "12345")
        s = v.start_session("bob", "Unlock door")
        v.verify(s.session_id, bob.otp(s))
        late = v.start_session("bob", "Too late")
        clock.now += v.identity.session_ttl + 1
        with pytest.raises(InvalidToken):
            v.verify(late.session_id, bob.otp(late))
        v.revoke("bob", Method.FACE)

        carol = v.credential("carol", Method.PIN)
        carol_otp_key = v.keys.otp_key(carol)
        dump = _dump(v, directory, database)
    finally:
        v.close()

    logs = "\n".join(all_logs).encode()
    assert b'"event":"accept"' in logs and b"lockout" in logs  # the logs were captured
    public = ec.encode_point(alice.agreement.public_key())
    assert any(form in dump for form in _forms(public)[1:3])  # ... and the dump is searchable

    otps += alice.otps + bob.otps
    secrets: dict[str, bytes | str] = {
        "alice OTP key": alice.otp_key,
        "bob OTP key (FIDO2-style)": bob.otp_key,
        "carol OTP key (SoftHSM)": carol_otp_key,
        "alice signing private key": _private_bytes(alice.signing),
        "alice agreement private key": _private_bytes(alice.agreement),
        "verifier signing private key": _private_bytes(v.keys._signing),
        "verifier root secret": _private_bytes(v.keys._root),
        "verifier key-encryption key": v.keys._kek_bytes,
        "offline PIN": OFFLINE_PIN,
        "SO PIN": "so-Secret-93",
    }
    secrets |= {f"OTP {otp}": otp for otp in otps}
    assert len(otps) == 8
    for name, secret in secrets.items():
        for form in _forms(secret):
            assert form not in dump, f"{name} is in the database dump"
            assert form not in logs, f"{name} is in the logs"
