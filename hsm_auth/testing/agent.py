"""A real ``hsm-auth agent`` for tests: a subprocess on a socket in a temp dir,
ready once ``hsm-auth agent --status`` answers, stopped with SIGTERM afterwards;
and the CLI commands that talk to it.

::

    with running_agent(home, socket_path, online_url=service.url) as agent:
        challenge = agent.wait_for(challenge_id)      # the long-poll brought it
        agent.cli("approve", challenge_id)            # CompletedProcess (text)
        assert "Traceback" not in agent.log()

``home`` is an ``--home`` directory whose ``config.toml`` names the methods (and
``[online] url``, unless ``online_url`` is given: it goes in
``HSM_AUTH_ONLINE_URL``). The agent gets no D-Bus (``DBUS_SYSTEM_BUS_ADDRESS``
points nowhere) unless ``env`` gives one; ``HSM_AUTH_*`` of the test process is
not passed on, except what ``env`` sets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunningAgent", "agent_environment", "running_agent"]


def agent_environment(
    socket_path: Path, *, online_url: str | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment an agent and its CLI commands run with in tests."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_AUTH_", "DBUS_"))}
    out["HSM_AUTH_AGENT_SOCKET"] = str(socket_path)
    out["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/hsm-auth-test-bus"
    if online_url is not None:
        out["HSM_AUTH_ONLINE_URL"] = online_url
    out.update(env or {})
    return out


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    socket: Path
    home: Path
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        """What the agent wrote to stderr so far."""
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def cli(
        self, *argv: str, pass_fds: tuple[int, ...] = (), timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``hsm-auth --home HOME ARGV`` against this agent (stdin empty, no terminal)."""
        return subprocess.run(
            [sys.executable, "-m", "hsm_auth", "--home", str(self.home), *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=self.env, pass_fds=pass_fds, check=False,
        )

    def status(self) -> dict[str, Any]:
        r = self.cli("--json", "agent", "--status")
        if r.returncode != 0:
            raise RuntimeError(f"hsm-auth agent --status failed: {r.stderr.strip()}")
        return dict(json.loads(r.stdout))

    def challenges(self) -> dict[str, dict[str, Any]]:
        """The challenges the agent holds, by id (``hsm-auth --json challenges``)."""
        r = self.cli("--json", "challenges")
        if r.returncode != 0:
            raise RuntimeError(f"hsm-auth challenges failed: {r.stderr.strip()}")
        return {c["challenge_id"]: c for c in json.loads(r.stdout)["challenges"]}

    def wait_for(self, challenge_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The challenge, once the agent's long-poll has brought it."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.challenges()
            if challenge_id in held:
                return held[challenge_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"the agent exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent never received {challenge_id}:\n{self.log()}")
            time.sleep(0.1)


@contextlib.contextmanager
def running_agent(
    home: Path,
    socket_path: Path,
    *,
    online_url: str | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    timeout: float = 30.0,
) -> Iterator[RunningAgent]:
    """Start ``hsm-auth --home HOME agent`` on ``socket_path``; yield once it answers."""
    child_env = agent_environment(socket_path, online_url=online_url, env=env)
    log_path = log_path or socket_path.parent.parent / f"agent-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hsm_auth", "--home", str(home), "agent"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env,
        )
    agent = RunningAgent(process, socket_path, home, child_env, log_path)
    try:
        deadline = time.monotonic() + timeout
        while agent.cli("agent", "--status").returncode != 0:
            if process.poll() is not None:
                raise RuntimeError(f"hsm-auth agent exited ({process.returncode}):\n{agent.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"hsm-auth agent did not become ready:\n{agent.log()}")
            time.sleep(0.05)
        yield agent
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
