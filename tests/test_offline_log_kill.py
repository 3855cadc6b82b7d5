"""kill -9 while the offline log is appended to (issue 14, docs/PROTOCOL.md §19):
never a broken chain, never a lost entry of a released OTP.

1. A forked child appends entries in a loop (ECDSA heads with a software key, so the
   kills land densely inside the append itself: the line's write, its fsync, the cut
   of a torn tail) and reports each entry once ``append`` returned; it is killed
   after a delay that sweeps across an append. After every kill the log parses, its
   seqs run 0..n, the verifier's check finds no alert, and every reported entry is
   there; the next child goes on appending to the same file.
2. The real path on SoftHSM: children of tests/_otp_killee.py make OTPs with
   ``finish_offline_authentication`` and are killed at sweeping delays; every OTP a
   child released has its entry, and the chain stays whole.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as pyec

from hsm_auth import ec
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.files import atomic_write_json, read_json
from hsm_auth.methods import Method
from hsm_auth.offline_audit import check_entries
from hsm_auth.offline_log import OfflineLog, data_hash
from hsm_auth.store.base import CredentialRecord
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.transcript import credential_id
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

KILLS = 150
VERIFIER_ID = b"V" * 16


def _record(public: bytes, user: str = "alice") -> CredentialRecord:
    return CredentialRecord(user, Method.DEVICE, "pkcs11", public, None, None, "suite", 0, 0)


def _check_log(log: OfflineLog, cred: CredentialRecord, must_hold: set[int]) -> int:
    """The log as the verifier would check it: no alert; returns its length."""
    cid = credential_id(cred.signing_key)
    entries = log.entries(cid)  # raises StateError on a line that does not parse
    assert [e.seq for e in entries] == list(range(len(entries)))
    keep, alerts = check_entries(cred, VERIFIER_ID, log.raw_entries(cid), {}, now=0)
    assert alerts == [] and len(keep) == len(entries)
    missing = must_hold - {e.atc for e in entries}
    assert not missing, f"released but not logged: {sorted(missing)}"
    return len(entries)


def _append_forever(log: OfflineLog, key: pyec.EllipticCurvePrivateKey, cid: bytes,
                    start: int, out: int) -> None:
    def sign(message: bytes) -> bytes:
        return ec.der_to_raw(key.sign(message, pyec.ECDSA(hashes.SHA256())))

    atc = start
    try:
        while True:
            atc += 1
            log.append(time=int(time.time()), verifier_id=VERIFIER_ID, tenant=None,
                       user="alice", method=Method.DEVICE, credential_id=cid, atc=atc,
                       data=data_hash(f"use {atc}"), sign=sign)
            os.write(out, f"{atc}\n".encode())  # "released": after the append returned
    finally:
        os._exit(1)


def test_kill_9_during_append_never_breaks_the_chain_or_loses_an_entry(tmp_path: Path) -> None:
    key = pyec.generate_private_key(pyec.SECP256R1())
    public = ec.encode_point(key.public_key())
    cred = _record(public)
    cid = credential_id(public)
    log = OfflineLog(tmp_path / "auth")
    released: set[int] = set()
    atc = 0
    torn = 0
    for attempt in range(KILLS):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            _append_forever(log, key, cid, atc, write)
        os.close(write)
        # Wait for the first append (the child is running), then a sweeping delay of
        # up to ~3 appends: the kill lands anywhere inside one.
        ready, _, _ = select.select([read], [], [], 30)
        assert ready
        deadline = time.perf_counter() + 0.004 * ((attempt * 0.618034) % 1.0)
        while time.perf_counter() < deadline:
            pass
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        reported = [int(x) for x in b"".join(chunks).split()]
        released.update(reported)
        torn += not log.path(cid).read_bytes().endswith(b"\n")
        entries = _check_log(log, cred, released)
        atc = max([atc, *reported, *(e.atc for e in log.entries(cid))])
        assert entries >= len(released)
    print(f"\n{KILLS} kills, {len(released)} entries reported, {torn} left a torn last line")


KILLEE_OTPS = 4
KILLEE_RUNS = 30


@pytest.mark.softhsm
def test_kill_9_during_finish_keeps_every_released_otp_in_the_log(softhsm_env, tmp_path):  # type: ignore[no-untyped-def]
    from test_pkcs11_kill import Zygote  # the zygote that forks OTP-making children

    token = init_token(unique_label("logkill"), so_pin="12345678", user_pin="kill-1234")
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin_file}"))
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": uri})})
    directory = tmp_path / "auth"
    Verifier.init(tmp_path / "verifier", "Kill test").close()
    identity = read_json(tmp_path / "verifier" / "identity.json")
    atomic_write_json(tmp_path / "verifier" / "identity.json", {**identity, "window": 200})
    verifier = Verifier.open(tmp_path / "verifier")  # every run's OTPs stay in the window
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    with Authenticator(directory, config) as auth:
        verifier.accept_enrollment(
            auth.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        )
    [cred] = verifier.store.credentials("alice")
    log = OfflineLog(directory)
    verifier_id = verifier.identity.verifier_id

    def check(released: set[int]) -> None:
        cid = credential_id(cred.signing_key)
        entries = log.entries(cid)
        assert [e.seq for e in entries] == list(range(len(entries)))
        _, alerts = check_entries(cred, verifier_id, log.raw_entries(cid), {}, now=0)
        assert alerts == []
        assert released <= {e.atc for e in entries}

    def session_text() -> str:
        return verifier.start_session("alice", "kill test", methods=[Method.DEVICE]).text

    zygote = Zygote(directory, uri)
    released: set[int] = set()
    try:
        lines, status, _ = zygote.run(session_text(), None)  # calibrate: not killed
        assert status == 0 and lines[-1] == "done", lines
        stamps = [int(x.split()[3]) for x in lines if x.startswith("otp ")]
        per_otp = (stamps[-1] - stamps[0]) / (len(stamps) - 1) / 1e9  # warm OTPs
        released |= {int(x.split()[1]) for x in lines if x.startswith("otp ")}
        check(released)
        for attempt in range(KILLEE_RUNS):
            # Kill a sweeping delay after the child's first OTP: inside its second
            # (counter, HMAC, head signature, log append) or third.
            delay = 2 * per_otp * ((attempt * 0.618034) % 1.0)
            lines = _run_and_kill(zygote, session_text(), delay)
            assert not [x for x in lines if x.startswith("error")], lines
            released |= {int(x.split()[1]) for x in lines if x.startswith("otp ")}
            check(released)
    finally:
        zygote.close()
        verifier.close()
    print(f"\n{KILLEE_RUNS} killed finish runs, {len(released)} OTPs released, all logged")


def _run_and_kill(zygote, text: str, delay: float) -> list[str]:  # type: ignore[no-untyped-def]
    """One child of the zygote, SIGKILLed ``delay`` s after it released its first OTP."""
    zygote.stdin.write(f"run {KILLEE_OTPS} {text}\n")
    zygote.stdin.flush()
    lines: list[str] = []
    pid = None
    while pid is None or not any(x.startswith(("otp", "error", "done")) for x in lines):
        line = zygote.line()
        if line.startswith("pid "):
            pid = int(line.split()[1])
        else:
            lines.append(line)
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline:
        pass  # busy-wait: sleep() is too coarse
    os.kill(pid, signal.SIGKILL)  # not reaped yet: still our child's pid
    zygote.stdin.write("reap\n")
    zygote.stdin.flush()
    while not (line := zygote.line()).startswith(f"exit {pid} "):
        lines.append(line)
    return lines


def test_a_torn_last_line_is_ignored_and_cut_by_the_next_append(tmp_path: Path) -> None:
    """What a crash mid-write (power loss) leaves: a last line without its newline."""
    key = pyec.generate_private_key(pyec.SECP256R1())
    public = ec.encode_point(key.public_key())
    cid = credential_id(public)
    log = OfflineLog(tmp_path / "auth")

    def sign(message: bytes) -> bytes:
        return ec.der_to_raw(key.sign(message, pyec.ECDSA(hashes.SHA256())))

    def append(atc: int) -> None:
        log.append(time=1, verifier_id=VERIFIER_ID, tenant="acme", user="alice",
                   method=Method.DEVICE, credential_id=cid, atc=atc, data=data_hash("x"),
                   sign=sign)

    append(1)
    append(2)
    whole = log.path(cid).read_bytes()
    log.path(cid).write_bytes(whole + whole.splitlines(keepends=True)[-1][:57])  # torn
    assert [e.atc for e in log.entries(cid)] == [1, 2]
    append(3)
    assert log.path(cid).read_bytes().startswith(whole)
    assert _check_log(log, _record(public), {1, 2, 3}) == 3
