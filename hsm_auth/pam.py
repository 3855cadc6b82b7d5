r"""``hsm-auth-pam``: the workstation-login helper run by Linux-PAM's ``pam_exec.so``.

PAM configuration (e.g. in ``/etc/pam.d/common-auth``, before ``pam_unix``)::

    auth [success=done default=die] pam_exec.so quiet expose_authtok stdout \
        /usr/local/bin/hsm-auth-pam

``expose_authtok`` makes pam_exec ask for the password (the PIN) and write it
to the helper's stdin; ``stdout`` shows the helper's cue text to the user.
pam_exec maps exit status 0 to ``PAM_SUCCESS`` and every other status (or a
death by signal) to a failure, and this helper exits 0 **only** after a
signature from the token verified against the enrolled key with the counter
moving forward (or, if and only if configured, for a user without
enrollment). Every other path (bad options, ``--help``, a crash, a timeout)
exits non-zero: fail closed.

Options come from the ``[login]`` table of the config file (``--config``,
default ``/etc/hsm-auth/config.toml``; owned by root, not writable by others,
not a symlink) and can be overridden on the pam_exec line:

================== ================== ==========================================
``[login]`` key    option             meaning
================== ================== ==========================================
``authdir``        ``--authdir DIR``  the authfile directory (``/etc/hsm-auth/login``)
``timeout``        ``--timeout S``    seconds before the helper is killed (30)
``remote``         ``--remote``       ``deny`` (default): refuse when PAM_RHOST is
                                      set, the service is ``sshd`` or the tty is
                                      ``ssh``; ``allow``
``unenrolled``     ``--unenrolled``   ``fail`` (default) or ``succeed`` (only for a
                                      stack where another required module still
                                      authenticates the user)
``cue``            ``--cue TEXT``     text shown before the token is used
``method``         ``--method M``     which enrolled method (default: the first)
``cancel``         ``--cancel``       ``empty-pin`` (default): an empty PIN cancels
                                      before the token is touched; ``never``
================== ================== ==========================================

The ``[environment]`` table is exported first (pam_exec clears the
environment; e.g. ``SOFTHSM2_CONF``). The helper never prompts on a
terminal: the PIN comes from stdin only. The timeout is ``alarm(2)`` with the
default action, so the kernel kills the helper even inside a blocked native
call. All descriptors above 2 are made close-on-exec at start, and every
file the helper opens is close-on-exec, so nothing leaks into children of
native libraries.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/hsm-auth/config.toml")
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Options:
    authdir: Path
    timeout: float
    remote: str  # "deny" | "allow"
    unenrolled: str  # "fail" | "succeed"
    cue: str
    method: str | None
    cancel: str  # "empty-pin" | "never"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # never exit 0, never print usage to the user
        raise _Refused(f"bad option: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _Refused("argparse tried to exit")


class _Refused(Exception):
    """Any reason to fail that is not an HsmAuthError."""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hsm-auth-pam", add_help=False)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--authdir", type=Path)
    p.add_argument("--timeout", type=float)
    p.add_argument("--remote", choices=("deny", "allow"))
    p.add_argument("--unenrolled", choices=("fail", "succeed"))
    p.add_argument("--cue")
    p.add_argument("--method")
    p.add_argument("--cancel", choices=("empty-pin", "never"))
    return p


def seal_descriptors() -> None:
    """Make every open descriptor above stderr close-on-exec."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue


def _arm_timeout(seconds: float) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel kills us, no Python needed
    signal.alarm(max(1, int(seconds + 0.999)))


def read_config(path: Path) -> Mapping[str, Any]:
    """The config file as a dict ({} when absent); refuses symlinks and unsafe modes."""
    from .config import read_file

    return read_file(path) or {}


def options(args: argparse.Namespace, table: Mapping[str, Any]) -> Options:
    from .errors import ConfigError
    from .login import DEFAULT_AUTHDIR

    if not isinstance(table, dict):
        raise ConfigError("[login] must be a table")

    def pick(name: str, default: Any, choices: Sequence[str] | None = None) -> Any:
        value = getattr(args, name)
        if value is None:
            value = table.get(name, default)
        if choices is not None and value not in choices:
            raise ConfigError(f"[login] {name} must be one of {', '.join(choices)}")
        return value

    timeout = pick("timeout", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise ConfigError("[login] timeout must be a number of seconds in (0, 600]")
    cue, method = pick("cue", ""), pick("method", None)
    if not isinstance(cue, str) or not (method is None or isinstance(method, str)):
        raise ConfigError("[login] cue and method must be strings")
    return Options(
        authdir=Path(pick("authdir", str(DEFAULT_AUTHDIR))),
        timeout=float(timeout),
        remote=pick("remote", "deny", ("deny", "allow")),
        unenrolled=pick("unenrolled", "fail", ("fail", "succeed")),
        cue=cue,
        method=method,
        cancel=pick("cancel", "empty-pin", ("empty-pin", "never")),
    )


def is_remote(env: Mapping[str, str]) -> bool:
    """A remote session as PAM reports it: PAM_RHOST set, sshd, or an ssh tty."""
    return bool(env.get("PAM_RHOST")) or env.get("PAM_SERVICE") == "sshd" or (
        env.get("PAM_TTY") == "ssh"
    )


def read_authtok() -> str | None:
    """The PIN pam_exec wrote to stdin (``expose_authtok``), ``None`` if there is none.

    Never reads a terminal."""
    from .files import MAX_PIN_BYTES, decode_pin

    if os.isatty(0):
        return None
    chunks = []
    size = 0
    while size <= MAX_PIN_BYTES:
        try:
            chunk = os.read(0, 1024)
        except OSError:
            return None
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\x00" in chunk:
            break
    if not chunks:
        return None
    # too long or not UTF-8 is refused as such (not taken for "no PIN", i.e. cancelled)
    return decode_pin(b"".join(chunks).split(b"\x00", 1)[0], "PAM (stdin)")


def _log(message: str) -> None:
    import syslog

    line = f"hsm-auth-pam: {message}"
    try:
        syslog.openlog("hsm-auth-pam", 0, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE, message)
    except OSError:
        pass
    print(line, file=sys.stderr, flush=True)


def authenticate(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """Run one login; return a log line on success, raise on every failure."""
    args = _parser().parse_args(list(argv))
    if env.get("PAM_TYPE") != "auth":
        raise _Refused("not run by pam_exec for the auth phase (PAM_TYPE must be 'auth')")
    user = env.get("PAM_USER", "")
    if not user:
        raise _Refused("PAM_USER is not set")

    from .config import parse as parse_config
    from .errors import Cancelled, UnknownMethod
    from .login import AuthDir, check_user_name, login
    from .methods import Method

    check_user_name(user)
    raw = read_config(args.config)
    config = parse_config(raw)  # the schema first: options() may then trust [login]'s types
    opts = options(args, raw.get("login", {}))
    _arm_timeout(opts.timeout)
    if opts.remote == "deny" and is_remote(env):
        raise _Refused(f"remote session refused for {user} (remote = deny)")
    config.apply_environment()
    method = Method.parse(opts.method) if opts.method else None
    with AuthDir(opts.authdir) as authdir:
        creds = authdir.read(user)
        if not creds:
            if opts.unenrolled == "succeed":
                return f"{user} has no login enrollment; passed (unenrolled = succeed)"
            raise UnknownMethod(f"{user} is not enrolled for login (unenrolled = fail)")
        needs_pin = any(c.method.needs_pin for c in creds if method in (None, c.method))
        pin = read_authtok() if needs_pin else None
        if needs_pin and not pin and opts.cancel == "empty-pin":
            raise Cancelled("cancelled: empty PIN")
        if opts.cue:
            print(opts.cue, flush=True)
        result = login(authdir, user, pin=pin, method=method, prompt=opts.cue or None,
                       timeout=opts.timeout)
    return f"{result.user} logged in with {result.method.value} (counter {result.counter})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 only after a successful authentication."""
    code = 1
    try:
        _arm_timeout(DEFAULT_TIMEOUT)  # until the configured timeout is known
        seal_descriptors()
        message = authenticate(sys.argv[1:] if argv is None else argv, os.environ)
        _log(message)
        code = 0
    except BaseException as e:  # fail closed on everything, KeyboardInterrupt included
        from .errors import HsmAuthError

        if isinstance(e, HsmAuthError):
            from .cli import describe  # the one place that words an error's data

            code = max(1, e.exit_code)
            _log(f"refused: {describe(e)}")
        elif isinstance(e, _Refused):
            code = 2
            _log(f"refused: {e}")
        else:
            code = 1
            _log(f"refused: internal error {e.__class__.__name__}")
    return code


def run() -> None:
    """Console-script entry (``hsm-auth-pam``)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
