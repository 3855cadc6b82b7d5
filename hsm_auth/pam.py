r"""The Python side of ``pam_hsm_auth.so``, the native PAM module.

``pam_hsm_auth.so`` (``pam/pam_hsm_auth.c``) runs ``python -I -m hsm_auth.pam``
(the interpreter fixed when the module is built) with the environment
``PATH=/usr/sbin:/usr/bin:/sbin:/bin`` only, descriptors 0 and 1 on a socket to
the module, 2 on ``/dev/null`` and nothing else open. :func:`serve` is that
side: it reads the module's request, builds the environment from root's
config file alone (``[environment]`` replaces, never merges with, what the
process has), runs :func:`hsm_auth.login.authenticate` with a
:class:`PamConversation` that asks the module for what it needs (a PIN with
its own prompt, a cue before the token waits), and answers one ``result``
line. The line protocol is described in ``pam/pam_hsm_auth.c`` and the README.

Module arguments go to :meth:`hsm_auth.login.LoginOptions.from_args`, except
``config=PATH`` (default ``/etc/hsm-auth/config.toml``), which this side
reads: root-owned (or the running user's, for tests), not writable by others,
not a symlink. ``[login] authdir`` and ``state_dir`` name the authfile and
failure-record directories.

``hsm-auth-pam``, the helper that ``pam_exec.so`` ran, is retired: pam_exec
gives its command the PAM environment (which modules and users can fill) and
a console script starts Python without ``-I``, so it could not be isolated.
An old ``pam_exec.so ... hsm-auth-pam`` line now fails (no such command), and
``python -I -m hsm_auth.pam`` only speaks the module's protocol.

The resident login service (:mod:`hsm_auth.login_service`) runs the same
:func:`serve` in a child per connection, with the :class:`Peer` the kernel
gave for the socket (``SO_PEERCRED``): its pid replaces the request's
``caller`` line, and :func:`caller_refusal` is the caller rule (a non-root
peer only for its own account, with the service's config).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

DEFAULT_CONFIG = Path("/etc/hsm-auth/config.toml")
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Peer:
    """The other end of a login-service connection, from the kernel (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


class _Refused(Exception):
    """Any reason to fail that is not an HsmAuthError (never carries a secret)."""


def read_config(path: Path) -> Mapping[str, Any]:
    """The config file as a dict ({} when absent); refuses symlinks and unsafe modes."""
    from .config import read_file

    return read_file(path) or {}


def _log(message: str) -> None:
    """One line to syslog (authpriv): the helper's stderr is /dev/null."""
    import syslog

    try:
        syslog.openlog("hsm-auth-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE, message)
    except OSError:
        pass


# --- pam_hsm_auth.so: the helper's side of the line protocol -------------------------

PROTOCOL = "hsm-auth-pam 1"
LINE_BYTES = 1024  # a line, its "\n" included (the module's limit)
MAX_SECRET = 256  # bytes of an answer or authtok
MAX_REQUEST_LINES = 64
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_GRACE = 10.0  # seconds past the timeout before the helper's own alarm fires


class ProtocolError(Exception):
    """The module sent something the protocol does not allow (never carries a secret)."""


def printable(text: str) -> str:
    """``text`` as one protocol line's payload: control characters replaced, cut to fit."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    data = clean.encode()[: LINE_BYTES - 64]
    return data.decode(errors="ignore")


class Channel:
    """Bounded lines over the socket to the module (``rfd`` in, ``wfd`` out)."""

    def __init__(self, rfd: int = 0, wfd: int = 1) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._buf = bytearray()

    def read(self) -> str:
        while b"\n" not in self._buf:
            if len(self._buf) >= LINE_BYTES:
                raise ProtocolError("a line from the module is too long")
            chunk = os.read(self.rfd, LINE_BYTES)
            if not chunk:
                raise ProtocolError("the module closed the connection")
            self._buf += chunk
        raw, _, rest = bytes(self._buf).partition(b"\n")
        self._buf[:] = rest
        if len(raw) >= LINE_BYTES or any(b < 0x20 or b == 0x7F for b in raw):
            raise ProtocolError("a line from the module is too long or not printable")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError("a line from the module is not UTF-8") from None

    def write(self, key: str, text: str | None = None) -> None:
        line = (key if text is None else f"{key} {printable(text)}").encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self.wfd, view):]


def _unhex_secret(value: str) -> str:
    try:
        data = bytes.fromhex(value)
        if len(data) > MAX_SECRET or len(value) != 2 * len(data):
            raise ValueError("length")
        return data.decode()
    except ValueError:  # UnicodeDecodeError included
        raise ProtocolError("a secret from the module is malformed") from None


@dataclass(frozen=True)
class PamRequest:
    """What the module sent before the conversation starts."""

    user: str
    service: str
    rhost: str | None = None
    tty: str | None = None
    ruser: str | None = None
    args: tuple[str, ...] = ()
    authtok: str | None = field(default=None, repr=False)
    prior_authtok: bool = False
    caller_pid: int | None = None


def read_request(channel: Channel) -> PamRequest:
    """The request block, strictly: the version line first, known keys once, ``end``."""
    if channel.read() != PROTOCOL:
        raise ProtocolError("not protocol version 1")
    single: dict[str, str] = {}
    args: list[str] = []
    for _ in range(MAX_REQUEST_LINES):
        line = channel.read()
        if line == "end":
            break
        key, sep, value = line.partition(" ")
        if not sep:
            raise ProtocolError("a request line without a value")
        if key == "option":
            args.append(value)
        elif key in ("user", "service", "rhost", "tty", "ruser", "authtok", "prior-authtok",
                     "caller") and key not in single:
            single[key] = value
        else:
            raise ProtocolError(f"unexpected request key {key[:20]!r}")
    else:
        raise ProtocolError("the request has too many lines")
    if "user" not in single or "service" not in single:
        raise ProtocolError("the request has no user or no service")
    caller = single.get("caller")
    if caller is not None and not caller.isdigit():
        raise ProtocolError("caller is not a process id")
    return PamRequest(
        user=single["user"], service=single["service"], rhost=single.get("rhost"),
        tty=single.get("tty"), ruser=single.get("ruser"), args=tuple(args),
        authtok=None if "authtok" not in single else _unhex_secret(single["authtok"]),
        prior_authtok=single.get("prior-authtok") == "yes",
        caller_pid=None if caller is None else int(caller),
    )


class _Clock:
    """The helper's alarm, stopped while the person answers the conversation."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds
        self._since = 0.0

    def start(self) -> None:
        import time

        self._since = time.monotonic()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel kills us, no Python needed
        signal.alarm(max(1, int(self.left + 0.999)))

    def stop(self) -> None:
        import time

        signal.alarm(0)
        self.left = max(1.0, self.left - (time.monotonic() - self._since))


class PamConversation:
    """:class:`hsm_auth.login.Conversation` over the module's line protocol."""

    def __init__(self, channel: Channel, clock: _Clock | None = None) -> None:
        self.channel = channel
        self.clock = clock

    def _ask(self, key: str, text: str) -> str:
        if self.clock is not None:
            self.clock.stop()
        try:
            self.channel.write(key, text)
            return self.channel.read()
        finally:
            if self.clock is not None:
                self.clock.start()

    def secret(self, prompt: str) -> str | None:
        reply = self._ask("secret", prompt)
        if reply == "none":
            return None
        if not reply.startswith("answer "):
            raise ProtocolError("the module did not answer a secret prompt")
        return _unhex_secret(reply[len("answer "):])

    def info(self, text: str) -> None:
        if self._ask("info", text) != "ok":
            raise ProtocolError("the module did not acknowledge a message")

    def error(self, text: str) -> None:
        if self._ask("error", text) != "ok":
            raise ProtocolError("the module did not acknowledge a message")

    def log(self, text: str) -> None:
        """A debug line for the module's syslog (shown only with ``debug``)."""
        self.channel.write("log", text)


def scrub_environment(environment: Mapping[str, str]) -> None:
    """The process environment becomes ``PATH`` plus root's ``[environment]``, nothing else."""
    os.environ.clear()
    os.environ["PATH"] = SAFE_PATH
    for key, value in environment.items():
        os.environ[key] = value


def split_config_arg(args: Sequence[str], default: Path = DEFAULT_CONFIG
                     ) -> tuple[Path, bool, list[str]]:
    """``config=PATH`` (this side's) apart from the login options: (the config file,
    whether an argument named it, the rest). ``socket=`` is the C module's own (which
    service to ask) and is dropped here."""
    path, named, rest = default, False, []
    for arg in args:
        if arg.startswith("config="):
            path, named = Path(arg[len("config="):]), True
            if not path.is_absolute():
                raise _Refused("config= must be an absolute path")
        elif not arg.startswith("socket="):
            rest.append(arg)
    return path, named, rest


def caller_refusal(peer: Peer, user: str, config_path: Path, named: bool,
                   service_config: Path) -> str | None:
    """The login service's caller rule; ``None``: the peer may ask, else why not.

    A peer running as root (sudo, su, login, a display manager, sshd) may ask for any
    account, with any config file, as the spawned helper would. Any other peer (a
    screen locker) runs as a user who controls its every byte: it may ask only for the
    account whose uid it has (``PAM_USER`` resolved with ``getpwnam``, as the policy
    does) and only under the service's own config file, so it cannot pick a config
    with another failure record or other limits."""
    if peer.uid == 0:
        return None
    from .login_policy import canonical_user

    canonical = canonical_user(user)
    try:
        uid = None if canonical is None else pwd_uid(canonical)
    except KeyError:
        uid = None
    if uid != peer.uid:
        return (f"a caller with uid {peer.uid} may log in only its own account, "
                f"not {user[:64]!r}")
    if named and os.path.realpath(config_path) != os.path.realpath(service_config):
        return f"a caller with uid {peer.uid} may not choose the config file"
    return None


def pwd_uid(name: str) -> int:
    import pwd

    return int(pwd.getpwnam(name).pw_uid)


def serve(channel: Channel | None = None, peer: Peer | None = None,
          service_config: Path = DEFAULT_CONFIG) -> int:
    """Run one authentication for the module; always ends with one ``result`` line.

    ``peer`` is set when the login service serves the connection: the kernel's
    word on the caller (see :func:`caller_refusal`), and ``service_config`` the
    config file used when the module names none. Returns the process exit status
    (0 when a result was sent)."""
    channel = channel or Channel()
    clock = _Clock(DEFAULT_TIMEOUT + _GRACE)
    clock.start()
    try:
        outcome, message = _serve(channel, clock, peer, service_config)
    except ProtocolError as e:  # the module is gone or broke the protocol: no result
        _log(f"protocol error: {e}")
        return 3
    except BaseException as e:  # fail closed, with the class only (a message may hold data)
        outcome, message = "SYSTEM_ERR", f"internal error {e.__class__.__name__}"
    try:
        channel.write("result", f"{outcome} {message}")
    except OSError:
        return 3
    return 0


def _serve(channel: Channel, clock: _Clock, peer: Peer | None = None,
           service_config: Path = DEFAULT_CONFIG) -> tuple[str, str]:
    import dataclasses

    from .config import parse as parse_config
    from .errors import HsmAuthError

    request = read_request(channel)
    if not sys.flags.isolated:
        return "SYSTEM_ERR", "hsm_auth.pam must run as python -I (from pam_hsm_auth.so)"
    try:
        config_path, named, args = split_config_arg(request.args, service_config)
        if peer is not None:
            # The kernel's pid of the PAM application, never what the request says.
            request = dataclasses.replace(request, caller_pid=peer.pid)
            refusal = caller_refusal(peer, request.user, config_path, named, service_config)
            if refusal is not None:
                return "PERM_DENIED", refusal
            if "debug" in args:
                channel.write("log", f"served by the login service for pid {peer.pid} "
                                     f"uid {peer.uid}")
        raw = read_config(config_path)
        config = parse_config(raw)
        scrub_environment(config.environment)
        return _authenticate(request, args, raw, config, channel, clock)
    except _Refused as e:  # a bad config= argument
        return "SERVICE_ERR", str(e)
    except HsmAuthError as e:
        from .cli import describe

        return "SYSTEM_ERR", describe(e)


def _authenticate(
    request: PamRequest, args: Sequence[str], raw: Mapping[str, Any], config: Config,
    channel: Channel, clock: _Clock,
) -> tuple[str, str]:
    """The login policy's verdict (:func:`hsm_auth.login.authenticate`) as a result line."""
    from .errors import ConfigError
    from .login import (
        DEFAULT_AUTHDIR,
        DEFAULT_STATE_DIR,
        LoginOptions,
        LoginRequest,
        authenticate,
    )

    table = raw.get("login", {})
    try:
        options = LoginOptions.from_args(args, table)
    except ConfigError as e:  # a bad module argument: the service's configuration
        return "SERVICE_ERR", str(e)
    clock.stop()
    clock.left = options.timeout + _GRACE
    clock.start()
    channel.write("timeout", f"{options.timeout:g}")
    login_request = LoginRequest(
        user=request.user, service=request.service, rhost=request.rhost, tty=request.tty,
        options=options, first_pass=request.authtok if options.first_pass else None,
        prior_authtok=request.prior_authtok, caller_pid=request.caller_pid,
    )
    conversation = PamConversation(channel, clock)
    outcome = authenticate(
        login_request, conversation, config=config,
        authdir=Path(table.get("authdir", str(DEFAULT_AUTHDIR))),
        state_dir=Path(table.get("state_dir", str(DEFAULT_STATE_DIR))),
    )
    if options.debug:
        conversation.log(f"{outcome.outcome.name}: {outcome.message}")
    return outcome.outcome.name, outcome.message


# --- the install check (scripts/pam-install) ---------------------------------------------


def check_install() -> list[str]:
    """What makes this interpreter unfit for the PAM module (empty: fit): root must not
    import code that others can change, nor a checkout (an editable install)."""
    import importlib
    import sysconfig

    from .errors import StateError
    from .files import check_state

    problems = []
    if not sys.flags.isolated:
        problems.append("run the check as python -I, as the module does")
    if os.geteuid() != 0:
        problems.append("run the check as root (files must be root's, not the caller's)")
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("purelib", "platlib")}
    for name in ("hsm_auth", "hsm_auth_backends"):
        module = importlib.import_module(name)
        where = os.path.realpath(os.path.dirname(module.__file__ or ""))
        if os.path.dirname(where) not in roots:
            problems.append(f"{name} is imported from {where}, outside {sorted(roots)[0]}: an "
                            "editable install or a checkout (install with pip install ., not -e)")
            continue
        for top, _dirs, files in os.walk(where):
            for entry in [top, *(os.path.join(top, f) for f in files)]:
                try:
                    check_state(entry, directory=entry == top)
                except StateError as e:
                    problems.append(str(e))
    try:
        check_state(os.path.realpath(sys.executable))
    except StateError as e:
        problems.append(str(e))
    return problems


def _check_install_main() -> int:
    problems = check_install()
    for problem in problems[:20]:
        print(f"hsm-auth: error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{sys.executable}: fit for pam_hsm_auth.so")
    sys.stdout.flush()
    return 1 if problems else 0


if __name__ == "__main__":
    os._exit(_check_install_main() if sys.argv[1:] == ["--check-install"] else serve())
