"""The agent: its socket (modes, peer credentials, stale sockets), its protocol
(malformed and oversize lines never kill it), the PIN cache (expiry on a fake
clock, lock, wipes), the D-Bus lock/sleep watch on a real private bus, and a
wrong PIN that reaches a real SoftHSM token and is not cached.

Agent *processes* here are real (``python -m hsm_auth agent``); the online side
is absent from them (no verifier enrolled online). Where the agent's own logic
needs challenges (merge, answer, claim, cache), :class:`FakeSource` stands in for
the online client: unit tests of the agent only. The agent with the real service,
tokens and browser is tests/test_agent_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hsm_auth import agent as agentmod
from hsm_auth.agent import Agent, ChallengeView, CredentialPolicy
from hsm_auth.agent_client import MAX_LINE, AgentClient, AgentNotRunning
from hsm_auth.errors import InvalidInput, PinInvalid, PinRequired, StateError
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.pin_cache import PinCache, SleepDetector
from hsm_auth.session_watch import LOCK, SLEEP, MonitorParser, SessionWatch

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to become nobody)")


# --- a real agent process ------------------------------------------------------------


def _wait_for(predicate: Any, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the agent exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_AUTH_", "DBUS_"))}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/bus"  # no D-Bus: said, not fatal
    env.update(extra or {})
    return env


def _answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def agent_process(
    sock: Path, home: Path, *, user: int | None = None, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsm_auth", "--home", str(home), "agent", "--socket", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=agent_env(env),
        user=user,
        group=NOBODY.pw_gid if user is not None else None,
        extra_groups=[] if user is not None else None,
    )
    try:
        _wait_for(lambda: _answers(sock), "its socket", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    sock = tmp_path / "run" / "agent.sock"
    with agent_process(sock, tmp_path / "home") as proc:
        yield proc, sock


def raw_exchange(sock: Path, data: bytes) -> list[dict[str, Any]]:
    """Send ``data``, read reply lines until the agent closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.settimeout(10)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # the agent may refuse (and close) before the end
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return [json.loads(line) for line in out.splitlines()]


# --- the socket ----------------------------------------------------------------------


def test_socket_and_directory_modes(running: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = running
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o700
    with AgentClient(sock) as client:
        status = client.call("status")
    assert status["pid"] == proc.pid and status["uid"] == os.getuid()
    assert status["sources"] == [] and status["pending"] == 0 and status["cache"] == []


def test_sigterm_removes_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"
    with agent_process(sock, tmp_path / "home") as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert not sock.exists()
    with pytest.raises(AgentNotRunning, match="not running"):
        AgentClient(sock)


def _start_fails(sock: Path, home: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(home), "agent", "--socket", str(sock)],
        capture_output=True, text=True, timeout=30, env=agent_env(),
    )
    assert result.returncode == StateError.exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsm-auth: error: "), lines  # one line
    return lines[0]


def test_refuses_a_directory_others_can_enter(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    os.chmod(run, 0o750)
    assert "accessible by group or others" in _start_fails(run / "agent.sock", tmp_path / "h")
    assert not (run / "agent.sock").exists()


@needs_root
def test_refuses_someone_elses_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY.pw_uid, NOBODY.pw_gid)
    assert "not to this user" in _start_fails(run / "agent.sock", tmp_path / "h")


def test_refuses_a_file_in_the_sockets_place(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "agent.sock").write_text("mine")
    assert "not this user's agent socket" in _start_fails(run / "agent.sock", tmp_path / "h")
    assert (run / "agent.sock").read_text() == "mine"


@needs_root
def test_refuses_someone_elses_socket(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(run / "agent.sock"))
    os.chown(run / "agent.sock", NOBODY.pw_uid, NOBODY.pw_gid)
    assert "not this user's agent socket" in _start_fails(run / "agent.sock", tmp_path / "h")
    assert os.lstat(run / "agent.sock").st_uid == NOBODY.pw_uid


def test_replaces_a_stale_socket_of_ours_but_not_a_live_agent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = run / "agent.sock"
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listening, closed: stale
        s.bind(str(sock))
    with agent_process(sock, tmp_path / "home"):
        with AgentClient(sock) as client:
            assert client.call("status")["ok"] is True
        assert "running already" in _start_fails(sock, tmp_path / "home")
        with AgentClient(sock) as client:  # the first agent kept its socket
            assert client.call("status")["ok"] is True


# --- peer credentials ------------------------------------------------------------------


def _as_nobody(action: Any) -> Any:
    """Run ``action()`` in a forked child that became nobody; return what it returned
    (a JSON value) or the name of the exception it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            try:
                result: Any = {"value": action()}
            except Exception as e:
                result = {"raised": e.__class__.__name__, "errno": getattr(e, "errno", None)}
            os.write(write, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


@needs_root
def test_another_user_cannot_reach_the_agent(
    running: tuple[subprocess.Popen[bytes], Path]
) -> None:
    _, sock = running

    def connect() -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b'{"v":1,"op":"status"}\n')
            return s.recv(100).decode()

    result = _as_nobody(connect)
    assert result.get("raised") == "PermissionError", result  # 0700 dir, 0600 socket
    with AgentClient(sock) as client:
        assert client.call("status")["ok"] is True


@contextlib.contextmanager
def forked_agent(
    sock: Path, *, nobody: bool = False, cached: Mapping[str, str] | None = None,
    system_bus: str | None = None,
) -> Iterator[int]:
    """A real agent in a child of this test process (as nobody if asked), serving
    ``sock``, with ``cached`` PINs in its cache and its D-Bus watch on ``system_bus``."""
    pid = os.fork()
    if pid == 0:  # the child: the agent, until SIGTERM; never returns to pytest
        code = 1
        try:
            if nobody:
                os.setgroups([])
                os.setgid(NOBODY.pw_gid)
                os.setuid(NOBODY.pw_uid)
            a = Agent([], notify=Recorder())
            for key, pin in (cached or {}).items():
                a.cache.put(key, pin, 3600)
            watch = None
            if system_bus is not None:
                from hsm_auth import session_watch

                command = ["dbus-monitor", "--address", system_bus, *session_watch.SYSTEM_RULES]
                watch = SessionWatch(lambda event: a.wipe(event), commands=[command])
            code = agentmod.run(a, sock, watch=watch)
        finally:
            os._exit(code)
    try:
        _wait_for(lambda: _answers(sock), "the agent's socket")
        yield pid
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@needs_root
def test_peer_credentials_are_checked_on_every_connection() -> None:
    """The agent runs as nobody; root (whom no file mode stops) connects and is closed
    without a byte, while nobody itself is answered: the check is the uid, not modes."""
    base = Path(tempfile.mkdtemp(prefix="hsm-auth-agent-", dir="/tmp"))
    try:
        os.chown(base, NOBODY.pw_uid, NOBODY.pw_gid)
        os.chmod(base, 0o700)
        sock = base / "run" / "agent.sock"
        with forked_agent(sock, nobody=True):
            assert os.lstat(sock).st_uid == NOBODY.pw_uid
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(sock))  # root: the modes let it through
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b'{"v":1,"op":"status"}\n')
                try:
                    answer = s.recv(100)
                except ConnectionResetError:
                    answer = b""
            assert answer == b""
            with pytest.raises(AgentNotRunning, match="without answering"), \
                    AgentClient(sock) as client:
                client.call("status")

            def ask() -> Any:
                with AgentClient(sock) as client:
                    return client.call("status")["uid"]

            assert _as_nobody(ask) == {"value": NOBODY.pw_uid}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the protocol's bad input ----------------------------------------------------------


BAD_LINES = [
    b"not json",
    b"\xff\xfe\x00",
    b"[]",
    b"42",
    b'"status"',
    b"{}",
    b'{"op":"status"}',
    b'{"v":2,"op":"status"}',
    b'{"v":1,"op":"shutdown"}',
    b'{"v":1,"op":["list"]}',
    b'{"v":1,"op":"approve"}',
    b'{"v":1,"op":"approve","id":7}',
    b'{"v":1,"op":"approve","id":"zz"}',
    b'{"v":1,"op":"approve","id":"00112233445566778899aabbccddeeff"}',
    b'{"v":1,"op":"approve","id":"00112233445566778899aabbccddeeff","pin":5}',
    b'{"v":1,"op":"approve","id":"00112233445566778899aabbccddeeff","pin":"a\\u0000b"}',
    b'{"v":1,"op":"approve","id":"00112233445566778899aabbccddeeff","method":"retina"}',
    b'{"v":1,"op":"claim"}',
    b'{"v":1,"op":"claim","claim":""}',
    b'{"v":1,"op":"claim","claim":"hsm-auth:claim:v1:00:11"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"v":1,"op":"status","x":' + b'"' + b"a" * 1000 + b'"}',
]


def test_malformed_lines_get_error_replies_and_the_agent_lives(
    running: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, sock = running
    replies = raw_exchange(sock, b"\n".join(BAD_LINES) + b"\n")
    assert len(replies) == len(BAD_LINES)
    for line, reply in zip(BAD_LINES, replies, strict=True):
        if line.startswith(b'{"v":1,"op":"status"'):  # unknown fields are ignored
            assert reply["ok"] is True
            continue
        assert reply["ok"] is False, line[:80]
        assert reply["error"]["type"] in ("InvalidInput", "UnknownMethod", "PinRequired"), reply
        assert "Traceback" not in reply["error"]["message"]
    assert proc.poll() is None
    with AgentClient(sock) as client:
        assert client.call("status")["ok"] is True


def test_an_oversize_line_is_refused_and_closed(
    running: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, sock = running
    for data in (b"x" * (MAX_LINE + 10), b'{"v":1,"op":"list","pad":"' + b"a" * MAX_LINE + b'"}\n'):
        replies = raw_exchange(sock, data)
        assert len(replies) == 1 and replies[0]["ok"] is False
        assert "longer than" in replies[0]["error"]["message"]
    assert proc.poll() is None
    with AgentClient(sock) as client:
        assert client.call("list") == {"ok": True, "challenges": []}


def test_a_flood_of_idle_connections_does_not_lock_out_the_user(
    running: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, sock = running
    idle = []
    try:
        for _ in range(agentmod.MAX_CONNECTIONS * 2):  # more than it serves at once
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            idle.append(s)
    finally:
        for s in idle:
            s.close()
    assert proc.poll() is None

    def answered() -> bool:
        try:
            with AgentClient(sock, timeout=5) as client:
                return client.call("status")["ok"] is True
        except AgentNotRunning:
            return False  # closed for a full house while the idle ones drain

    _wait_for(answered, "an answer after the idle connections closed", proc)


def test_the_test_helper_runs_an_agent_and_its_cli(tmp_path: Path) -> None:
    from hsm_auth.testing.agent import running_agent

    sock = tmp_path / "run" / "agent.sock"
    with running_agent(tmp_path / "home", sock) as agent:
        assert agent.status()["sources"] == [] and agent.challenges() == {}
        r = agent.cli("approve", "00" * 16)
        assert r.returncode == InvalidInput.exit_code and "no pending challenge" in r.stderr
    assert agent.process.returncode == 0 and not sock.exists()
    assert "no [online] url" in agent.log() or "listening on" in agent.log()


def test_cli_without_an_agent_says_how_to_start_it(tmp_path: Path) -> None:
    env = agent_env({"HSM_AUTH_AGENT_SOCKET": str(tmp_path / "none" / "agent.sock")})
    for argv in (["challenges"], ["approve", "00" * 16], ["reject", "00" * 16],
                 ["claim", "hsm-auth:claim:v1:x", "--approve"], ["agent", "--status"]):
        result = subprocess.run(
            [sys.executable, "-m", "hsm_auth", *argv], capture_output=True, text=True,
            timeout=30, env=env,
        )
        assert result.returncode == StateError.exit_code, (argv, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"hsm-auth: error: the hsm-auth agent is not running (no agent at "
            f"{tmp_path / 'none' / 'agent.sock'}); start it with 'hsm-auth agent &' or "
            "'systemctl --user start hsm-auth-agent'"
        ]


def test_install_unit_names_this_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "hsm-auth"
    result = subprocess.run(
        [str(exe), "--home", str(tmp_path / "home"), "agent", "--install-unit",
         "--unit-dir", str(tmp_path / "units")],
        capture_output=True, text=True, timeout=30, env=agent_env(),
    )
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "units" / "hsm-auth-agent.service").read_text()
    starts = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert starts == [f"ExecStart={exe} agent --home {tmp_path / 'home'}"]
    assert "[Install]" in unit and "WantedBy=default.target" in unit and "LimitCORE=0" in unit
    assert stat.S_IMODE(os.stat(tmp_path / "units" / "hsm-auth-agent.service").st_mode) == 0o644


# --- the PIN cache ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_cache_keeps_a_pin_for_its_timeout_then_wipes_the_buffer() -> None:
    clock = FakeClock()
    cache = PinCache(clock)
    cache.put("cred-a", "4321", 60)
    buffer = cache._entries["cred-a"].secret  # the bytes the cache holds
    assert bytes(buffer) == b"4321"
    clock.now += 59.9
    assert cache.get("cred-a") == "4321"
    assert [(s.key, round(s.seconds_left, 1)) for s in cache.status()] == [("cred-a", 0.1)]
    clock.now += 0.1
    assert cache.get("cred-a") is None
    assert bytes(buffer) == b"\0\0\0\0"  # overwritten, not just dropped
    assert cache.status() == []


def test_cache_never_keeps_a_pin_for_timeout_zero_and_hides_it() -> None:
    cache = PinCache(FakeClock())
    cache.put("cred-a", "4321", 0)
    cache.put("cred-b", "1111", -5)
    assert cache.get("cred-a") is None and cache.get("cred-b") is None
    cache.put("cred-c", "secret-pin", 30)
    assert "secret-pin" not in repr(cache) and "secret-pin" not in repr(cache._entries)
    assert "secret-pin" not in repr(cache.status())


def test_cache_clear_wipes_every_entry_and_replacing_wipes_the_old() -> None:
    cache = PinCache(FakeClock())
    cache.put("a", "1111", 30)
    old = cache._entries["a"].secret
    cache.put("a", "2222", 30)
    assert bytes(old) == b"\0\0\0\0" and cache.get("a") == "2222"
    cache.put("b", "3333", 30)
    buffers = [e.secret for e in cache._entries.values()]
    assert cache.clear() == 2
    assert all(bytes(b) == b"\0\0\0\0" for b in buffers)
    assert cache.get("a") is None and cache.get("b") is None


def test_cache_entries_are_mlocked() -> None:
    cache = PinCache(FakeClock())
    cache.put("a", "1111", 30)
    assert cache.locked_in_memory()  # RLIMIT_MEMLOCK allows 4 bytes everywhere we run


def test_sleep_is_seen_from_the_clocks() -> None:
    boot, mono = FakeClock(500.0), FakeClock(100.0)
    detector = SleepDetector(2.0, boottime=boot, monotonic=mono)
    boot.now += 10
    mono.now += 10  # both moved: awake
    assert not detector.slept()
    boot.now += 3600  # BOOTTIME counted an hour that MONOTONIC did not: asleep
    mono.now += 1
    assert detector.slept()
    assert not detector.slept()


# --- the agent's logic (FakeSource stands in for the online client) ---------------------


class Recorder:
    def __init__(self) -> None:
        self.notes: list[tuple[str, str]] = []
        self.lines: list[str] = []

    def notify(self, summary: str, body: str) -> None:
        self.notes.append((summary, body))

    def line(self, text: str) -> None:
        self.lines.append(text)


def view(cid: str, *, kind: str = "push", expires: int = 2_000_000_000, **context: Any) -> Any:
    return ChallengeView(cid, kind, "pending", expires, "alice", "Sign in to Example", **context)


class FakeSource:
    name = "Example verifier"
    verifier_id = b"\x01" * 8
    user = "alice"
    url = "http://127.0.0.1:1"

    def __init__(self, methods: dict[Method, CredentialPolicy], pin: str | None = None) -> None:
        self._methods = methods
        self.pin = pin  # what the "token" takes
        self.answers: list[tuple[str, bool, Method, str | None]] = []
        self.batches: list[list[ChallengeView]] = []
        self.polled = threading.Event()
        self.known: list[list[str]] = []
        self.authorized: list[float | None] = []

    def methods(self) -> Mapping[Method, CredentialPolicy]:
        return self._methods

    def pending(
        self, method: Method, wait: float, auth: Authorization, known: Any
    ) -> list[ChallengeView]:
        self.known.append(sorted(known))
        if self.batches:
            return self.batches.pop(0)
        self.polled.set()
        time.sleep(0.05)
        return []

    def owns_claim(self, claim: str) -> bool:
        return claim.startswith("hsm-auth:claim:v1:0101010101010101:")

    def claim(self, claim: str, method: Method, auth: Authorization) -> ChallengeView:
        self._check(method, auth)
        return view(claim.rsplit(":", 1)[1], kind="qr", ip="203.0.113.9")

    def answer(
        self, challenge: ChallengeView, approve: bool, method: Method, auth: Authorization,
        authorized_at: float | None,
    ) -> None:
        self._check(method, auth)
        self.answers.append((challenge.challenge_id, approve, method, auth.pin))
        self.authorized.append(authorized_at)

    def _check(self, method: Method, auth: Authorization) -> None:
        if method.needs_pin and auth.pin != self.pin:
            raise PinInvalid()


CID = "00112233445566778899aabbccddeeff"
CID2 = "ffeeddccbbaa99887766554433221100"


def make_agent(source: FakeSource, clock: FakeClock | None = None) -> tuple[Agent, Recorder]:
    rec = Recorder()
    clock = clock or FakeClock(1_000_000_000)
    return Agent([source], notify=rec, cache=PinCache(clock, wall=clock), clock=clock), rec


def test_polled_challenges_are_shown_once_and_forgotten_when_gone() -> None:
    source = FakeSource({Method.DEVICE: CredentialPolicy("c-dev")})
    a, rec = make_agent(source)
    hostile = "Sign in\u202e\x1b[31m"
    source.batches = [[view(CID, ip="203.0.113.9", location="Berlin", custom={"k": hostile})],
                      [view(CID, ip="203.0.113.9"), view(CID2)], [view(CID2)]]
    a.start_polling()
    assert source.polled.wait(10)
    a.stopping.set()
    assert [c["challenge_id"] for c in a.list()["challenges"]] == [CID2]  # CID: answered elsewhere
    assert len(rec.notes) == 2  # CID once, CID2 once
    assert source.known[:4] == [[], [CID], [CID, CID2], [CID2]]  # the long-poll's "known"
    summary, body = rec.notes[0]
    assert summary == "Example verifier: push challenge for alice"
    assert "203.0.113.9" in body and "Berlin" in body and f"hsm-auth approve {CID}" in body


def test_approve_with_a_pin_caches_it_only_when_the_policy_allows() -> None:
    source = FakeSource({Method.PIN: CredentialPolicy("c-pin", timeout=300),
                         Method.DEVICE: CredentialPolicy("c-dev", timeout=0)}, pin="2468")
    clock = FakeClock(1_000_000_000)
    a, _ = make_agent(source, clock)
    a._merge(a._sources[0], [view(CID), view(CID2)])
    with pytest.raises(PinRequired):
        a.answer(CID, True, "pin", None)
    assert a.answer(CID, True, "pin", "2468")["state"] == "approved"
    assert a.cache.get("c-pin") == "2468"
    assert a.answer(CID2, False, "pin", None)["state"] == "rejected"  # the cached PIN
    assert source.answers == [(CID, True, Method.PIN, "2468"), (CID2, False, Method.PIN, "2468")]
    assert source.authorized == [None, 1_000_000_000]  # the cached one says when it was typed
    clock.now += 300
    a._merge(a._sources[0], [view(CID)])
    with pytest.raises(PinRequired):  # expired: asked again
        a.answer(CID, True, "pin", None)


def test_a_wrong_pin_is_not_cached_and_a_wrong_cached_pin_is_dropped() -> None:
    source = FakeSource({Method.PIN: CredentialPolicy("c-pin", timeout=300)}, pin="2468")
    a, _ = make_agent(source)
    a._merge(a._sources[0], [view(CID)])
    with pytest.raises(PinInvalid):
        a.answer(CID, True, "pin", "0000")
    assert a.cache.get("c-pin") is None and source.answers == []
    assert [c["challenge_id"] for c in a.list()["challenges"]] == [CID]  # still to answer
    a.answer(CID, True, "pin", "2468")
    source.pin = "1357"  # the PIN changed on the token
    a._merge(a._sources[0], [view(CID2)])
    with pytest.raises(PinInvalid):
        a.answer(CID2, True, "pin", None)
    assert a.cache.get("c-pin") is None


def test_claim_then_only_the_claiming_method_answers() -> None:
    source = FakeSource({Method.PIN: CredentialPolicy("c-pin", timeout=0),
                         Method.DEVICE: CredentialPolicy("c-dev")}, pin="2468")
    a, _ = make_agent(source)
    with pytest.raises(Exception, match="does not poll"):
        a.claim(f"hsm-auth:claim:v1:{'02' * 8}:{CID}", None, None)
    reply = a.claim(f"hsm-auth:claim:v1:{'01' * 8}:{CID}", "pin", "2468")
    assert reply["challenge"]["context"]["ip"] == "203.0.113.9"
    assert a.cache.get("c-pin") is None  # timeout 0: never cached
    with pytest.raises(InvalidInput, match="claimed with the pin method"):
        a.answer(CID, True, "device", None)
    a._merge(a._sources[0], [])  # a poll without it does not drop a claimed challenge
    assert a.answer(CID, True, None, "2468")["state"] == "approved"


def test_lock_and_session_events_wipe_the_cache() -> None:
    source = FakeSource({Method.PIN: CredentialPolicy("c-pin", timeout=300)}, pin="2468")
    a, rec = make_agent(source)
    a.cache.put("c-pin", "2468", 300)
    assert a.handle_line(b'{"v":1,"op":"lock"}') == {"ok": True, "wiped": 1}
    assert a.cache.get("c-pin") is None
    a.cache.put("c-pin", "2468", 300)
    a.wipe("screen locked")
    assert a.cache.get("c-pin") is None and rec.lines == ["PIN cache wiped (screen locked)"]


# --- D-Bus: lock and sleep signals on a real (private) bus -----------------------------


def test_monitor_parser_reads_both_tools() -> None:
    p = MonitorParser()
    dbus_monitor = [
        "signal time=1.0 sender=:1.2 -> destination=(null destination) serial=9 "
        "path=/org/freedesktop/login1; interface=org.freedesktop.login1.Manager; "
        "member=PrepareForSleep",
        "   boolean false",
        "signal time=1.0 sender=:1.2 -> destination=(null destination) serial=9 "
        "path=/org/freedesktop/login1; interface=org.freedesktop.login1.Manager; "
        "member=PrepareForSleep",
        "   boolean true",
        "signal time=1.1 sender=:1.2 -> destination=(null destination) serial=10 "
        "path=/org/freedesktop/login1/session/_32; interface=org.freedesktop.login1.Session; "
        "member=Lock",
        "signal time=1.1 sender=:1.2 -> destination=(null destination) serial=10 "
        "path=/org/freedesktop/login1/session/_32; interface=org.freedesktop.login1.Session; "
        "member=Unlock",
    ]
    assert [p.feed(line) for line in dbus_monitor] == [None, None, None, SLEEP, LOCK, None]
    gdbus = [
        "/org/freedesktop/login1: org.freedesktop.login1.Manager.PrepareForSleep (false,)",
        "/org/freedesktop/login1: org.freedesktop.login1.Manager.PrepareForSleep (true,)",
        "/org/freedesktop/login1/session/_32: org.freedesktop.login1.Session.Lock ()",
        "/org/gnome/ScreenSaver: org.gnome.ScreenSaver.ActiveChanged (true,)",
    ]
    assert [p.feed(line) for line in gdbus] == [None, SLEEP, LOCK, LOCK]


@pytest.fixture
def private_bus(tmp_path: Path) -> Iterator[str]:
    if not (shutil.which("dbus-daemon") and shutil.which("dbus-monitor")
            and shutil.which("gdbus")):
        pytest.skip("needs dbus-daemon, dbus-monitor and gdbus")
    proc = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address=1",
         f"--address=unix:path={tmp_path / 'bus'}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def _emit(address: str, path: str, signal_name: str, *args: str) -> None:
    subprocess.run(
        ["gdbus", "emit", "--address", address, "--object-path", path, "--signal", signal_name,
         *args],
        check=True, timeout=10, capture_output=True,
    )


def _attach(address: str, heard: threading.Semaphore, events: list[str]) -> None:
    """Emit a Lock until the monitor hears one (it has attached), then forget it."""
    deadline = time.monotonic() + 20
    while not heard.acquire(timeout=0.2):
        assert time.monotonic() < deadline, "the monitor never attached"
        _emit(address, "/org/freedesktop/login1/session/_1",
              "org.freedesktop.login1.Session.Lock")
    while heard.acquire(timeout=0.5):  # the other pings' echoes
        pass
    events.clear()


def test_session_watch_hears_lock_and_sleep_on_a_real_bus(private_bus: str) -> None:
    from hsm_auth import session_watch

    events: list[str] = []
    heard = threading.Semaphore(0)

    def on_event(event: str) -> None:
        events.append(event)
        heard.release()

    command = ["dbus-monitor", "--address", private_bus, *session_watch.SYSTEM_RULES]
    watch = SessionWatch(on_event, commands=[command])
    watch.start()
    try:
        _attach(private_bus, heard, events)
        _emit(private_bus, "/org/freedesktop/login1",
              "org.freedesktop.login1.Manager.PrepareForSleep", "false")
        _emit(private_bus, "/org/freedesktop/login1",
              "org.freedesktop.login1.Manager.PrepareForSleep", "true")
        _emit(private_bus, "/org/freedesktop/login1/session/_31",
              "org.freedesktop.login1.Session.Unlock")
        _emit(private_bus, "/org/freedesktop/login1/session/_31",
              "org.freedesktop.login1.Session.Lock")
        assert heard.acquire(timeout=10) and heard.acquire(timeout=10)
    finally:
        watch.stop()
    assert events == [SLEEP, LOCK]


def test_the_agent_process_wipes_its_cache_on_a_lock_signal(
    tmp_path: Path, private_bus: str
) -> None:
    """A real agent process holding a cached PIN, watching a (private) bus: a session's
    Lock there wipes every cached PIN."""
    sock = tmp_path / "run" / "agent.sock"
    with forked_agent(sock, cached={"c-pin": "2468", "c-other": "1357"},
                      system_bus=private_bus), AgentClient(sock) as client:
        assert len(client.call("status")["cache"]) == 2
        _wait_for(lambda: client.call("status")["watching"] == 1, "the watch")
        deadline = time.monotonic() + 20
        while client.call("status")["cache"]:  # until the monitor has attached
            assert time.monotonic() < deadline, "the Lock signal never wiped the cache"
            _emit(private_bus, "/org/freedesktop/login1/session/_7",
                  "org.freedesktop.login1.Session.Lock")
            time.sleep(0.1)
        assert client.call("status")["cache"] == []


def test_lock_over_the_socket_wipes_the_process_cache(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "agent.sock"
    with forked_agent(sock, cached={"c-pin": "2468"}), AgentClient(sock) as client:
        assert [c["credential"] for c in client.call("status")["cache"]] == ["c-pin"]
        result = subprocess.run(
            [sys.executable, "-m", "hsm_auth", "agent", "--lock", "--socket", str(sock)],
            capture_output=True, text=True, timeout=30, env=agent_env(),
        )
        assert result.returncode == 0 and "1 cached" in result.stdout
        assert client.call("status")["cache"] == []


def test_notifications_carry_only_escaped_text(tmp_path: Path) -> None:
    """notify-send (a stand-in script on PATH that records its argv) gets the text with
    control / bidi characters escaped and markup as entities; no PIN goes near it."""
    from hsm_auth.notify import Notifier

    record = tmp_path / "argv.json"
    fake = tmp_path / "bin" / "notify-send"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    n = Notifier(sys.stderr, use_desktop=True)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{fake.parent}:{old}"
    try:
        n.notify("Bank\u202e: sign in", "<b>Approve</b> & \x1b[31mnow\u200b")
    finally:
        os.environ["PATH"] = old
    argv = json.loads(record.read_text())
    assert argv[:2] == ["--app-name=hsm-auth", "--"]
    assert argv[2] == "Bank\\u202e: sign in"
    assert argv[3] == "&lt;b&gt;Approve&lt;/b&gt; &amp; \\u001b[31mnow\\u200b"


# --- a wrong PIN reaches the real SoftHSM token and is not cached ------------------------

_CKF_USER_PIN_COUNT_LOW = 0x10000


class TokenSource(FakeSource):
    """Answers by signing in a real SoftHSM token with the agent's Authorization, as the
    online client does (the service is not part of this unit test)."""

    def __init__(self, uri: str, key: str) -> None:
        super().__init__({Method.PIN: CredentialPolicy("c-pin", timeout=120)})
        self._uri, self._key = uri, key

    def answer(
        self, challenge: ChallengeView, approve: bool, method: Method, auth: Authorization,
        authorized_at: float | None,
    ) -> None:
        from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

        with Pkcs11KeyStore.open({"uri": self._uri, "allow_unenforced_pin": True}) as store:
            store.sign(self._key, challenge.challenge_id.encode(), auth)
        self.answers.append((challenge.challenge_id, approve, method, None))


@pytest.mark.softhsm
def test_a_wrong_pin_counts_on_the_softhsm_token_and_is_not_cached(softhsm_token: Any) -> None:
    import pkcs11
    from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

    from hsm_auth.keystore import KeyKind

    settings = {"uri": softhsm_token.uri, "allow_unenforced_pin": True}
    with Pkcs11KeyStore.open(settings) as store:
        key = store.generate_key("agent-test/sign", KeyKind.SIGNING, Authorization(pin="1234"))

    def flags() -> int:
        lib = pkcs11.lib(softhsm_token.module_path)
        return int(lib.get_token(token_label=softhsm_token.label).flags)

    assert not flags() & _CKF_USER_PIN_COUNT_LOW
    source = TokenSource(softhsm_token.uri, key)
    a, _ = make_agent(source)
    a._merge(a._sources[0], [view(CID)])
    with pytest.raises(PinInvalid):
        a.answer(CID, True, None, "9999")
    assert flags() & _CKF_USER_PIN_COUNT_LOW  # the token saw (and counted) the wrong PIN
    assert a.cache.get("c-pin") is None and a.cache.status() == []
    with pytest.raises(PinRequired):  # nothing cached to fall back on
        a.answer(CID, True, None, None)
    assert a.answer(CID, True, None, "1234")["state"] == "approved"
    assert not flags() & _CKF_USER_PIN_COUNT_LOW  # the right PIN cleared it
    assert a.cache.get("c-pin") == "1234"
