"""A storm of bad requests at every route of a real ``hsm-auth serve`` (the routes are
read from its own /openapi.json, so a route added later is stormed too): malformed
JSON, huge bodies, wrong types, unknown fields, bad hex, hostile path and query
values, missing, malformed, unknown, revoked and wrong-scope API keys, valid OTPs
with a bad key, wrong OTPs for other users' sessions, expired sessions.

Each answer is a 4xx ``application/problem+json`` document (never 5xx, never a
traceback, never the key or an OTP echoed); afterwards nothing changed (every
session unused, every ATC where it was, no acceptance in the audit), the log holds
no traceback and no secret, and the service still verifies a valid OTP.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
import urllib.parse

import httpx
from _service_http import Connection, Planned, populate, verify_request
from _verifier_device import enroll

from hsm_auth import api_keys
from hsm_auth.methods import Method
from hsm_auth.testing.service import make_verifier, running_service
from hsm_auth.verifier import Verifier

PROBLEM = "application/problem+json"
HOSTILE_VALUES = [
    "", "zz", "0" * 31, "A" * 32, "0" * 33, "0" * 5000, "..%2F..%2Fetc%2Fpasswd", "%00",
    "%C0%AE", "%FF%FE", "caf%C3%A9", "%E2%80%AE", "a%0Ab", "%20", "-1", "1e999", "null",
]


def _bodies(schema_props: dict) -> list[bytes]:
    """Bodies that no route may accept: malformed JSON, wrong shapes, wrong types for
    each property (the others missing), unknown fields, hostile strings."""
    out = [
        b"", b"{", b"}", b"[]", b"null", b"0", b'"x"', b"1e999999", b"{'a': 1}",
        b'{"a":1,}', b"\xff\xfe\x00\x00", b'{"\xc3\x28": 1}', b"[" * 5000 + b"]" * 5000,
        b'{"a": ' * 2000 + b"1" + b"}" * 2000, b'{"zzz_unknown": 1}',
        b'{"__proto__": {"x": 1}}', b'{"x": "\\ud800"}', b'{"x": "\\u0000"}',
        json.dumps({"k" + str(i): i for i in range(3000)}).encode()[:60000],
    ]
    wrong = [None, 1, -1, 1.5, True, [], {}, "", "\x00", "\u202e", "9" * 20000,
             [1] * 1000, {"$gt": ""}]
    for name in schema_props:
        for value in wrong:
            out.append(json.dumps({name: value}).encode())
        out.append(json.dumps({name: "x", "unknown_field": 1}).encode())
    return out


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.randint(-(2**70), 2**70)
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300, 3.14])
    if kind in (4, 5):
        alphabet = "0123456789abcdefABCDEF\x00\u202e\u0660\uff11 \"'<>&%/\\\n\t"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 8, 32, 33, 300])))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(99)}": _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_bodies(rng: random.Random, props: dict, n: int) -> list[bytes]:
    """Random objects over the route's fields, each with an unknown field too (every
    request model forbids unknown fields: none of these can be valid)."""
    out = []
    for _ in range(n):
        body = {name: _random_json(rng) for name in props if rng.random() < 0.7}
        body[f"unknown_{rng.randrange(1000)}"] = _random_json(rng)
        out.append(json.dumps(body).encode())
    return out


def _mutants(rng: random.Random, valid: bytes, n: int) -> list[bytes]:
    """``valid`` (compact JSON) truncated, or with one byte replaced by a byte that is
    not whitespace, or with a non-whitespace byte inserted: never the same request."""
    out: set[bytes] = set()
    junk = [b for b in range(256) if b not in b" \t\r\n"]
    while len(out) < n:
        i = rng.randrange(len(valid))
        how = rng.randrange(3)
        if how == 0:
            m = valid[:i]
        elif how == 1:
            m = valid[:i] + bytes([rng.choice(junk)]) + valid[i + 1 :]
        else:
            m = valid[:i] + bytes([rng.choice(junk)]) + valid[i:]
        if m != valid:
            out.add(m)
    return sorted(out)


def _violating(schema: dict) -> list[str]:
    """URL-encoded values that a parameter's schema refuses (or that no name may hold:
    control and bidi characters, spaces): never a value the route could accept."""
    options = [x for x in schema.get("anyOf", [schema]) if x.get("type") != "null"]
    s = options[0] if options else schema
    if s.get("type") == "integer":
        out = ["abc", "1.5", "1e99", "9" * 30, "%00"]
        if "minimum" in s:
            out.append(str(s["minimum"] - 1))
        if "maximum" in s:
            out.append(str(s["maximum"] + 1))
        return out
    out = ["%00", "a%0Ab", "%E2%80%AE", "%20", "%7F"]
    if "maxLength" in s:
        out.append("0" * (s["maxLength"] + 1))
    if "pattern" in s:
        out += [v for v in HOSTILE_VALUES
                if not re.fullmatch(s["pattern"], urllib.parse.unquote(v))]
    return out


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    ops = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path, op))
    return ops


def _schema_props(spec: dict, op: dict) -> dict:
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    ref = content.get("schema", {}).get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return spec["components"]["schemas"][ref.rsplit("/", 1)[1]].get("properties", {})
    return content.get("schema", {}).get("properties", {})


def _request(method: str, target: str, body: bytes | None, auth: str | None,
             content_type: str = "application/json") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    if body is not None:
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + (body or b"")


def _fill(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def hidden_routes(directory, spec: dict) -> list[tuple[str, str]]:
    """(method, path) of every route of the application that its OpenAPI description
    does not list (the login page's), read from the app itself."""
    from hsm_auth.service.app import create_app
    from hsm_auth.service.context import ServiceSettings

    app = create_app(settings=ServiceSettings(verifier_dir=directory))
    listed = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}

    def walk(routes, prefix: str):
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included router
            if inner is not None:
                yield from walk(inner.routes, prefix + route.include_context.prefix)
            elif hasattr(route, "routes"):  # an older FastAPI, or a mounted router
                yield from walk(route.routes, prefix)
            for method in sorted(getattr(route, "methods", None) or ()):
                yield method, prefix + route.path

    return sorted(
        {(m, p) for m, p in walk(app.routes, "")
         if m != "HEAD" and (m, p) not in listed and p != "/openapi.json"}
    )


def hidden_requests(routes: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """Bad requests for routes outside the API (browser pages): forms without or with a
    forged CSRF token, JSON where a form belongs, junk, hostile path values."""
    out = []
    forms = [b"", b"user=alice&flow=offline", b"csrf=forged&user=alice&flow=offline",
             b"csrf=&otp=12345678", b"%ZZ=%YY", b"a" * 70_000, b"user=" + b"\xff" * 40,
             b"csrf=x&csrf=y&flow=offline&user=" + b"u" * 300]
    for method, path in routes:
        has_param = "{" in path
        targets = [_fill(path, v) for v in HOSTILE_VALUES] if has_param else [path]
        if method == "GET":
            if has_param:
                out += [(f"hidden {method} {path}", _request(method, t, None, None))
                        for t in targets]
            continue
        for target in targets:
            for body in forms:
                out.append((f"hidden {method} {path} form", _request(
                    method, target, body, None, "application/x-www-form-urlencoded")))
            for body in _bodies({"user": {}, "otp": {}, "csrf": {}})[:12]:
                out.append((f"hidden {method} {path} json", _request(method, target, body, None)))
            out.append((f"hidden {method} {path} origin", _request(
                method, target, b"csrf=x&user=alice&flow=offline", None,
                "application/x-www-form-urlencoded\r\nOrigin: https://evil.example")))
    return out


def storm_requests(spec: dict, keys: dict[str, str], victim) -> list[tuple[str, bytes]]:
    """(what, raw request) pairs, every one of them bad."""
    rng = random.Random(2026)
    wrong_secret = keys["verify"][:-1] + ("1" if keys["verify"].endswith("0") else "0")
    bad_auth = [
        None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer hsk_", "bearer x y",
        f"Bearer {keys['revoked']}", f"Bearer {keys['unknown']}",
        f"Bearer {wrong_secret}", "Bearer " + "A" * 6000, "Bearer \u00e9",
        f"Bearer {keys['verify']} {keys['verify']}", f"Bearer  {keys['verify']}x",
    ]
    full = f"Bearer {keys['all']}"
    out: list[tuple[str, bytes]] = []
    for method, path, op in _operations(spec):
        props = _schema_props(spec, op)
        has_body = "requestBody" in op
        secured = bool(op.get("security"))
        targets = [_fill(path, v) for v in HOSTILE_VALUES] if "{" in path else [path]
        if not (secured or has_body or "{" in path):
            continue  # nothing in such a request can be bad (GET /v1/health)
        for target, auth in itertools.product(targets, bad_auth if secured else [None]):
            out.append((f"{method} {path} auth {auth!r:.20}", _request(
                method, target, b'{"x": 1}' if has_body else None, auth)))
        if has_body:
            for body in _bodies(props):
                for auth in ([full, f"Bearer {keys['wrong-scope']}"] if secured else [None]):
                    out.append((f"{method} {path} body", _request(method, targets[0], body, auth)))
            out.append((f"{method} {path} text/plain", _request(
                method, targets[0], json.dumps(dict.fromkeys(props, "1")).encode(), full,
                "text/plain")))
            out.append((f"{method} {path} too large", _request(
                method, targets[0], b'{"x": "' + b"9" * 70_000 + b'"}', full)))
            for body in _random_bodies(rng, props, 400):
                out.append((f"{method} {path} random body", _request(
                    method, targets[0], body, full)))
        params = op.get("parameters", [])
        for param in params:  # with a key that may do everything: the value is what is bad
            for value in _violating(param.get("schema", {})):
                if param.get("in") == "path":
                    target = path.replace("{" + param["name"] + "}", value)
                elif param.get("in") == "query":
                    target = f"{targets[0]}?{param['name']}={value}"
                else:
                    continue
                out.append((f"{method} {path} bad {param['in']} {param['name']}", _request(
                    method, target, b'{"zzz_unknown": 1}' if has_body else None, full)))
    # /v1/verify in depth: a victim's real OTP with every bad key; wrong OTPs and
    # other users' sessions; expired sessions; every malformed field.
    for auth in bad_auth:
        out.append(("verify: valid OTP, bad key", _request(
            "POST", "/v1/verify", json.dumps(
                {"session_id": victim["session"].session_id.hex(), "otp": victim["session"].otp}
            ).encode(), auth)))
    out.append(("verify: valid OTP, wrong scope", verify_request(
        victim["session"].session_id, victim["session"].otp, keys["wrong-scope"])))
    for other in victim["others"]:  # the victim's OTP at someone else's session
        out.append(("verify: other user's session", verify_request(
            other.session_id, victim["session"].otp, keys["verify"])))
    for expired in victim["expired"]:
        out.append(("verify: expired session", verify_request(
            expired.session_id, expired.otp, keys["verify"])))
    sid, otp = victim["session"].session_id.hex(), victim["session"].otp
    # The fuzz target's own valid request, mutated (its wrong OTPs count as failures:
    # it is not the victim, whose failures must stay 0).
    target = victim["fuzzed"]
    valid = json.dumps({"session_id": target.session_id.hex(), "otp": target.otp},
                       separators=(",", ":")).encode()
    for body in _mutants(rng, valid, 1800):
        out.append(("verify: mutated body", _request(
            "POST", "/v1/verify", body, f"Bearer {keys['verify']}")))
    for bad_sid in ["", sid.upper(), sid[:-1], sid + "0", "g" * 32, 1, None, [sid], {"a": sid},
                    "\u0660" * 32, sid + "\x00"]:
        out.append(("verify: bad session id", _request("POST", "/v1/verify", json.dumps(
            {"session_id": bad_sid, "otp": otp}).encode(), f"Bearer {keys['verify']}")))
    for bad_otp in ["", "12", "1" * 11, otp + " ", " " + otp, "\uff11" * 8, "\u0661" * 8,
                    int(otp), None, [otp], f"{otp}\x00", "-" + otp[1:], "1e7" + otp[3:]]:
        out.append(("verify: bad otp", _request("POST", "/v1/verify", json.dumps(
            {"session_id": sid, "otp": bad_otp}).encode(), f"Bearer {keys['verify']}")))
    return out


async def _fire(url: str, requests: list[tuple[str, bytes]], connections: int = 12):
    """Send everything over a few keep-alive connections (reopened when the server
    closes one); returns (what, status, content type, body) per request."""
    results: list[tuple[str, int, str, bytes]] = []
    queue = list(reversed(requests))

    async def worker():
        conn = await Connection.open(url)
        while queue:
            what, raw = queue.pop()
            try:
                a = await conn.call(raw)
            except (ConnectionError, asyncio.IncompleteReadError):
                # The server may close after refusing a body it did not read (413):
                # then the answer must have come before the close on a fresh connection.
                conn.close()
                conn = await Connection.open(url)
                a = await conn.call(raw)
            results.append((what, a.status, a.headers.get("content-type", ""), a.body))
            if a.headers.get("connection", "").lower() == "close":
                conn.close()
                conn = await Connection.open(url)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return results


def test_a_storm_of_bad_requests_changes_nothing_and_the_service_keeps_verifying(tmp_path):
    directory = make_verifier(tmp_path / "v")
    plan, verify_key = populate(directory, None, 6)
    victim, others, fuzzed, last = plan[0], plan[1:4], plan[4], plan[5]
    with Verifier.open(directory, clock=lambda: time.time() - 7200) as old:
        expired = []
        for i in range(3):  # sessions started two hours ago: expired now
            device = enroll(old, f"late{i}")
            s = old.start_session(f"late{i}", "old login")
            expired.append(Planned(f"late{i}", s.session_id, device.otp(s)))
    with Verifier.open(directory) as v:
        now = int(time.time())
        keys = {
            "verify": verify_key,
            "all": api_keys.create(v.store, "all", list(api_keys.SCOPES), now=now).key,
            "wrong-scope": api_keys.create(v.store, "enroll only", ["enroll"], now=now).key,
        }
        revoked = api_keys.create(v.store, "revoked", list(api_keys.SCOPES), now=now)
        api_keys.revoke(v.store, revoked.record.key_id, now=now)
        keys["revoked"] = revoked.key
        keys["unknown"] = f"hsk_{'0' * len(revoked.record.key_id)}_{'1' * 64}"
        before = {p.user: v.credential(p.user, Method.DEVICE) for p in plan + expired}

    args = ["--rate-address", "0", "--rate-user", "0"]
    with running_service(directory, args=args) as svc:
        spec = httpx.get(svc.url + "/openapi.json").json()
        requests = storm_requests(
            spec, keys, {"session": victim, "others": others, "expired": expired, "fuzzed": fuzzed}
        )
        hidden = hidden_routes(directory, spec)
        requests += hidden_requests(hidden)
        random.Random(13).shuffle(requests)
        assert len(requests) >= 2000
        results = asyncio.run(_fire(svc.url, requests))
        assert len(results) == len(requests)
        secrets_sent = [k for k in keys.values()] + [p.otp for p in plan + expired]
        for what, status, ctype, body in results:
            assert 400 <= status < 500, (what, status, body[:300])
            if what.startswith("verify: valid OTP, bad key"):
                assert status == 401, (what, status)
            if what.startswith("POST /v1/verify auth"):  # a well-formed key: with the batch
                assert status in (401, 422), (what, status)
            if what.startswith("hidden "):  # a browser page: its own 4xx page or problem
                assert b"Traceback" not in body, (what, body[:300])
                continue
            assert ctype == PROBLEM, (what, status, ctype, body[:300])
            problem = json.loads(body)
            assert problem["status"] == status and problem["type"].startswith(
                "https://hsm-auth.invalid/problems/"
            ), (what, problem)
            text = body.decode()
            assert "Traceback" not in text and "File \"" not in text, (what, text[:300])
            assert not any(s in text for s in secrets_sent), (what, text[:300])
        # Still serving: the last user's valid OTP is accepted, once.
        with httpx.Client() as client:
            h = {"Authorization": f"Bearer {verify_key}"}
            body = {"session_id": last.session_id.hex(), "otp": last.otp}
            ok = client.post(svc.url + "/v1/verify", json=body, headers=h)
            assert ok.status_code == 200, ok.text
            assert ok.json() | {"credential_id": None} == {
                "user": last.user, "method": "device", "atc": 1, "label": "device",
                "credential_id": None}
            assert client.post(svc.url + "/v1/verify", json=body, headers=h).status_code == 403
        log = svc.log()
    assert "Traceback" not in log
    assert not any(s in log for s in secrets_sent)
    with Verifier.open(directory) as v:
        sessions, _ = v.store.snapshot([p.session_id for p in plan + expired])
        for p in plan + expired:
            cred = v.credential(p.user, Method.DEVICE)
            if p is last:
                assert cred.atc == 1 and sessions[p.session_id].used
                continue
            assert cred.atc == before[p.user].atc == 0, p.user
            assert not sessions[p.session_id].used, p.user
            trail = v.store.audit_records(p.user, 10_000)
            assert "accept" not in [r.event.value for r in trail], p.user
        # The login page's forms (user alice, forged or missing CSRF) started nothing.
        assert v.store.audit_records("alice", 100) == []
        # The victim's OTP, sent with every bad key, was never even tried.
        assert v.credential(victim.user, Method.DEVICE).failures == 0
