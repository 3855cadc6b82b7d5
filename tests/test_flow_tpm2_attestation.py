"""TPM attestation in the enrollment flow (issue 11): registration by credential
activation, then enrollments whose certify statements the verifier checks up to the
EK certificate of the swtpm fixture's CA, stored and shown by ``verifier show``."""

from __future__ import annotations

import json

import pytest
from _cli import cli_ok, code_file, error_line, run_cli

from hsm_auth.attestation import AttestationRefused, AttestationResult
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.swtpm

PIN = "735190"
VERIFIED = "hsm-auth-tpm2, verified (CN=swtpm-localca-rootca)"


def _policy(directory, roots, mode="required"):
    text = "".join(
        f'[methods.{m}]\nattestation = "{mode}"\nroots = ["{roots}"]\n' for m in ("device", "pin")
    )
    (directory / "policy.toml").write_text(text)
    (directory / "policy.toml").chmod(0o600)


@pytest.fixture
def tpm_config(swtpm_ek, tmp_path):
    tpm, ca = swtpm_ek
    settings = {"tcti": tpm.tcti, "state_dir": str(tmp_path / "tpm2-objects"), "auth": "auto"}
    config = Config(
        methods={m: MethodConfig("tpm2", settings) for m in (Method.DEVICE, Method.PIN)}
    )
    return config, ca


@pytest.fixture
def verifier(tpm_config, tmp_path):
    _, ca = tpm_config
    Verifier.init(tmp_path / "verifier", "TPM verifier").close()
    _policy(tmp_path / "verifier", ca.roots_file)
    v = Verifier.open(tmp_path / "verifier")
    yield v
    v.close()


def test_registered_tpm_enrollments_are_verified_stored_and_usable(
    tpm_config, verifier, tmp_path
):
    config, _ = tpm_config
    with Authenticator(tmp_path / "auth", config) as a:
        a.tpm_activate(verifier.tpm_challenge(a.tpm_registration_request()))
        for method in (Method.DEVICE, Method.PIN):
            offer = verifier.create_offer("alice", methods=[method])
            pin = PIN if method is Method.PIN else None
            response = a.add_or_update(
                method, offer.text, activation_code=offer.activation_code, pin=pin
            )
            verifier.accept_enrollment(response)
        for cred in verifier.show("alice").credentials:
            result = AttestationResult.from_json(cred.attestation)
            assert result.summary == VERIFIED
            assert ("noDA" in result.details["signing_key"]) is (cred.method is Method.DEVICE)
        session = verifier.start_session("alice", "Unlock ws-9", methods=[Method.PIN])
        request = a.start_offline_authentication(session.text)
        otp = a.finish_offline_authentication(request, Method.PIN, pin=PIN).otp
        assert verifier.verify(session.session_id, otp).method is Method.PIN


def test_an_unregistered_tpm_is_refused_where_attestation_is_required(
    tpm_config, verifier, tmp_path
):
    config, _ = tpm_config
    with Authenticator(tmp_path / "auth", config) as a:
        offer = verifier.create_offer("alice", methods=[Method.DEVICE])
        with pytest.raises(AttestationRefused, match="requires an attestation"):
            response = a.add_or_update(
                Method.DEVICE, offer.text, activation_code=offer.activation_code
            )
            verifier.accept_enrollment(response)
        # An AK that no verifier activated: the statements verify, the binding is missing.
        a.tpm_registration_request()
        offer = verifier.create_offer("alice", methods=[Method.PIN])
        with pytest.raises(AttestationRefused, match="not registered with this verifier"):
            response = a.add_or_update(
                Method.PIN, offer.text, activation_code=offer.activation_code, pin=PIN
            )
            verifier.accept_enrollment(response)


def test_cli_registers_the_tpm_and_verifier_show_reports_the_attestation(swtpm_ek, tmp_path):
    tpm, ca = swtpm_ek
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(f'[methods.device]\nbackend = "tpm2"\ntcti = "{tpm.tcti}"\n')
    cli_ok(home, "verifier", "init", "--name", "TPM verifier")
    _policy(home / "verifier", ca.roots_file)
    request = cli_ok(home, "tpm", "register")
    challenge = cli_ok(home, "verifier", "tpm-challenge", stdin=request)
    assert "registered" in cli_ok(home, "tpm", "activate", challenge)
    code = code_file(home)
    offer = cli_ok(home, "verifier", "offer", *code, "--user", "alice", "--methods", "device")
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)
    assert VERIFIED in cli_ok(home, "verifier", "show", "--user", "alice")
    shown = json.loads(cli_ok(home, "--json", "verifier", "show", "--user", "alice"))
    assert "verified (CN=swtpm-localca-rootca)" in shown["credentials"][0]["attestation"]


def test_cli_refuses_registration_from_an_unknown_ca_in_one_line(swtpm_ek_factory, tmp_path):
    _, trusted = swtpm_ek_factory("tpm")
    stranger, _ = swtpm_ek_factory("stranger", ca="other-ca")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(
        f'[methods.device]\nbackend = "tpm2"\ntcti = "{stranger.tcti}"\n'
    )
    cli_ok(home, "verifier", "init")
    _policy(home / "verifier", trusted.roots_file)
    request = cli_ok(home, "tpm", "register")
    result = run_cli(home, "verifier", "tpm-challenge", stdin=request)
    assert "does not chain to a configured TPM manufacturer root" in error_line(result, 6)
