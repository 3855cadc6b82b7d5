"""What TPM attestation costs an enrollment, in one run on one swtpm.

The swtpm is made with an EK certificate by a local test CA
(``hsm_auth.testing.swtpm.manufacture``). For ``device`` and ``pin``, ``N``
enrollments of fresh users (one authenticator each, as a CLI run opens the TPM
once) before the TPM is registered (no attestation: the path before issue 11),
then the registration (``tpm register``/``tpm-challenge``/``tpm activate``, once),
then ``N`` enrollments with the certify statements, under a policy that requires
them: ``Authenticator.add_or_update`` and ``Verifier.accept_enrollment``, medians.

    .venv/bin/python bench/tpm_attestation.py [--n 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hsm_auth.attestation import VerifierPolicy
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.testing.swtpm import manufacture, running_swtpm, set_da_parameters
from hsm_auth.verifier import Verifier

PIN = "735190"


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=15)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ca = manufacture(base / "tpm", base / "ca")
        with running_swtpm(base / "tpm") as tpm:
            set_da_parameters(tpm.tcti)
            settings = {"tcti": tpm.tcti, "state_dir": str(base / "objects"), "auth": "auto"}
            methods = (Method.DEVICE, Method.PIN)
            config = Config({m: MethodConfig("tpm2", settings) for m in methods})
            with Verifier.init(base / "verifier", "bench") as v:

                def run(tag: str) -> None:
                    for method in (Method.DEVICE, Method.PIN):
                        client, accept = [], []
                        for i in range(n):
                            _, offer = v.create_offer(f"{tag}{method.value}{i}", methods=[method])
                            with Authenticator(base / f"auth-{tag}-{method.value}-{i}",
                                               config) as a:
                                start = time.perf_counter()
                                response = a.add_or_update(method, offer, pin=PIN
                                                           if method is Method.PIN else None)
                                client.append(time.perf_counter() - start)
                                start = time.perf_counter()
                                cred = v.accept_enrollment(response)
                                accept.append(time.perf_counter() - start)
                        result = (cred.attestation or "")[:90]
                        print(f"{tag:10} {method.value:6}: add_or_update {_ms(client)}, "
                              f"accept_enrollment {_ms(accept)}  [{result}...]")

                run("unattested")
                policy = "".join(f'[methods.{m}]\nattestation = "required"\nroots = '
                                 f'["{ca.roots_file}"]\n' for m in ("device", "pin"))
                (base / "verifier" / "policy.toml").write_text(policy)
                (base / "verifier" / "policy.toml").chmod(0o600)
                v.policy = VerifierPolicy.load(base / "verifier")
                with Authenticator(base / "auth-register", config) as a:
                    start = time.perf_counter()
                    a.tpm_activate(v.tpm_challenge(a.tpm_registration_request()))
                    print(f"registration (once per TPM and verifier): "
                          f"{(time.perf_counter() - start) * 1e3:.1f} ms")
                run("attested")
    return 0


if __name__ == "__main__":
    sys.exit(main())
