"""`hsm-auth demo`, the README's first command, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hsm_auth.testing.softhsm import softhsm_available
from hsm_auth.testing.swtpm import manufacturing_available


@pytest.mark.softhsm
def test_demo_runs_every_method_and_refuses_every_replay(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "HSM_AUTH_HOME")}
    result = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(tmp_path), "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for method in ("device", "pin", "biometric", "face"):
        assert f"verifier accepted demo with {method}" in out
    assert out.count("replaying the same OTP: refused") == 4
    assert out.count("stored the verifier's certificate for") == 4  # the device certificates
    if manufacturing_available() is None:  # the demo TPM has an EK certificate
        assert "attestation of device: hsm-auth-tpm2, verified (CN=swtpm-localca-rootca)" in out
    assert "Traceback" not in result.stderr
    # the demo's swtpm was stopped: nothing is listening on its socket any more
    sock = tmp_path / "demo" / "swtpm" / "tpm.sock"
    if sock.exists():
        import socket

        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.connect(str(sock))
