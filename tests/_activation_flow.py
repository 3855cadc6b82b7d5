"""The whole activation flow on the four methods, with the demo's real tokens, in a
process of its own (run by tests/test_activation.py):

    python _activation_flow.py TMPDIR

For each method an attacker's answer to the intercepted offer (software keys, without
the code or with a wrong one) is refused before attestation, a typo is told before any
key is made (the tokens hold nothing new), and the right code enrolls a method whose
OTP verifies. Prints one JSON line, {method: "ok"}; any failure is an exception."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _verifier_device import PythonDevice

from hsm_auth import activation, demo
from hsm_auth.activation import ActivationCodeTypo, ActivationRefused
from hsm_auth.audit import Event
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Paths
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier


def _refused(call) -> None:  # type: ignore[no-untyped-def]
    try:
        call()
    except ActivationRefused:
        return
    raise AssertionError("the verifier accepted a response without the right code")


def main(tmp: Path) -> None:
    home = tmp / "home"
    done: dict[str, str] = {}
    with demo.prepare(home) as tokens:
        tokens.config().apply_environment()
        paths = Paths(home)
        verifier = Verifier.init(paths.verifier_dir, "Four methods")
        tpm = tokens.tpm_roots is not None and tokens.methods[Method.DEVICE][0] == "tpm2"
        if tpm:
            demo._require_tpm_attestation(verifier, paths.verifier_dir, str(tokens.tpm_roots))
        with verifier, Authenticator(paths.authenticator_dir, tokens.config()) as a:
            if tpm:
                a.tpm_activate(verifier.tpm_challenge(a.tpm_registration_request()))
            for method in tokens.methods:
                pin = tokens.offline_pin if method.needs_pin else None
                offer = verifier.create_offer("alice", methods=[method])
                wrong = activation.code_from_mac(os.urandom(32))
                for code in (None, wrong):
                    forged = PythonDevice(wrapped=method in (Method.BIOMETRIC, Method.FACE))
                    response = forged.enroll(offer.text, method, activation_code=code)
                    _refused(lambda r=response: verifier.accept_enrollment(r))
                before = a.keys(pin=tokens.offline_pin).keys
                right = offer.activation_code.replace("-", "")
                typo = next(right[:i] + right[i + 1] + right[i] + right[i + 2:]
                            for i in range(11) if right[i] != right[i + 1])
                try:
                    a.add_or_update(method, offer.text, activation_code=typo, pin=pin)
                except ActivationCodeTypo as e:
                    assert "has a typo" in str(e), e
                else:
                    raise AssertionError("a typo was not told")
                assert a.keys(pin=tokens.offline_pin).keys == before, "a typo made keys"
                response = a.add_or_update(
                    method, offer.text, activation_code=offer.activation_code, pin=pin
                )
                cred = verifier.accept_enrollment(response)
                assert cred.method is method
                session = verifier.start_session(
                    "alice", f"Log in with {method.value}", methods=[method]
                )
                request = a.start_offline_authentication(session.text)
                otp = a.finish_offline_authentication(request, method, pin=pin).otp
                assert verifier.verify(session.session_id, otp).method is method
                trail = [
                    (r.event, r.detail)
                    for r in verifier.store.audit_records("alice")
                    if r.event in (Event.ENROLL_REFUSED, Event.ENROLL)
                ]
                assert trail[-3:] == [
                    (Event.ENROLL_REFUSED, "1 of 5"),
                    (Event.ENROLL_REFUSED, "2 of 5"),
                    (Event.ENROLL, cred.backend),
                ], trail
                done[method.value] = "ok"
    print(json.dumps(done, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
