"""``hsm-auth agent``: the authenticator's resident side.

It long-polls each online verifier for push challenges, shows them (desktop
notification, else its terminal), answers them on the user's word through the
token, claims QR challenges, and keeps the PIN cache
(:mod:`hsm_auth.pin_cache`) for credentials whose user-authentication policy
allows it. The CLI talks to it over a UNIX socket.

The socket
==========
``$XDG_RUNTIME_DIR/hsm-auth/agent.sock`` unless ``--socket`` or
``HSM_AUTH_AGENT_SOCKET`` names another (:func:`hsm_auth.agent_client.default_socket`).
Its directory is created 0700; an existing one must be a real directory owned by
this user that group and others cannot enter, and every directory above it passes
:func:`hsm_auth.files.check_parents`. The socket is made 0600 (bound under umask
0177). A socket already there is removed only when it is a socket of this user that
nobody answers on (a stale one); anything else (a file, someone else's socket, a
live agent) refuses the start. Every connection's peer credentials
(``SO_PEERCRED``) are read: a peer whose uid is not the agent's is closed without
a byte of answer. At exit the socket is removed (when it is still the one bound).

The protocol (JSON lines)
=========================
One JSON object per line, UTF-8, each at most
:data:`~hsm_auth.agent_client.MAX_LINE` bytes with its newline; a connection may
carry any number of requests, answered in order. A request::

    {"v": 1, "op": OP, ...arguments}

A reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type": T,
"message": M, ...}}`` where ``T`` is the name of a :mod:`hsm_auth.errors` class
(``PinInvalid``, ``InvalidInput``, …; authorization errors add ``retries_left``,
``retry_after`` and ``locked``). Malformed JSON, a non-object, an unknown ``op``
or version, a wrong argument type: an ``InvalidInput`` reply, and the connection
stays open. A line over the bound: an ``InvalidInput`` reply, then the connection
is closed. No request can stop the agent.

``status``
    → ``pid``, ``uid``, ``socket``, ``sources`` (one per polled verifier: ``verifier``,
    ``user``, ``method``, ``url``, ``state``), ``pending`` (count), ``cache`` (list of
    ``{"credential", "seconds_left"}``), ``mlock`` (every cached PIN is mlocked),
    ``watching`` (how many D-Bus monitors run).
``list``
    → ``challenges``: the pending (and claimed) challenges, each ``{"challenge_id",
    "kind", "state", "expires", "user", "message", "context": {"ip", "user_agent",
    "location", "custom"}, "verifier", "method"}``.
``approve`` / ``reject`` ``{"id": HEX, "method"?: NAME, "pin"?: TEXT}``
    Answers the challenge through the token (the approval is signed there) and →
    ``state`` (``approved``/``rejected``) and ``challenge``. ``method`` defaults to
    the one that received (or claimed) it. Without ``pin``, the cached one is used if
    any; a method that needs a PIN and has none: a ``PinRequired`` reply (the CLI
    then asks and sends it again). A PIN given here reaches the token like any
    other, so a wrong one counts a retry there; it is cached only after the token
    took it, and only when the credential's policy timeout is above 0.
``claim`` ``{"claim": TEXT, "method"?: NAME, "pin"?: TEXT}``
    Claims a QR challenge at the verifier its text names → ``challenge`` (with the
    context of the desktop that started it); it is then pending here until
    answered by the credential that claimed it.
``otp`` ``{"request": TEXT, "method": NAME, "pin"?: TEXT, "data"?: TEXT, "prompt"?: TEXT}``
    Computes the OTP for verification data (``hsm-auth finish`` through the agent)
    with the agent's own :class:`~hsm_auth.authenticator.Authenticator`, under the
    method's ``pin_cache`` policy (:mod:`hsm_auth.unlocked`: the token is held
    unlocked for that long after the PIN was typed; ``data`` is what the user entered
    and ``prompt`` the text shown, as for :meth:`~hsm_auth.authenticator.Authenticator.
    finish_offline_authentication`) → ``otp``, ``atc``, ``method``
    and ``held`` (true: no PIN was typed, the held state answered). A method whose
    PIN is asked at every use (``pin_cache = 0``, the default; or a method without
    a PIN) → ``{"otp": null, "every_use": true}``: nothing was touched and the caller
    computes the OTP itself. Nothing held and no ``pin``: a ``PinRequired`` reply. A
    ``pin`` given always reaches the token (a wrong one counts there) and replaces
    what was held. The reply carries the OTP: the socket is this user's alone.
``lock``
    Wipes the PIN cache and the held unlocked state → ``wiped`` (how many).

Where the service is
====================
The agent polls every verifier that an online enrollment recorded a service URL
for (see :mod:`hsm_auth.agent_online`, which builds the :class:`Source` objects
this module uses). One source per (verifier, user): the enrolled method that polls
is the first of device, biometric, face, pin (the one least likely to need the
user for each signed request).

Secrets
=======
The agent process is made non-dumpable (``PR_SET_DUMPABLE`` 0: no core dump, no
ptrace by other processes of the user) and the PIN cache's rules are in
:mod:`hsm_auth.pin_cache`. A PIN arrives only on the socket, never in argv or
the environment, and is never logged; replies never carry it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import display, files
from .agent_client import MAX_LINE, VERSION, error_to_json
from .errors import (
    AuthorizationError,
    HsmAuthError,
    InvalidInput,
    PinInvalid,
    PinRequired,
    StateError,
    UnknownMethod,
)
from .keystore import Authorization, UserInteraction
from .methods import Method
from .pin_cache import PinCache, SleepDetector
from .unlocked import EveryUse, Unlocked

if TYPE_CHECKING:
    from .authenticator import Authenticator

log = logging.getLogger(__name__)

#: Seconds one long-poll asks the service to wait (the service caps it at 30).
POLL_WAIT = 25.0
#: Seconds between tries after a poll failed, doubling up to the last.
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
#: Connections served at once; more are closed at once.
MAX_CONNECTIONS = 16
#: Seconds a connection may stay silent before it is closed.
IDLE_TIMEOUT = 300.0
#: Poll order: the first enrolled of these polls for its verifier.
POLL_ORDER = (Method.DEVICE, Method.BIOMETRIC, Method.FACE, Method.PIN)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


# --- what the agent needs from the online side ---------------------------------------


@dataclass(frozen=True)
class ChallengeView:
    """A challenge as the agent keeps and shows it; ``original`` is the online client's
    own object, handed back to it to answer."""

    challenge_id: str
    kind: str
    state: str
    expires: int
    user: str | None
    message: str
    ip: str = ""
    user_agent: str = ""
    location: str = ""
    custom: Mapping[str, str] = field(default_factory=dict)
    original: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "challenge_id": self.challenge_id,
            "kind": self.kind,
            "state": self.state,
            "expires": self.expires,
            "user": self.user,
            "message": self.message,
            "context": {
                "ip": self.ip,
                "user_agent": self.user_agent,
                "location": self.location,
                "custom": dict(self.custom),
            },
        }


@dataclass(frozen=True)
class CredentialPolicy:
    """An enrolled method's credential at a verifier, and how long its PIN may be cached
    (the user-authentication policy's timeout; 0: the token is unlocked for each use)."""

    credential_id: str
    timeout: float = 0.0


class Source(Protocol):
    """One verifier and user that the agent serves (built by :mod:`hsm_auth.agent_online`)."""

    name: str  # the verifier's name, as the authenticator pinned it
    verifier_id: bytes
    user: str
    url: str

    def methods(self) -> Mapping[Method, CredentialPolicy]:
        """The methods enrolled at this verifier for this user."""

    def pending(
        self, method: Method, wait: float, auth: Authorization, known: Sequence[str]
    ) -> list[ChallengeView]:
        """The user's pending push / in-app challenges: long-poll up to ``wait`` s for
        the set to differ from ``known`` (the ids the agent holds)."""

    def owns_claim(self, claim: str) -> bool:
        """Whether ``claim`` (a QR text) names this source's verifier."""

    def claim(self, claim: str, method: Method, auth: Authorization) -> ChallengeView: ...

    def answer(
        self, challenge: ChallengeView, approve: bool, method: Method, auth: Authorization,
        authorized_at: float | None,
    ) -> None:
        """Approve or reject, signed in the token. ``authorized_at``: when the PIN in
        ``auth`` was typed, if it comes from the cache (the policy may refuse it)."""


class Notify(Protocol):
    def notify(self, summary: str, body: str) -> None: ...

    def line(self, text: str) -> None: ...


def poll_method(methods: Mapping[Method, CredentialPolicy]) -> Method:
    for method in POLL_ORDER:
        if method in methods:
            return method
    raise UnknownMethod("no method is enrolled at this verifier")


# --- the agent's state and operations --------------------------------------------------


@dataclass
class _Pending:
    view: ChallengeView
    source: Source
    method: Method  # the method that received or claimed it
    claimed: bool = False


@dataclass
class _SourceState:
    source: Source
    method: Method
    state: str = "starting"


class _AgentInteraction(UserInteraction):
    def __init__(self, notify: Notify) -> None:
        self._notify = notify

    def prompt_up(self, prompt: str) -> None:
        self._notify.notify("hsm-auth", f"{prompt or 'Touch your authenticator'}")


class Agent:
    """The agent's state: sources, pending challenges, the PIN cache. Every public
    method is one protocol operation and is safe to call from any thread."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        notify: Notify,
        cache: PinCache | None = None,
        clock: Callable[[], float] = time.time,
        prompts: Mapping[Method, str] | None = None,
        offline: Authenticator | None = None,
        unlocked: Unlocked | None = None,
    ) -> None:
        self.cache = cache if cache is not None else PinCache()
        #: The OTP side: the authenticator that computes OTPs here, and what it holds.
        self.offline = offline
        self.unlocked = unlocked if unlocked is not None else Unlocked()
        self._offline_lock = threading.Lock()
        self._notify = notify
        self._clock = clock
        self._prompts = dict(prompts or {})
        self._interaction = _AgentInteraction(notify)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._sources = [_SourceState(s, poll_method(s.methods())) for s in sources]
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.watching: Callable[[], int] = lambda: 0

    # --- background work ------------------------------------------------------------

    def start_polling(self) -> None:
        for state in self._sources:
            t = threading.Thread(
                target=self._poll, args=(state,), daemon=True, name="hsm-auth-agent-poll"
            )
            self._threads.append(t)
            t.start()

    def _auth(self, source: Source, method: Method, pin: str | None) -> Authorization:
        return Authorization(
            pin=pin, prompt=self._prompts.get(method) or None, interaction=self._interaction
        )

    def _poll(self, state: _SourceState) -> None:
        source, method = state.source, state.method
        failures = 0
        while not self.stopping.is_set():
            policy = source.methods()[method]
            pin = self.cache.get(policy.credential_id)
            if method.needs_pin and pin is None:
                state.state = "waiting for the PIN (answer or claim a challenge with it)"
                self.cache.wait_for_change(30.0)
                continue
            with self._lock:
                known = [c for c, p in self._pending.items() if p.source is source]
            try:
                views = source.pending(method, POLL_WAIT, self._auth(source, method, pin), known)
            except HsmAuthError as e:
                if isinstance(e, AuthorizationError) and pin is not None:
                    self.cache.drop(policy.credential_id)  # wrong now: never try it again
                state.state = f"error: {display.escape(str(e), keep='')[:200]}"
                log.info("poll of %s failed: %s", source.name, e.__class__.__name__)
            except Exception as e:  # a bug or a transport error: keep polling, later
                state.state = f"error: {e.__class__.__name__}"
                log.warning("poll of %s failed", source.name, exc_info=True)
            else:
                state.state = "polling"
                failures = 0
                self._merge(state, views)
                continue
            self.stopping.wait(BACKOFF[min(failures, len(BACKOFF) - 1)])
            failures += 1

    def _merge(self, state: _SourceState, views: Sequence[ChallengeView]) -> None:
        """The source's pending challenges are these: new ones are shown, those gone
        (answered elsewhere, expired) forgotten; claimed ones stay until answered."""
        fresh: list[ChallengeView] = []
        with self._lock:
            ids = {v.challenge_id for v in views}
            for cid in [
                cid for cid, p in self._pending.items()
                if p.source is state.source and not p.claimed and cid not in ids
            ]:
                del self._pending[cid]
            for view in views:
                if view.challenge_id not in self._pending:
                    fresh.append(view)
                self._pending[view.challenge_id] = _Pending(view, state.source, state.method)
        for view in fresh:
            self._show(state.source, view)

    def _show(self, source: Source, view: ChallengeView) -> None:
        lines = [view.message]
        for label, value in (
            ("from", view.ip), ("browser", view.user_agent), ("location", view.location)
        ):
            if value:
                lines.append(f"{label}: {value}")
        lines.extend(f"{k}: {v}" for k, v in view.custom.items())
        lines.append(f"hsm-auth approve {view.challenge_id}  (or reject)")
        summary = f"{source.name}: {view.kind} challenge for {view.user}"
        self._notify.notify(summary, "\n".join(lines))

    def housekeeping(self, detector: SleepDetector | None = None) -> None:
        """Once a second: expired PINs, held tokens and challenges go; a sleep wipes
        the cache."""
        self.cache.expire()
        self.unlocked.expire()
        if detector is not None and detector.slept():
            self.wipe("the machine slept")
        now = self._clock()
        with self._lock:
            for cid in [c for c, p in self._pending.items() if p.view.expires < now]:
                del self._pending[cid]

    def wipe(self, why: str) -> int:
        n = self.cache.clear() + self.unlocked.clear()
        if n:
            self._notify.line(f"PIN cache wiped ({why})")
        return n

    # --- operations ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._pending)
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "sources": [
                {
                    "verifier": s.source.name,
                    "user": s.source.user,
                    "method": s.method.value,
                    "url": s.source.url,
                    "state": s.state,
                }
                for s in self._sources
            ],
            "pending": pending,
            "cache": [
                {"credential": e.key, "seconds_left": round(e.seconds_left, 1)}
                for e in self.cache.status()
            ],
            "unlocked": [
                {"credential": e.key, "seconds_left": round(e.seconds_left, 1)}
                for e in self.unlocked.status()
            ],
            "mlock": self.cache.locked_in_memory() and self.unlocked.locked_in_memory(),
            "watching": self.watching(),
        }

    def list(self) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            items = [p for p in self._pending.values() if p.view.expires >= now]
        items.sort(key=lambda p: p.view.expires)
        return {
            "challenges": [
                {**p.view.to_json(), "verifier": p.source.name, "method": p.method.value}
                for p in items
            ]
        }

    def answer(
        self, challenge_id: str, approve: bool, method_name: str | None, pin: str | None
    ) -> dict[str, Any]:
        with self._lock:
            entry = self._pending.get(challenge_id)
        if entry is None or entry.view.expires < self._clock():
            raise InvalidInput(
                f"no pending challenge {challenge_id} here (hsm-auth challenges lists them)"
            )
        method = entry.method if method_name is None else Method.parse(method_name)
        if entry.claimed and method is not entry.method:
            raise InvalidInput(
                f"this challenge was claimed with the {entry.method.value} method; "
                "only that credential may answer it"
            )
        self._with_token(
            entry.source, method, pin,
            lambda auth, at: entry.source.answer(entry.view, approve, method, auth, at),
        )
        with self._lock:
            self._pending.pop(challenge_id, None)
        return {
            "state": "approved" if approve else "rejected",
            "challenge": {**entry.view.to_json(), "verifier": entry.source.name},
        }

    def claim(self, text: str, method_name: str | None, pin: str | None) -> dict[str, Any]:
        sources = [s for s in self._sources if s.source.owns_claim(text)]
        if not sources:
            raise UnknownMethod(
                "the claim code is for a verifier this agent does not poll "
                "(enrolled online with it?)"
            )
        state = sources[0]
        method = state.method if method_name is None else Method.parse(method_name)
        view = self._with_token(
            state.source, method, pin, lambda auth, at: state.source.claim(text, method, auth)
        )
        with self._lock:
            self._pending[view.challenge_id] = _Pending(view, state.source, method, claimed=True)
        return {"challenge": {**view.to_json(), "verifier": state.source.name,
                              "method": method.value}}

    def _with_token(
        self, source: Source, method: Method, pin: str | None,
        work: Callable[[Authorization, float | None], Any],
    ) -> Any:
        """Run one signed operation with the PIN given, else the cached one (with the
        time it was typed); cache a given PIN that the token took when the credential's
        policy allows it."""
        policy = source.methods().get(method)
        if policy is None:
            raise UnknownMethod(
                f"the {method.value} method is not enrolled at {source.name} for {source.user}"
            )
        if pin is not None:  # a typed PIN reaches the token: no login of ours is left
            self.unlocked.close_sessions()
        cached = self.cache.lookup(policy.credential_id) if pin is None else None
        use = pin if pin is not None else (cached.pin if cached is not None else None)
        if method.needs_pin and use is None:
            raise PinRequired(f"the {method.value} method needs its PIN")
        try:
            result = work(
                self._auth(source, method, use),
                cached.authorized_at if cached is not None else None,
            )
        except (PinInvalid, PinRequired):
            if cached is not None:  # wrong now, or too old for the policy: never again
                self.cache.drop(policy.credential_id)
            raise
        if pin is not None and policy.timeout > 0:
            self.cache.put(policy.credential_id, pin, policy.timeout)
        return result

    def otp(
        self, text: str, method_name: str, pin: str | None, *,
        data: str | None = None, prompt: str | None = None,
    ) -> dict[str, Any]:
        """``hsm-auth finish`` through the agent (the ``otp`` operation)."""
        if self.offline is None:
            raise StateError("this agent computes no OTPs (it was started without a home)")
        method = Method.parse(method_name)
        with self._offline_lock:
            self.offline.reload()  # enrollments made since the agent started
            request = self.offline.start_offline_authentication(text)
            try:
                result = self.offline.finish_offline_authentication(
                    request, method, pin=pin, data=data, prompt=prompt, unlocked=self.unlocked
                )
            except EveryUse:
                return {"otp": None, "every_use": True}
        return {"otp": result.otp, "atc": result.atc, "method": result.method.value,
                "held": pin is None}

    def lock(self) -> dict[str, Any]:
        return {"wiped": self.cache.clear() + self.unlocked.clear()}

    # --- the protocol --------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line → its reply (never raises)."""
        try:
            try:
                request = json.loads(line)
            except (ValueError, RecursionError):
                raise InvalidInput("the request is not JSON") from None
            return {"ok": True, **self._dispatch(request)}
        except HsmAuthError as e:
            return {"ok": False, "error": error_to_json(e)}
        except Exception:
            log.exception("the agent failed on a request")
            return {"ok": False, "error": {"type": "HsmAuthError",
                                           "message": "the agent failed on this request"}}

    def _dispatch(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise InvalidInput("a request is a JSON object")
        if request.get("v") != VERSION:
            raise InvalidInput(f"this agent speaks protocol version {VERSION}")
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "list":
            return self.list()
        if op == "lock":
            return self.lock()
        if op in ("approve", "reject"):
            cid = _hex_id(request.get("id"))
            return self.answer(
                cid, op == "approve", _opt_text(request, "method", 20), _pin(request)
            )
        if op == "otp":
            text = request.get("request")
            if not isinstance(text, str) or not 0 < len(text) <= 16384:
                raise InvalidInput("request is the verification data's text")
            method = _opt_text(request, "method", 20)
            if method is None:
                raise InvalidInput("method names the method to authenticate with")
            return self.otp(
                text.strip(), method, _pin(request),
                data=_opt_data(request), prompt=_opt_text(request, "prompt", 1024),
            )
        if op == "claim":
            claim = request.get("claim")
            if not isinstance(claim, str) or not 0 < len(claim) <= 4096:
                raise InvalidInput("claim is the QR code's text")
            return self.claim(claim.strip(), _opt_text(request, "method", 20), _pin(request))
        raise InvalidInput(f"unknown op {display.escape(str(op), keep='')[:40]!r}")


def _hex_id(value: Any) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 128:
        raise InvalidInput("id is a challenge id (hex)")
    try:
        return bytes.fromhex(value).hex()
    except ValueError:
        raise InvalidInput("id is a challenge id (hex)") from None


def _opt_text(request: Mapping[str, Any], key: str, most: int) -> str | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= most:
        raise InvalidInput(f"{key} must be a short string")
    return value


def _opt_data(request: Mapping[str, Any]) -> str | None:
    """``data``: what the user entered, judged by the authenticator (§17); only bounded
    here."""
    value = request.get("data")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 4096:
        raise InvalidInput("data must be a string (what the user entered)")
    return value


def _pin(request: Mapping[str, Any]) -> str | None:
    value = request.get("pin")
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("pin must be a string")
    pin = files.decode_pin(value.encode("utf-8", "surrogatepass"), "the request")
    if not pin:
        raise PinRequired("the PIN is empty")
    return pin


# --- the socket ------------------------------------------------------------------------


def bind_socket(path: Path) -> socket.socket:
    """The listening socket at ``path``, under the rules of the module docstring."""
    path = Path(os.path.abspath(path))
    parent = path.parent
    uid = os.getuid()
    files.check_parents(parent)
    if not os.path.lexists(parent):
        try:
            os.mkdir(parent, 0o700)
        except OSError as e:
            raise StateError(f"cannot create {parent}: {e.strerror}") from None
    st = os.lstat(parent)
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{parent} is not a directory (a symbolic link?); refusing to use it")
    if st.st_uid != uid:
        raise StateError(f"{parent} belongs to uid {st.st_uid}, not to this user; refusing it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StateError(
            f"{parent} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"chmod 700 {parent}"
        )
    if os.path.lexists(path):
        _remove_stale(path, uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        raise StateError(f"cannot create the agent's socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    return sock


def _remove_stale(path: Path, uid: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
        raise StateError(
            f"{path} exists and is not this user's agent socket; refusing to replace it"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(2.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as e:
        if e.errno != errno.ECONNREFUSED:
            raise StateError(f"cannot check the socket {path}: {e.strerror}") from None
        os.unlink(path)  # nobody listens: a stale socket of ours
        return
    finally:
        probe.close()
    raise StateError(f"an hsm-auth agent is running already at {path}")


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _PEERCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return int(uid)


class Server:
    """Accepts connections on the bound socket and hands their lines to the agent."""

    def __init__(self, agent: Agent, sock: socket.socket, path: Path) -> None:
        self._agent = agent
        self._sock = sock
        self.path = path
        self._inode = os.stat(path).st_ino
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0

    def serve_forever(self) -> None:
        self._sock.settimeout(0.5)
        while not self._agent.stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._agent.stopping.is_set():
                    return
                log.warning("accept failed: %s", e.strerror)
                time.sleep(0.1)
                continue
            if peer_uid(conn) != os.getuid():
                self.refused += 1
                log.warning("refused a connection from another user")
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), daemon=True, name="hsm-auth-agent-conn"
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT)
            buffer = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if len(line) >= MAX_LINE:
                        self._too_long(conn)
                        return
                    if not self._send(conn, self._agent.handle_line(line)):
                        return
                if len(buffer) >= MAX_LINE:
                    self._too_long(conn)
                    return
        finally:
            conn.close()
            self._slots.release()

    def _too_long(self, conn: socket.socket) -> None:
        """Refuse the line, then close gently: what the peer still sends is read and
        dropped (a little, for a moment), so that it can read the refusal."""
        error = InvalidInput(f"a request line is longer than {MAX_LINE} bytes")
        if not self._send(conn, {"ok": False, "error": error_to_json(error)}):
            return
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(1.0)
            dropped = 0
            while dropped < 4 * MAX_LINE:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> bool:
        data = json.dumps(reply, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
        try:
            conn.sendall(data)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


# --- running it --------------------------------------------------------------------


def make_undumpable() -> None:
    """No core dump and no ptrace of the agent by the user's other processes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        log.warning("could not make the agent non-dumpable")


def run(
    agent: Agent,
    path: Path,
    *,
    ready: Callable[[Path], None] = lambda p: None,
    watch: Any = None,
) -> int:
    """Bind, serve until SIGTERM / SIGINT / SIGHUP, then wipe and clean up."""
    make_undumpable()
    sock = bind_socket(path)
    server = Server(agent, sock, path)
    stop = agent.stopping

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if watch is not None:
        agent.watching = lambda: int(watch.watching)
        watch.start()
    detector = SleepDetector()

    def housekeeping() -> None:
        while not stop.wait(1.0):
            try:
                agent.housekeeping(detector)
            except Exception:
                log.exception("agent housekeeping failed")

    threading.Thread(target=housekeeping, daemon=True, name="hsm-auth-agent-house").start()
    agent.start_polling()
    accept = threading.Thread(target=server.serve_forever, daemon=True, name="hsm-auth-agent")
    accept.start()
    ready(path)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop.set()
        agent.cache.clear()
        agent.unlocked.clear()
        server.close()
        if watch is not None:
            watch.stop()
        accept.join(timeout=2)
    return 0
