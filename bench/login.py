"""End-to-end PAM login time on SoftHSM and on swtpm, through the resident login
service and through the spawned helper, against the same PAM stacks answering
SUCCESS at once and a bare ``python -c pass``, all in one run.

    .venv/bin/python bench/login.py [--runs N]

One login = pamtester (under pam_wrapper) -> ``pam_hsm_auth.so`` (the native
module, ``build/pam``) -> the Python side -> the login policy -> the token: a
fresh challenge, the counter advanced and the signature made in the token,
verified, the counter stored, the failure record cleared. The Python side is
either the resident service (``python -I -m hsm_auth.login_service`` on a temp
socket, the module's ``socket=``: the default deployment, one forked child per
login with everything imported) or, the fallback when no service runs
(``socket=none``), ``python -I -m hsm_auth.pam`` spawned for the login. Target:
a login through the service at most 3x the bare start (OK / OVER TARGET); the
fallback's figures are printed as information.

The service rows run one service per token through
:func:`hsm_auth.login_service.main` with the real handler wrapped to note how
long each child's :func:`hsm_auth.pam.serve` took (written after its result).

Floors, to show where the time goes: the service floor is pamtester,
pam_wrapper, the module's connect and checks, the service's accept and fork
and the protocol, with a child that answers SUCCESS
(``hsm_auth.testing.pam_floor --serve``); the spawn floor is the module built
to run ``hsm_auth.testing.pam_floor`` (fork/exec, the interpreter's start).
Then the spawned Python side is timed in parts in one ``python -I`` process:
the imports of the login path (and which modules cost most, ``-X
importtime``), the backend's import, and one ``authenticate`` call with the
token work (which is what a service child does).
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


#: The login service as ``python -I -m hsm_auth.login_service`` runs it, with a handler
#: that notes how long each child's :func:`hsm_auth.pam.serve` took (after the result).
_TIMED_SERVICE = r"""
import os, sys, time
from pathlib import Path
from hsm_auth import login_service
log, argv = sys.argv[1], sys.argv[2:]
real = login_service.serve_login(Path(argv[argv.index("--config") + 1]))
def timed(channel, peer):
    start = time.perf_counter()
    status = real(channel, peer)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, f"{(time.perf_counter() - start) * 1000:.3f}\n".encode())
    return status
sys.exit(login_service.main(argv, handler=timed))
"""


class Resident:
    """A service process (``python -I ARGS --socket SOCKET``), stopped by :meth:`stop`."""

    def __init__(self, socket: Path, *args: str) -> None:
        import socket as sockets

        self.proc = subprocess.Popen([sys.executable, "-I", *args, "--socket", str(socket)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE,
                                     env={"PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 30
        while True:
            probe = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            try:
                probe.connect(str(socket))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{args} did not start") from None
                time.sleep(0.02)
            finally:
                probe.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


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
if sys.argv[6] == "preload":  # as the login service's parent does, before any fork
    from hsm_auth.login_service import preload
    preload()
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
          runs: int, preload: bool = False) -> tuple[float, float, float]:
    """Median ms of: the login path's imports, the backend's import, authenticate()
    (``preload``: after the login service's imports, as in a service child)."""
    rows = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-I", "-c", _PARTS, str(config), str(authdir),
                              user, str(state), PIN, "preload" if preload else "-"],
                             capture_output=True, text=True, env=env,
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
        run = tmp / "run"
        run.mkdir(mode=0o755)
        tokens = ["SoftHSM", *(["swtpm"] if tpm_reason is None else [])]
        floor_socket = run / "floor.sock"
        child_logs = {t: tmp / f"child-{t}.log" for t in tokens}
        for token in tokens:  # one service per token, so each child log is one token's
            resident = Resident(run / f"login-{token}.sock", "-c", _TIMED_SERVICE,
                                str(child_logs[token]), "--config", str(config))
            stack.callback(resident.stop)
        floor_service = Resident(floor_socket, "-m", "hsm_auth.testing.pam_floor", "--serve")
        stack.callback(floor_service.stop)
        services = tmp / "pam.d"
        services.mkdir()
        (services / "bench").write_text(f"auth required {MODULE} config={config} "
                                        "socket=none\n")
        (services / "floor").write_text(f"auth required {floor_module(tmp)} config={config} "
                                        "socket=none\n")
        for token in tokens:
            (services / f"svc-{token.lower()}").write_text(
                f"auth required {MODULE} config={config} socket={run / f'login-{token}.sock'}\n")
        (services / "svc-floor").write_text(f"auth required {MODULE} config={config} "
                                            f"socket={floor_socket}\n")
        pam_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                   "LD_PRELOAD": str(PAM_WRAPPER), "PAM_WRAPPER": "1",
                   "PAM_WRAPPER_SERVICE_DIR": str(services)}
        bare = [sys.executable, "-c", "pass"]
        users = {"SoftHSM": hsm_user, "swtpm": tpm_user}
        cases = {f"service {t}": ["pamtester", f"svc-{t.lower()}", users[t], "authenticate"]
                 for t in tokens}
        cases |= {f"spawn {t}": ["pamtester", "bench", users[t], "authenticate"]
                  for t in tokens}
        cases["service floor"] = ["pamtester", "svc-floor", hsm_user, "authenticate"]
        cases["spawn floor"] = ["pamtester", "floor", hsm_user, "authenticate"]
        for args in cases.values():  # warm the page and bytecode caches
            timed(args, pam_env, PIN + "\n")
        timed(bare, user_environment())
        times: dict[str, list[float]] = {name: [] for name in (*cases, "bare")}
        for _ in range(runs):  # interleaved, so all see the same machine load
            for name, args in cases.items():
                times[name].append(timed(args, pam_env, PIN + "\n"))
            times["bare"].append(timed(bare, user_environment()))
        split = {t: parts(config, authdir, users[t], state, user_environment(),
                          max(5, runs // 2)) for t in tokens}
        child = {t: statistics.median(float(x) for x in
                                      child_logs[t].read_text().split()[1:]) for t in tokens}
        resident_work = {t: parts(config, authdir, users[t], state, user_environment(),
                                  max(5, runs // 2), preload=True)[2] for t in tokens}
        imports = {"SoftHSM": top_imports(user_environment(), "hsm_auth_backends.pkcs11"),
                   "swtpm": top_imports(user_environment(), "hsm_auth_backends.tpm2")}
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    low = {name: min(v) * 1000 for name, v in times.items()}
    bm = med["bare"]

    def row(label: str, name: str) -> str:
        return (f"{label:<58} median {med[name]:6.1f} ms, min {low[name]:6.1f} ms: "
                f"{med[name] / bm:.1f}x bare")

    print(f"{'bare `python -c pass`:':<58} median {bm:6.1f} ms, min {low['bare']:6.1f} ms "
          f"({runs} runs, interleaved)")
    print("through the login service (the default deployment):")
    print(row("  floor: the same stack, a service child answering SUCCESS", "service floor"))
    for token in tokens:
        name = f"service {token}"
        verdict = "OK" if med[name] / bm <= TARGET else "OVER TARGET"
        print(row(f"  PAM login on {token}:", name)
              + f" (target <= {TARGET:.0f}x: {verdict}), "
              f"{med[name] - med['service floor']:.1f} ms above the floor")
    print("fallback, no service (python -I -m hsm_auth.pam spawned per login), information:")
    print(row("  floor: the same stack, helper hsm_auth.testing.pam_floor", "spawn floor"))
    for token in tokens:
        name = f"spawn {token}"
        print(row(f"  PAM login on {token}:", name)
              + f", {med[name] - med['spawn floor']:.1f} ms above the floor")
    if tpm_reason is not None:
        print(f"swtpm skipped: {tpm_reason}")
    print("where the service path's time goes: the floor above (pamtester, pam_wrapper, the "
          "module, accept, fork, protocol), then the child:")
    for name, work in resident_work.items():
        above = med[f"service {name}"] - med["service floor"]
        print(f"  {name}: {above:.1f} ms above the floor: the child's serve() {child[name]:.1f} ms "
              "(timed in each child of this run: root's config, the policy, the conversation, "
              f"the token work), {above - child[name]:.1f} ms outside it (pamtester's PIN "
              "prompt, copy-on-write after the fork, noise)")
        print(f"    authenticate() alone in a process with the service's imports, timed after "
              f"the logins: {work:.1f} ms")
    print("where the spawned path's time goes, in one `python -I` process:")
    for name, (imp, backend, login) in split.items():
        print(f"  {name}: login-path imports {imp:.1f} ms, backend import {backend:.1f} ms, "
              f"authenticate() {login:.1f} ms (bindings' import on first use, token open, "
              "PIN, counter, signature, checks, authfile and record writes)")
        print(f"    imports: {imports[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
