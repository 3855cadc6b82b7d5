"""TPM attestation on a real TPM (``--hw-tpm``) and on swtpm with an EK certificate by a
local test CA (``--emulators``): registration by credential activation, then an
enrollment whose certify statements verify up to the EK certificate's root.

On a real TPM, ``HSM_AUTH_HW_TPM_ROOTS`` names a PEM file with the TPM
manufacturer's root and the intermediate CAs of its EK certificate (the vendor
publishes them); without it the scenario skips. It makes an attestation key (a
blob in a temporary directory, nothing persistent in the TPM) and, for the
enrollment, the keys and NV counter that test_hw_scenarios.py makes too, deleted
afterwards."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from hsm_auth.attestation import AttestationResult
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import HsmAuthError
from hsm_auth.files import atomic_write, ensure_private_dir
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.registry import load_backend
from hsm_auth.testing.swtpm import (  # noqa: F401 - fixtures
    swtpm_ek,
    swtpm_ek_factory,
    swtpm_manufactured,
)
from hsm_auth.verifier import Verifier


@pytest.fixture(params=["swtpm", "tpm"])
def attested_tpm(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict, str, str]:
    """(tpm2 settings, roots file, PIN) of the TPM to attest."""
    opt = request.config.getoption
    if request.param == "swtpm":
        if not opt("emulators"):
            pytest.skip("swtpm emulator not requested (pass --emulators)")
        tpm, ca = request.getfixturevalue("swtpm_ek")
        settings = {"tcti": tpm.tcti, "state_dir": str(tmp_path / "tpm2-state")}
        return settings, str(ca.roots_file), "swtpm-pin"
    if not opt("hw_tpm"):
        pytest.skip("hardware TPM not requested (pass --hw-tpm)")
    if not os.access("/dev/tpmrm0", os.R_OK | os.W_OK):
        pytest.skip("/dev/tpmrm0 is missing or not accessible to this user")
    roots = os.environ.get("HSM_AUTH_HW_TPM_ROOTS")
    if not roots:
        pytest.skip("set HSM_AUTH_HW_TPM_ROOTS to the TPM manufacturer's root and CA PEM file")
    settings = {"tcti": "device:/dev/tpmrm0", "state_dir": str(tmp_path / "tpm2-state")}
    return settings, roots, os.environ.get("HSM_AUTH_HW_TPM_PIN", "hw-test-pin")


def test_tpm_enrollment_is_attested_to_the_manufacturer_root(attested_tpm, tmp_path):
    settings, roots, pin = attested_tpm
    directory = tmp_path / "verifier"
    ensure_private_dir(directory)
    atomic_write(directory / "policy.toml",
                 f'[methods.pin]\nattestation = "required"\nroots = ["{roots}"]\n'.encode())
    verifier = Verifier.init(directory, "hw-tests")
    uris: list[str | None] = []
    try:
        config = Config({Method.PIN: MethodConfig("tpm2", settings)})
        with Authenticator(tmp_path / "auth", config) as auth:
            auth.tpm_activate(verifier.tpm_challenge(auth.tpm_registration_request(Method.PIN)),
                              Method.PIN)
            issued = verifier.create_offer("hw", methods=[Method.PIN])
            cred = verifier.accept_enrollment(
                auth.add_or_update(
                    Method.PIN, issued.text, activation_code=issued.activation_code, pin=pin
                )
            )
            e = auth.enrolled[0]
            uris = [e.signing_key, e.otp_key, e.counter]
        assert cred.attestation is not None
        result = AttestationResult.from_json(cred.attestation)
        assert result.verified and result.format == "hsm-auth-tpm2", result
    finally:
        verifier.close()
        with contextlib.suppress(HsmAuthError), load_backend("tpm2").open(settings) as store:
            for uri in uris:
                if uri:
                    store.delete_key(uri, Authorization(pin=pin))
