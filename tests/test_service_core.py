"""The service's core against a real ``hsm-auth serve`` (uvicorn subprocess) on a
real temp verifier: health, problem documents for unknown routes and wrong methods,
the body limit (413 before the body is read), the address rate limit (429 with
Retry-After), the OpenAPI description, and ``serve``'s own refusals."""

from __future__ import annotations

import socket
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest

from hsm_auth.testing.service import make_verifier

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int, slug: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["type"] == f"https://hsm-auth.invalid/problems/{slug}"
    assert body["status"] == status
    assert "Traceback" not in r.text
    return body


def test_health_answers_with_the_verifier_id(service):
    r = httpx.get(service.url + "/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert len(body["verifier_id"]) == 16
    assert body["schema_version"] >= 7


def test_unknown_route_and_wrong_method_are_problems(service):
    _problem(httpx.get(service.url + "/v1/nothing-here"), 404, "not-found")
    r = httpx.delete(service.url + "/v1/health")
    _problem(r, 405, "method-not-allowed")
    assert "GET" in r.headers["allow"]


def test_openapi_is_served_and_docs_ui_is_not(service):
    spec = httpx.get(service.url + "/openapi.json").json()
    assert "/v1/health" in spec["paths"]
    for ui in ("/docs", "/redoc"):
        _problem(httpx.get(service.url + ui), 404, "not-found")


def _raw(url: str, request: bytes) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_a_huge_body_is_refused_before_it_is_read(service):
    # A length of 1 GB and not one byte of body sent: the answer comes anyway.
    answer = _raw(
        service.url,
        b"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert PROBLEM.encode() in head
    assert b"body-too-large" in body


def test_a_chunked_body_past_the_limit_is_refused(service):
    chunk = b"x" * 70000
    answer = _raw(
        service.url,
        b"POST /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n",
    )
    # The route does not read bodies: uvicorn sees the method refused first (405), or
    # the limit refuses the body as it is read (413); never a 5xx.
    status = int(answer.split(b" ", 2)[1])
    assert status in (405, 413), answer[:200]


def test_address_rate_limit_gives_429_with_retry_after(service_factory, tmp_path):
    verifier = make_verifier(tmp_path / "v")
    running = service_factory(verifier, args=["--rate-address", "0.5/3"])
    codes = [httpx.get(running.url + "/openapi.json").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    r = httpx.get(running.url + "/openapi.json")
    body = _problem(r, 429, "rate-limited")
    assert int(r.headers["retry-after"]) >= 1
    assert "address" in body["detail"]
    # the readiness probe is exempt
    assert httpx.get(running.url + "/v1/health").status_code == 200


def _serve(*args: str, env_home: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", env_home, "serve", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_serve_refuses_bad_settings_in_one_line(tmp_path):
    verifier = make_verifier(tmp_path / "v")
    home = str(tmp_path / "home")
    cases = [
        (["--listen", "nonsense", "--verifier", str(verifier)], "HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--verifier", str(verifier), "--workers", "2"],
         "PostgreSQL"),
        (["--listen", "127.0.0.1:0", "--verifier", str(tmp_path / "none")], "no verifier"),
        (["--listen", "127.0.0.1:0", "--verifier", str(verifier), "--tls-cert",
          str(tmp_path / "c.pem")], "go together"),
    ]
    for args, words in cases:
        done = _serve(*args, env_home=home)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hsm-auth: error:"), done.stderr
        assert words in lines[0]


@pytest.mark.parametrize("listen", ["127.0.0.1:0"])
def test_tls_serves_https(tmp_path, service_factory, listen):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    verifier = make_verifier(tmp_path / "v")
    import ssl

    context = ssl.create_default_context(cafile=str(cert_path))
    running = service_factory(
        verifier, args=["--tls-cert", str(cert_path), "--tls-key", str(key_path)],
        ready_context=context,
    )
    assert running.url.startswith("https://")
    r = httpx.get(running.url + "/v1/health", verify=context)
    assert r.status_code == 200
