"""Helpers for the online-service tests: real SoftHSM tokens and soft FIDO2
authenticators behind an Authenticator, and enrollment through a verifier."""

from __future__ import annotations

from pathlib import Path

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

OFFLINE_PIN = "482916"


def softhsm_methods(directory: Path) -> dict[Method, MethodConfig]:
    """device (a token whose PIN is in a 0600 file) and pin (the PIN is the offline PIN)."""
    directory.mkdir(parents=True, exist_ok=True)
    device = init_token(unique_label("dev"), so_pin="12345678", user_pin="device-secret")
    pin = init_token(unique_label("pin"), so_pin="12345678", user_pin=OFFLINE_PIN)
    pin_file = directory / "device.pin"
    pin_file.write_text(device.user_pin)
    pin_file.chmod(0o600)
    device_uri = Pkcs11Uri(
        token=device.label, module_path=device.module_path, pin_source=f"file:{pin_file}"
    )
    pin_uri = Pkcs11Uri(token=pin.label, module_path=pin.module_path)
    return {
        Method.DEVICE: MethodConfig("pkcs11", {"uri": str(device_uri)}),
        Method.PIN: MethodConfig("pkcs11", {"uri": str(pin_uri), "allow_unenforced_pin": True}),
    }


def fido2_method(device_path: Path, state: Path) -> MethodConfig:
    return MethodConfig("fido2", {
        "device": f"soft:{device_path}", "state_dir": str(state), "prompts": False,
        "allow_software_authenticator": True,
    })


def make_authenticator(directory: Path, methods: dict[Method, MethodConfig]) -> Authenticator:
    return Authenticator(directory, Config(methods=methods))


def response_for(
    verifier: Verifier, authenticator: Authenticator, user: str, method: Method,
    *, replace: bool = False,
) -> str:
    """Make an offer at ``verifier`` and answer it in the token (not submitted yet)."""
    offer = verifier.create_offer(user, methods=[method], replace=replace)
    pin = OFFLINE_PIN if method is Method.PIN else None
    return authenticator.add_or_update(
        method, offer.text, activation_code=offer.activation_code, pin=pin, replace=replace
    )
