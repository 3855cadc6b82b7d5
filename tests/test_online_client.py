"""OnlineClient's transport and errors: a real service refusing bad input, a hostile
HTTP server (not JSON, too large, 500, hanging up), an unreachable port, bad URLs and
claim codes refused before anything is sent. Every failure is an HsmAuthError."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsm_auth.authenticator import Authenticator
from hsm_auth.errors import ConfigError, InvalidInput, UnknownMethod, UntrustedMessage
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient, ServiceError


@pytest.fixture
def authenticator(tmp_path: Path) -> Iterator[Authenticator]:
    with Authenticator(tmp_path / "auth") as a:
        yield a


class _Hostile(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        path = self.path
        if path.startswith("/p/hangup"):
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = {"/p/notjson": b"<html>", "/p/huge": b"[" + b"0," * (1 << 20) + b"0]",
                "/p/boom": b'{"detail": "db down \\u001b[31m"}'}
        payload = body.get(path.split("/v1")[0], b"{}")
        self.send_response(500 if path.startswith("/p/boom") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("prefix", ["/p/notjson", "/p/huge", "/p/boom", "/p/hangup"])
def test_a_hostile_server_is_one_service_error(authenticator, hostile, prefix) -> None:  # type: ignore[no-untyped-def]
    client = OnlineClient(authenticator, hostile + prefix)
    with pytest.raises(ServiceError) as e:
        client.enroll("HA1:xxxx")
    assert "\x1b" not in str(e.value)  # the server's detail is escaped


def test_an_unreachable_service_is_a_service_error(authenticator) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(ServiceError, match="did not answer"):
            OnlineClient(authenticator, f"http://127.0.0.1:{port}", timeout=5).enroll("x")


@pytest.mark.parametrize("url", ["ftp://host", "http://", "http://h/?q=1", "http://h/#f", "h:1"])
def test_a_bad_url_is_refused(authenticator, url) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        OnlineClient(authenticator, url)


def test_bad_claims_and_unenrolled_methods_are_refused_before_sending(authenticator) -> None:  # type: ignore[no-untyped-def]
    client = OnlineClient(authenticator, "http://127.0.0.1:9", verifier_id=bytes(8))
    for text in ("", "hello", "hsm-auth:claim:v1:zz:00", "hsm-auth:claim:v1:00:" + "0" * 32):
        with pytest.raises(InvalidInput):
            client.claim(text, Method.DEVICE)
    with pytest.raises(UntrustedMessage):
        client.claim("hsm-auth:claim:v1:" + "11" * 8 + ":" + "0" * 32, Method.DEVICE)
    loose = OnlineClient(authenticator, "http://127.0.0.1:9")
    for call in (lambda: loose.pending(Method.DEVICE), lambda: loose.credentials(Method.PIN),
                 lambda: loose.remove(Method.FACE)):
        with pytest.raises(UnknownMethod):
            call()


def test_the_service_refuses_a_bad_enrollment_response(authenticator, service) -> None:  # type: ignore[no-untyped-def]
    client = OnlineClient(authenticator, service.url)
    for text in ("HA1:not-a-message", "x" * 40000):
        with pytest.raises(InvalidInput):
            client.enroll(text)
    assert "Traceback" not in service.log()
