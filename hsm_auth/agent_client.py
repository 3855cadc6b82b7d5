"""The CLI's side of the agent's socket: where it is, one request, one reply.

The protocol is described in :mod:`hsm_auth.agent`; this module holds what both
sides share (the socket's place, the line bound, the error mapping) and imports
nothing heavy, so ``hsm-auth challenges`` starts fast.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from . import errors
from .errors import HsmAuthError, InvalidInput, StateError

#: Protocol version, the ``v`` of every request.
VERSION = 1
#: The longest request or reply line, newline included (a claim text is < 7 KiB; a
#: list of pending challenges with their contexts stays far below).
MAX_LINE = 256 * 1024
#: The agent's socket, when neither --socket nor this variable names one.
SOCKET_ENV = "HSM_AUTH_AGENT_SOCKET"
START_HINT = "start it with 'hsm-auth agent &' or 'systemctl --user start hsm-auth-agent'"


_CLOSED = (
    "the hsm-auth agent closed the connection without answering (another user's agent?)"
)


class AgentNotRunning(StateError):
    """Nothing answers on the agent's socket."""


class AgentProtocolError(StateError):
    """The agent's reply is not one (a line too long, not JSON, cut short)."""


def default_socket() -> Path:
    """``$HSM_AUTH_AGENT_SOCKET``, else ``$XDG_RUNTIME_DIR/hsm-auth/agent.sock``, else
    ``/run/user/UID/hsm-auth/agent.sock`` where that runtime directory exists."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        fallback = Path(f"/run/user/{os.getuid()}")
        if not fallback.is_dir():
            raise StateError(
                "XDG_RUNTIME_DIR is not set and /run/user/UID does not exist: "
                f"give the agent's socket with --socket PATH or {SOCKET_ENV}"
            )
        runtime = str(fallback)
    return Path(runtime) / "hsm-auth" / "agent.sock"


#: Error types a reply may name, rebuilt as themselves (any other: HsmAuthError).
_ERRORS: dict[str, type[HsmAuthError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, HsmAuthError)
}


def error_to_json(error: HsmAuthError) -> dict[str, Any]:
    """An error as the agent sends it: type, message and data (never a secret: the
    library's messages hold none)."""
    doc: dict[str, Any] = {"type": error.__class__.__name__, "message": str(error)}
    if error.__class__.__name__ not in _ERRORS:  # a subclass outside hsm_auth.errors
        for base in error.__class__.__mro__:
            if base.__name__ in _ERRORS and _ERRORS[base.__name__] is base:
                doc["type"] = base.__name__
                break
    if isinstance(error, errors.AuthorizationError):
        doc["retries_left"] = error.retry.retries_left
        doc["retry_after"] = error.retry.retry_after
        doc["locked"] = error.retry.locked
    return doc


def error_from_json(doc: Any) -> HsmAuthError:
    """The error a reply carries, as its own class where it is one of ours."""
    if not isinstance(doc, dict):
        return AgentProtocolError("the agent's error reply is malformed")
    message = str(doc.get("message", "the agent refused"))[:1000]
    cls = _ERRORS.get(str(doc.get("type")), HsmAuthError)
    if issubclass(cls, errors.AuthorizationError):
        def number(key: str) -> Any:
            value = doc.get(key)
            return value if isinstance(value, int | float) and not isinstance(value, bool) else None

        retry = errors.RetryStatus(
            retries_left=number("retries_left"),
            retry_after=number("retry_after"),
            locked=doc.get("locked") is True,
        )
        if issubclass(cls, errors.LoginRequired):
            return cls(message)
        return cls(message, retry=retry)
    if issubclass(cls, errors.BackendUnavailable | errors.MechanismNotSupported):
        error = HsmAuthError(message)
        error.exit_code = cls.exit_code
        return error
    if issubclass(cls, errors.InvalidToken):
        return cls(message)
    try:
        return cls(message)
    except TypeError:  # a constructor with other arguments
        return HsmAuthError(message)


class AgentClient:
    """One connection to the agent; :meth:`call` sends a request and waits for its reply."""

    def __init__(self, path: Path | None = None, *, timeout: float | None = 330.0) -> None:
        self.path = path if path is not None else default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(os.fspath(self.path))
        except OSError as e:
            self._sock.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise AgentNotRunning(
                    f"the hsm-auth agent is not running (no agent at {self.path}); {START_HINT}"
                ) from None
            raise AgentNotRunning(
                f"cannot reach the hsm-auth agent at {self.path}: {e.strerror or e}"
            ) from None
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send ``{"v": 1, "op": op, **args}``; return the reply's fields, or raise the
        error it carries."""
        line = json.dumps({"v": VERSION, "op": op, **args}, separators=(",", ":")).encode()
        if len(line) >= MAX_LINE:
            raise InvalidInput("the request is too long for the agent")
        try:
            self._sock.sendall(line + b"\n")
            reply = self._read_line()
        except TimeoutError:
            raise AgentProtocolError("the hsm-auth agent did not answer in time") from None
        except OSError:
            raise AgentNotRunning(_CLOSED) from None
        try:
            doc = json.loads(reply)
        except ValueError:
            raise AgentProtocolError("the hsm-auth agent's reply is not JSON") from None
        if not isinstance(doc, dict):
            raise AgentProtocolError("the hsm-auth agent's reply is not a JSON object")
        if doc.get("ok") is True:
            return doc
        raise error_from_json(doc.get("error"))

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise AgentProtocolError("the hsm-auth agent's reply is too long")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise AgentNotRunning(_CLOSED)
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line
