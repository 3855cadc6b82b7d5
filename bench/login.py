"""End-to-end PAM login time on SoftHSM vs a bare ``python -c pass``, same run.

    .venv/bin/python bench/login.py [--runs N]

One login = pamtester (under pam_wrapper) -> pam_hsm_auth.so (build/pam, built by
scripts/setup) -> python -I -m hsm_auth.pam -> SoftHSM: fresh challenge, counter
advanced and signature made in the token, verified, counter stored. The floor is
the same stack with the module built to run hsm_auth.testing.pam_floor (reads the
request, answers SUCCESS). Target: at most 3x the bare start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hsm_auth.config import Config, MethodConfig
from hsm_auth.login import AuthDir, enroll
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, softhsm_available, softhsm_environment

PIN = "1234"
PAM_WRAPPER = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "build" / "pam" / "pam_hsm_auth.so"


def timed(args: list[str], env: dict[str, str] | None, stdin: str = "") -> float:
    start = time.perf_counter()
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env,
                            check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {result.stdout}{result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    reason = softhsm_available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    for path in (PAM_WRAPPER, str(MODULE)):
        if not os.path.exists(path):
            print(f"skipped: {path} not found (apt install libpam-wrapper pamtester; "
                  "scripts/setup builds the module)")
            return 0
    with tempfile.TemporaryDirectory() as tmp, softhsm_environment(Path(tmp) / "hsm") as env:
        root = Path(tmp)
        os.chmod(root, 0o755)
        token = init_token("bench-login", so_pin="12345678", user_pin=PIN)
        settings = {"uri": token.uri, "allow_unenforced_pin": True}
        with AuthDir(root / "login", create=True) as authdir:
            enroll(authdir, "bench", Method.PIN, Config({Method.PIN: MethodConfig("pkcs11",
                                                                                  settings)}),
                   pin=PIN)
        config = root / "config.toml"
        config.write_text(f'[environment]\nSOFTHSM2_CONF = "{env.conf}"\n'
                          f'[login]\nauthdir = "{root / "login"}"\n')
        services = root / "pam.d"
        services.mkdir()
        (services / "bench").write_text(f"auth required {MODULE} config={config}\n")
        # The same PAM stack running an (almost) empty Python program: the floor of
        # any Python PAM helper (pamtester + pam_wrapper + module + interpreter start).
        floor_module = root / "pam_floor.so"
        subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(floor_module),
                        sys.executable, "hsm_auth.testing.pam_floor"], check=True)
        (services / "floor").write_text(f"auth required {floor_module}\n")
        pam_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_PRELOAD": PAM_WRAPPER,
                   "PAM_WRAPPER": "1", "PAM_WRAPPER_SERVICE_DIR": str(services)}
        login = ["pamtester", "bench", "bench", "authenticate"]
        floor = ["pamtester", "floor", "bench", "authenticate"]
        bare = [sys.executable, "-c", "pass"]
        timed(login, pam_env, PIN + "\n")  # warm the page cache
        timed(bare, None)
        logins, bares, floors = [], [], []
        for _ in range(runs):  # interleaved, so all see the same machine load
            logins.append(timed(login, pam_env, PIN + "\n"))
            bares.append(timed(bare, None))
            floors.append(timed(floor, pam_env, PIN + "\n"))
    lm, bm = statistics.median(logins), statistics.median(bares)
    fm = statistics.median(floors)
    print(f"PAM login on SoftHSM (pamtester -> pam_hsm_auth.so -> hsm_auth.pam): "
          f"median {lm * 1000:.1f} ms, min {min(logins) * 1000:.1f} ms ({runs} runs)")
    print(f"bare `python -c pass`:                                         "
          f"median {bm * 1000:.1f} ms, min {min(bares) * 1000:.1f} ms")
    print(f"same PAM stack running `python -c pass` (a Python helper's floor): "
          f"median {fm * 1000:.1f} ms ({lm / fm:.1f}x of it is hsm-auth's login)")
    ratio = lm / bm
    print(f"ratio: {ratio:.1f}x (target <= 3x): {'OK' if ratio <= 3 else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
