"""``hsm-auth demo``: the whole offline flow on embedded SoftHSM tokens.

Everything lives in ``<data dir>/demo`` (wiped at the start of each run): a
SoftHSM configuration with two tokens (``hsm-auth-device``, whose PIN sits in
a 0600 file as a pin-source, and ``hsm-auth-pin``, whose user PIN is the
offline PIN), a verifier and an authenticator. The demo tokens' PINs are given
to ``softhsm2-util`` on its command line: they are throw-away demo tokens.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import TextIO

from . import qr
from .authenticator import Authenticator
from .config import Paths
from .config import load as load_config
from .errors import HsmAuthError, InvalidToken
from .files import atomic_write, ensure_private_dir
from .methods import Method
from .verifier import Verifier

USER = "demo"
CONTEXT = "Log in to demo-workstation as demo"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare(home: Path) -> tuple[Path, Path]:
    """Create the demo tokens and config under ``home``; return (config file, offline PIN file)."""
    from .testing.softhsm import init_token, softhsm_available, softhsm_environment
    from .uri import Pkcs11Uri

    reason = softhsm_available()
    if reason:
        raise HsmAuthError(f"the demo needs SoftHSM2: {reason}")
    ensure_private_dir(home)
    with softhsm_environment(home / "softhsm") as env:
        device = init_token("hsm-auth-device", secrets.token_hex(8), secrets.token_hex(8))
        pin_token = init_token(
            "hsm-auth-pin", secrets.token_hex(8), f"{secrets.randbelow(10**6):06d}"
        )
    device_pin = home / "device.pin"
    atomic_write(device_pin, device.user_pin.encode())
    offline_pin = home / "offline.pin"
    atomic_write(offline_pin, pin_token.user_pin.encode())
    device_uri = Pkcs11Uri(
        token=device.label, module_path=device.module_path, pin_source=f"file:{device_pin}"
    )
    pin_uri = Pkcs11Uri(token=pin_token.label, module_path=pin_token.module_path)
    config = home / "config.toml"
    atomic_write(
        config,
        (
            "# written by hsm-auth demo\n"
            "[methods.device]\n"
            'backend = "pkcs11"\n'
            f"uri = {_toml_string(str(device_uri))}\n\n"
            "[methods.pin]\n"
            'backend = "pkcs11"\n'
            f"uri = {_toml_string(str(pin_uri))}\n"
            "allow_unenforced_pin = true  # SoftHSM has no PIN retry limit\n\n"
            "[environment]\n"
            f"SOFTHSM2_CONF = {_toml_string(str(env.conf))}\n"
        ).encode(),
    )
    return config, offline_pin


def run_demo(paths: Paths, *, out: TextIO, err: TextIO, as_json: bool = False) -> int:
    home = paths.data_dir / "demo"
    if home.exists():
        shutil.rmtree(home)

    def step(text: str) -> None:
        print(f"==> {text}", file=out)

    step(f"creating SoftHSM tokens, a verifier and an authenticator in {home}")
    _, offline_pin_file = prepare(home)
    demo_paths = Paths(home)
    cfg = load_config(demo_paths)
    cfg.apply_environment()
    offline_pin = offline_pin_file.read_text()
    verifier = Verifier.init(demo_paths.verifier_dir, "hsm-auth demo verifier")
    failures = 0
    with Authenticator(
        demo_paths.authenticator_dir, cfg, warn=lambda m: print(m, file=err)
    ) as auth:
        for method in (Method.DEVICE, Method.PIN):
            _, offer = verifier.create_offer(USER, methods=[method])
            response = auth.add_or_update(
                method, offer, pin=offline_pin if method.needs_pin else None
            )
            cred = verifier.accept_enrollment(response)
            step(f"enrolled {method.value} (backend {cred.backend}, initial ATC {cred.atc})")

        for method in (Method.DEVICE, Method.PIN):
            session = verifier.start_session(USER, CONTEXT, methods=[Method.DEVICE, Method.PIN])
            step(f"verifier started session {session.session_id.hex()}; verification data:")
            print(qr.terminal(session.text), file=out)
            print(session.text, file=out)
            request = auth.start_offline_authentication(session.text)
            step(
                f"authenticator shows: verifier {request.verifier_name!r}, "
                f"context {request.context!r}"
            )
            result = auth.finish_offline_authentication(
                request, method, pin=offline_pin if method.needs_pin else None
            )
            step(f"OTP from the {method.value} token: {result.otp} (ATC {result.atc})")
            accepted = verifier.verify(session.session_id, result.otp)
            step(
                f"verifier accepted {accepted.user} with {accepted.method.value} "
                f"(ATC {accepted.atc})"
            )
            try:
                verifier.verify(session.session_id, result.otp)
            except InvalidToken:
                step("replaying the same OTP: refused, as it must be")
            else:
                print("error: the replayed OTP was accepted", file=err)
                failures += 1
    verifier.close()
    if failures:
        return 1
    step(f"demo passed; state kept in {home} (try: hsm-auth --home {home} methods)")
    return 0
