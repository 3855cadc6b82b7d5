"""Fault 1 of issue 9: SIGKILL a real process in the middle of making an OTP on
SoftHSM (counter update and HMAC), at many points, and check after every kill that
the counter is still there, never went back, and that the next OTP is accepted by
the verifier.

The killed processes are forked by tests/_otp_killee.py, which has imported
everything already, so each one costs a PKCS#11 initialisation, not a Python
start-up. Each logs in, then makes ``OTPS`` OTPs (the first finds and reads the
counter's objects, as ``hsm-auth finish`` does, the others use cached handles) and
is killed after a delay that sweeps across them; CLOCK_MONOTONIC stamps from the
child tell where inside an OTP each kill landed. Before every third child the test
destroys the counter object to be written next, as a torn write leaves it, so that
kills also land in its re-creation.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = [pytest.mark.softhsm, pytest.mark.slow]

KILLS = 60  # kills that must land inside an OTP, at distinct (OTP, microsecond) points
OTPS = 4  # per child: fewer than the verifier's look-ahead window (10)
KILLEE = Path(__file__).with_name("_otp_killee.py")


class Zygote:
    def __init__(self, directory: Path, uri: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(KILLEE), str(directory), uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.fd = self.proc.stdout.fileno()  # read raw: select() and a buffer don't mix
        self.pending = b""

    def line(self, timeout: float = 60.0) -> str:
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, "the killee stopped answering"
            chunk = os.read(self.fd, 65536)
            assert chunk, "the killee exited"
            self.pending += chunk
        text, _, self.pending = self.pending.partition(b"\n")
        return text.decode()

    def run(self, session: str, kill_after: float | None) -> tuple[list[str], int, int | None]:
        """One child: returns its lines, its wait status and the kill instant (ns)."""
        self.stdin.write(f"run {OTPS} {session}\n")
        self.stdin.flush()
        lines: list[str] = []
        pid = None
        while pid is None or not any(x.startswith(("ready", "error")) for x in lines):
            text = self.line()
            if text.startswith("pid "):
                pid = int(text.split()[1])
            else:
                lines.append(text)
        killed_at = None
        if kill_after is not None:
            deadline = time.perf_counter() + kill_after
            while time.perf_counter() < deadline:
                pass  # busy-wait: sleep() is too coarse for microseconds
            killed_at = time.monotonic_ns()
            os.kill(pid, signal.SIGKILL)  # not reaped yet: still our child's pid
        else:
            while "done" not in lines and not any(x.startswith("error") for x in lines):
                lines.append(self.line())
        self.stdin.write("reap\n")
        self.stdin.flush()
        while True:
            text = self.line()
            if text.startswith(f"exit {pid} "):
                return lines, int(text.split()[2]), killed_at
            lines.append(text)

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)


def test_sigkill_during_otp_never_loses_the_counter(softhsm_env, tmp_path):  # type: ignore[no-untyped-def]
    token = init_token(unique_label("kill"), so_pin="12345678", user_pin="kill-1234")
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin_file}"))
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": uri})})
    directory = tmp_path / "auth"
    verifier = Verifier.init(tmp_path / "verifier", "Kill test")
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    with Authenticator(directory, config) as auth:
        verifier.accept_enrollment(
            auth.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        )
        counter = auth.enrolled[0].counter
    store = Pkcs11KeyStore.open({"uri": uri})
    no_pin = Authorization()
    ident = store._ref(counter).id

    def session_text() -> str:
        return verifier.start_session("alice", "kill test", methods=[Method.DEVICE]).text

    def next_otp_is_accepted() -> int:
        session = verifier.start_session("alice", "after a kill", methods=[Method.DEVICE])
        with Authenticator(directory, config) as auth:
            request = auth.start_offline_authentication(session.text)
            otp = auth.finish_offline_authentication(request, Method.DEVICE)
            accepted = verifier.verify(session.session_id, otp.otp)
            assert accepted.atc == otp.atc
            synced = auth.sync(verifier.sync_message("alice", Method.DEVICE))
            auth.apply_sync_ack(verifier.apply_sync(synced.report).ack)
        return otp.atc

    zygote = Zygote(directory, uri)
    try:
        # Calibrate: a child that is not killed; its stamps give the time to sweep.
        lines, status, _ = zygote.run(session_text(), None)
        assert status == 0 and lines[-1] == "done", lines
        stamps = [int(x.split()[1 if x.startswith("ready") else 3]) for x in lines[:-1]]
        span = (stamps[-1] - stamps[0]) / 1e9
        cold = (stamps[1] - stamps[0]) / 1e9  # the first OTP finds and reads the objects
        high = max(int(x.split()[1]) for x in lines if x.startswith("otp "))
        assert store.counter_value(counter, no_pin) == high
        last = next_otp_is_accepted()

        inside: list[tuple[int, int]] = []  # (OTP index, ns into it) per kill inside an OTP
        torn = 0  # kills after which one of the two counter objects was gone or damaged
        attempt = 0
        while len({(i, ns // 1000) for i, ns in inside}) < KILLS and attempt < 4 * KILLS:
            # A low-discrepancy sweep, alternately of the first OTP and of the others.
            start, width = (0.0, cold) if attempt % 2 else (cold, span - cold)
            delay = start + width * ((attempt * 0.618034) % 1.0)
            attempt += 1
            recreate = attempt % 3 == 0
            if recreate:  # as a torn write leaves it: the slot to write next is gone
                state = store._read_atc(ident)
                victim = state.objects[state.target]
                assert victim is not None
                victim.destroy()
            lines, status, killed_at = zygote.run(session_text(), delay)
            assert not [x for x in lines if x.startswith("error")], lines
            released = [x.split() for x in lines if x.startswith("otp ")]
            for _, atc, _, _ in released:
                assert int(atc) > last, "an OTP for a value that was released before"
                last = int(atc)
            # After every kill: the counter is there, and not below any released value.
            value = store.counter_value(counter, no_pin)
            assert value >= last
            if not recreate:
                torn += None in store._read_atc(ident).values
            if os.WIFSIGNALED(status) and "done" not in lines:
                assert killed_at is not None
                begun = int(released[-1][3]) if released else int(lines[0].split()[1])
                inside.append((len(released), killed_at - begun))
            accepted = next_otp_is_accepted()
            assert accepted > max(value, last)
            last = accepted
    finally:
        zygote.close()
        store.close()
        verifier.close()
    points = {(index, ns // 1000) for index, ns in inside}
    print(
        f"\n{len(inside)} kills inside an OTP in {attempt} runs, {len(points)} distinct "
        f"(OTP, us) points, per OTP index {[sum(i == k for i, _ in inside) for k in range(OTPS)]}"
        f", {torn} real kills left one counter object gone or damaged; final ATC {last}"
    )
    assert len(points) >= KILLS
