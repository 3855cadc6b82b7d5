"""The workstation-login policy, in one place: what :func:`hsm_auth.login.authenticate` does.

One login, in this order (each refusal is a :class:`~hsm_auth.login.LoginOutcome`):

1. **Remote sessions** (``remote = deny``, the default) are refused with
   ``PERM_DENIED`` before anything else; see :func:`is_remote` for what is trusted.
2. **The account**: ``PAM_USER`` is resolved with ``getpwnam`` and the account's own
   name (``pw_name``) is used from here on. ``Alice`` or ``alice.`` on a
   case-insensitive NSS (SSSD, AD) become ``alice``, and log in only with alice's
   tokens; a name that resolves to no account is ``USER_UNKNOWN`` (never ``IGNORE``:
   there is nobody the next module could authenticate either).
3. **The methods allowed for login** are those that prove a person: ``pin``,
   ``biometric``, ``face`` (:data:`PERSON_METHODS`), narrowed by ``methods=``.
   ``device`` proves possession only (malware running as the user has it), so it is
   allowed only as a *second factor*: ``device = "second-factor"`` in ``[login]`` of
   root's config **and** the module argument ``second_factor`` **and** an earlier
   module of the stack set ``PAM_AUTHTOK`` (:attr:`LoginRequest.prior_authtok`).
   A PAM module cannot see whether earlier modules succeeded: that is the stack's
   job. The README's second-factor stack puts ``pam_unix.so`` as ``requisite`` before
   this module, so this module only runs after the password was right; the
   ``PAM_AUTHTOK`` check only catches a stack where no password module ran first.
   With ``device`` listed in ``methods=`` but not configured so, it is ignored.
4. **Not enrolled** (no authfile, or no credential of an allowed method): ``IGNORE``
   with ``nouserok``, else ``USER_UNKNOWN``. So a stack of
   ``auth [success=done ignore=ignore default=die] pam_hsm_auth.so nouserok``
   followed by ``pam_unix.so`` lets ``root`` and every account without a token log
   in with their password, and an enrolled user only with the token.
5. **The failure record** (:class:`FailureRecord`, like ``pam_faillock``): after
   ``deny`` failures (default 3) within ``fail_interval`` seconds (900), every try
   is refused with ``MAXTRIES`` for ``unlock_time`` seconds (600) without asking a
   PIN or reaching a token. A try is recorded *before* the token is used (a
   ``kill -9`` counts as a failure, the record never goes back) and the record is
   cleared only by a successful login.
6. **Every enrolled credential** of an allowed method is tried in the authfile's
   order (as pam_u2f tries every key): a token that is absent is skipped; only when
   none is present the result is ``AUTHINFO_UNAVAIL``. For a present token the PIN
   is asked through the conversation with its own prompt naming the token (never
   the previous module's password, unless ``try_first_pass`` / ``use_first_pass``);
   the cue is shown (``info``) before the token is used. A wrong PIN, failed user
   verification, a refused signature or counter → ``AUTH_ERR``, and no further
   token is tried; a locked token (PIN blocked, TPM lockout) → ``MAXTRIES``.

Everything unexpected is ``SYSTEM_ERR`` with a log line (never a secret).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .errors import (
    AuthorizationError,
    BackendUnavailable,
    Cancelled,
    ConfigError,
    HsmAuthError,
    InvalidInput,
    InvalidToken,
    KeyNotFound,
    LockedOut,
    PinLocked,
    StateError,
)
from .keystore import Authorization, UserInteraction
from .login import (
    CHALLENGE_BYTES,
    AuthDir,
    Conversation,
    LoginCredential,
    LoginOutcome,
    LoginRequest,
    Outcome,
    check_pin_protection,
    check_user_name,
    hostname,
    make_proof,
    verify_proof,
    with_secrets,
)
from .methods import Method

#: The methods that prove a person, allowed for login by default.
PERSON_METHODS = (Method.PIN, Method.BIOMETRIC, Method.FACE)
#: The ``[login] device`` value that allows ``device`` as a second factor.
SECOND_FACTOR = "second-factor"
DENY, FAIL_INTERVAL, UNLOCK_TIME = 3, 900, 600

Getpwnam = Callable[[str], Any]


class _Refuse(Exception):
    """A refusal decided by the policy (outcome and log line)."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


# --- accounts ---------------------------------------------------------------------------


def canonical_user(name: str, getpwnam: Getpwnam = pwd.getpwnam) -> str | None:
    """The account's own name for ``name`` as NSS resolves it, ``None`` if there is no
    such account (or NSS answers inconsistently). The authfile is looked up by it."""
    if not name or "\0" in name or len(name) > 256:
        return None
    try:
        entry = getpwnam(name)
        canonical = str(entry.pw_name)
        if canonical != name and getpwnam(canonical).pw_uid != entry.pw_uid:
            return None
    except (KeyError, OSError, UnicodeError, ValueError):
        return None
    try:
        return check_user_name(canonical)
    except InvalidInput:
        return None


# --- methods ----------------------------------------------------------------------------


def allowed_methods(request: LoginRequest, table: Mapping[str, Any]) -> tuple[Method, ...]:
    """The methods this login may use (module docstring, step 3)."""
    device = table.get("device", "refuse")
    if device not in ("refuse", SECOND_FACTOR):
        raise ConfigError(f"[login] device must be refuse or {SECOND_FACTOR}")
    wanted = request.options.methods
    allowed: list[Method] = [m for m in (wanted or PERSON_METHODS) if m in PERSON_METHODS]
    device_ok = (device == SECOND_FACTOR and request.options.second_factor
                 and request.prior_authtok)
    if device_ok and (wanted is None or Method.DEVICE in wanted):
        allowed.append(Method.DEVICE)
    return tuple(allowed)


# --- remote sessions ----------------------------------------------------------------------

LOGINCTL = Path("/usr/bin/loginctl")
_SESSION_SCOPE = re.compile(r"/session-([A-Za-z0-9_-]{1,64})\.scope(?:/|$)")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def logind_running() -> bool:
    """systemd is init (``sd_booted``'s test) and logind's client is installed."""
    return os.path.isdir("/run/systemd/system") and LOGINCTL.is_file()


def _loginctl(loginctl: Path, *args: str) -> str:
    """One ``loginctl`` query: absolute path, fixed environment, no shell, bounded time.
    A failure is a :class:`StateError` (the caller then fails closed)."""
    import subprocess  # only where logind runs: PAM start-up time

    try:
        result = subprocess.run(
            [str(loginctl), *args], capture_output=True, text=True, timeout=5, check=False,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "SYSTEMD_PAGER": ""},
            stdin=subprocess.DEVNULL, close_fds=True,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StateError(f"loginctl failed ({e.__class__.__name__})") from None
    if result.returncode != 0:
        raise StateError(f"loginctl {args[0]} failed (exit {result.returncode})")
    return result.stdout.strip()


def _proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", encoding="utf-8", errors="replace") as f:
            return f.read(65536)
    except OSError as e:
        raise StateError(f"cannot read /proc/{pid}/{name}: {e.strerror}") from None


def logind_remote(pid: int, *, loginctl: Path = LOGINCTL) -> bool:
    """Whether process ``pid`` (the PAM application) runs in a remote logind session.

    Its session comes from its cgroup (``/proc/PID/cgroup``, ``session-N.scope``),
    which the kernel keeps and the user cannot move into another session; never
    from ``XDG_SESSION_ID``, which is in the environment the user controls. The
    session's ``Remote`` property is asked from ``loginctl``. A process outside any
    session scope (a terminal started by the user's systemd instance, or a process
    moved there with ``systemd-run --user``) counts as remote if its real user has
    any remote session."""
    session = session_of(_proc(pid, "cgroup"))
    if session is not None:
        sessions = [session]
    else:
        uid = _real_uid(_proc(pid, "status"))
        listed = _loginctl(loginctl, "show-user", str(uid), "--property=Sessions", "--value")
        sessions = [s for s in listed.split() if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", s)]
    for session in sessions:
        value = _loginctl(loginctl, "show-session", session, "--property=Remote", "--value")
        if value not in ("yes", "no"):
            raise StateError("loginctl gave no Remote property")
        if value == "yes":
            return True
    return False


def session_of(cgroup: str) -> str | None:
    """The logind session a ``/proc/PID/cgroup`` text puts the process in (its
    ``session-N.scope``, cgroup v2 or v1's ``name=systemd`` line), ``None`` if none."""
    for line in cgroup.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers not in ("", "name=systemd"):
            continue
        match = _SESSION_SCOPE.search(path)
        if match is not None:
            return match.group(1)
    return None


def _real_uid(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise StateError("no Uid in /proc status")


def pam_items_remote(request: LoginRequest) -> bool:
    """What the PAM items say: ``PAM_RHOST`` naming another host, the ``sshd`` service,
    or the ``ssh`` tty sshd sets. (sudo sets ``PAM_RHOST`` to the local host name.)"""
    rhost = (request.rhost or "").strip()
    local = rhost in _LOCAL_HOSTS or rhost == hostname()
    return (bool(rhost) and not local) or request.service == "sshd" or (
        request.tty is not None and (request.tty == "ssh" or request.tty.startswith("ssh:"))
    )


def is_remote(request: LoginRequest, *, loginctl: Path | None = None,
              logind: bool | None = None) -> bool:
    """A remote session: the PAM items (:func:`pam_items_remote`), or, where logind
    runs, the caller's logind session (:func:`logind_remote`). Without logind (a
    container, CI) only the PAM items count, so ``su``/``sudo`` typed inside an SSH
    session look local there. Where logind runs and cannot answer, this raises
    :class:`StateError` and the login fails closed."""
    if pam_items_remote(request):
        return True
    if logind if logind is not None else logind_running():
        return logind_remote(request.caller_pid or os.getpid(), loginctl=loginctl or LOGINCTL)
    return False


# --- the failure record ----------------------------------------------------------------


@dataclass(frozen=True)
class FailurePolicy:
    deny: int = DENY
    fail_interval: float = FAIL_INTERVAL
    unlock_time: float = UNLOCK_TIME

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> FailurePolicy:
        values = {k: table[k] for k in ("deny", "fail_interval", "unlock_time") if k in table}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0 < value <= 10**7
            ):
                raise ConfigError(f"[login] {key} must be a positive number")
        return cls(**values)


class FailureRecord:
    """Root's per-user record of failed login tries, in the spirit of pam_faillock.

    ``STATE_DIR/failures/<user>``: JSON ``{"version": 1, "failures": [t, ...]}``,
    mode 0600 in a 0700 directory, owned by root (or the running user, for tests),
    replaced atomically (:func:`hsm_auth.files.atomic_write`) under a ``flock``.
    :meth:`begin` records a try *before* the token is used; :meth:`clear` (a
    successful login) is the only way the record goes back."""

    def __init__(self, state_dir: Path, user: str, policy: FailurePolicy,
                 clock: Callable[[], float] = time.time) -> None:
        from .files import ensure_private_dir

        check_user_name(user)
        self.dir = ensure_private_dir(Path(state_dir) / "failures")
        self.path = self.dir / user
        self.policy = policy
        self.clock = clock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from .files import locked

        with locked(self.dir / ".lock"):
            yield

    def _read(self) -> list[float]:
        from .files import read_state

        raw = read_state(self.path, secret=True, limit=65536, missing_ok=True)
        if raw is None:
            return []
        try:
            data = json.loads(raw)
            failures = data["failures"]
            if data.get("version") != 1 or not isinstance(failures, list) or not all(
                type(t) in (int, float) for t in failures
            ):
                raise ValueError("shape")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise StateError(f"the failure record {self.path} is malformed") from None
        return [float(t) for t in failures]

    def _write(self, failures: list[float]) -> None:
        from .files import atomic_write

        body = json.dumps({"version": 1, "failures": failures}).encode() + b"\n"
        atomic_write(self.path, body)

    def _recent(self, failures: list[float], now: float) -> list[float]:
        # A clock set back does not forget failures (max with the newest).
        newest = max(failures, default=now)
        now = max(now, newest)
        return [t for t in failures if now - t < self.policy.fail_interval]

    def locked_for(self, failures: list[float] | None = None) -> float:
        """Seconds this user's tries stay refused (0: not refused)."""
        now = self.clock()
        recent = self._recent(self._read() if failures is None else failures, now)
        if len(recent) < self.policy.deny:
            return 0.0
        return max(0.0, max(recent) + self.policy.unlock_time - max(now, max(recent)))

    def begin(self) -> None:
        """Record one try before the token is used, or refuse while locked."""
        with self._locked():
            failures = self._read()
            wait = self.locked_for(failures)
            if wait > 0:
                raise _Refuse(Outcome.MAXTRIES,
                              f"too many failed logins; refused for {int(wait + 0.999)} s "
                              "without trying the token")
            now = self.clock()
            recent = self._recent(failures, now)
            self._write([*recent[-(self.policy.deny * 4):], now])

    def clear(self) -> None:
        with self._locked():
            if self._read():
                self._write([])

    def count(self) -> int:
        return len(self._read())


# --- talking to the person ----------------------------------------------------------------


def token_name(cred: LoginCredential) -> str:
    """A name for the token in prompts: the PKCS#11 token label, else the backend."""
    uri = cred.settings.get("uri")
    if cred.backend == "pkcs11" and isinstance(uri, str):
        from .uri import Pkcs11Uri

        with contextlib.suppress(HsmAuthError, ValueError):
            label = Pkcs11Uri.parse(uri).token
            if label:
                return f"token {label!r}"
    return {"tpm2": "the TPM", "fido2": "your security key"}.get(cred.backend,
                                                                  f"the {cred.backend} token")


class _Cue(UserInteraction):
    """Shows the cue once, before the token waits (a FIDO2 touch or verification)."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.shown = False

    def show(self, text: str) -> None:
        if not self.shown:
            self.shown = True
            self.conversation.info(text)

    def prompt_up(self, prompt: str) -> None:
        self.show(prompt)


# --- one login --------------------------------------------------------------------------------


def run(request: LoginRequest, conversation: Conversation, *, config: Config, authdir: Path,
        state_dir: Path, getpwnam: Getpwnam = pwd.getpwnam) -> LoginOutcome:
    """:func:`hsm_auth.login.authenticate`: the policy of the module docstring."""
    try:
        return _run(request, conversation, config, authdir, state_dir, getpwnam)
    except _Refuse as r:
        return LoginOutcome(r.outcome, r.message)
    except HsmAuthError as e:
        return LoginOutcome(Outcome.SYSTEM_ERR, f"{e.__class__.__name__}: {str(e)[:200]}")
    except Exception as e:  # fail closed, say what kind of failure without its data
        return LoginOutcome(Outcome.SYSTEM_ERR, f"internal error {e.__class__.__name__}")


def _run(request: LoginRequest, conversation: Conversation, config: Config, authdir: Path,
         state_dir: Path, getpwnam: Getpwnam) -> LoginOutcome:
    options = request.options
    table = config.raw.get("login", {})
    if not isinstance(table, dict):
        raise ConfigError("[login] must be a table")
    if options.remote == "deny" and is_remote(request):
        raise _Refuse(Outcome.PERM_DENIED, "remote session refused (remote = deny)")
    user = canonical_user(request.user, getpwnam)
    if user is None:
        raise _Refuse(Outcome.USER_UNKNOWN, f"no account {request.user[:64]!r}")
    allowed = allowed_methods(request, table)
    with AuthDir(authdir) as directory:
        creds = [c for c in directory.read(user) or [] if c.method in allowed]
        if not creds:
            outcome = Outcome.IGNORE if options.nouserok else Outcome.USER_UNKNOWN
            return LoginOutcome(outcome, f"{user} is not enrolled for login with "
                                         f"{', '.join(m.value for m in allowed) or 'any method'}")
        record = FailureRecord(state_dir, user, FailurePolicy.from_table(table))
        wait = record.locked_for()
        if wait > 0:
            raise _Refuse(Outcome.MAXTRIES, f"{user}: too many failed logins; refused for "
                                            f"{int(wait + 0.999)} s without trying the token")
        absent: list[str] = []
        first_pass = request.first_pass if options.first_pass else None
        for cred in creds:
            result = _try(request, user, cred, directory, record, conversation, config,
                          first_pass, absent)
            if result is not None:
                return result
            first_pass = None  # the earlier password goes to one token at most
    return LoginOutcome(Outcome.AUTHINFO_UNAVAIL,
                        f"{user}: no enrolled token present ({'; '.join(absent)[:300]})")


def _try(request: LoginRequest, user: str, cred: LoginCredential, directory: AuthDir,
         record: FailureRecord, conversation: Conversation, config: Config,
         first_pass: str | None, absent: list[str]) -> LoginOutcome | None:
    """Try one credential: an outcome, or ``None`` when its token is absent."""
    from . import registry

    options = request.options
    name = token_name(cred)
    settings = with_secrets(cred, config)
    try:
        backend = registry.load_backend(cred.backend, cred.backend_ref)
        with backend.open(settings) as store:
            pin: str | None = None
            if cred.method.needs_pin:
                check_pin_protection(store, settings, None)
                pin = first_pass
                if pin is None and options.first_pass == "use":  # noqa: S105 - a mode
                    raise _Refuse(Outcome.AUTH_ERR, "use_first_pass: no earlier password")
                if pin is None:
                    pin = conversation.secret(f"PIN for {name}: ")
                if not pin:
                    raise _Refuse(Outcome.AUTH_ERR, f"{user}: no PIN given for {name}")
            cue = _Cue(conversation)
            auth = Authorization(pin=pin, prompt=options.cue or None,
                                 timeout=options.timeout, interaction=cue)
            record.begin()  # before the token sees the PIN: a kill counts as a failure
            if options.cue:
                cue.show(options.cue)
            with directory.locked():
                host = hostname()
                challenge = os.urandom(CHALLENGE_BYTES)
                proof = make_proof(store, cred, host, user, challenge, auth)
                fresh = next((c for c in directory.read(user) or []
                              if c.signing_key == cred.signing_key), None)
                if fresh is None:
                    raise InvalidToken("the credential was removed during the login")
                counter = verify_proof(fresh, host, user, challenge, proof)
                current = directory.read(user) or []
                directory.write(user, [dataclasses.replace(c, counter=counter)
                                       if c.signing_key == cred.signing_key else c
                                       for c in current])
    except _Refuse:
        raise
    except (PinLocked, LockedOut) as e:
        return LoginOutcome(Outcome.MAXTRIES, f"{user}: {name} is locked ({e})")
    except Cancelled as e:
        return LoginOutcome(Outcome.AUTH_ERR, f"{user}: cancelled at {name} ({e})")
    except (AuthorizationError, InvalidToken) as e:
        return LoginOutcome(Outcome.AUTH_ERR, f"{user}: refused by {name} ({e})")
    except (BackendUnavailable, KeyNotFound) as e:
        absent.append(f"{name}: {str(e)[:100]}")
        return None
    record.clear()
    return LoginOutcome(Outcome.SUCCESS,
                        f"{user} logged in with {cred.method.value} on {name} "
                        f"(counter {counter})", cred.method)
