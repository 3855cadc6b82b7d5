"""The process that test_pkcs11_kill.py kills: a zygote that imports everything once,
then forks one child per command; each child opens the authenticator on SoftHSM and
makes OTPs (``Authenticator.finish_offline_authentication``) until it is killed.

The zygote never loads the PKCS#11 module (``pkcs11.lib``) itself, so every child
initialises SoftHSM afresh, as ``hsm-auth finish`` does. Protocol, one line each:

* argv[1]: the authenticator directory, argv[2]: the token's pkcs11: URI;
* stdin  ``run N VERIFICATION-DATA`` → stdout ``pid P`` (zygote), then from the child
  ``ready T`` once it is logged in to the token, and after each OTP released
  ``otp ATC OTP T`` (T: CLOCK_MONOTONIC ns),
  ``done`` after N OTPs; stdin ``reap`` → ``exit P STATUS`` (the zygote reaped it);
* a child that fails writes ``error TEXT`` and exits 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pkcs11  # noqa: F401 - the binding only; the module is loaded by each child

from hsm_auth import registry
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # unbuffered: nothing to lose at SIGKILL or fork


def _child(directory: Path, config: Config, count: int, text: str) -> None:
    try:
        with Authenticator(directory, config) as auth:
            request = auth.start_offline_authentication(text)
            (enrolled,) = auth.enrolled
            # Open the store and log in (pin-source) first: SoftHSM rewrites token.object
            # in place at every C_Login, so a kill there destroys the whole token (see
            # README). The kills are aimed at the counter update and the HMAC.
            with auth._store(enrolled.backend, enrolled.settings, Method.DEVICE):
                pass
            _say(f"ready {time.monotonic_ns()}")
            for _ in range(count):
                otp = auth.finish_offline_authentication(request, Method.DEVICE)
                _say(f"otp {otp.atc} {otp.otp} {time.monotonic_ns()}")
        _say("done")
    except BaseException as e:  # report anything to the test, never a traceback
        _say(f"error {type(e).__name__}: {e}")
        os._exit(1)
    os._exit(0)


def main() -> None:
    directory, uri = Path(sys.argv[1]), sys.argv[2]
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": uri})})
    registry.load_backend("pkcs11")  # import the backend module before forking
    for line in sys.stdin:
        command, count, text = line.split(" ", 2)
        assert command == "run"
        pid = os.fork()
        if pid == 0:
            _child(directory, config, int(count), text.strip())
        _say(f"pid {pid}")
        # Reap only when told: until then the pid stays ours (a zombie at worst), so
        # the test's SIGKILL can never reach a process that reused the number.
        assert sys.stdin.readline() == "reap\n"
        _, status = os.waitpid(pid, 0)
        _say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
