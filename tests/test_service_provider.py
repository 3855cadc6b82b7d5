"""The provider API against a real ``hsm-auth serve`` on a real temp verifier
(SQLite): API keys (CLI lifecycle, bad headers, wrong scopes, never in a log), an
offer enrolled by a real SoftHSM authenticator, sessions and their QR codes decoded
by zbarimg, credentials and audit, bad input at every route, per-user rate limits,
and the OpenAPI description."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from _service import (
    ALL_SCOPES,
    bearer,
    enroll_python_device,
    make_key,
    problem,
    svg_to_png,
    zbar,
)

from hsm_auth import ec, transcript
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData
from hsm_auth.testing.service import make_verifier
from hsm_auth.verifier import Verifier

#: Every provider route of this module: (method, path, scope, a valid body).
ROUTES = [
    ("POST", "/v1/offers", "enroll", {"user": "carol"}),
    ("POST", "/v1/sessions", "verify", {"user": "alice", "context": "ctx"}),
    ("GET", "/v1/sessions/{sid}/qr.svg", "verify", None),
    ("GET", "/v1/sessions/{sid}/qr.png", "verify", None),
    ("GET", "/v1/users/alice/credentials", "admin", None),
    ("GET", "/v1/credentials/{cid}", "admin", None),
    ("GET", "/v1/audit", "admin", None),
    ("DELETE", "/v1/credentials/{cid}", "admin", None),  # last: it revokes the credential
]


def _cli(home, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(home), *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def test_api_key_lifecycle_through_the_cli(tmp_path, service_factory):
    home = tmp_path / "home"
    from hsm_auth.config import Paths

    assert _cli(home, "verifier", "init").returncode == 0
    verifier_dir = Paths.from_env(str(home)).verifier_dir
    made = _cli(home, "verifier", "api-key", "create", "--label", "shop backend",
                "--scope", "enroll")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("hsk_") and len(made.stdout.splitlines()) == 1
    key_id, secret = key[4:20], key[21:]
    assert secret not in made.stderr and key_id in made.stderr
    listed = _cli(home, "--json", "verifier", "api-key", "list")
    assert secret not in listed.stdout
    [row] = json.loads(listed.stdout)["api_keys"]
    assert (row["key_id"], row["label"], row["scopes"], row["revoked"]) == (
        key_id, "shop backend", ["enroll"], None)

    service = service_factory(verifier_dir)
    r = httpx.post(service.url + "/v1/offers", json={"user": "alice"}, headers=bearer(key))
    assert r.status_code == 201, r.text
    # enroll only: a session (verify) and the audit (admin) are refused
    problem(httpx.post(service.url + "/v1/sessions", json={"user": "alice", "context": "c"},
                       headers=bearer(key)), 403, "forbidden")
    problem(httpx.get(service.url + "/v1/audit", headers=bearer(key)), 403, "forbidden")

    revoked = _cli(home, "verifier", "api-key", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    # refused from the very next request on (no cache)
    problem(httpx.post(service.url + "/v1/offers", json={"user": "alice"},
                       headers=bearer(key)), 401, "unauthorized")
    again = _cli(home, "verifier", "api-key", "revoke", key_id)
    assert again.returncode != 0 and again.stderr.startswith("hsm-auth: error:")
    listed = json.loads(_cli(home, "--json", "verifier", "api-key", "list").stdout)
    assert listed["api_keys"][0]["revoked"] is not None
    audit = _cli(home, "verifier", "audit").stdout
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert "api-key-create" in events and "api-key-revoke" in events
    assert secret not in audit
    log = service.log()
    assert secret not in log and key not in log
    assert "hsk_" not in log


def test_bad_authorization_is_401_and_never_logged(service):
    key = make_key(service.verifier_dir)
    secret = key[21:]
    other = make_key(service.verifier_dir)
    wrong_secret = key[:21] + ("0" if key[21] != "0" else "1") + key[22:]
    unknown_id = "hsk_" + "0" * 16 + key[20:]
    cases = [
        {},
        {"Authorization": key},
        {"Authorization": f"Basic {key}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer hsk_nothex_x"},
        {"Authorization": f"Bearer {key}x"},
        {"Authorization": f"Bearer {key.upper()}"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": f"Bearer {unknown_id}"},
        {"Authorization": f"Bearer {other[:21]}{secret}"},  # another key's id
    ]
    for headers in cases:
        r = httpx.post(service.url + "/v1/offers", json={"user": "alice"}, headers=headers)
        body = problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert secret not in r.text
        assert body["detail"] == "a valid API key is needed"
    with Verifier.open(service.verifier_dir) as v:
        assert not [r for r in v.store.audit_records() if r.event.value == "offer"]
    assert secret not in service.log()


@pytest.fixture
def enrolled(service):
    """A service with alice enrolled (software device) and a live session."""
    key = make_key(service.verifier_dir)
    device = enroll_python_device(service.url, key, service.verifier_dir)
    r = httpx.post(service.url + "/v1/sessions",
                   json={"user": "alice", "context": "Log in to shop.example"},
                   headers=bearer(key))
    assert r.status_code == 201, r.text
    return service, key, device, r.json()


def _path(template, session, device):
    return template.format(sid=session["session_id"], cid=device.credential_id.hex())


def test_every_route_needs_its_scope(enrolled):
    service, _, device, session = enrolled
    keys = {
        scope: (make_key(service.verifier_dir, *[s for s in ALL_SCOPES if s != scope]),
                make_key(service.verifier_dir, scope))
        for scope in ALL_SCOPES
    }
    for method, template, scope, body in ROUTES:
        wrong, right = keys[scope]
        url = service.url + _path(template, session, device)
        r = httpx.request(method, url, json=body, headers=bearer(wrong))
        problem(r, 403, "forbidden")
        problem(httpx.request(method, url, json=body), 401, "unauthorized")
        r = httpx.request(method, url, json=body, headers=bearer(right))
        assert r.status_code in (200, 201), (method, template, r.text)


def test_session_qr_codes_decode_to_the_verification_data(enrolled, tmp_path, service_factory):
    service, key, device, session = enrolled
    base = f"{service.url}/v1/sessions/{session['session_id']}"
    png_answer = httpx.get(base + "/qr.png", headers=bearer(key))
    assert png_answer.headers["content-type"] == "image/png"
    assert zbar(png_answer.content, tmp_path) == session["data"]
    svg_answer = httpx.get(base + "/qr.svg", headers=bearer(key))
    assert svg_answer.headers["content-type"].startswith("image/svg+xml")
    assert zbar(svg_to_png(svg_answer.content), tmp_path) == session["data"]

    # Another worker (here another service on the same verifier) signs the data again:
    # the same fields, a good signature from the verifier's key.
    other = service_factory(service.verifier_dir)
    text = zbar(httpx.get(f"{other.url}/v1/sessions/{session['session_id']}/qr.png",
                          headers=bearer(key)).content, tmp_path)
    original, _ = VerificationData.from_text(session["data"])
    again, signed = VerificationData.from_text(text)
    assert again == original
    with Verifier.open(service.verifier_dir) as v:
        ec.verify(v.keys.signing_public, signed.signature, signed.body)
        # the OTP for the re-signed data is the OTP for the session
        otp = device.otp_for(again.challenge, again.context)
        assert v.verify(bytes.fromhex(session["session_id"]), otp).user == "alice"
    # a used session has no QR code any more; an unknown one never had
    problem(httpx.get(base + "/qr.png", headers=bearer(key)), 410, "expired")
    problem(httpx.get(f"{service.url}/v1/sessions/{'0' * 32}/qr.svg", headers=bearer(key)),
            404, "not-found")
    problem(httpx.get(f"{service.url}/v1/sessions/nothex/qr.svg", headers=bearer(key)),
            422, "validation")


def test_credentials_show_revoke_and_audit(enrolled):
    service, key, device, session = enrolled
    h = bearer(key)
    cid = device.credential_id.hex()
    listed = httpx.get(service.url + "/v1/users/alice/credentials", headers=h).json()
    [cred] = listed["credentials"]
    assert cred["credential_id"] == cid
    assert (cred["user"], cred["method"], cred["atc"], cred["locked"]) == (
        "alice", "device", 0, False)
    assert cred["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert httpx.get(f"{service.url}/v1/credentials/{cid}", headers=h).json() == cred
    assert httpx.get(service.url + "/v1/users/nobody/credentials", headers=h).json() == {
        "user": "nobody", "credentials": []}
    problem(httpx.get(service.url + "/v1/users/a%20b/credentials", headers=h),
            400, "invalid-input")
    problem(httpx.get(f"{service.url}/v1/credentials/{'ab' * 16}", headers=h),
            404, "not-found")

    r = httpx.delete(f"{service.url}/v1/credentials/{cid}", headers=h)
    assert r.json() == {"revoked": cid}
    problem(httpx.get(f"{service.url}/v1/credentials/{cid}", headers=h), 404, "not-found")
    problem(httpx.delete(f"{service.url}/v1/credentials/{cid}", headers=h), 404, "not-found")
    # the session started before is refused now, and no new one starts
    with Verifier.open(service.verifier_dir) as v:
        from hsm_auth.errors import InvalidToken

        with pytest.raises(InvalidToken):
            v.verify(bytes.fromhex(session["session_id"]), device.otp(
                VerificationData.from_text(session["data"])[0]))
    problem(httpx.post(service.url + "/v1/sessions", json={"user": "alice", "context": "c"},
                       headers=h), 404, "not-found")

    records = httpx.get(service.url + "/v1/audit?user=alice&limit=50", headers=h).json()
    events = [r["event"] for r in records["records"]]
    assert events[:3] == ["offer", "enroll", "session"] and "revoke" in events
    assert all(r["user"] == "alice" for r in records["records"])
    assert len(httpx.get(service.url + "/v1/audit?limit=2", headers=h).json()["records"]) == 2
    for query in ("limit=0", "limit=1001", "limit=x", "user="):
        problem(httpx.get(service.url + "/v1/audit?" + query, headers=h), 422, "validation")


BAD_BODIES = [
    (b"{nope", 400, "malformed-json"),
    (b"", 422, "validation"),
    (b"[]", 422, "validation"),
    (b'"alice"', 422, "validation"),
    (json.dumps({"user": 5}).encode(), 422, "validation"),
    (json.dumps({"user": ["s3cr3t"]}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "replace": "s3cr3t"}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "replace": "yes"}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "replace": 1}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "methods": []}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "methods": ["nope"]}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "methods": "device"}).encode(), 422, "validation"),
    (json.dumps({"user": "alice", "admin": True}).encode(), 422, "validation"),
    (json.dumps({"user": None}).encode(), 422, "validation"),
    (json.dumps({"user": "x" * 65}).encode(), 422, "validation"),
    (json.dumps({"user": "a b"}).encode(), 400, "invalid-input"),
    (json.dumps({"user": "a\u202eb"}).encode(), 400, "invalid-input"),
    (b'{"user": "alice", "user": "bob", "x": 1}', 422, "validation"),
]


def test_bad_offer_bodies_are_problems_and_change_nothing(service):
    key = make_key(service.verifier_dir)
    for body, status, slug in BAD_BODIES:
        r = httpx.post(service.url + "/v1/offers", content=body,
                       headers={**bearer(key), "Content-Type": "application/json"})
        body_doc = problem(r, status, slug)
        assert all(set(e) == {"loc", "msg"} for e in body_doc.get("errors", []))
        assert "s3cr3t" not in r.text  # what was sent is not echoed
    with Verifier.open(service.verifier_dir) as v:
        assert not [a for a in v.store.audit_records() if a.event.value == "offer"]


def test_bad_session_bodies_and_a_huge_body(enrolled):
    service, key, _, _ = enrolled
    h = bearer(key)
    for body, status in [
        ({"user": "alice"}, 422),
        ({"user": "alice", "context": ""}, 422),
        ({"user": "alice", "context": "x" * 201}, 422),
        ({"user": "alice", "context": 7}, 422),
        ({"user": "alice", "context": "a\x1b[31mb"}, 400),
        ({"user": "alice", "context": "c", "methods": ["face"]}, 404),
        ({"user": "bob", "context": "c"}, 404),
    ]:
        r = httpx.post(service.url + "/v1/sessions", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    huge = json.dumps({"user": "alice", "context": "x" * 100_000}).encode()
    problem(httpx.post(service.url + "/v1/sessions", content=huge,
                       headers={**h, "Content-Type": "application/json"}),
            413, "body-too-large")
    with Verifier.open(service.verifier_dir) as v:
        sessions = [a for a in v.store.audit_records() if a.event.value == "session"]
    assert len(sessions) == 1  # the fixture's


def test_per_user_rate_limit(service_factory, tmp_path):
    verifier_dir = make_verifier(tmp_path / "v")
    service = service_factory(verifier_dir, args=["--rate-user", "0.01/2"])
    h = bearer(make_key(verifier_dir))
    for _ in range(2):
        assert httpx.post(service.url + "/v1/offers", json={"user": "alice"},
                          headers=h).status_code == 201
    r = httpx.post(service.url + "/v1/offers", json={"user": "alice"}, headers=h)
    body = problem(r, 429, "rate-limited")
    assert int(r.headers["retry-after"]) >= 50
    assert "user" in body["detail"]
    assert httpx.post(service.url + "/v1/offers", json={"user": "bob"},
                      headers=h).status_code == 201


def test_openapi_describes_every_route_with_its_schemas(service):
    spec = httpx.get(service.url + "/openapi.json").json()
    paths = spec["paths"]
    for method, template, _, body in ROUTES:
        path = template.replace("{sid}", "{session_id}").replace("{cid}", "{credential_id}")
        path = path.replace("/v1/users/alice/", "/v1/users/{user}/")
        operation = paths[path][method.lower()]
        assert operation.get("security") == [{"ApiKey": []}], (method, path)
        if body is not None:
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
            assert schema["additionalProperties"] is False
            assert set(body) <= set(schema["properties"])
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


@pytest.mark.softhsm
def test_an_offer_over_http_enrolls_a_softhsm_authenticator(service, softhsm_env, tmp_path):
    from hsm_auth.authenticator import Authenticator
    from hsm_auth.config import Config, MethodConfig
    from hsm_auth.testing.softhsm import init_token, unique_label
    from hsm_auth.uri import Pkcs11Uri

    token = init_token(unique_label("svc"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
    key = make_key(service.verifier_dir, "enroll", "verify", "admin")
    h = bearer(key)
    offer = httpx.post(service.url + "/v1/offers",
                       json={"user": "dana", "methods": ["device"]}, headers=h).json()
    assert set(offer) == {"offer_id", "offer", "activation_code", "user", "methods", "expires"}
    with Authenticator(tmp_path / "auth", config) as authenticator:
        response = authenticator.add_or_update(
            Method.DEVICE, offer["offer"], activation_code=offer["activation_code"]
        )
        with Verifier.open(service.verifier_dir) as v:
            cred = v.accept_enrollment(response)
        session = httpx.post(service.url + "/v1/sessions",
                             json={"user": "dana", "context": "Pay 12.00 EUR"},
                             headers=h).json()
        request = authenticator.start_offline_authentication(session["data"])
        assert request.context == "Pay 12.00 EUR"
        otp = authenticator.finish_offline_authentication(request, Method.DEVICE).otp
    with Verifier.open(service.verifier_dir) as v:
        assert v.verify(bytes.fromhex(session["session_id"]), otp).user == "dana"
    listed = httpx.get(service.url + "/v1/users/dana/credentials", headers=h).json()
    [shown] = listed["credentials"]
    assert shown["credential_id"] == transcript.credential_id(cred.signing_key).hex()
    assert shown["atc"] >= 1 and shown["backend"] == "pkcs11"
    assert otp not in service.log() and offer["activation_code"] not in service.log()
