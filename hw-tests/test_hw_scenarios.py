"""The end-to-end scenarios on one target (see conftest.py): enroll + offline
OTP, local login through the library, and login through a real PAM stack."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import HsmAuthError, PinInvalid
from hsm_auth.keystore import Authorization
from hsm_auth.login import AuthDir, enroll, login
from hsm_auth.methods import Method
from hsm_auth.registry import load_backend
from hsm_auth.verifier import Verifier

PAM_WRAPPER = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
PAM_MODULE = Path(__file__).resolve().parent.parent / "build" / "pam" / "pam_hsm_auth.so"


def _config(target) -> Config:
    return Config({Method(target.method): MethodConfig(target.backend, target.settings)})


def _policy(target, directory: Path) -> None:
    """The verifier's attestation policy for the target's FIDO2 method: the soft
    authenticator's AAGUID and test root named; a real key's vendor root is not
    configured here, so its attestation is recorded (if-available), not required."""
    if target.backend != "fido2":
        return
    if target.name == "soft-fido2":
        from hsm_auth.testing.fido2 import write_soft_policy
        from hsm_auth.testing.soft_fido2 import SoftAuthenticator

        device = SoftAuthenticator(target.settings["device"].removeprefix("soft:"))
        write_soft_policy(directory, [device])
        return
    from hsm_auth.attestation import POLICY_FILE
    from hsm_auth.files import atomic_write, ensure_private_dir

    ensure_private_dir(directory)
    text = f'[methods.{target.method}]\nattestation = "if-available"\n'
    atomic_write(directory / POLICY_FILE, text.encode())


def _cleanup(target, uris) -> None:
    with contextlib.suppress(HsmAuthError), load_backend(target.backend).open(
        target.settings
    ) as store:
        for uri in uris:
            if uri:
                store.delete_key(uri, Authorization(pin=target.pin))


def test_enroll_and_offline_otp(target, tmp_path):
    method = Method(target.method)
    _policy(target, tmp_path / "verifier")
    verifier = Verifier.init(tmp_path / "verifier", "hw-tests")
    uris: list[str | None] = []
    try:
        with Authenticator(tmp_path / "auth", _config(target)) as auth:
            offer = verifier.create_offer("hw", methods=[method])
            response = auth.add_or_update(
                method, offer.text, activation_code=offer.activation_code, pin=target.pin
            )
            verifier.accept_enrollment(response)
            e = auth.enrolled[0]
            uris = [e.signing_key, e.otp_key, e.counter, e.agreement_key]
            session = verifier.start_session("hw", "hw-tests login")
            request = auth.start_offline_authentication(session.text)
            otp = auth.finish_offline_authentication(request, method, pin=target.pin)
            assert verifier.verify(session.session_id, otp.otp).atc == otp.atc
    finally:
        verifier.close()
        _cleanup(target, uris)


def test_local_login(target, tmp_path):
    with AuthDir(tmp_path / "login", create=True) as authdir:
        cred = enroll(authdir, "hwuser", Method(target.method), _config(target), pin=target.pin)
        try:
            first = login(authdir, "hwuser", pin=target.pin)
            assert first.counter > cred.counter
            if target.emulated and target.pin:  # never spend a real token's PIN retries
                with pytest.raises(PinInvalid):
                    login(authdir, "hwuser", pin="wrong-" + (target.pin or ""))
            assert login(authdir, "hwuser", pin=target.pin).counter > first.counter
        finally:
            _cleanup(target, [cred.signing_key, cred.counter_uri])


def test_pam_login(target, tmp_path):
    for path, package in ((PAM_WRAPPER, "apt install libpam-wrapper"),
                          (str(PAM_MODULE), "scripts/setup builds it")):
        if not os.path.exists(path):
            pytest.skip(f"{path} not found ({package})")
    if shutil.which("pamtester") is None:
        pytest.skip("pamtester not found (apt install pamtester)")
    root = tmp_path / "pam"
    (root / "pam.d").mkdir(parents=True, mode=0o755)
    user = pwd.getpwuid(os.geteuid()).pw_name
    authdir_path = root / "login"
    with AuthDir(authdir_path, create=True) as authdir:
        # a real account: the login policy resolves PAM_USER with getpwnam
        cred = enroll(authdir, user, Method(target.method), _config(target), pin=target.pin)
    try:
        env = "".join(f'{k} = "{v}"\n' for k, v in target.helper_environment.items())
        config = root / "config.toml"
        config.write_text(f'[environment]\n{env}[login]\nauthdir = "{authdir_path}"\n'
                          f'state_dir = "{root / "state"}"\n')
        (root / "pam.d" / "hw").write_text(f"auth required {PAM_MODULE} config={config}\n")
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_PRELOAD": PAM_WRAPPER,
                   "PAM_WRAPPER": "1", "PAM_WRAPPER_SERVICE_DIR": str(root / "pam.d")}

        def pamtester(pin: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["pamtester", "-v", "hw", user, "authenticate"],
                                  input=pin + "\n", capture_output=True, text=True,
                                  env=run_env, timeout=120, check=False)

        result = pamtester(target.pin or "")
        assert result.returncode == 0, result.stdout + result.stderr
        if target.emulated and target.pin:
            assert pamtester("wrong-pin").returncode != 0
    finally:
        _cleanup(target, [cred.signing_key, cred.counter_uri])
