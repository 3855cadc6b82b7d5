"""The verifier's attestation policy (issue 11): what it stores about a token is what
it checked, never the client's ``backend`` claim; ``policy.toml`` is validated."""

from __future__ import annotations

import pytest
from _verifier_device import Clock, PythonDevice

from hsm_auth.attestation import (
    AttestationMode,
    AttestationRefused,
    AttestationResult,
    VerifierPolicy,
)
from hsm_auth.errors import ConfigError, StateError, UnknownMethod
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier


def _verifier(tmp_path, policy: str | None = None) -> Verifier:
    Verifier.init(tmp_path / "v", "Bank").close()
    if policy is not None:
        (tmp_path / "v" / "policy.toml").write_text(policy)
        (tmp_path / "v" / "policy.toml").chmod(0o600)
    return Verifier.open(tmp_path / "v", clock=Clock())


def test_an_unattested_enrollment_is_recorded_as_unattested_whatever_it_claims(tmp_path):
    with _verifier(tmp_path) as v:
        device = PythonDevice()  # its response says backend "python"; it has no attestation
        offer = v.create_offer("alice", methods=[Method.DEVICE])
        saved = v.accept_enrollment(device.enroll(offer, Method.DEVICE))
        stored = v.credential("alice", Method.DEVICE).attestation
        assert stored is not None and saved.attestation == stored
        assert AttestationResult.from_json(stored) == AttestationResult("unattested", False)


def test_a_method_that_requires_attestation_refuses_one_without(tmp_path):
    policy = '[methods.device]\nattestation = "required"\n'
    with _verifier(tmp_path, policy) as v:
        assert v.policy.for_method(Method.DEVICE).attestation is AttestationMode.REQUIRED
        offer = v.create_offer("alice", methods=[Method.DEVICE])
        with pytest.raises(AttestationRefused, match="requires an attestation"):
            v.accept_enrollment(PythonDevice().enroll(offer, Method.DEVICE))
        with pytest.raises(UnknownMethod):
            v.credential("alice", Method.DEVICE)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("colour = 1\n", "unknown policy key 'colour'"),
        ("allow_override = 'yes'\n", "allow_override must be true or false"),
        ('[methods.device]\nattestation = "always"\n', "required, if-available or none"),
        ("[methods.device]\nroots = 'x.pem'\n", "roots must be a list"),
        ('[methods.face]\naaguid_deny = ["xyz"]\n', "AAGUIDs"),
        ("[methods.device]\ncolour = 1\n", "unknown key 'colour'"),
        ("[methods.tentacle]\n", "unknown method"),
    ],
)
def test_a_bad_policy_file_is_one_clear_error(tmp_path, text, why):
    Verifier.init(tmp_path / "v", "Bank").close()
    path = tmp_path / "v" / "policy.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises((ConfigError, UnknownMethod), match=why):
        Verifier.open(tmp_path / "v")


def test_a_policy_file_others_can_write_is_refused(tmp_path):
    Verifier.init(tmp_path / "v", "Bank").close()
    path = tmp_path / "v" / "policy.toml"
    path.write_text("allow_override = true\n")
    path.chmod(0o666)
    with pytest.raises(StateError):
        Verifier.open(tmp_path / "v")


def test_the_default_policy():
    policy = VerifierPolicy.default()
    assert policy.allow_override is False
    assert policy.for_method(Method.PIN).attestation is AttestationMode.IF_AVAILABLE
