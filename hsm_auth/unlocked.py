"""The agent's held unlocked state: a method's token kept unlocked for the verifier's
``pin_cache`` seconds after the user typed the PIN, in the agent's memory only.

The verifier's policy says per method how long (``[offline.pin] pin_cache = N`` in
its ``policy.toml``; sent in the enrollment result and stored as
:attr:`hsm_auth.authenticator.EnrolledMethod.pin_cache`). ``0``, the default, asks
for the PIN at every use. With ``N > 0`` and the agent running, ``hsm-auth finish``
has the agent compute the OTP (:meth:`hsm_auth.agent.Agent.otp`): the agent holds an
:class:`~hsm_auth.authenticator.Authenticator` and one :class:`Unlocked`, which keeps,
per credential:

PKCS#11
    the logged-in store itself: the session the PIN was typed into stays open and
    logged in (``C_Login`` once, ``C_Logout`` and ``C_CloseSession`` when it goes).
    The PIN is not kept at all. The token's retry counter still counts every PIN
    typed: a PIN that reaches the agent is never compared with anything on the
    host; every held session is closed first (PKCS#11 login state is per process
    and token, so no login of the agent's process may remain, and two settings may
    name one token) and the PIN goes to ``C_Login``, where a wrong one counts as on
    any other login (``CKF_USER_PIN_COUNT_LOW`` / ``FINAL_TRY`` / ``LOCKED``). A
    held session asks the user nothing, so it counts nothing: no PIN was typed. The
    limit: a store the agent keeps open for *another* method on the same token (a
    ``device`` method whose ``pin-source`` logs it in) keeps that login, and then
    the backend compares a typed PIN on the host; keep the pin method on a token of
    its own.
TPM 2.0
    the auth value (the PIN) in an ``mlock``-ed buffer of a
    :class:`~hsm_auth.pin_cache.PinCache`, given to the TPM's salted HMAC session for
    each use: the TPM checks it every time (and a wrong one typed counts against its
    dictionary-attack lockout, as it does without the agent).
FIDO2 (biometric, face)
    nothing. Built-in user verification runs at every use whatever the policy: a
    fingerprint or a face is never cached. A pinUvAuthToken got with the PIN (the
    ``allow_pin_fallback`` path) is not kept either: the PIN stands in for the
    fingerprint only where the user typed it, once per use. So FIDO2 "PIN caching"
    means nothing is cached; ``pin_cache`` is stated for the ``pin`` method only
    (:mod:`hsm_auth.attestation`).

What a held token means: for those N seconds, any process of this user that can
reach the agent's socket (0600, peer uid checked: :mod:`hsm_auth.agent`) gets OTPs
for verification data the verifier signed, without the PIN, as with ``ssh-agent``;
each OTP still advances the token's counter and is bound to its session. That is
what the verifier's policy allows when it sets ``pin_cache`` above 0.

The time counts from the moment the PIN was typed and is never extended by use. It
is read from an injectable clock, ``CLOCK_BOOTTIME`` by default (counts suspended
time, :func:`hsm_auth.pin_cache.boot_clock`). Everything held goes at its timeout
(:meth:`Unlocked.expire`, the agent's housekeeping once a second, and before every
lookup), on :meth:`Unlocked.clear` (``hsm-auth agent --lock``, screen lock,
suspend, agent exit: the agent's wipe paths) and when it fails once (a wrong cached
PIN, a session the token closed). Nothing is written anywhere.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

from .errors import HsmAuthError
from .keystore import KeyStore
from .pin_cache import CacheEntryStatus, Clock, PinCache, boot_clock


class EveryUse(HsmAuthError):
    """The method's policy has its PIN asked at every use (``pin_cache = 0``), or the
    method has nothing to hold: the caller computes the OTP itself, as without an
    agent. Raised before the token is touched."""


@dataclass
class _Session:
    store: KeyStore
    expires: float
    generation: int


class Unlocked:
    """Held unlocked state by credential (any hashable key: the credential id).
    Thread-safe; a held store is taken out while one operation uses it (so that an
    expiry or a wipe never closes it under that operation) and put back only if no
    wipe happened meanwhile and its time is not up."""

    def __init__(self, clock: Clock = boot_clock, *, wall: Clock = time.time) -> None:
        self._clock = clock
        self.pins = PinCache(clock, wall=wall)
        self._sessions: dict[Hashable, _Session] = {}
        self._lock = threading.Lock()
        self._generation = 0  # moved by every clear(): held stores taken before it go

    def __repr__(self) -> str:
        return f"Unlocked({len(self._sessions)} sessions, {self.pins!r})"

    # --- PKCS#11: logged-in stores ---------------------------------------------------

    def take_session(self, key: Hashable) -> _Session | None:
        """The held session of ``key``, taken out for one use (``None``: none, or its
        time is up). Give it back with :meth:`put_back` or :meth:`discard`."""
        self.expire()
        with self._lock:
            return self._sessions.pop(key, None)

    def hold_session(self, key: Hashable, store: KeyStore, timeout: float) -> None:
        """Keep ``store`` (logged in by a PIN typed just now) for ``timeout`` seconds."""
        if not timeout > 0:
            store.close()
            return
        with self._lock:
            entry = _Session(store, self._clock() + timeout, self._generation)
            old = self._sessions.pop(key, None)
            self._sessions[key] = entry
        if old is not None:
            old.store.close()

    def put_back(self, key: Hashable, session: _Session) -> None:
        with self._lock:
            keep = (
                session.generation == self._generation
                and session.expires > self._clock()
                and key not in self._sessions
            )
            if keep:
                self._sessions[key] = session
        if not keep:
            session.store.close()

    @staticmethod
    def discard(session: _Session) -> None:
        session.store.close()

    def close_sessions(self) -> int:
        """Close every held session (a PIN typed for another operation of the agent
        must reach its token, not a login of this process)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            with contextlib.suppress(Exception):
                s.store.close()
        return len(sessions)

    # --- both ----------------------------------------------------------------------

    def forget(self, key: Hashable) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.store.close()
        self.pins.drop(key)

    def expire(self) -> int:
        now = self._clock()
        with self._lock:
            gone = [k for k, s in self._sessions.items() if s.expires <= now]
            sessions = [self._sessions.pop(k) for k in gone]
        for s in sessions:
            with contextlib.suppress(Exception):  # a token removed meanwhile
                s.store.close()
        return len(sessions) + self.pins.expire()

    def clear(self) -> int:
        """Close and wipe everything held (lock, screen lock, suspend, exit)."""
        with self._lock:
            self._generation += 1
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            with contextlib.suppress(Exception):
                s.store.close()
        return len(sessions) + self.pins.clear()

    def status(self) -> list[CacheEntryStatus]:
        """What is held, by credential, with the seconds left (never a secret)."""
        self.expire()
        now = self._clock()
        with self._lock:
            held = [
                CacheEntryStatus(str(k), max(0.0, s.expires - now))
                for k, s in self._sessions.items()
            ]
        return held + self.pins.status()

    def locked_in_memory(self) -> bool:
        return self.pins.locked_in_memory()
