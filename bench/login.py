"""End-to-end PAM login time on SoftHSM and on swtpm against the same PAM stack
running an empty Python program and a bare ``python -c pass``, in one run.

    .venv/bin/python bench/login.py [--runs N]

One login = pamtester (under pam_wrapper) -> ``pam_hsm_auth.so`` (the native
module, ``build/pam``) -> ``python -I -m hsm_auth.pam`` -> the login policy ->
the token: a fresh challenge, the counter advanced and the signature made in
the token, verified, the counter stored, the failure record cleared. The
*floor* is the same stack with the module built to run
``hsm_auth.testing.pam_floor`` instead, which reads the request and answers
SUCCESS (what any Python helper of this module costs: pamtester, pam_wrapper,
the module's fork/exec, the interpreter's start, the protocol). Target: a login
at most 3x the bare start.

Then, to show where a login's time goes, the same Python side is timed in
parts in one process started as the module starts it (``python -I``): the
imports of the login path (and which modules cost most, ``-X importtime``),
the backend's import, and one ``authenticate`` call with the token work.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from hsm_auth.config import Config, MethodConfig
from hsm_auth.login import AuthDir, enroll
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, softhsm_available, softhsm_environment

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "build" / "pam" / "pam_hsm_auth.so"
PAM_WRAPPER = Path("/usr/lib/x86_64-linux-gnu/libpam_wrapper.so")
PIN = "135791"
TARGET = 3.0


def timed(args: list[str], env: dict[str, str] | None, stdin: str = "") -> float:
    start = time.perf_counter()
    result = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env,
                            check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {result.stdout}{result.stderr}")
    return elapsed


def user_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's machine keeps a bytecode cache
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def accounts() -> tuple[str, str]:
    """Two real accounts (the policy resolves names with getpwnam)."""
    import pwd

    names = [p.pw_name for p in pwd.getpwall() if p.pw_uid != 0]
    preferred = [n for n in ("daemon", "bin") if n in names]
    chosen = (preferred + [n for n in names if n not in preferred])[:2]
    return chosen[0], chosen[1]


def floor_module(tmp: Path) -> Path:
    """pam_hsm_auth.so built to run :mod:`hsm_auth.testing.pam_floor` (reads the
    request, answers ``result SUCCESS``): the same stack, module, interpreter and
    protocol as a login, without the login."""
    out = tmp / "pam_floor.so"
    subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(out), sys.executable,
                    "hsm_auth.testing.pam_floor"], check=True, capture_output=True)
    return out


_PARTS = r"""
import sys, time
t0 = time.perf_counter()
import hsm_auth.pam, hsm_auth.login, hsm_auth.login_policy, hsm_auth.config, hsm_auth.registry
t1 = time.perf_counter()
from pathlib import Path
from hsm_auth.config import parse
from hsm_auth.config import read_file
from hsm_auth.login import AuthDir, LoginOptions, LoginRequest, authenticate
from hsm_auth.registry import load_backend
config = parse(read_file(Path(sys.argv[1])) or {})
config.apply_environment()
with AuthDir(Path(sys.argv[2])) as d:
    cred = d.read(sys.argv[3])[0]
t2 = time.perf_counter()
load_backend(cred.backend, cred.backend_ref)
t3 = time.perf_counter()
class Conv:
    def secret(self, prompt): return sys.argv[5]
    def info(self, text): pass
    def error(self, text): pass
out = authenticate(LoginRequest(sys.argv[3], "bench", None, None, LoginOptions()), Conv(),
                   config=config, authdir=Path(sys.argv[2]), state_dir=Path(sys.argv[4]))
t4 = time.perf_counter()
assert out.outcome.name == "SUCCESS", out
print(f"{(t1 - t0) * 1000:.1f} {(t3 - t2) * 1000:.1f} {(t4 - t3) * 1000:.1f}")
"""


def parts(config: Path, authdir: Path, user: str, state: Path, env: dict[str, str],
          runs: int) -> tuple[float, float, float]:
    """Median ms of: the login path's imports, the backend's import, authenticate()."""
    rows = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-I", "-c", _PARTS, str(config), str(authdir),
                              user, str(state), PIN], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        rows.append([float(x) for x in out])
    a, b, c = (statistics.median(col) for col in zip(*rows, strict=True))
    return a, b, c


def top_imports(env: dict[str, str], backend: str, count: int = 6) -> str:
    code = f"import hsm_auth.pam, hsm_auth.login_policy, {backend}"
    err = subprocess.run([sys.executable, "-I", "-X", "importtime", "-c", code],
                         capture_output=True, text=True, env=env, check=True).stderr
    rows = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # top-level and first-level imports
            rows.append((int(m.group(2)), m.group(4)))
    total = len([1 for line in err.splitlines() if line.startswith("import time:")]) - 1
    rows.sort(reverse=True)
    shown = ", ".join(f"{name} {us / 1000:.1f}" for us, name in rows[:count])
    return f"{total} modules; cumulative ms: {shown}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    for reason in (softhsm_available(),
                   None if MODULE.exists() else f"{MODULE} not built (bash scripts/setup)",
                   None if PAM_WRAPPER.exists() else "libpam_wrapper.so not found",
                   None if shutil.which("pamtester") else "pamtester not found",
                   None if shutil.which("gcc") else "gcc not found"):
        if reason:
            print(f"skipped: {reason}")
            return 0
    from hsm_auth.testing.swtpm import SwtpmProcess, swtpm_available

    tpm_reason = swtpm_available()
    hsm_user, tpm_user = accounts()
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        env = stack.enter_context(softhsm_environment(tmp / "hsm"))
        authdir, state = tmp / "login", tmp / "state"
        token = init_token("bench-login", so_pin="12345678", user_pin=PIN)
        hsm = Config({Method.PIN: MethodConfig("pkcs11", {"uri": token.uri,
                                                          "allow_unenforced_pin": True})})
        with AuthDir(authdir, create=True) as d:
            enroll(d, hsm_user, Method.PIN, hsm, pin=PIN)
        if tpm_reason is None:
            (tmp / "tpm").mkdir()
            tpm = SwtpmProcess(tmp / "tpm")
            tpm.start()
            stack.callback(tpm.stop)
            settings = {"tcti": tpm.tcti, "state_dir": str(tmp / "tpm2-state")}
            with AuthDir(authdir) as d:
                enroll(d, tpm_user, Method.PIN, Config({Method.PIN: MethodConfig(
                    "tpm2", settings)}), pin=PIN)
        config = tmp / "config.toml"
        config.write_text(f'[environment]\nSOFTHSM2_CONF = "{env.conf}"\n'
                          f'[login]\nauthdir = "{authdir}"\nstate_dir = "{state}"\n')
        services = tmp / "pam.d"
        services.mkdir()
        (services / "bench").write_text(f"auth required {MODULE} config={config}\n")
        (services / "floor").write_text(f"auth required {floor_module(tmp)} config={config}\n")
        pam_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "LD_PRELOAD": str(PAM_WRAPPER), "PAM_WRAPPER": "1",
                   "PAM_WRAPPER_SERVICE_DIR": str(services)}
        bare = [sys.executable, "-c", "pass"]
        cases = {"SoftHSM": ["pamtester", "bench", hsm_user, "authenticate"]}
        if tpm_reason is None:
            cases["swtpm"] = ["pamtester", "bench", tpm_user, "authenticate"]
        floor = ["pamtester", "floor", hsm_user, "authenticate"]
        for args in cases.values():  # warm the page and bytecode caches
            timed(args, pam_env, PIN + "\n")
        timed(bare, user_environment())
        times: dict[str, list[float]] = {name: [] for name in (*cases, "floor", "bare")}
        for _ in range(runs):  # interleaved, so all see the same machine load
            for name, args in cases.items():
                times[name].append(timed(args, pam_env, PIN + "\n"))
            times["floor"].append(timed(floor, pam_env, PIN + "\n"))
            times["bare"].append(timed(bare, user_environment()))
        split = {"SoftHSM": parts(config, authdir, hsm_user, state, user_environment(),
                                  max(5, runs // 2))}
        if tpm_reason is None:
            split["swtpm"] = parts(config, authdir, tpm_user, state, user_environment(),
                                   max(5, runs // 2))
        imports = {"SoftHSM": top_imports(user_environment(), "hsm_auth_backends.pkcs11"),
                   "swtpm": top_imports(user_environment(), "hsm_auth_backends.tpm2")}
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    low = {name: min(v) * 1000 for name, v in times.items()}
    bm, fm = med["bare"], med["floor"]
    print(f"bare `python -c pass`:                              median {bm:6.1f} ms, "
          f"min {low['bare']:6.1f} ms ({runs} runs)")
    print(f"same PAM stack, helper hsm_auth.testing.pam_floor:  median {fm:6.1f} ms, "
          f"min {low['floor']:6.1f} ms ({fm / bm:.1f}x bare)")
    for name in cases:
        ratio = med[name] / bm
        verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
        print(f"PAM login on {name + ':':9}                           median "
              f"{med[name]:6.1f} ms, min {low[name]:6.1f} ms: {ratio:.1f}x bare "
              f"(target <= {TARGET:.0f}x: {verdict}), {med[name] - fm:.1f} ms above the floor")
    if tpm_reason is not None:
        print(f"swtpm skipped: {tpm_reason}")
    for name, (imp, backend, login) in split.items():
        print(f"  {name}, in one `python -I` process: login-path imports {imp:.1f} ms, "
              f"backend import {backend:.1f} ms, authenticate() {login:.1f} ms "
              "(token open, PIN, counter, signature, checks, authfile and record writes)")
        print(f"    imports: {imports[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
