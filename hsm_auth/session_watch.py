"""Screen lock and suspend, as the agent hears of them: D-Bus signals read from a
``dbus-monitor`` (else ``gdbus monitor``) subprocess.

Signals that mean "forget the cached PINs now":

* logind (system bus): ``org.freedesktop.login1.Manager.PrepareForSleep(true)``
  before suspend / hibernate, and ``org.freedesktop.login1.Session.Lock`` on any
  session (``loginctl lock-session``, the desktop's lock); any session's, not only
  ours: wiping too often is safe;
* the desktop's screen saver (session bus): ``ActiveChanged(true)`` of
  ``org.freedesktop.ScreenSaver`` / ``org.gnome.ScreenSaver``.

``dbus-monitor`` is used as a monitor where the bus allows it, else with plain match
rules (broadcast signals reach those without privilege); the buses are the ones the
tools find themselves (``DBUS_SYSTEM_BUS_ADDRESS``, ``DBUS_SESSION_BUS_ADDRESS``).
``gdbus monitor`` (the fallback) can only follow logind on the system bus.

Where there is no D-Bus (no tool, no bus, the monitor exits): nothing is heard, the
watcher says so once through ``report``, and the cache is wiped only at its timeout,
on ``hsm-auth lock``, at agent exit, and after a suspend that
:class:`~hsm_auth.pin_cache.SleepDetector` notices from the clocks (within seconds of
resuming, not before sleeping).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable

#: What a line of monitor output may mean.
LOCK = "lock"
SLEEP = "sleep"

_MEMBERS = {
    "org.freedesktop.login1.Manager.PrepareForSleep": SLEEP,
    "org.freedesktop.login1.Session.Lock": LOCK,
    "org.freedesktop.ScreenSaver.ActiveChanged": LOCK,
    "org.gnome.ScreenSaver.ActiveChanged": LOCK,
}
#: Those that carry a boolean and mean it only when it is true.
_BOOLEAN = frozenset(
    {
        "org.freedesktop.login1.Manager.PrepareForSleep",
        "org.freedesktop.ScreenSaver.ActiveChanged",
        "org.gnome.ScreenSaver.ActiveChanged",
    }
)

SYSTEM_RULES = (
    "type='signal',interface='org.freedesktop.login1.Manager',member='PrepareForSleep'",
    "type='signal',interface='org.freedesktop.login1.Session',member='Lock'",
)
SESSION_RULES = (
    "type='signal',interface='org.freedesktop.ScreenSaver',member='ActiveChanged'",
    "type='signal',interface='org.gnome.ScreenSaver',member='ActiveChanged'",
)

_DBUS_MONITOR_HEAD = re.compile(r"^signal .* interface=([\w.]+); member=(\w+)")
_GDBUS_LINE = re.compile(r"^/\S*: ([\w.]+)\.(\w+) \((.*)\)\s*$")


class MonitorParser:
    """Turns monitor output, line by line, into :data:`LOCK` / :data:`SLEEP` events."""

    def __init__(self) -> None:
        self._waiting: str | None = None  # a boolean signal whose argument comes next

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\n")
        m = _GDBUS_LINE.match(line)
        if m is not None:  # gdbus: one line, arguments in a tuple
            name = f"{m.group(1)}.{m.group(2)}"
            event = _MEMBERS.get(name)
            if event is None:
                return None
            if name in _BOOLEAN:
                return event if m.group(3).strip().startswith("true") else None
            return event
        m = _DBUS_MONITOR_HEAD.match(line)
        if m is not None:  # dbus-monitor: a header line, then one line per argument
            name = f"{m.group(1)}.{m.group(2)}"
            self._waiting = None
            event = _MEMBERS.get(name)
            if event is None:
                return None
            if name in _BOOLEAN:
                self._waiting = event
                return None
            return event
        if self._waiting is not None:
            event, self._waiting = self._waiting, None
            return event if line.strip() == "boolean true" else None
        return None


def monitor_commands() -> list[list[str]]:
    """The monitor processes to run here (none without a tool)."""
    if shutil.which("dbus-monitor"):
        commands = [["dbus-monitor", "--system", *SYSTEM_RULES]]
        if os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            commands.append(["dbus-monitor", "--session", *SESSION_RULES])
        return commands
    if shutil.which("gdbus"):
        return [["gdbus", "monitor", "--system", "--dest", "org.freedesktop.login1"]]
    return []


class SessionWatch:
    """Runs the monitors in the background and calls ``on_event(LOCK | SLEEP)``.

    ``report`` gets one line when a monitor cannot run or stops (never a secret:
    nothing secret passes here)."""

    def __init__(
        self,
        on_event: Callable[[str], None],
        *,
        report: Callable[[str], None] = lambda line: None,
        commands: Iterable[list[str]] | None = None,
    ) -> None:
        self._on_event = on_event
        self._report = report
        self._commands = list(monitor_commands() if commands is None else commands)
        self._procs: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: How many monitors are running and have not stopped.
        self.watching = 0

    def start(self) -> None:
        if not self._commands:
            self._report(
                "no dbus-monitor or gdbus: the PIN cache is not wiped on screen lock or "
                "suspend before it happens (only at timeout, lock, exit, and after a sleep)"
            )
            return
        for command in self._commands:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                    bufsize=1,
                )
            except OSError as e:
                self._report(f"cannot run {command[0]}: {e.strerror}")
                continue
            self._procs.append(proc)
            self.watching += 1
            t = threading.Thread(
                target=self._read, args=(proc, " ".join(command[:2])), daemon=True,
                name="hsm-auth-session-watch",
            )
            self._threads.append(t)
            t.start()

    def _read(self, proc: subprocess.Popen[str], what: str) -> None:
        parser = MonitorParser()
        assert proc.stdout is not None
        for line in proc.stdout:
            event = parser.feed(line[:4096])
            if event is not None:
                self._on_event(event)
        proc.wait()
        self.watching -= 1
        if not self._stopping.is_set():
            self._report(
                f"{what} stopped (exit {proc.returncode}; no D-Bus here?): the PIN cache is "
                "no longer wiped on that bus's lock / suspend signals"
            )

    def stop(self) -> None:
        self._stopping.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(timeout=2)
