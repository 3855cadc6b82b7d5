"""``hsm-auth demo``: the whole offline flow on the embedded default tokens.

Everything lives in ``<data dir>/demo`` (wiped at the start of each run):

* ``pin``       → a SoftHSM token ``hsm-auth-pin`` whose user PIN is the offline PIN;
* ``device``    → a swtpm TPM 2.0 started for the demo (stopped at its end), or,
  without swtpm, a SoftHSM token ``hsm-auth-device`` with its PIN in a 0600 file;
* ``biometric`` → the software FIDO2 authenticator with a fingerprint modality;
* ``face``      → the software FIDO2 authenticator with a face modality;

plus a verifier and an authenticator. The demo tokens' PINs are given to
``softhsm2-util`` on its command line: they are throw-away demo tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import qr
from .attestation import AttestationResult
from .authenticator import Authenticator
from .config import Config, MethodConfig, Paths
from .errors import HsmAuthError, InvalidToken
from .files import atomic_write, ensure_private_dir
from .methods import Method
from .verifier import Verifier

USER = "demo"
CONTEXT = "Log in to demo-workstation as demo"


@dataclass
class DemoTokens:
    """What :func:`prepare` set up: per-method backend settings and the offline PIN."""

    methods: dict[Method, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    offline_pin: str = field(default="", repr=False)
    notes: list[str] = field(default_factory=list)
    #: The PEM file of the demo TPM's manufacturer CA (swtpm_localca), if it has an
    #: EK certificate: the verifier's policy then requires TPM attestation to it.
    tpm_roots: str | None = None

    def config(self) -> Config:
        return Config(
            methods={m: MethodConfig(b, s) for m, (b, s) in self.methods.items()},
            environment=dict(self.environment),
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(path: Path, tokens: DemoTokens) -> None:
    lines = ["# written by hsm-auth demo"]
    for method, (backend, settings) in tokens.methods.items():
        lines += ["", f"[methods.{method.value}]", f'backend = "{backend}"']
        lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    lines += ["", "[environment]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in tokens.environment.items()]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


@contextlib.contextmanager
def prepare(home: Path, *, tpm: bool = True, fido2: bool = True) -> Iterator[DemoTokens]:
    """Create the demo tokens under ``home`` and write ``home/config.toml``.

    Yields while the swtpm it started (if any) runs; stops it afterwards.
    """
    from .testing.softhsm import init_token, softhsm_available, softhsm_environment
    from .uri import Pkcs11Uri

    reason = softhsm_available()
    if reason:
        raise HsmAuthError(f"the demo needs SoftHSM2: {reason}")
    ensure_private_dir(home)
    tokens = DemoTokens(offline_pin=f"{secrets.randbelow(10**6):06d}")
    with softhsm_environment(home / "softhsm") as env:
        pin_token = init_token("hsm-auth-pin", secrets.token_hex(8), tokens.offline_pin)
        device = init_token("hsm-auth-device", secrets.token_hex(8), secrets.token_hex(8))
    tokens.environment["SOFTHSM2_CONF"] = str(env.conf)
    atomic_write(home / "offline.pin", tokens.offline_pin.encode())
    pin_uri = Pkcs11Uri(token=pin_token.label, module_path=pin_token.module_path)
    tokens.methods[Method.PIN] = ("pkcs11", {"uri": str(pin_uri), "allow_unenforced_pin": True})
    device_pin = home / "device.pin"
    atomic_write(device_pin, device.user_pin.encode())
    device_uri = Pkcs11Uri(
        token=device.label, module_path=device.module_path, pin_source=f"file:{device_pin}"
    )
    tokens.methods[Method.DEVICE] = ("pkcs11", {"uri": str(device_uri)})

    with contextlib.ExitStack() as stack:
        if tpm:
            _add_tpm(home, tokens, stack)
        if fido2:
            _add_fido2(home, tokens)
        write_config(home / "config.toml", tokens)
        yield tokens


def _add_tpm(home: Path, tokens: DemoTokens, stack: contextlib.ExitStack) -> None:
    from .testing.swtpm import manufacture, manufacturing_available, running_swtpm, swtpm_available

    reason = swtpm_available()
    if reason:
        tokens.notes.append(f"device stays on SoftHSM: {reason}")
        return
    state = home / "swtpm"
    state.mkdir(mode=0o700)
    unmade = manufacturing_available()
    if unmade is None:  # an EK certificate by a local test CA, as a manufacturer makes it
        tokens.tpm_roots = str(manufacture(state, home / "swtpm-ca").roots_file)
    else:
        tokens.notes.append(f"the demo TPM has no EK certificate: {unmade}")
    tpm = stack.enter_context(running_swtpm(state))
    tokens.methods[Method.DEVICE] = (
        "tpm2",
        {"tcti": tpm.tcti, "state_dir": str(home / "tpm2-objects"), "auth": "none"},
    )


def _add_fido2(home: Path, tokens: DemoTokens) -> None:
    try:
        from hsm_auth.testing.fido2 import write_soft_policy
        from hsm_auth.testing.soft_fido2 import SoftAuthenticator, UvModality
    except ImportError as e:
        tokens.notes.append(f"biometric and face skipped: python-fido2 is missing ({e})")
        return
    devices = []
    for method, modality in (
        (Method.BIOMETRIC, UvModality.FINGERPRINT),
        (Method.FACE, UvModality.FACE),
    ):
        device = SoftAuthenticator.create(
            home / f"soft-fido2-{method.value}.json", uv_modality=modality
        )
        settings = {
            "device": f"soft:{device.path}",
            "state_dir": str(home / "fido2-state"),
            "prompts": False,
            "allow_software_authenticator": True,  # a test tool: the demo opts in
        }
        tokens.methods[method] = ("fido2", settings)
        devices.append(device)
    # The verifier's policy refuses the software authenticator unless it names its
    # AAGUID; the demo's names it and its attestation roots (a test tool: it opts in).
    write_soft_policy(Paths(home).verifier_dir, devices)


def _require_tpm_attestation(verifier: Verifier, directory: Path, roots: str) -> None:
    """The demo verifier's policy also requires the TPM ``device`` method to be attested
    to ``roots``: added to ``policy.toml`` (kept for ``hsm-auth verifier`` afterwards)."""
    from .attestation import POLICY_FILE, VerifierPolicy

    path = directory / POLICY_FILE
    before = path.read_text() if path.exists() else ""
    table = f'\n[methods.device]\nattestation = "required"\nroots = [{_toml_value(roots)}]\n'
    atomic_write(path, (before + table).encode())
    verifier.policy = VerifierPolicy.load(directory)


def run_demo(paths: Paths, *, out: TextIO, err: TextIO, as_json: bool = False) -> int:
    """Run the demo; progress on ``out`` (on ``err`` with ``as_json``, where ``out``
    gets one JSON document: every method's backend, ATCs and outcome)."""
    home = paths.data_dir / "demo"
    if home.exists():
        shutil.rmtree(home)
    shown = err if as_json else out

    def step(text: str) -> None:
        print(f"==> {text}", file=shown)

    step(f"creating tokens, a verifier and an authenticator in {home}")
    results: list[dict[str, Any]] = []
    with prepare(home) as tokens:
        for note in tokens.notes:
            step(note)
        for method, (backend, _) in tokens.methods.items():
            step(f"{method.value:9} -> {backend}")
        tokens.config().apply_environment()
        demo_paths = Paths(home)
        verifier = Verifier.init(demo_paths.verifier_dir, "hsm-auth demo verifier")
        tpm_attested = tokens.tpm_roots is not None and tokens.methods[Method.DEVICE][0] == "tpm2"
        if tpm_attested:
            _require_tpm_attestation(verifier, demo_paths.verifier_dir, str(tokens.tpm_roots))
        methods = [m for m in Method if m in tokens.methods]
        warn = lambda m: print(m, file=err)  # noqa: E731
        with verifier, Authenticator(demo_paths.authenticator_dir, tokens.config(), warn=warn) as a:
            if tpm_attested:  # credential activation: the TPM's AK bound to its EK
                a.tpm_activate(verifier.tpm_challenge(a.tpm_registration_request()))
                step("registered the TPM's attestation key with the verifier (EK certificate "
                     "by the demo's test CA, credential activation)")
            for method in methods:
                pin = tokens.offline_pin if method.needs_pin else None
                # The code reaches the user over the verifier's own channel (after an
                # online login); the demo hands it over in memory.
                issued = verifier.create_offer(USER, methods=[method])
                response = a.add_or_update(
                    method, issued.text, activation_code=issued.activation_code, pin=pin
                )
                cred = verifier.accept_enrollment(response)
                step(f"enrolled {method.value} (backend {cred.backend}, initial ATC {cred.atc}, "
                     "activation code checked)")
                summary = (AttestationResult.from_json(cred.attestation).summary
                           if cred.attestation else "unattested")
                if summary.startswith("hsm-auth-tpm2"):
                    step(f"attestation of {method.value}: {summary}")
                # The enrollment result: the device certificate, checked and kept.
                stored = a.store_result(verifier.enrollment_result(cred))
                fingerprint = hashlib.sha256(cred.certificate or b"").hexdigest()
                step(f"stored the verifier's certificate for {method.value} "
                     f"(SHA-256 {fingerprint[:16]}...)")
                results.append(
                    {"method": method.value, "backend": cred.backend, "initial_atc": cred.atc,
                     "certificate": fingerprint if stored.certificate else None,
                     "attestation": summary}
                )
            for i, (method, result_doc) in enumerate(zip(methods, results, strict=True)):
                session = verifier.start_session(USER, CONTEXT, methods=methods)
                step(f"verifier started session {session.session_id.hex()}")
                if not as_json:
                    if i == 0:  # one QR code is enough to show
                        print(qr.terminal(session.text), file=out)
                    print(session.text, file=out)
                request = a.start_offline_authentication(session.text)
                step(f"authenticator shows {request.verifier_name!r}: {request.context!r}")
                pin = tokens.offline_pin if method.needs_pin else None
                result = a.finish_offline_authentication(request, method, pin=pin)
                step(f"OTP from the {method.value} token: {result.otp} (ATC {result.atc})")
                ok = verifier.verify(session.session_id, result.otp)
                step(f"verifier accepted {ok.user} with {ok.method.value} (ATC {ok.atc})")
                result_doc.update(atc=ok.atc, accepted=True, replay_refused=False)
                try:
                    verifier.verify(session.session_id, result.otp)
                except InvalidToken:
                    step("replaying the same OTP: refused, as it must be")
                    result_doc["replay_refused"] = True
                else:
                    print("error: the replayed OTP was accepted", file=err)
    passed = all(r.get("replay_refused") for r in results)
    if as_json:
        doc = {
            "passed": passed,
            "home": str(home),
            "user": USER,
            "context": CONTEXT,
            "notes": tokens.notes,
            "methods": results,
        }
        print(json.dumps(doc, sort_keys=True), file=out)
    if not passed:
        return 1
    step(f"demo passed for {', '.join(m.value for m in methods)}; state kept in {home}")
    return 0
