"""Enrollment time per method, and what the device certificate adds, in one run
(``bench/enroll.py`` times whole re-enrollments; this one isolates the certificate).

On the demo's tokens (``hsm_auth.demo.prepare``: ``device`` on swtpm if installed,
else SoftHSM; ``pin`` on SoftHSM; ``biometric`` and ``face`` on the software FIDO2
authenticator), with the verifier's keys in a key file and, with ``--hsm``, in a
SoftHSM token. For each method, ``2 * N`` enrollments of fresh users, alternating:

* ``Authenticator.add_or_update`` (the token makes the keys; the response);
* ``Verifier.accept_enrollment`` with its device-certificate step, and with that
  step switched off (the floor: what enrollment cost before the device CA);
* ``Authenticator.store_result`` (the result's signature, the certificate's chain
  and key checked, credentials.json written durably).

    .venv/bin/python bench/enrollment.py [--n 15] [--hsm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Paths
from hsm_auth.demo import prepare
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier


def _hsm_uri(directory: Path) -> str:
    from hsm_auth.testing.softhsm import init_token, unique_label
    from hsm_auth.uri import Pkcs11Uri

    pin = "bench-verifier-pin"
    token = init_token(unique_label("verifier-bench"), so_pin="12345678", user_pin=pin)
    pin_file = directory / "verifier.pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    return str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                         pin_source=f"file:{pin_file}"))


def _ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:6.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--hsm", action="store_true", help="the verifier's keys in SoftHSM")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, prepare(Path(tmp) / "home") as tokens:
        tokens.config().apply_environment()
        hsm = _hsm_uri(Path(tmp)) if args.hsm else None
        print(f"verifier keys: {'SoftHSM' if hsm else 'key file'}; medians of {args.n}")
        directory = Paths(Path(tmp) / "home").verifier_dir
        with Verifier.init(directory, "bench", hsm=hsm) as v:
            for method in (m for m in Method if m in tokens.methods):
                pin = tokens.offline_pin if method.needs_pin else None
                accept: dict[bool, list[float]] = {True: [], False: []}
                client: list[float] = []
                store: list[float] = []
                for i in range(2 * args.n):
                    certify = i % 2 == 0
                    issued = v.create_offer(f"{method.value}{i}", methods=[method])
                    # one authenticator per enrollment: each holds one method per verifier
                    with Authenticator(Path(tmp) / f"auth-{method.value}-{i}",
                                       tokens.config()) as a:
                        start = time.perf_counter()
                        response = a.add_or_update(
                            method, issued.text, activation_code=issued.activation_code, pin=pin
                        )
                        client.append(time.perf_counter() - start)
                        if not certify:
                            v._certify = lambda *a, **k: None  # type: ignore[method-assign]
                        try:
                            start = time.perf_counter()
                            cred = v.accept_enrollment(response)
                            accept[certify].append(time.perf_counter() - start)
                        finally:
                            v.__dict__.pop("_certify", None)
                        if certify:
                            text = v.enrollment_result(cred)
                            start = time.perf_counter()
                            a.store_result(text)
                            store.append(time.perf_counter() - start)
                extra = statistics.median(accept[True]) - statistics.median(accept[False])
                print(f"{method.value:9} ({tokens.methods[method][0]:6}): add_or_update "
                      f"{_ms(client)}; accept_enrollment {_ms(accept[False])} without the "
                      f"certificate, {_ms(accept[True])} with it ({extra * 1e3:+.2f} ms); "
                      f"store_result {_ms(store)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
