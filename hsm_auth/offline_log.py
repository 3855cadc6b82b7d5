"""The authenticator's offline log (docs/PROTOCOL.md §19): one entry per offline
use, hash-chained, each head signed in the token.

Each OTP that :meth:`Authenticator.finish_offline_authentication` releases is
first recorded here: when, at which verifier, for which tenant, user, method and
credential, at which ATC, and the SHA-256 of what it was bound to (the context,
the transaction data and what the user entered: :func:`data_hash`). Never the
OTP, a PIN or a key.

* **One chain per credential**, in ``<authenticator dir>/offline-log/<credential
  id>.log`` (0600): what is submitted to a verifier is only its own credential's
  uses. Entry ``seq`` 0 has ``prev`` = 32 zero bytes; each later entry's ``prev`` is
  the previous entry's hash (:meth:`LogEntry.entry_hash`, over its canonical CBOR).
* **The head is signed at each use**, in the same authorization as the OTP (the
  same open token session, the same PIN: no second prompt), with the method's
  signing key: ECDSA P-256 over :func:`head_message` (the credential id, the
  entry's seq and hash). A FIDO2 credential signs only its own assertions: its
  entries carry no signature, and its head is signed **at submission**, by the
  signed request (an assertion, with user verification) whose body holds them
  (``hsm-auth log submit``).
* **Durable before the OTP is released** (the counter rule): the entry is one line,
  written with one ``write`` and ``fsync``-ed (with its directory on first use)
  before the caller sees the OTP. A kill leaves at most one torn last line without
  its newline: its OTP was never released, it is ignored when read and cut off by
  the next append. Appending (one line) instead of rewriting the file (temp +
  rename) keeps an OTP's cost independent of the log's length.
* The counter advances before the entry is written, so a kill between the two
  leaves an ATC with no entry and no OTP: the verifier reports such a gap
  (:mod:`hsm_auth.offline_audit`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cbor2

from .errors import DecodeError, StateError
from .files import atomic_write, check_stat, check_state, ensure_private_dir, read_state
from .methods import Method

if TYPE_CHECKING:
    from .authenticator import EnrolledMethod
    from .keystore import Authorization, KeyStore
    from .protocol import VerificationData

__all__ = [
    "GENESIS",
    "LogEntry",
    "OfflineLog",
    "data_hash",
    "head_message",
    "record_use",
]

VERSION = 1
#: ``prev`` of the first entry.
GENESIS = bytes(32)
_ENTRY_DOMAIN = b"hsm-auth offline-log entry v1\x00"
_HEAD_DOMAIN = b"hsm-auth offline-log head v1\x00"
_DATA_DOMAIN = b"hsm-auth offline-log data v1\x00"
#: The largest log read (about 40,000 entries); older entries are kept by the verifier.
MAX_LOG_BYTES = 16 * 1024 * 1024
_HEX = re.compile(r"[0-9a-f]*")
_MAX_INT = 2**63 - 1
_TEXT_LIMIT = 256
_TAIL_WINDOW = 4096  # read from the end to find the last entry (an entry is < 2 KiB)

#: Signs a head message in the token; returns the raw r || s signature.
HeadSigner = Callable[[bytes], bytes]


def data_hash(
    context: str, transaction: Sequence[Sequence[str]] | None = None, user_data: str = ""
) -> bytes:
    """SHA-256 of what an OTP was bound to, as the question binds it (docs/PROTOCOL.md
    §17): the context the user saw, the transaction's digest ``TH``
    (:func:`hsm_auth.transaction.digest`, empty without one) and the data the user
    entered (as :func:`hsm_auth.transaction.user_data` normalized it; "" for none), as
    canonical CBOR ``[context, TH, user_data]``."""
    from . import transaction as tx

    pairs = None if transaction is None else tuple((str(a), str(b)) for a, b in transaction)
    body = cbor2.dumps([context, tx.digest(pairs), user_data], canonical=True)
    return hashlib.sha256(_DATA_DOMAIN + body).digest()


def head_message(credential_id: bytes, seq: int, entry_hash: bytes) -> bytes:
    """What the token signs at each use: the log's head after entry ``seq``."""
    return _HEAD_DOMAIN + credential_id + seq.to_bytes(8, "big") + entry_hash


@dataclass(frozen=True)
class LogEntry:
    """One offline use. ``signature`` is the raw ECDSA signature of
    :func:`head_message` for this entry (``None`` for FIDO2: see the module docstring)."""

    seq: int
    time: int
    verifier_id: bytes
    tenant: str | None
    user: str
    method: Method
    credential_id: bytes
    atc: int
    data: bytes  # data_hash(...)
    prev: bytes
    signature: bytes | None = field(default=None, repr=False)

    def canonical(self) -> bytes:
        return cbor2.dumps(
            [VERSION, self.seq, self.time, self.verifier_id, self.tenant, self.user,
             self.method.value, self.credential_id, self.atc, self.data, self.prev],
            canonical=True,
        )

    def entry_hash(self) -> bytes:
        return hashlib.sha256(_ENTRY_DOMAIN + self.canonical()).digest()

    def head(self) -> bytes:
        """The message this entry's signature covers."""
        return head_message(self.credential_id, self.seq, self.entry_hash())

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "seq": self.seq,
            "time": self.time,
            "verifier": self.verifier_id.hex(),
            "tenant": self.tenant,
            "user": self.user,
            "method": self.method.value,
            "credential": self.credential_id.hex(),
            "atc": self.atc,
            "data": self.data.hex(),
            "prev": self.prev.hex(),
            "sig": None if self.signature is None else self.signature.hex(),
        }

    @classmethod
    def from_json(cls, d: object) -> LogEntry:
        """Strict: exactly the fields of :meth:`to_json`, each checked (DecodeError)."""
        if not isinstance(d, Mapping) or set(d) != _FIELDS:
            raise DecodeError("a log entry has exactly the fields " + ", ".join(sorted(_FIELDS)))
        if d["v"] != VERSION or type(d["v"]) is not int:
            raise DecodeError("a log entry of an unknown version")
        try:
            method = Method(d["method"])
        except ValueError:
            raise DecodeError("a log entry names an unknown method") from None
        sig = d["sig"]
        return cls(
            seq=_int(d["seq"], "seq"),
            time=_int(d["time"], "time"),
            verifier_id=_hex(d["verifier"], "verifier", 1, 64),
            tenant=None if d["tenant"] is None else _text(d["tenant"], "tenant"),
            user=_text(d["user"], "user"),
            method=method,
            credential_id=_hex(d["credential"], "credential", 16, 16),
            atc=_int(d["atc"], "atc"),
            data=_hex(d["data"], "data", 32, 32),
            prev=_hex(d["prev"], "prev", 32, 32),
            signature=None if sig is None else _hex(sig, "sig", 64, 64),
        )


_FIELDS = frozenset(
    {"v", "seq", "time", "verifier", "tenant", "user", "method", "credential", "atc", "data",
     "prev", "sig"}
)


def _int(v: object, name: str) -> int:
    if type(v) is not int or not 0 <= v <= _MAX_INT:
        raise DecodeError(f"a log entry's {name} is not an integer from 0 to 2^63-1")
    return v


def _hex(v: object, name: str, lo: int, hi: int) -> bytes:
    if not isinstance(v, str) or not _HEX.fullmatch(v) or len(v) % 2 or not (
        lo <= len(v) // 2 <= hi
    ):
        raise DecodeError(f"a log entry's {name} is not {lo}..{hi} bytes of lower-case hex")
    return bytes.fromhex(v)


def _text(v: object, name: str) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= _TEXT_LIMIT or not v.isprintable():
        raise DecodeError(f"a log entry's {name} is not printable text of 1..{_TEXT_LIMIT}")
    return v


class OfflineLog:
    """The logs of one authenticator directory (the caller holds its lock to append)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "offline-log"

    def path(self, credential_id: bytes) -> Path:
        return self.directory / f"{credential_id.hex()}.log"

    def credentials(self) -> list[bytes]:
        """The credentials that have a log here."""
        check_state(self.directory, directory=True, missing_ok=True)
        if not self.directory.is_dir():
            return []
        found = []
        for name in sorted(os.listdir(self.directory)):
            stem, dot, ext = name.partition(".")
            if dot and ext == "log" and len(stem) == 32 and _HEX.fullmatch(stem):
                found.append(bytes.fromhex(stem))
        return found

    def entries(self, credential_id: bytes) -> list[LogEntry]:
        """The credential's entries as written (a torn last line, whose OTP was never
        released, is left out). A line that does not parse is a StateError: someone
        edited the file (submitting it anyway is how the verifier hears of it:
        :meth:`raw_entries`)."""
        out = []
        for number, line in enumerate(self._lines(credential_id), 1):
            try:
                out.append(LogEntry.from_json(json.loads(line)))
            except (ValueError, DecodeError) as e:
                raise StateError(
                    f"{self.path(credential_id)} line {number} is not a log entry ({e})"
                ) from None
        return out

    def raw_entries(self, credential_id: bytes) -> list[Any]:
        """The credential's entries as JSON values, unchecked (what is submitted)."""
        out: list[Any] = []
        for line in self._lines(credential_id):
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append(None)  # the verifier refuses it: an alert
        return out

    def sent(self, credential_id: bytes) -> int:
        """The highest seq the verifier has taken (-1: none): the next submission
        starts after it."""
        data = read_state(self._sent_path(credential_id), missing_ok=True)
        try:
            return int(data) if data else -1
        except ValueError:
            return -1  # unreadable: send everything again (the verifier keeps each once)

    def last_seq(self, credential_id: bytes) -> int:
        """The seq of the log's last complete entry (-1: none), from its end only."""
        path = self.path(credential_id)
        check_state(path, missing_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1
        except OSError as e:
            raise StateError(f"cannot open {path}: {e.strerror}") from None
        try:
            last, _, _ = _last_line(fd, path)
        finally:
            os.close(fd)
        if last is None:
            return -1
        try:
            return LogEntry.from_json(json.loads(last)).seq
        except (ValueError, DecodeError):
            return -1  # not an entry: left to an explicit submission (hsm-auth log submit)

    def mark_sent(self, credential_id: bytes, seq: int) -> None:
        atomic_write(self._sent_path(credential_id), f"{seq}\n".encode())

    def _sent_path(self, credential_id: bytes) -> Path:
        return self.directory / f"{credential_id.hex()}.sent"

    def _lines(self, credential_id: bytes) -> Iterator[bytes]:
        data = read_state(self.path(credential_id), limit=MAX_LOG_BYTES, missing_ok=True)
        if not data:
            return
        complete, _, _torn = data.rpartition(b"\n")
        if complete:
            yield from complete.split(b"\n")

    def append(
        self,
        *,
        time: int,
        verifier_id: bytes,
        tenant: str | None,
        user: str,
        method: Method,
        credential_id: bytes,
        atc: int,
        data: bytes,
        sign: HeadSigner | None,
    ) -> LogEntry:
        """Chain a new entry to the credential's log, have ``sign`` sign its head (in
        the token), and write it durably. Returns the entry."""
        ensure_private_dir(self.directory)  # it, and every directory above it
        path = self.path(credential_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_APPEND
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StateError(f"{path} is a symbolic link; refusing to use it") from None
            raise StateError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            check_stat(st, path, directory=False)  # the file itself, as opened
            created = st.st_size == 0
            seq, prev = self._tail(fd, path)
            entry = LogEntry(seq, time, verifier_id, tenant, user, method, credential_id, atc,
                             data, prev)
            if sign is not None:
                entry = replace(entry, signature=sign(entry.head()))
            line = json.dumps(entry.to_json(), separators=(",", ":"), sort_keys=True) + "\n"
            _write_all(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.directory)
        return entry

    def _tail(self, fd: int, path: Path) -> tuple[int, bytes]:
        """The next seq and the last entry's hash, from the end of the file only (an
        OTP's cost does not grow with the log); cuts off a torn last line."""
        size = os.fstat(fd).st_size
        if size > MAX_LOG_BYTES:
            raise StateError(f"{path} is larger than {MAX_LOG_BYTES} bytes: submit it (hsm-auth "
                             "log submit) and move it away")
        last, end, torn = _last_line(fd, path)
        if torn:  # a write that a crash interrupted: its OTP was never released
            os.ftruncate(fd, end)
            os.fsync(fd)
        if last is None:
            return 0, GENESIS
        try:
            entry = LogEntry.from_json(json.loads(last))
        except (ValueError, DecodeError) as e:
            raise StateError(f"the last line of {path} is not a log entry ({e})") from None
        return entry.seq + 1, entry.entry_hash()


def _last_line(fd: int, path: Path) -> tuple[bytes | None, int, bool]:
    """The last complete line (None: none), the offset where it ends (after its
    newline) and whether a torn line follows it; reads only the end of the file."""
    size = os.fstat(fd).st_size
    window = _TAIL_WINDOW
    while True:  # back to the newline before the last complete line, or the start
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        end = data.rfind(b"\n")
        if start == 0 or (end > 0 and data.rfind(b"\n", 0, end) >= 0):
            break
        window *= 2
    complete, newline, torn = data.rpartition(b"\n")
    if not newline:
        if start:
            raise StateError(f"the end of {path} is not a log entry")
        return None, 0, bool(torn)
    return complete.rpartition(b"\n")[2], start + len(complete) + 1, bool(torn)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def record_use(
    directory: Path,
    store: KeyStore,
    enrolled: EnrolledMethod,
    data: VerificationData,
    atc: int,
    auth: Authorization,
    *,
    now: int,
    user_data: str = "",
) -> LogEntry:
    """The step of :meth:`Authenticator.finish_offline_authentication` between the
    counter and the OTP: log the use at ``atc``, its head signed by ``store`` with the
    method's signing key in the same ``auth`` (FIDO2: unsigned, see the module
    docstring). The caller holds the authenticator's lock."""
    from . import ec
    from .keystore import Capability

    sign: HeadSigner | None = None
    if Capability.SIGN in store.capabilities():

        def sign(message: bytes) -> bytes:
            return ec.der_to_raw(store.sign(enrolled.signing_key, message, auth))

    return OfflineLog(directory).append(
        time=now,
        verifier_id=enrolled.verifier_id,
        tenant=data.tenant or None,
        user=enrolled.user,
        method=enrolled.method,
        credential_id=bytes.fromhex(enrolled.credential_id),
        atc=atc,
        data=data_hash(data.context, data.transaction, user_data),
        sign=sign,
    )
