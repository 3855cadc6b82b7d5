"""Files that hold state: written atomically (temp file + fsync + rename), 0600."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import StateError

PRIVATE_MODE = 0o600


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as a directory only its owner can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half."""
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


def check_private(path: Path) -> None:
    """Refuse a secret-holding file that others can read or write, or that is a symlink."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise StateError(f"{path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{path} is a symbolic link; refusing to use it")
    if st.st_mode & 0o077:
        raise StateError(
            f"{path} is accessible by group or others (mode {st.st_mode & 0o777:o}); chmod 600 it"
        )


def read_private(path: Path) -> bytes:
    check_private(path)
    return path.read_bytes()


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StateError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise StateError(f"{path} is unreadable: {e.__class__.__name__}") from e
