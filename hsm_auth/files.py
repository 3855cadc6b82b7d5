"""Files that hold state: written atomically (temp file + fsync + rename), 0600,
and checked before they are used.

One trust policy, :func:`check_state`, for every directory and file hsm-auth
keeps state or configuration in, or reads a secret from (the rule OpenSSH's
``StrictModes`` applies to ``~/.ssh``):

* the thing itself is not a symbolic link, is of the expected kind, is owned
  by the current user or by root, and is not writable by group or others
  (a secret — a key file, a PIN file — not readable by them either);
* every directory above it, up to ``/``, is owned by the current user or root
  and is not writable by group or others unless it is sticky (``/tmp``): so
  nobody else can rename or replace anything on the way. A symbolic link
  above it (``/var/run -> /run``) must itself be owned by the current user or
  root, and the directories it leads to are checked the same way.

For root, "the current user or root" is just root: state owned by any other
user is refused, because that user could rewrite it (root itself is never
stopped by modes). Each refusal is one :class:`StateError` line that says how
to fix it. Lock files are opened with ``O_NOFOLLOW`` (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidInput, StateError

PRIVATE_MODE = 0o600
#: The largest state file read (credential lists, identity, TPM blobs are far smaller).
STATE_LIMIT = 16 * 1024 * 1024
#: The longest PIN accepted from a file, a descriptor or a PAM conversation.
MAX_PIN_BYTES = 4096


# --- the trust policy ---------------------------------------------------------------


def trusted_owner(uid: int) -> bool:
    """Whether files owned by ``uid`` may hold our state: ours, or root's."""
    return uid == 0 or uid == os.geteuid()


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _owners() -> str:
    me = _user(os.geteuid())
    return me if os.geteuid() == 0 else f"{me} or root"


def check_stat(st: os.stat_result, path: str | os.PathLike[str], *, directory: bool,
               secret: bool = False, what: str = "") -> None:
    """Refuse ``path`` (already ``lstat``/``fstat``-ed as ``st``) unless it is a
    directory (or a regular file), owned by us or root, and safe from others.
    ``what`` names it in the message (``"the PIN file "``)."""
    name = f"{what}{_p(path)}"
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{name} is a symbolic link; refusing to use it (give the real path)")
    if directory and not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{name} is not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise StateError(f"{name} is not a regular file")
    if not trusted_owner(st.st_uid):
        raise StateError(
            f"{name} is owned by {_user(st.st_uid)}, not by {_owners()}: "
            f"chown {_user(os.geteuid())} {_p(path)}"
        )
    mode = stat.S_IMODE(st.st_mode)
    fix = "chmod 700" if directory else "chmod 600" if secret else "chmod go-w"
    if secret and mode & 0o077:
        raise StateError(
            f"{name} is accessible by group or others (mode {mode:04o}): {fix} {_p(path)}"
        )
    if mode & 0o022:
        raise StateError(
            f"{name} is writable by group or others (mode {mode:04o}): {fix} {_p(path)}"
        )


def _check_above(directory: str, item: str, depth: int = 0) -> None:
    """Check ``directory`` (absolute, normalized) and every directory above it
    (see the module docstring). Strings, not Paths: this runs for every OTP."""
    current = ""
    for part in directory.split("/"):
        if not part and current:
            continue  # "/" itself, or a trailing slash
        current = f"{current}/{part}" if current not in ("", "/") else f"/{part}"
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return  # the rest does not exist yet: we create it, 0700
        except (OSError, ValueError) as e:
            raise _above(current, item, f"cannot be checked: {_reason(e)}") from None
        if stat.S_ISLNK(st.st_mode):
            if not trusted_owner(st.st_uid):
                raise _above(current, item, f"is a symbolic link owned by {_user(st.st_uid)}, "
                             f"not by {_owners()}; use a path without it")
            try:
                current = str(Path(current).resolve(strict=True))
            except (OSError, RuntimeError):
                raise _above(current, item, "is a broken symbolic link") from None
            if depth > 8:
                raise _above(current, item, "changes while it is checked")
            _check_above(current, item, depth + 1)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _above(current, item, "is not a directory")
        if not trusted_owner(st.st_uid):
            raise _above(current, item, f"is owned by {_user(st.st_uid)}, not by {_owners()}, "
                         "who could replace what it holds; keep hsm-auth state elsewhere")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise _above(current, item, f"is writable by group or others (mode {mode:04o}): "
                         f"chmod go-w {_p(current)}")


def _above(directory: str, item: str, why: str) -> StateError:
    return StateError(f"{_p(directory)} (above {_p(item)}) {why}")


def _p(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in os.fspath(path))


def _reason(e: Exception) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or "invalid path"


def check_parents(path: str | os.PathLike[str]) -> None:
    """Check every directory above ``path`` (not ``path`` itself) as :func:`check_state` does."""
    item = os.path.abspath(path)
    _check_above(os.path.dirname(item), item)


def check_state(path: str | os.PathLike[str], *, directory: bool = False, secret: bool = False,
                missing_ok: bool = False) -> None:
    """The trust policy for state, config and secret files (module docstring).

    Raises :class:`StateError` with the fix; a missing ``path`` is an error
    unless ``missing_ok`` (then only what exists above it is checked)."""
    item = os.path.abspath(path)
    _check_above(os.path.dirname(item), item)
    try:
        st = os.lstat(item)
    except FileNotFoundError:
        if missing_ok:
            return
        raise StateError(f"{_p(item)} does not exist") from None
    except (OSError, ValueError) as e:
        raise StateError(f"cannot check {_p(item)}: {_reason(e)}") from None
    check_stat(st, item, directory=directory, secret=secret)


def check_private(path: Path) -> None:
    """Refuse a secret-holding file that others can read or write, or that is a symlink."""
    check_state(path, secret=True)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as a directory only its owner can enter, or
    check an existing one: refused unless :func:`check_state` accepts it."""
    if not os.path.lexists(path):
        check_parents(path)  # nothing is created below a directory others control
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except (OSError, ValueError) as e:
            raise StateError(f"cannot create {_p(path)}: {_reason(e)}") from None
    check_state(path, directory=True)
    return path


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600, never through a
    symlink; the caller has checked its directory with :func:`ensure_private_dir`)."""
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_lock_file(path: Path) -> int:
    """The descriptor of the lock file ``path`` to ``flock``: created 0600, never
    through a symlink, refused unless :func:`check_stat` accepts it. Closing it
    releases any lock held on it."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, PRIVATE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(f"{_p(path)} is a symbolic link; refusing to lock it") from None
        raise StateError(f"cannot open the lock file {_p(path)}: {e.strerror}") from None
    try:
        check_stat(os.fstat(fd), path, directory=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- reading and writing --------------------------------------------------------------


def read_state(path: Path, *, secret: bool = False, limit: int = STATE_LIMIT,
               missing_ok: bool = False) -> bytes | None:
    """The bytes of a state file that :func:`check_state` accepts (opened without
    following a symlink, checked on the open descriptor); ``None`` if it does not
    exist and ``missing_ok``."""
    item = os.path.abspath(path)
    _check_above(os.path.dirname(item), item)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(item, flags)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise StateError(f"{_p(item)} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(f"{_p(item)} is a symbolic link; refusing to use it") from None
        raise StateError(f"cannot open {_p(item)}: {e.strerror}") from None
    try:  # before fdopen, which raises IsADirectoryError for a directory
        check_stat(os.fstat(fd), item, directory=False, secret=secret)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise StateError(f"cannot read {_p(item)}: {e.strerror}") from None
    if len(data) > limit:
        raise StateError(f"{_p(item)} is larger than {limit} bytes")
    return data


def read_private(path: Path) -> bytes:
    data = read_state(path, secret=True)
    assert data is not None
    return data


def read_json(path: Path) -> Any:
    data = read_state(path)
    assert data is not None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{_p(path)} is unreadable: {e.__class__.__name__}") from e


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half."""
    import tempfile  # only writers need it (CLI start-up)

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


# --- secrets from files and descriptors, values from state ----------------------------


def read_secret_file(path: str | os.PathLike[str], what: str = "the PIN file") -> bytes:
    """Up to ``MAX_PIN_BYTES + 2`` bytes of a secret file: a regular file (or a
    pipe, e.g. ``<(…)``) owned by us or root that nobody else can read or write."""
    try:  # non-blocking: a FIFO without a writer reads as empty instead of hanging
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except (OSError, ValueError) as e:
        raise StateError(f"cannot open {what} {_p(path)}: {_reason(e)}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # os.fdopen would raise IsADirectoryError
        os.close(fd)
        raise StateError(f"{what} {_p(path)} is a directory; give a file")
    with os.fdopen(fd, "rb") as f:
        os.set_blocking(fd, True)
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode):
            if not trusted_owner(st.st_uid) or stat.S_IMODE(st.st_mode) & 0o077:
                raise StateError(f"{what} {_p(path)} is a pipe others can use; use a private file")
        else:
            check_stat(st, path, directory=False, secret=True, what=f"{what} ")
        try:
            return f.read(MAX_PIN_BYTES + 3)
        except OSError as e:
            raise StateError(f"cannot read {what} {_p(path)}: {e.strerror}") from None


def decode_pin(data: bytes, source: str) -> str:
    """A PIN from bytes read from ``source`` (named in errors, which never hold the PIN):
    UTF-8, no control characters, at most :data:`MAX_PIN_BYTES`, trailing newline removed."""
    if len(data) > MAX_PIN_BYTES + 2 or len(data.rstrip(b"\r\n")) > MAX_PIN_BYTES:
        raise InvalidInput(f"the PIN from {source} is longer than {MAX_PIN_BYTES} bytes")
    try:
        pin = data.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"the PIN from {source} is not UTF-8 text") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in pin):
        raise InvalidInput(f"the PIN from {source} contains control characters")
    return pin


def state_int(data: dict[str, Any], key: str, default: int | None, lo: int, hi: int,
              where: str) -> int:
    """An integer setting read from a state file, refused outside ``lo..hi`` (a value
    only an edit could put there); ``default`` None: the key is required."""
    if key not in data and default is None:
        raise StateError(f"{where}: {key} is missing")
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value)[:40]
        raise StateError(f"{where}: {key} = {shown} is not an integer from {lo} to {hi}")
    return value
