"""The OTP path does no needless work: the backend recorded at enrollment loads
without an entry-point scan (which imports importlib.metadata and reads every
installed distribution: ~15 ms in a fresh ``hsm-auth finish``), and credentials
written before the reference was recorded still work."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from hsm_auth import registry
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import SoftHsmToken
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm


def _no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process as far as the registry knows, in which a scan fails the test."""

    def scan(**kwargs: object) -> object:
        raise AssertionError("the OTP path scanned the entry points")

    monkeypatch.setattr(registry, "_CLASSES", {})
    monkeypatch.setattr(registry, "_ENTRY_POINTS", None)
    monkeypatch.setattr(importlib.metadata, "entry_points", scan)


def test_finish_loads_the_recorded_backend_without_a_scan(
    softhsm_token: SoftHsmToken, tmp_path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    pin = tmp_path / "pin"
    pin.write_text(softhsm_token.user_pin)
    pin.chmod(0o600)
    uri = f"{softhsm_token.uri}&pin-source=file:{pin}"
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": uri})})
    verifier = Verifier.init(tmp_path / "verifier", "V")
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    with Authenticator(tmp_path / "auth", config) as auth:
        verifier.accept_enrollment(
            auth.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
        )
        assert auth.enrolled[0].backend_ref == registry.backend_reference("pkcs11")

    def otp_accepted() -> None:
        session = verifier.start_session("alice", "ctx", methods=[Method.DEVICE])
        with Authenticator(tmp_path / "auth", config) as auth:
            request = auth.start_offline_authentication(session.text)
            otp = auth.finish_offline_authentication(request, Method.DEVICE)
        assert verifier.verify(session.session_id, otp.otp).atc == otp.atc

    with monkeypatch.context() as m:
        _no_scan(m)
        otp_accepted()
    # Credentials of earlier versions have no reference: loaded through the scan.
    state = tmp_path / "auth" / "credentials.json"
    data = json.loads(state.read_text())
    for method in data["methods"]:
        del method["backend_ref"]
    state.write_text(json.dumps(data))
    monkeypatch.setattr(registry, "_CLASSES", {})
    otp_accepted()
    verifier.close()
