"""Enrollment time per method: ``Authenticator.add_or_update`` (keys made in the
token, key confirmation in the token, the response signed) plus
``Verifier.accept_enrollment`` (checks, seal, redeem), on the demo's tokens:
``device`` on swtpm (SoftHSM without it), ``pin`` on SoftHSM, ``biometric`` and
``face`` on the software FIDO2 authenticator.

Each round enrolls every method once with ``replace`` (a new offer each time, the
old keys deleted as a user's re-enrollment deletes them); it prints the median,
the minimum and the maximum over the rounds, in milliseconds.

Run: ``.venv/bin/python bench/enroll.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Paths
from hsm_auth.demo import prepare
from hsm_auth.files import atomic_write
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d, prepare(Path(d) / "home") as tokens:
        tokens.config().apply_environment()
        directory = Paths(Path(d) / "home").verifier_dir  # prepare's policy.toml is there
        policy = directory / "policy.toml"
        before = policy.read_text() if policy.exists() else ""
        atomic_write(policy, ("allow_override = true\n" + before).encode())  # re-enrollment
        verifier = Verifier.init(directory, "bench")
        times: dict[Method, list[float]] = {m: [] for m in tokens.methods}
        with verifier, Authenticator(Path(d) / "auth", tokens.config()) as auth:
            for i in range(args.rounds + 1):  # the first round warms up
                for method in tokens.methods:
                    pin = tokens.offline_pin if method.needs_pin else None
                    issued = verifier.create_offer("bench", methods=[method], replace=i > 0)
                    start = time.perf_counter()
                    response = auth.add_or_update(
                        method,
                        issued.text,
                        activation_code=issued.activation_code,
                        pin=pin,
                        replace=i > 0,
                    )
                    verifier.accept_enrollment(response)
                    if i:
                        times[method].append(time.perf_counter() - start)
        for method, samples in times.items():
            backend = tokens.methods[method][0]
            ms = [s * 1e3 for s in samples]
            print(
                f"[{method.value:9} {backend:6}] enroll median {statistics.median(ms):8.1f} ms"
                f"  min {min(ms):8.1f}  max {max(ms):8.1f}  ({len(ms)} rounds)"
            )


if __name__ == "__main__":
    main()
