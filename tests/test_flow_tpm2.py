"""The whole offline flow on a real swtpm through the library API, for the
device method (no user auth) and the pin method (auth value, DA-protected)."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from _cli import code_file

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import BackendUnavailable, InvalidToken, PinInvalid, PinLocked
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.swtpm

OFFLINE_PIN = "735190"


@pytest.fixture
def config(swtpm, tmp_path):
    # One TPM, one store: "auto" gives the pin method's keys the PIN as auth value
    # and the device method's keys an empty one (swtpm has no resource manager, so
    # two stores on it would compete for its three object slots).
    settings = {"tcti": swtpm.tcti, "state_dir": str(tmp_path / "tpm2-objects"), "auth": "auto"}
    return Config(
        methods={
            Method.DEVICE: MethodConfig("tpm2", settings),
            Method.PIN: MethodConfig("tpm2", settings),
        }
    )


@pytest.fixture
def verifier(tmp_path):
    v = Verifier.init(tmp_path / "verifier", "TPM verifier")
    yield v
    v.close()


@pytest.fixture
def enrolled(tmp_path, config, verifier):
    with Authenticator(tmp_path / "auth", config) as a:
        for method in (Method.DEVICE, Method.PIN):
            offer = verifier.create_offer("alice", methods=[method])
            pin = OFFLINE_PIN if method is Method.PIN else None
            verifier.accept_enrollment(
                a.add_or_update(method, offer.text, activation_code=offer.activation_code, pin=pin)
            )
        yield a


@pytest.mark.parametrize("method", [Method.DEVICE, Method.PIN])
def test_tpm_offline_flow_accepts_once_then_refuses_replay(verifier, enrolled, method):
    session = verifier.start_session("alice", "Unlock ws-9 for alice")
    request = enrolled.start_offline_authentication(session.text)
    pin = OFFLINE_PIN if method is Method.PIN else None
    result = enrolled.finish_offline_authentication(request, method, pin=pin)
    accepted = verifier.verify(session.session_id, result.otp)
    assert (accepted.method, accepted.atc) == (method, result.atc)
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, result.otp)


def test_tpm_counter_is_hardware_and_moves_forward(verifier, enrolled):
    atcs = []
    for _ in range(3):
        session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
        request = enrolled.start_offline_authentication(session.text)
        result = enrolled.finish_offline_authentication(request, Method.DEVICE)
        assert verifier.verify(session.session_id, result.otp).atc == result.atc
        atcs.append(result.atc)
    assert atcs[0] < atcs[1] < atcs[2]


def test_tpm_wrong_pin_counts_down_then_locks(verifier, enrolled):
    session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
    request = enrolled.start_offline_authentication(session.text)
    remaining = []
    with pytest.raises(PinLocked) as locked:  # the fixture sets 3 tries
        for _ in range(4):
            try:
                enrolled.finish_offline_authentication(request, Method.PIN, pin="000000")
            except PinInvalid as e:
                remaining.append(e.retry.retries_left)
    assert remaining and all(a > b for a, b in itertools.pairwise(remaining))
    assert locked.value.retry.retry_after is not None and locked.value.retry.retry_after > 0
    with pytest.raises(PinLocked):  # even the right PIN, while locked
        enrolled.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN)


def test_wrong_pins_on_pin_do_not_lock_out_device(verifier, enrolled):
    from hsm_auth.cli import describe

    session = verifier.start_session("alice", "ctx", methods=[Method.PIN])
    request = enrolled.start_offline_authentication(session.text)
    with pytest.raises(PinLocked):  # the fixture sets 3 tries: the TPM is now in lockout
        for _ in range(4):
            with contextlib.suppress(PinInvalid):
                enrolled.finish_offline_authentication(request, Method.PIN, pin="000000")
    with pytest.raises(PinLocked) as locked:  # the right PIN, in the lockout
        enrolled.finish_offline_authentication(request, Method.PIN, pin=OFFLINE_PIN)
    assert describe(locked.value).startswith(
        "the TPM is in dictionary-attack lockout, caused by wrong PINs (retry in "
    )
    for _ in range(2):  # the lockout is TPM-wide, but device keys have no PIN to guess
        session = verifier.start_session("alice", "device in a lockout", methods=[Method.DEVICE])
        request = enrolled.start_offline_authentication(session.text)
        result = enrolled.finish_offline_authentication(request, Method.DEVICE)
        assert verifier.verify(session.session_id, result.otp).atc == result.atc
    from hsm_auth_backends.tpm2 import Tpm2KeyStore

    with Tpm2KeyStore.open(enrolled.enrolled[0].settings) as store:
        assert store.pin_status().locked  # still: the device OTPs did not need it lifted


def test_wrong_tcti_is_a_clear_error(tmp_path, verifier):
    bad = Config(
        methods={
            Method.DEVICE: MethodConfig(
                "tpm2", {"tcti": f"swtpm:path={tmp_path}/nothing.sock", "state_dir": str(tmp_path)}
            )
        }
    )
    with Authenticator(tmp_path / "a", bad) as a:
        offer = verifier.create_offer("bob", methods=[Method.DEVICE])
        with pytest.raises(BackendUnavailable):
            a.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        assert a.enrolled == []


def test_backends_shows_the_tpm_and_its_lockout_parameters(swtpm):
    from hsm_auth.registry import probe_backend

    status = probe_backend("tpm2", {"tcti": swtpm.tcti})
    assert status.available, status.reason
    text = " ".join(f"{k}={v}" for k, v in status.details.items()).lower()
    assert "manufacturer" in text and "firmware" in text and "lockout" in text


def test_cli_reports_an_unreachable_tpm_in_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[methods.device]\nbackend = "tpm2"\ntcti = "swtpm:path={tmp_path}/none.sock"\n'
    )
    run = [sys.executable, "-m", "hsm_auth", "--home", str(home)]
    subprocess.run([*run, "verifier", "init"], check=True, capture_output=True)
    offer = subprocess.run(
        [*run, "verifier", "offer", *code_file(home), "--user", "u", "--methods", "device"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = subprocess.run(
        [*run, "enroll", *code_file(home), "--method", "device"],
        input=offer,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 22  # TokenNotFound: no TPM at that TCTI
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (home / "authenticator" / "credentials.json").exists()


# --- a killed client must not leave the TPM full (no resource manager on swtpm) ----------

_BUSY_CHILD = r"""
import sys
from pathlib import Path

from hsm_auth_backends.tpm2 import Tpm2KeyStore

from hsm_auth.authenticator import Authenticator
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method

auth_dir, tcti, state_dir, pin, device_text, pin_text, mode = sys.argv[1:]
authenticator = Authenticator(Path(auth_dir))
if mode == "otp":  # whole OTPs through the library: counter update, then the HMAC
    requests = [
        (authenticator.start_offline_authentication(device_text), Method.DEVICE, None),
        (authenticator.start_offline_authentication(pin_text), Method.PIN, pin),
    ]
    while True:
        for request, method, secret in requests:
            authenticator.finish_offline_authentication(request, method, pin=secret)
            print("otp", flush=True)
enrolled = {m.method: m for m in authenticator.enrolled}
store = Tpm2KeyStore.open({"tcti": tcti, "state_dir": state_dir, "auth": "auto"})
keys = [
    (enrolled[Method.PIN], Authorization(pin=pin)),
    (enrolled[Method.DEVICE], Authorization()),
]
while True:  # churn keys in and out of the TPM's object slots until killed
    for method, auth in keys:
        store.hmac(method.otp_key, b"m" * 1500, auth)  # > 1024 bytes: an HMAC sequence
        store.sign(method.signing_key, b"x", auth)
        store.counter_value(method.counter, auth)
    print("busy", flush=True)
"""


def _leftovers(tcti):
    """Transient objects and sessions in the TPM, read directly through tpm2-pytss."""
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HR, TPM2_HT

    with ESAPI(tcti) as ectx:
        found = []
        for kind in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION, TPM2_HT.SAVED_SESSION):
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, kind << TPM2_HR.SHIFT, 64)
            found += [int(h) for h in data.data.handles]
    return found


def test_tpm_stays_usable_after_ten_kills_in_a_row(swtpm, tmp_path, config, verifier, enrolled):
    """SIGKILL a real process at a random instant, alternately inside whole OTPs
    (counter update and HMAC, device and pin) and inside a loop that churns keys,
    sessions and an HMAC sequence; after every kill, with what it left still loaded,
    a full OTP of each method is accepted by the verifier."""
    settings = config.methods[Method.DEVICE].settings
    enrolled.close()  # no store of ours is open: the next one is the TPM's first client
    rng = random.Random(9)
    for kill in range(10):
        mode = "otp" if kill % 2 == 0 else "churn"
        texts = [
            verifier.start_session("alice", "the child's", methods=[m]).text
            for m in (Method.DEVICE, Method.PIN)
        ]
        child = subprocess.Popen(
            [sys.executable, "-c", _BUSY_CHILD, str(tmp_path / "auth"), swtpm.tcti,
             settings["state_dir"], OFFLINE_PIN, *texts, mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert child.stdout is not None
            for _ in range(rng.randint(1, 3) if mode == "otp" else 1):
                assert child.stdout.readline() in ("otp\n", "busy\n"), (
                    child.stderr.read() if child.stderr else ""
                )
            # the kill lands at a random instant inside the next OTP / round
            time.sleep(rng.uniform(0, 0.004 if mode == "otp" else 0.05))
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait()
        assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
        assert _leftovers(swtpm.tcti), f"kill {kill}: the child left nothing in the TPM"
        with Authenticator(tmp_path / "auth", config) as a:
            for method in (Method.DEVICE, Method.PIN):
                session = verifier.start_session("alice", "after a kill", methods=[method])
                request = a.start_offline_authentication(session.text)
                pin = OFFLINE_PIN if method is Method.PIN else None
                result = a.finish_offline_authentication(request, method, pin=pin)
                assert verifier.verify(session.session_id, result.otp).atc == result.atc
                synced = a.sync(verifier.sync_message("alice", method), pin=pin)
                a.apply_sync_ack(verifier.apply_sync(synced.report).ack)


def test_cli_lockout_names_its_cause_and_device_still_works(swtpm, tmp_path):
    """The CLI on one swtpm (3 tries, 2 s): wrong PINs on pin end in one line that
    names the lockout's cause and when it ends; device OTPs are still accepted."""
    home = tmp_path / "home"
    home.mkdir()
    method = f'backend = "tpm2"\ntcti = "{swtpm.tcti}"\nauth = "auto"\n'
    (home / "config.toml").write_text(f"[methods.device]\n{method}\n[methods.pin]\n{method}")
    for name, text in (("right.pin", OFFLINE_PIN), ("wrong.pin", "000000")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    right = ("--pin-file", str(tmp_path / "right.pin"))
    wrong = ("--pin-file", str(tmp_path / "wrong.pin"))

    def run(*args, stdin=""):
        return subprocess.run(
            [sys.executable, "-m", "hsm_auth", "--home", str(home), *args],
            input=stdin, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def ok(*args, stdin=""):
        done = run(*args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def error(code, *args):
        done = run(*args)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("hsm-auth: error: ")]
        return line.removeprefix("hsm-auth: error: ")

    def session(m):
        out = ok("--json", "verifier", "session", "--user", "alice", "--context", "c",
                 "--methods", m)  # fmt: skip
        doc = json.loads(out)
        return doc["session"], doc["data"]

    ok("verifier", "init")
    for m, extra in (("device", ()), ("pin", right)):
        offer = ok("verifier", "offer", *code_file(home), "--user", "alice", "--methods", m)
        response = ok("enroll", *code_file(home), "--method", m, *extra, stdin=offer)
        ok("verifier", "enroll", stdin=response)
    _, data = session("pin")
    assert error(32, "finish", "--method", "pin", *wrong, data) == "wrong PIN (2 retries left)"
    error(32, "finish", "--method", "pin", *wrong, data)
    error(33, "finish", "--method", "pin", *wrong, data)
    cause = "the TPM is in dictionary-attack lockout, caused by wrong PINs"
    assert error(33, "finish", "--method", "pin", *right, data) == f"{cause} (retry in 2 s)"
    for _ in range(2):
        sid, data = session("device")
        otp = ok("finish", "--method", "device", data)
        assert "accepted" in ok("verifier", "verify", "--session", sid, "--otp", otp)
