"""The agent's PIN cache: a credential's PIN held in memory for its policy's timeout.

A credential whose user-authentication policy has ``timeout > 0`` may sign an
approval within that many seconds of the last time the user unlocked it
(Authsignal's ``timeout``, OneWelcome's override policy), so the agent keeps
the PIN the user typed, and only that:

* in a :class:`bytearray` that is ``mlock``-ed where the kernel allows it (not
  swapped out; a failed ``mlock`` is reported by :meth:`PinCache.locked_in_memory`
  and otherwise ignored), overwritten with zeros and ``munlock``-ed when it is
  dropped: at its expiry, on :meth:`PinCache.clear` (``hsm-auth lock``, screen
  lock, suspend, agent exit);
* never on disk, in argv, the environment or a log; ``repr`` shows no value.

Python cannot wipe a ``str``: :meth:`PinCache.get` hands out a ``str`` copy
(what :class:`~hsm_auth.keystore.Authorization` takes) that lives for one token
operation and is then garbage; only the cached copy is wiped. This is the limit
of a Python agent, not a promise.

Time comes from an injectable clock. The default is ``CLOCK_BOOTTIME``, which
keeps counting while the machine sleeps (``CLOCK_MONOTONIC`` stops), so a
timeout is never stretched by a suspend; :meth:`PinCache.slept` tells a
suspend apart (BOOTTIME moved ahead of MONOTONIC) for agents without D-Bus.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

Clock = Callable[[], float]


def boot_clock() -> float:
    """Seconds of ``CLOCK_BOOTTIME``: monotonic, and counts time spent suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _mlock(buf: bytearray) -> bool:
    if _LIBC is None or not buf:
        return False
    return int(_LIBC.mlock(ctypes.c_void_p(_address(buf)), ctypes.c_size_t(len(buf)))) == 0


def _wipe(buf: bytearray, locked: bool) -> None:
    if buf:
        ctypes.memset(_address(buf), 0, len(buf))
        if locked and _LIBC is not None:
            _LIBC.munlock(ctypes.c_void_p(_address(buf)), ctypes.c_size_t(len(buf)))


@dataclass
class _Entry:
    secret: bytearray = field(repr=False)
    expires: float
    locked: bool
    authorized_at: float  # wall-clock time the PIN was given (the verifier's policy counts it)


@dataclass(frozen=True)
class CachedPin:
    """A PIN out of the cache, and when it was given (wall clock)."""

    pin: str = field(repr=False)
    authorized_at: float


@dataclass(frozen=True)
class CacheEntryStatus:
    """What ``hsm-auth challenges``/``status`` may say about a cached PIN: never the PIN."""

    key: str
    seconds_left: float


class PinCache:
    """PINs keyed by credential (any hashable; the agent uses the credential id), each
    with its own expiry. Thread-safe; every read drops what has expired first."""

    def __init__(self, clock: Clock = boot_clock, *, wall: Clock = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"PinCache({len(self._entries)} entries)"

    def put(self, key: Hashable, pin: str, timeout: float) -> None:
        """Keep ``pin`` for ``timeout`` seconds (nothing is kept for ``timeout <= 0``).
        Replaces (and wipes) what was kept for ``key``."""
        if not timeout > 0:
            self.drop(key)
            return
        secret = bytearray(pin.encode("utf-8"))
        entry = _Entry(secret, self._clock() + timeout, _mlock(secret), self._wall())
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = entry
            self._changed.notify_all()
        if old is not None:
            _wipe(old.secret, old.locked)

    def get(self, key: Hashable) -> str | None:
        """The PIN kept for ``key`` if it has not expired (then it is wiped, ``None``)."""
        cached = self.lookup(key)
        return None if cached is None else cached.pin

    def lookup(self, key: Hashable) -> CachedPin | None:
        """:meth:`get` with the time the PIN was given."""
        self.expire()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            return CachedPin(entry.secret.decode("utf-8"), entry.authorized_at)

    def drop(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            _wipe(entry.secret, entry.locked)

    def clear(self) -> int:
        """Wipe every entry (lock, suspend, exit); returns how many there were."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._changed.notify_all()
        for entry in entries:
            _wipe(entry.secret, entry.locked)
        return len(entries)

    def expire(self) -> int:
        """Wipe the entries whose time is up; returns how many."""
        now = self._clock()
        with self._lock:
            gone = [k for k, e in self._entries.items() if e.expires <= now]
            entries = [self._entries.pop(k) for k in gone]
        for entry in entries:
            _wipe(entry.secret, entry.locked)
        return len(entries)

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((e.expires for e in self._entries.values()), default=None)

    def status(self) -> list[CacheEntryStatus]:
        self.expire()
        now = self._clock()
        with self._lock:
            return [
                CacheEntryStatus(str(k), max(0.0, e.expires - now))
                for k, e in self._entries.items()
            ]

    def locked_in_memory(self) -> bool:
        """Whether every kept PIN is ``mlock``-ed (true when nothing is kept)."""
        with self._lock:
            return all(e.locked for e in self._entries.values())

    def wait_for_change(self, timeout: float) -> None:
        """Sleep until an entry is added or the cache cleared, or ``timeout`` seconds
        (real time): the expiry thread's pacing."""
        with self._lock:
            self._changed.wait(timeout)


class SleepDetector:
    """Tells that the machine slept since the last call: ``CLOCK_BOOTTIME`` moved
    ahead of ``CLOCK_MONOTONIC`` (which stops while suspended) by more than
    ``threshold`` seconds. The suspend signal the agent has without D-Bus."""

    def __init__(
        self,
        threshold: float = 2.0,
        *,
        boottime: Clock = boot_clock,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self._boottime = boottime
        self._monotonic = monotonic
        self._threshold = threshold
        self._offset = boottime() - monotonic()

    def slept(self) -> bool:
        offset = self._boottime() - self._monotonic()
        moved = offset - self._offset > self._threshold
        self._offset = offset
        return moved
