r"""The resident login service: ``python -I -m hsm_auth.login_service``.

``pam_hsm_auth.so`` spawns ``python -I -m hsm_auth.pam`` for every login, and
that interpreter's start and imports (the login path, cryptography, the
token's bindings: tpm2-pytss alone is about 45 ms) cost more than the login.
Like sssd for ``pam_sss`` and fprintd for ``pam_fprintd``, this service is
started once, as root (``pam/hsm-auth-login.service``), imports all of that
once, and serves each login in a forked child that already has it:

* **Parent**: imports the login path and every installed backend with its C
  bindings (python-pkcs11, tpm2-pytss, python-fido2), but opens no token or
  TPM context and never calls ``C_Initialize`` (a PKCS#11 library is not
  fork-safe); listens on a UNIX stream socket (default
  :data:`DEFAULT_SOCKET`, mode 0666 in a root-owned 0755 directory: any
  program that may run PAM must reach it, and the service decides what a
  caller may ask); accepts, reads the peer's ``SO_PEERCRED`` and forks.
  It caps concurrent children (:data:`MAX_CHILDREN` in all, of which callers
  that are not root may hold at most half, and each such uid at most
  :data:`PER_UID`, so a local user cannot starve root's logins); beyond the
  cap the connection is answered ``result SYSTEM_ERR busy`` and closed.
* **Child**: serves exactly one authentication with the module's line
  protocol, :func:`hsm_auth.pam.serve` (its alarm bounds the child's own
  time; a caller that stops answering a prompt is cut off after
  :data:`IDLE_SECONDS`), with the kernel's peer pid as the caller for the
  logind check and the caller rule of :func:`hsm_auth.pam.caller_refusal`,
  then exits. The environment is rebuilt from root's config for each login
  (``[environment]``), as the spawned helper does; the service's own start
  environment is cleared before anything is imported.

The service must run as ``python -I`` (it refuses otherwise), logs to syslog
(authpriv) only, never a secret, and on SIGTERM stops accepting and removes
its socket; children in flight finish their login.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .pam import DEFAULT_CONFIG, SAFE_PATH, Channel, Peer

DEFAULT_SOCKET = Path("/run/hsm-auth/login.sock")
MAX_CHILDREN = 32
PER_UID = 4  # concurrent logins of one uid that is not root
IDLE_SECONDS = 300  # a caller that sends nothing for this long is dropped
BACKLOG = 64
_UCRED = struct.Struct("3i")

#: What the login path imports when it opens a token, imported once by the parent.
#: Bindings that are not installed are skipped (that backend is unavailable anyway).
PRELOAD = (
    "hsm_auth.pam", "hsm_auth.login", "hsm_auth.login_policy", "hsm_auth.config",
    "hsm_auth.registry", "hsm_auth.files", "hsm_auth.uri", "hsm_auth.cli", "tomllib",
    "pkcs11", "pkcs11._pkcs11", "pkcs11.attributes",
    "tpm2_pytss", "tpm2_pytss.constants", "tpm2_pytss.types",
    "fido2.ctap", "fido2.ctap2", "fido2.ctap2.base", "fido2.ctap2.pin", "fido2.hid",
    "fido2.pcsc",
)

Handler = Callable[[Channel, Peer], int]
#: What a child closes at once: the listening socket, the selector, the wake-up pipe.
_Inherited = tuple[socket.socket, selectors.BaseSelector, int, int]


class StartError(Exception):
    """The service cannot start (one line, for ``hsm-auth: error:``)."""


def _log(priority: int, message: str) -> None:
    import syslog

    with contextlib.suppress(OSError):
        syslog.syslog(priority, message)


def preload() -> list[str]:
    """Import :data:`PRELOAD` and every installed backend class; the names that failed."""
    import importlib

    failed = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional binding that is not installed
            failed.append(name)
    from . import registry
    from .errors import HsmAuthError

    for name in registry.backend_names():
        try:
            registry.load_backend(name)
        except HsmAuthError:
            failed.append(f"backend {name}")
    return failed


def _check_directory(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise StartError(f"the socket directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartError(f"{path} is not a directory")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise StartError(f"the socket directory {path} must be root's and not writable by "
                         "group or others (the module refuses it otherwise)")


def bind(path: Path) -> tuple[socket.socket, int]:
    """A listening socket at ``path`` (mode 0666) and its inode. A stale socket is
    replaced; a live service, or anything that is not a socket, is refused."""
    if not path.is_absolute() or len(os.fsencode(path)) >= 100:
        raise StartError("the socket path must be absolute and shorter than 100 bytes")
    _check_directory(path.parent)
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(old.st_mode):
            raise StartError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass  # nobody listens: stale
        else:
            raise StartError(f"a service already listens on {path}")
        finally:
            probe.close()
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o111)  # created 0666: no window with another mode
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(previous)
    os.chmod(tmp, 0o666)  # noqa: S103 - any local PAM caller; the service decides
    sock.listen(BACKLOG)
    os.rename(tmp, path)  # listening before it appears
    sock.setblocking(False)
    return sock, os.lstat(path).st_ino


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return Peer(pid, uid, gid)


def serve_login(service_config: Path) -> Handler:
    """The real handler: :func:`hsm_auth.pam.serve` for one connection."""
    from .pam import serve

    def handle(channel: Channel, peer: Peer) -> int:
        return serve(channel, peer=peer, service_config=service_config)

    return handle


class Server:
    """The accept loop: one forked child per connection, at most ``max_children``."""

    def __init__(self, path: Path, handler: Handler, *, max_children: int = MAX_CHILDREN,
                 per_uid: int = PER_UID, name: str = "hsm-auth-login") -> None:
        self.path = path
        self.handler = handler
        self.max_children = max_children
        self.per_uid = per_uid
        self.name = name
        self.children: dict[int, int] = {}  # pid -> the peer's uid
        self.stopping = False
        self._last_busy = 0.0

    def run(self) -> int:
        import syslog

        syslog.openlog(self.name, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        sock, inode = bind(self.path)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        _log(syslog.LOG_INFO, f"listening on {self.path}")
        try:
            while not self.stopping:
                for key, _ in selector.select(timeout=5.0):
                    if key.fd == wake_r:
                        with contextlib.suppress(BlockingIOError, InterruptedError):
                            while os.read(wake_r, 256):
                                pass
                self._reap()
                if not self.stopping:
                    self._accept_all(sock, (sock, selector, wake_r, wake_w))
        finally:
            signal.set_wakeup_fd(-1)
            selector.close()
            self._unlink(inode)
            sock.close()
            os.close(wake_r)
            os.close(wake_w)
        _log(syslog.LOG_INFO, f"stopped; {len(self.children)} logins still finishing")
        return 0

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _unlink(self, inode: int) -> None:
        try:
            if os.lstat(self.path).st_ino == inode:  # still ours
                os.unlink(self.path)
        except OSError:
            pass

    def _reap(self) -> None:
        import syslog

        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            if os.WIFSIGNALED(status):
                _log(syslog.LOG_NOTICE, f"login child {pid} ended by signal "
                                        f"{os.WTERMSIG(status)}")

    def _busy_for(self, uid: int) -> bool:
        if len(self.children) >= self.max_children:
            return True
        if uid == 0:
            return False
        others = [u for u in self.children.values() if u != 0]
        return (len(others) >= self.max_children // 2
                or sum(1 for u in others if u == uid) >= self.per_uid)

    def _accept_all(self, sock: socket.socket, inherited: _Inherited) -> None:
        import syslog

        for _ in range(BACKLOG):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again later
                _log(syslog.LOG_ERR, f"accept failed: {e.strerror}")
                time.sleep(0.05)
                return
            try:
                peer = peer_of(conn)
                if self._busy_for(peer.uid):
                    self._refuse_busy(conn, peer)
                    continue
                pid = os.fork()
                if pid == 0:  # the child never returns
                    self._child(conn, peer, inherited)
                self.children[pid] = peer.uid
            except OSError as e:
                _log(syslog.LOG_ERR, f"cannot serve a connection: {e.strerror}")
            finally:
                conn.close()

    def _refuse_busy(self, conn: socket.socket, peer: Peer) -> None:
        import syslog

        with contextlib.suppress(OSError):
            conn.send(b"result SYSTEM_ERR busy\n", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        now = time.monotonic()
        if now - self._last_busy > 10:
            self._last_busy = now
            _log(syslog.LOG_WARNING, f"busy: {len(self.children)} logins running; refused "
                                     f"pid {peer.pid} uid {peer.uid}")

    def _child(self, conn: socket.socket, peer: Peer, inherited: _Inherited) -> None:
        status = 70
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            listening, selector, wake_r, wake_w = inherited
            listening.close()
            selector.close()
            os.close(wake_r)
            os.close(wake_w)
            os.umask(0o022)
            idle = struct.pack("ll", IDLE_SECONDS, 0)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, idle)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, idle)
            fd = conn.detach()
            status = self.handler(Channel(fd, fd), peer)
        except BaseException:  # never back into the parent's loop
            status = 70
        finally:
            os._exit(status)


def start_environment() -> None:
    """The service's own environment (systemd's, or whoever started it) is dropped
    before anything is imported: each login builds its own from root's config."""
    os.environ.clear()
    os.environ["PATH"] = SAFE_PATH


def main(argv: list[str] | None = None, handler: Handler | None = None,
         name: str = "hsm-auth-login") -> int:
    """``python -I -m hsm_auth.login_service [--socket PATH] [--config PATH]
    [--max-children N] [--per-uid N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -I -m {__name__}",
                                     description="hsm-auth's resident login service")
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="root's config, used when the module line names none")
    parser.add_argument("--max-children", type=int, default=MAX_CHILDREN)
    parser.add_argument("--per-uid", type=int, default=PER_UID)
    args = parser.parse_args(argv)
    if not sys.flags.isolated:
        print(f"hsm-auth: error: run the login service as python -I -m {__name__}",
              file=sys.stderr)
        return 2
    if not args.config.is_absolute() or args.max_children < 2 or args.per_uid < 1:
        print("hsm-auth: error: --config must be absolute, --max-children at least 2, "
              "--per-uid at least 1", file=sys.stderr)
        return 2
    start_environment()
    failed = preload()  # also for another handler (the benchmark's floor): same parent
    handler = handler or serve_login(args.config)
    import gc

    gc.freeze()  # the imported modules stay shared with the children
    if failed:
        import syslog

        syslog.openlog(name, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        _log(syslog.LOG_INFO, f"not installed, skipped: {', '.join(failed)}")
    server = Server(args.socket, handler, max_children=args.max_children,
                    per_uid=args.per_uid, name=name)
    try:
        return server.run()
    except StartError as e:
        print(f"hsm-auth: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
