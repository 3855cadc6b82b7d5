"""Enrollment time per method, in one run: whole re-enrollments, and each step of
fresh ones with what the device certificate adds.

On the demo's tokens (``hsm_auth.demo.prepare``: ``device`` on swtpm if installed,
else SoftHSM; ``pin`` on SoftHSM; ``biometric`` and ``face`` on the software FIDO2
authenticator), with the verifier's keys in a key file and, with ``--hsm``, in a
SoftHSM token.

* **Re-enrollment**: each round enrolls every method once more with ``replace``
  (a new offer each time, the old keys deleted as a user's re-enrollment deletes
  them): ``Authenticator.add_or_update`` (keys made in the token, key confirmation
  in the token, the activation MAC, the response signed) plus
  ``Verifier.accept_enrollment`` (checks, seal, redeem, certificate); the median,
  minimum and maximum over the rounds (the first round warms up).
* **Fresh enrollments**: for each method, ``2 * N`` enrollments of fresh users,
  alternating: ``Authenticator.add_or_update``; ``Verifier.accept_enrollment``
  with its device-certificate step, and with that step switched off (the floor:
  what enrollment cost before the device CA); ``Authenticator.store_result`` (the
  result's signature, the certificate's chain and key checked, credentials.json
  written durably). Medians.

    .venv/bin/python bench/enroll.py [--rounds 7] [--n 15] [--hsm]
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
from hsm_auth.demo import DemoTokens, prepare
from hsm_auth.files import atomic_write
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


def re_enrollments(v: Verifier, tokens: DemoTokens, auth_dir: Path, rounds: int) -> None:
    """Every method enrolled again ``rounds`` times (with ``replace``) by one authenticator."""
    times: dict[Method, list[float]] = {m: [] for m in tokens.methods}
    with Authenticator(auth_dir, tokens.config()) as auth:
        for i in range(rounds + 1):  # the first round warms up
            for method in tokens.methods:
                pin = tokens.offline_pin if method.needs_pin else None
                issued = v.create_offer("bench", methods=[method], replace=i > 0)
                start = time.perf_counter()
                response = auth.add_or_update(
                    method,
                    issued.text,
                    activation_code=issued.activation_code,
                    pin=pin,
                    replace=i > 0,
                )
                v.accept_enrollment(response)
                if i:
                    times[method].append(time.perf_counter() - start)
    print(f"re-enrollment (add_or_update + accept_enrollment), {rounds} rounds:")
    for method, samples in times.items():
        backend = tokens.methods[method][0]
        ms = [s * 1e3 for s in samples]
        print(
            f"[{method.value:9} {backend:6}] enroll median {statistics.median(ms):8.1f} ms"
            f"  min {min(ms):8.1f}  max {max(ms):8.1f}  ({len(ms)} rounds)"
        )


def fresh_enrollments(v: Verifier, tokens: DemoTokens, tmp: Path, n: int) -> None:
    """Per method, ``2 * n`` fresh users: each step timed, the certificate step on and off."""
    print(f"fresh enrollments, medians of {n}:")
    for method in (m for m in Method if m in tokens.methods):
        pin = tokens.offline_pin if method.needs_pin else None
        accept: dict[bool, list[float]] = {True: [], False: []}
        client: list[float] = []
        store: list[float] = []
        for i in range(2 * n):
            certify = i % 2 == 0
            issued = v.create_offer(f"{method.value}{i}", methods=[method])
            # one authenticator per enrollment: each holds one method per verifier
            with Authenticator(tmp / f"auth-{method.value}-{i}", tokens.config()) as a:
                start = time.perf_counter()
                response = a.add_or_update(
                    method, issued.text, activation_code=issued.activation_code, pin=pin
                )
                client.append(time.perf_counter() - start)
                if not certify:
                    v._certify = lambda *a, **k: None  # type: ignore[method-assign,assignment]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="re-enrollment rounds (default 7)")
    parser.add_argument("--n", type=int, default=15,
                        help="fresh enrollments per method and certificate setting (default 15)")
    parser.add_argument("--hsm", action="store_true", help="the verifier's keys in SoftHSM")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d, prepare(Path(d) / "home") as tokens:
        tmp = Path(d)
        tokens.config().apply_environment()
        hsm = _hsm_uri(tmp) if args.hsm else None
        print(f"verifier keys: {'SoftHSM' if hsm else 'key file'}")
        directory = Paths(tmp / "home").verifier_dir  # prepare's policy.toml is there
        policy = directory / "policy.toml"
        before = policy.read_text() if policy.exists() else ""
        atomic_write(policy, ("allow_override = true\n" + before).encode())  # re-enrollment
        with Verifier.init(directory, "bench", hsm=hsm) as v:
            re_enrollments(v, tokens, tmp / "auth", args.rounds)
            fresh_enrollments(v, tokens, tmp, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
