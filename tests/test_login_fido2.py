"""Workstation login with a FIDO2 authenticator (the software one): the
assertion format, user verification, the modality check, counter moves."""

from __future__ import annotations

import pytest

from hsm_auth import login as L
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import MechanismNotSupported, UserVerificationFailed
from hsm_auth.methods import Method

pytestmark = pytest.mark.fido2

UvModality = pytest.importorskip("hsm_auth.testing.soft_fido2").UvModality


@pytest.fixture
def authdir(tmp_path):
    with L.AuthDir(tmp_path / "login", create=True) as a:
        yield a


def _config(device, tmp_path, method=Method.BIOMETRIC):
    settings = {
        "device": f"soft:{device.path}",
        "state_dir": str(tmp_path / "f2"),
        "prompts": False,
        "allow_software_authenticator": True,
    }
    return Config(methods={method: MethodConfig("fido2", settings)})


def test_fingerprint_login_uses_a_verified_assertion_and_moves_the_counter(
    authdir, soft_fido2_factory, tmp_path
):
    device = soft_fido2_factory(uv_modality=UvModality.FINGERPRINT)
    cred = L.enroll(authdir, "alice", Method.BIOMETRIC, _config(device, tmp_path))
    assert cred.format == L.FIDO2_ASSERTION
    first = L.login(authdir, "alice")
    second = L.login(authdir, "alice")
    assert cred.counter < first.counter < second.counter
    assert authdir.read("alice")[0].counter == second.counter


def test_failed_fingerprint_refuses_login_and_keeps_the_counter(
    authdir, soft_fido2_factory, tmp_path
):
    device = soft_fido2_factory(uv_modality=UvModality.FINGERPRINT)
    L.enroll(authdir, "bob", Method.BIOMETRIC, _config(device, tmp_path))
    before = authdir.read("bob")[0].counter
    device.configure(uv_outcome="fail")
    with pytest.raises(UserVerificationFailed):
        L.login(authdir, "bob")
    assert authdir.read("bob")[0].counter == before


def test_face_only_authenticator_cannot_enroll_the_fingerprint_method(
    authdir, soft_fido2_factory, tmp_path
):
    device = soft_fido2_factory(uv_modality=UvModality.FACE)
    with pytest.raises(MechanismNotSupported, match="face"):
        L.enroll(authdir, "carol", Method.BIOMETRIC, _config(device, tmp_path))
    assert authdir.read("carol") is None
