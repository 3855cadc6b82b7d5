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
        b"Content-Length: 1000000000\r\nConnection: close\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert PROBLEM.encode() in head
    assert b"body-too-large" in body


def test_a_chunked_body_past_the_limit_is_refused(service):
    chunk = b"x" * 70000
    answer = _raw(
        service.url,
        b"POST /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n",
    )
    # The route does not read bodies: uvicorn sees the method refused first (405), or
    # the limit refuses the body as it is read (413); never a 5xx.
    status = int(answer.split(b" ", 2)[1])
    assert status in (405, 413), answer[:200]


def test_address_rate_limit_gives_429_with_retry_after(service_factory, tmp_path):
    verifier = make_verifier(tmp_path / "v")
    running = service_factory(verifier, args=["--rate-address", "0.01/3"])
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


def test_an_unexpected_error_is_a_500_without_detail_and_logged_without_its_message(
    caplog, tmp_path
):
    # The service's own stack, in-process, with one route that fails the way a bug would.
    import asyncio
    import logging

    from hsm_auth.service.app import close_context, create_app, open_context
    from hsm_auth.service.context import ServiceSettings

    context = open_context(ServiceSettings(make_verifier(tmp_path / "v")))
    app = create_app(context)

    async def boom() -> None:
        raise RuntimeError("hsk_0123456789abcdef_s3cr3t in the message")

    app.add_api_route("/v1/boom", boom, methods=["GET"])

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/v1/boom")

    try:
        with caplog.at_level(logging.DEBUG, logger="hsm_auth.service"):
            r = asyncio.run(call())
    finally:
        close_context(context)
    body = _problem(r, 500, "internal-error")
    assert "s3cr3t" not in r.text and "RuntimeError" not in r.text
    assert body["detail"] == "the service failed; it is logged"
    assert "RuntimeError" in caplog.text and "/v1/boom" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_behind_a_proxy_each_forwarded_client_has_its_own_bucket(service_factory, tmp_path):
    verifier = make_verifier(tmp_path / "v")
    running = service_factory(verifier, args=[
        "--rate-address", "0.01/1", "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"])
    url = running.url + "/openapi.json"
    assert httpx.get(url, headers={"X-Forwarded-For": "192.0.2.1"}).status_code == 200
    _problem(httpx.get(url, headers={"X-Forwarded-For": "192.0.2.1"}), 429, "rate-limited")
    assert httpx.get(url, headers={"X-Forwarded-For": "192.0.2.2"}).status_code == 200


def test_without_proxy_headers_a_forwarded_address_is_ignored(service_factory, tmp_path):
    verifier = make_verifier(tmp_path / "v")
    running = service_factory(verifier, args=["--rate-address", "0.01/1"])
    url = running.url + "/openapi.json"
    assert httpx.get(url, headers={"X-Forwarded-For": "192.0.2.1"}).status_code == 200
    _problem(httpx.get(url, headers={"X-Forwarded-For": "192.0.2.2"}), 429, "rate-limited")


def test_token_buckets_refill_and_stay_bounded():
    from hsm_auth.service.limits import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(2.0, 3, clock=lambda: now[0], max_keys=4)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: one token in 0.5 s
    now[0] += 0.5
    assert buckets.take("a") == 0.0
    for name in "bcdefg":  # a flood of new addresses never grows the table past its bound
        buckets.take(name)
        assert len(buckets) <= 4
    assert TokenBuckets(0, 1).take("x") == 0.0  # rate 0: no limit
