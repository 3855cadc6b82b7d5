"""pam_hsm_auth.so with the resident login service (hsm_auth/login_service.py):
real pamtester + pam_wrapper + the built module + the real service process on a
temp socket, on SoftHSM and swtpm.

Logins that must go through the service use a module built with ``/bin/false``
as its interpreter: were it to fall back to spawning the helper, the helper
would exit at once and the login would be PAM_SYSTEM_ERR, so a SUCCESS proves
the service answered. Tests of untrusted sockets use the real module and the
right PIN: a fallback would log in, trusting the socket would answer what the
fake says; only a refusal is PAM_SYSTEM_ERR.

Non-root callers (a screen locker) are played by a raw client speaking the line
protocol as another uid (``setpriv``), see :data:`_CLIENT`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pam import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    PAM_AUTH_ERR,
    PAM_AUTHINFO_UNAVAIL,
    PAM_MAXTRIES,
    PAM_SERVICE_ERR,
    PAM_SYSTEM_ERR,
    PAM_USER_UNKNOWN,
    PAM_WRAPPER,
    PIN,
    REPO,
    UNIX_PASSWORD,
    Rig,
    assert_login_ignores,
    hostile_environment,
    hsm_rig,
    make_rig,
    native_libs,
    pam_tools,
    planted,
    rig,
)

pytestmark = pytest.mark.pam

NOBODY = 65534


def _pids_with_parent(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(entry.name))
    return found


class Service:
    """``python -I -m hsm_auth.login_service`` on ``RUN_DIR/login.sock``; ``RUN_DIR``
    a new 0755 directory in /tmp (pytest's tmp_path is 0700: uid nobody must reach
    the socket), removed by :meth:`cleanup`."""

    def __init__(self, root: Path, config: Path, env: dict[str, str] | None = None,
                 run_dir: Path | None = None) -> None:
        self.owns_dir = run_dir is None
        self.dir = run_dir or Path(tempfile.mkdtemp(prefix="hsm-auth-run-"))
        self.dir.chmod(0o755)
        self.socket = self.dir / "login.sock"
        self.log = root / "service.log"
        args = [sys.executable, "-I", "-m", "hsm_auth.login_service", "--socket",
                str(self.socket), "--config", str(config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, env=env or {"PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 30
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the service did not start: {self.log.read_text()}")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[int]:
        return _pids_with_parent(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def nospawn_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pam_hsm_auth.so whose fallback helper is /bin/false: only the service logs in."""
    out = tmp_path_factory.mktemp("nospawn") / "pam_nospawn.so"
    subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(out), "/bin/false"],
                   check=True, capture_output=True)
    return out


@pytest.fixture
def served(rig: Rig, nospawn_module: Path) -> Iterator[tuple[Rig, Service]]:
    """``rig`` (SoftHSM or swtpm) with a login service and the no-spawn module."""
    yield from _served(rig, nospawn_module)


@pytest.fixture
def hsm_served(hsm_rig: Rig, nospawn_module: Path) -> Iterator[tuple[Rig, Service]]:
    yield from _served(hsm_rig, nospawn_module)


def _served(r: Rig, module: Path) -> Iterator[tuple[Rig, Service]]:
    service = Service(r.root, r.config)
    r.socket = str(service.socket)
    r.module = module
    try:
        yield r, service
    finally:
        service.cleanup()


def _failures(r: Rig, user: str = ALICE) -> int:
    path = r.root / "state" / "failures" / user
    if not path.exists():
        return 0
    return len(json.loads(path.read_text())["failures"])


# --- the same results as the spawned helper ---------------------------------------------


def test_results_through_the_service_match_the_spawned_helper(
        served: tuple[Rig, Service]) -> None:
    r, service = served
    before = r.counter()
    ok = r.pamtester(r.sudo(), ALICE, [PIN])
    assert ok.ok, ok.out + service.log.read_text()
    assert "PIN for " in ok.out and r.counter() > before
    after = r.counter()
    login = r.login()
    first = r.pamtester(login, ALICE, ["999999"])
    assert first.code(PAM_AUTH_ERR), first.out
    for _ in range(2):  # swtpm's lockout may come first (max tries 3 counts all tries)
        wrong = r.pamtester(login, ALICE, ["999999"])
        assert wrong.code(PAM_AUTH_ERR) or wrong.code(PAM_MAXTRIES), wrong.out
    assert r.counter() == after
    locked = r.pamtester(login, ALICE, [PIN])  # the failure record: deny = 3
    assert locked.code(PAM_MAXTRIES) and "PIN for" not in locked.out, locked.out
    unknown = r.pamtester(login, "no-such-account-x", [PIN])
    assert unknown.code(PAM_USER_UNKNOWN), unknown.out
    ignored = r.pamtester("sudo", BOB, [UNIX_PASSWORD])
    assert ignored.ignored and ignored.ok, ignored.out  # nouserok: the next line decided
    strict = r.pamtester(login, BOB, [PIN])
    assert strict.code(PAM_USER_UNKNOWN), strict.out
    bad = r.pamtester(r.login("socket=relative.sock", name="bad"), ALICE, [PIN])
    assert bad.code(PAM_SERVICE_ERR), bad.out
    assert service.alive


def test_no_token_is_authinfo_unavail_through_the_service(
        hsm_served: tuple[Rig, Service]) -> None:
    r, _ = hsm_served
    subprocess.run(["softhsm2-util", "--delete-token", "--token", r.token_label],  # type: ignore[attr-defined]
                   check=True, capture_output=True)
    result = r.pamtester(r.login(), ALICE, [PIN])
    assert result.code(PAM_AUTHINFO_UNAVAIL), result.out


@pytest.mark.swtpm
def test_a_locked_tpm_is_maxtries_through_the_service(
        tmp_path: Path, request: pytest.FixtureRequest, nospawn_module: Path) -> None:
    rig = make_rig(request, tmp_path, "swtpm")
    rig.write_config(rig.environment, "deny = 100\n")  # the TPM locks, not the record
    for r, _ in _served(rig, nospawn_module):
        service = r.login()
        codes = [r.pamtester(service, ALICE, ["999999"]) for _ in range(4)]
        assert codes[0].code(PAM_AUTH_ERR), codes[0].out
        assert codes[-1].code(PAM_MAXTRIES), codes[-1].out


# --- sockets the module must not trust -------------------------------------------------

_FAKE = r"""
import os, socket, sys
path, uid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
out = open(log, "ab", buffering=0)  # opened as root: nobody cannot reach tmp_path
if uid:
    os.setgid(uid); os.setuid(uid)  # the listener's credentials are taken at listen()
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(2)
    got = b""
    try:
        while not got.endswith(b"end\n"):
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    out.write(got)
    try:
        c.sendall(b"result SUCCESS fake\n")
    except OSError:
        pass
    c.close()
"""


class Fake:
    def __init__(self, path: Path, uid: int) -> None:
        self.log = path.parent.parent / f"fake-{uid}.log"
        self.log.touch()
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", _FAKE, str(path), str(uid),
                                      str(self.log)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_a_fake_service_running_as_another_uid_is_not_trusted(hsm_rig: Rig) -> None:
    """A root-owned socket in a root-owned 0755 directory, but the process listening on
    it runs as nobody (it bound as root, then dropped to nobody before listen): the
    kernel's SO_PEERCRED says so, and the module refuses it without sending anything."""
    run = hsm_rig.root / "run"
    run.mkdir(mode=0o755)
    path = run / "login.sock"
    fake = Fake(path, NOBODY)
    try:
        assert path.stat().st_uid == 0
        hsm_rig.socket = str(path)
        result = hsm_rig.pamtester(hsm_rig.login(), ALICE, [PIN])
        assert result.code(PAM_SYSTEM_ERR) and not result.ok, result.out
        assert fake.log.read_bytes() == b""  # not even the user name reached it
    finally:
        fake.stop()


def test_a_fake_service_as_root_is_trusted_so_the_check_above_is_what_refuses(
        hsm_rig: Rig) -> None:
    """The same fake listening as root: the module takes its SUCCESS (without asking a
    PIN), which shows that the refusal above comes from the peer credential check."""
    run = hsm_rig.root / "run"
    run.mkdir(mode=0o755)
    path = run / "login.sock"
    fake = Fake(path, 0)
    try:
        hsm_rig.socket = str(path)
        result = hsm_rig.pamtester(hsm_rig.login(), ALICE, [])
        assert result.ok and "PIN for" not in result.out, result.out
        assert f"user {ALICE}\n".encode() in fake.log.read_bytes()
    finally:
        fake.stop()


def test_untrusted_socket_paths_are_system_errors(hsm_served: tuple[Rig, Service]) -> None:
    """The real service, reached through paths an attacker could have planted: a
    group- or other-writable directory, a symlink, a socket owned by another uid, a
    directory owned by another uid. Each is PAM_SYSTEM_ERR (the right PIN is given:
    trusting the socket or falling back to the helper would both log in)."""
    r, service = hsm_served
    r.module = REPO / "build" / "pam" / "pam_hsm_auth.so"
    login = r.login()
    assert r.pamtester(login, ALICE, [PIN]).ok
    for mode in (0o775, 0o757, 0o1777):
        service.dir.chmod(mode)
        result = r.pamtester(login, ALICE, [PIN])
        assert result.code(PAM_SYSTEM_ERR), (oct(mode), result.out)
    service.dir.chmod(0o755)
    link = r.root / "link.sock"
    link.symlink_to(service.socket)
    r.socket = str(link)
    assert r.pamtester(r.login(name="via-link"), ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    r.socket = str(service.socket)
    os.chown(service.socket, NOBODY, NOBODY)
    assert r.pamtester(login, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    os.chown(service.socket, 0, 0)
    os.chown(service.dir, NOBODY, NOBODY)
    assert r.pamtester(login, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    os.chown(service.dir, 0, 0)
    parent = r.root
    parent.chmod(0o777)  # an ancestor others can write (not sticky)
    try:
        assert r.pamtester(login, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    finally:
        parent.chmod(0o755)
    assert r.pamtester(login, ALICE, [PIN]).ok  # all restored: trusted again
    assert service.alive


def test_a_fake_socket_owned_by_another_uid_is_refused(hsm_rig: Rig) -> None:
    """Another user's socket (here: nobody binds it in a root directory someone made
    writable, then the directory is tightened again): refused even though a process
    answers SUCCESS on it."""
    run = hsm_rig.root / "run"
    run.mkdir(mode=0o755)
    path = run / "login.sock"
    fake = Fake(path, 0)
    try:
        os.chown(path, NOBODY, NOBODY)
        hsm_rig.socket = str(path)
        result = hsm_rig.pamtester(hsm_rig.login(), ALICE, [PIN])
        assert result.code(PAM_SYSTEM_ERR), result.out
        assert fake.log.read_bytes() == b""
    finally:
        fake.stop()


# --- callers that are not root ----------------------------------------------------------

# A raw client of the line protocol: argv[1] socket, argv[2] JSON list of request lines,
# argv[3] the PIN (hex-encoded on the wire), argv[4] "kill-at-cue" or "". Prints each
# line received, one per line, then "EOF".
_CLIENT = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall("".join(line + "\n" for line in json.loads(sys.argv[2])).encode())
f = s.makefile("rb")
for raw in f:
    line = raw.decode().rstrip("\n")
    print(line, flush=True)
    if line.startswith("secret "):
        s.sendall(b"answer " + sys.argv[3].encode().hex().encode() + b"\n")
    elif line.startswith(("info ", "error ")):
        if sys.argv[4] == "stop-at-cue":
            sys.stdin.readline()  # the test kills the service's child meanwhile
        s.sendall(b"ok\n")
    elif line.startswith("result "):
        break
print("EOF", flush=True)
"""


def _request(r: Rig, user: str, *options: str, caller: int = 1) -> list[str]:
    return ["hsm-auth-pam 1", f"user {user}", "service login", f"caller {caller}",
            *(f"option {o}" for o in (f"config={r.config}", *options)), "end"]


def _client(socket_path: str, lines: list[str], uid: int = 0, pin: str = PIN
            ) -> list[str]:
    prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                  "--clear-groups"]
    out = subprocess.run([*prefix, sys.executable, "-I", "-c", _CLIENT, socket_path,
                          json.dumps(lines), pin, ""], capture_output=True, text=True,
                         timeout=60, check=False)
    return out.stdout.splitlines()


def test_a_caller_that_is_not_root_logs_in_only_its_own_account(
        hsm_served: tuple[Rig, Service]) -> None:
    """A screen locker runs as the user: uid nobody asking for games is refused
    (PERM_DENIED) without a PIN asked, a failure recorded or the token touched; games
    (uid 5) asking for games logs in; games may not choose another config file. The
    request's ``caller`` line is ignored: the kernel's pid of the client is used."""
    r, service = hsm_served
    uid = pwd.getpwnam(ALICE).pw_uid
    before = r.counter()
    denied = _client(str(service.socket), _request(r, ALICE), NOBODY)
    assert denied[-2].startswith("result PERM_DENIED "), denied
    assert not any(line.startswith("secret ") for line in denied)
    assert r.counter() == before and _failures(r) == 0
    unknown = _client(str(service.socket), _request(r, "no-such-account-x"), NOBODY)
    assert unknown[-2].startswith("result PERM_DENIED "), unknown
    other_config = r.root / "other.toml"
    other_config.write_text(r.config.read_text().replace("[login]", "[login]\ndeny = 1000"))
    chosen = _client(str(service.socket), [*_request(r, ALICE)[:4],
                                           f"option config={other_config}", "end"], uid)
    assert chosen[-2].startswith("result PERM_DENIED "), chosen
    own = _client(str(service.socket), _request(r, ALICE, "debug", caller=1), uid)
    assert own[-2].startswith("result SUCCESS "), own
    assert any(line.startswith("secret PIN for ") for line in own)
    assert r.counter() > before
    served_for = [line for line in own if "served by the login service" in line]
    assert served_for and " pid 1 " not in served_for[0], own  # the client's own pid
    root_asks = _client(str(service.socket), _request(r, ALICE), 0, pin="999999")
    assert root_asks[-2].startswith("result AUTH_ERR "), root_asks  # root: any account
    assert service.alive


# --- the service survives its clients ------------------------------------------------------


def _open(path: Path, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        held.append(s)
    return held


_HOLDER = r"""
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", flush=True)
sys.stdin.readline()
"""


def test_garbage_hangups_and_floods_do_not_stop_the_service(
        hsm_served: tuple[Rig, Service]) -> None:
    r, service = hsm_served
    garbage = [b"\x00\xff" * 600, b"hsm-auth-pam 1\n", b"hsm-auth-pam 1\nuser " + b"x" * 5000,
               b"GET / HTTP/1.0\r\n\r\n", b"hsm-auth-pam 1\nuser a\nuser b\nend\n",
               b"\n" * 2000, b"hsm-auth-pam 1\nuser games\nservice x\nauthtok zz\nend\n", b""]
    for data in garbage * 3:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(service.socket))
        if data:
            s.sendall(data)
        s.close()  # hang up at once
    # nobody holds 40 connections open: its logins are capped, root's are not
    holder = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", sys.executable, "-I", "-c", _HOLDER,
                               str(service.socket), "40"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        time.sleep(0.3)
        assert len(service.children()) <= 4  # PER_UID
        during = r.pamtester(r.login(), ALICE, [PIN])
        assert during.ok, during.out
    finally:
        holder.communicate("\n", timeout=30)
    # nobody's children end with its connections: wait until they are reaped, so the
    # flood below fills exactly the 32 slots (a slot freed later would serve the module)
    deadline = time.monotonic() + 20
    while len(service.children()) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # root floods past the cap: the excess is answered busy, never served
    held = _open(service.socket, 60)
    try:
        # the service answers the excess "busy" as it accepts it: wait until it has
        # accepted all 60 (32 served, 28 busy), else the module's connect could meet a
        # full backlog (EAGAIN), which falls back to spawning the helper, not "busy"
        busy, waiting, deadline = 0, list(held), time.monotonic() + 20
        while busy < len(held) - 32 and waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(waiting, [], [], 0.2)
            for s in readable:
                waiting.remove(s)
                with contextlib.suppress(OSError):
                    busy += s.recv(100) == b"result SYSTEM_ERR busy\n"
        assert len(service.children()) <= 32
        assert busy > 0
        nospawn, r.module = r.module, REPO / "build" / "pam" / "pam_hsm_auth.so"
        refused = r.pamtester(r.login(name="busy"), ALICE, [PIN])  # it reads "busy"
        assert refused.code(PAM_SYSTEM_ERR) and "PIN for" not in refused.out, refused.out
        r.module = nospawn  # (the real module would have logged in had it spawned)
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 20
    while len(service.children()) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = r.pamtester(r.login(), ALICE, [PIN])
    assert after.ok, after.out + service.log.read_text()
    assert service.alive


def test_the_caller_environment_has_no_effect_through_the_service(
        hsm_served: tuple[Rig, Service], planted: tuple[Path, Path],
        native_libs: dict[str, Path], tmp_path: Path) -> None:
    """The same hostile variables as the spawned helper's test, in pamtester's
    environment (LD_PRELOAD included) and in the PAM environment, and in the service's
    own start environment: the login works on root's config, nothing planted runs."""
    r, service = hsm_served
    service.stop()
    plant, marker = planted
    hostile = hostile_environment(plant, tmp_path, native_libs)
    service = Service(r.root, r.config, {"PATH": "/usr/bin:/bin", **hostile})
    r.socket = str(service.socket)
    try:
        assert_login_ignores(r, hostile, native_libs, marker, service.log.read_text)
    finally:
        service.cleanup()


# --- kill -9 and a stopped service ------------------------------------------------------


def _stop_at_cue(service: Service, r: Rig) -> tuple[subprocess.Popen[str], int]:
    lines = _request(r, ALICE, "cue_prompt=Touch it")
    proc = subprocess.Popen([sys.executable, "-I", "-c", _CLIENT, str(service.socket),
                             json.dumps(lines), PIN, "stop-at-cue"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("info "):
            break
    else:
        raise AssertionError("no cue")
    (child,) = service.children()
    return proc, child


def test_kill_9_of_a_child_mid_login_keeps_the_record_and_authfile(
        served: tuple[Rig, Service]) -> None:
    """At the cue the try is recorded and the token not yet used: kill -9 of the child
    counts as a failure. Then (swtpm) kills at moments inside the token work: the
    authfile always parses, its counter never goes back, and the next login works.
    (Not on SoftHSM: it rewrites token.object in place at every C_Login, and a kill
    there loses the token itself, see tests/test_pkcs11_counter.py.)"""
    r, service = served
    sweep = (0.0, 0.003, 0.006, 0.01, 0.02, 0.04) if not r.environment else ()
    before = r.counter()
    proc, child = _stop_at_cue(service, r)
    os.kill(child, signal.SIGKILL)
    proc.kill()
    proc.wait(10)
    assert _failures(r) == 1
    assert r.counter() == before
    r.write_config(r.environment, "deny = 100\n")
    last = before
    for delay in sweep:
        proc = subprocess.Popen([sys.executable, "-I", "-c", _CLIENT, str(service.socket),
                                 json.dumps(_request(r, ALICE)), PIN, ""],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("secret "):
                break
        time.sleep(delay)
        for pid in service.children():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(10)
        now = r.counter()  # parses, or this raises
        assert now >= last
        last = now
    ok = r.pamtester(r.login(), ALICE, [PIN])
    assert ok.ok, ok.out
    assert r.counter() > last and _failures(r) == 0
    assert service.alive


def test_a_stopped_service_falls_back_to_spawning_the_helper(
        hsm_served: tuple[Rig, Service]) -> None:
    """SIGTERM removes the socket: the real module spawns the helper and logs in, the
    no-spawn module fails (so it did not reach a service). kill -9 leaves a stale socket
    nobody listens on: the same."""
    r, service = hsm_served
    assert r.pamtester(r.login(), ALICE, [PIN]).ok  # the no-spawn module: the service
    assert service.stop() == 0
    assert not service.socket.exists()
    nospawn = r.pamtester(r.login(name="nospawn"), ALICE, [PIN])
    assert nospawn.code(PAM_SYSTEM_ERR), nospawn.out
    r.module = REPO / "build" / "pam" / "pam_hsm_auth.so"
    assert r.pamtester(r.login(name="real"), ALICE, [PIN]).ok
    again = Service(r.root, r.config, run_dir=service.dir)
    again.proc.kill()
    again.proc.wait(10)
    assert again.socket.exists()
    assert r.pamtester("real", ALICE, [PIN]).ok


# --- starting the service -----------------------------------------------------------------


def test_the_service_refuses_to_start_unsafely(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "hsm_auth.login_service"]
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    config = tmp_path / "c.toml"
    not_isolated = subprocess.run([*base, "--socket", str(run / "s")], capture_output=True,
                                  text=True, timeout=60, check=False)
    assert not_isolated.returncode == 2
    assert not_isolated.stderr.startswith("hsm-auth: error: ") and "-I" in not_isolated.stderr
    run.chmod(0o777)
    unsafe = subprocess.run([sys.executable, "-I", "-m", "hsm_auth.login_service",
                             "--socket", str(run / "s"), "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert unsafe.returncode == 1 and "not writable by group or others" in unsafe.stderr
    assert "Traceback" not in unsafe.stderr
    run.chmod(0o755)
    first = Service(tmp_path, config, run_dir=run)
    try:
        mode = first.socket.stat().st_mode & 0o777
        assert mode == 0o666
        second = subprocess.run([sys.executable, "-I", "-m", "hsm_auth.login_service",
                                 "--socket", str(first.socket), "--config", str(config)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1 and "already listens" in second.stderr
        assert first.alive
        assert first.socket.exists()
    finally:
        first.stop()
    assert not first.socket.exists()


def test_the_parent_preloads_bindings_but_opens_no_token(
        hsm_served: tuple[Rig, Service]) -> None:
    """The parent has tpm2-pytss and python-pkcs11 loaded (their libraries are mapped)
    but no PKCS#11 module (SoftHSM) and no TPM connection: only children open tokens."""
    r, service = hsm_served
    assert r.pamtester(r.login(), ALICE, [PIN]).ok
    maps = (Path("/proc") / str(service.proc.pid) / "maps").read_text()
    assert "libsofthsm2" not in maps
    assert "tss2" in maps or "pytss" in maps
    fds = [os.readlink(f) for f in (Path("/proc") / str(service.proc.pid) / "fd").iterdir()]
    assert not any("softhsm" in f or "tpm" in f for f in fds), fds



def test_the_service_floor_for_the_benchmark(hsm_rig: Rig, nospawn_module: Path) -> None:
    """bench/login.py's floor of the service path: the service's own loop and fork with
    a child answering SUCCESS (``hsm_auth.testing.pam_floor --serve``)."""
    run = Path(tempfile.mkdtemp(prefix="hsm-auth-run-"))
    run.chmod(0o755)
    path = run / "floor.sock"
    proc = subprocess.Popen([sys.executable, "-I", "-m", "hsm_auth.testing.pam_floor",
                             "--serve", "--socket", str(path)], env={"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        hsm_rig.socket, hsm_rig.module = str(path), nospawn_module
        result = hsm_rig.pamtester(hsm_rig.login(), ALICE, [])
        assert result.ok and "PIN for" not in result.out, result.out
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(run, ignore_errors=True)


def test_a_request_the_module_cannot_send_is_a_system_error_at_once(
        hsm_served: tuple[Rig, Service]) -> None:
    """A PAM item with a control character cannot be framed: the module stops the request
    half-way. Through the service that is PAM_SYSTEM_ERR as with the spawned helper, not
    a child left waiting for the rest until the timeout (PAM_AUTH_ERR)."""
    r, service = hsm_served
    result = r.pamtester(r.login("timeout=3"), ALICE, [PIN], "rhost=host\x01name")
    assert result.code(PAM_SYSTEM_ERR), result.out
    assert service.alive
