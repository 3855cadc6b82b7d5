"""Signed requests and approvals (docs/PROTOCOL.md §16): the document's vectors
recomputed, the header parsed strictly, signatures made in real tokens (SoftHSM
ECDSA, the soft FIDO2 authenticator's assertions) checked and attacked, the nonce
consumed once across PostgreSQL worker processes, challenge compare-and-swap on
both engines, and the approval policy."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing
import re
import threading
import tomllib

import pytest
from _online import OFFLINE_PIN, fido2_method, make_authenticator, response_for, softhsm_methods
from _vectors import DOCUMENT, parse
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, transcript
from hsm_auth.approvals import OnlineVerifier
from hsm_auth.attestation import ApprovalPolicy, VerifierPolicy
from hsm_auth.challenges import (
    Challenge,
    ChallengeContext,
    ChallengeKind,
    ChallengeState,
    Decision,
    context_hash,
)
from hsm_auth.errors import ConfigError, PinRequired
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.request_signing import (
    Signature,
    SignatureRefused,
    approval_message,
    b64u,
    check_signature,
    format_header,
    parse_header,
    request_message,
)
from hsm_auth.store import open_store
from hsm_auth.store.base import Consumed
from hsm_auth.verifier import Verifier

_FENCE = re.compile(r"^```signing-vectors[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
V = parse("".join(f"```vectors\n{b}```\n" for b in _FENCE.findall(DOCUMENT.read_text())))


def _public(name: str) -> bytes:
    key = cec.derive_private_key(int.from_bytes(V[name], "big"), ec.CURVE)
    return ec.encode_point(key.public_key())


def _challenge() -> Challenge:
    return Challenge(
        V["ch_id"], ChallengeKind(V["ch_kind"]), V["ch_user"], V["ch_message"],
        ChallengeContext(ip=V["ch_ip"], user_agent=V["ch_user_agent"],
                         location=V["ch_location"], custom=dict(V["ch_custom"])),
        ChallengeState.CLAIMED, 1_900_000_000,
    )


# --- the document's vectors -----------------------------------------------------------


def test_the_request_vectors_are_what_the_code_makes() -> None:
    assert V["sr_signing_key"] == _public("sr_signing_scalar")
    assert V["sr_credential_id"] == transcript.credential_id(V["sr_signing_key"])
    message = request_message(
        V["sr_method"], V["sr_target"], V["sr_body"].encode(), V["sr_nonce"],
        V["sr_verifier_id"], V["sr_credential_id"],
    )
    assert message == V["sr_request_message"]
    check_signature(Method.DEVICE, V["sr_signing_key"], message,
                    Signature(V["sr_request_signature"]), last_counter=0)
    assert V["sr_header"] == format_header(
        V["sr_credential_id"], V["sr_nonce"], Signature(V["sr_request_signature"])
    )
    parsed = parse_header(V["sr_header"])
    assert (parsed.credential_id, parsed.nonce) == (V["sr_credential_id"], V["sr_nonce"])


def test_the_approval_vectors_are_what_the_code_makes() -> None:
    challenge = _challenge()
    assert context_hash(challenge) == V["ch_context_hash"]
    message = approval_message(challenge.id_bytes, V["ch_context_hash"], Decision.APPROVE,
                               V["sr_verifier_id"], V["sr_credential_id"])
    assert message == V["ch_approval_message"]
    check_signature(Method.PIN, V["sr_signing_key"], message,
                    Signature(V["ch_approval_signature"]), last_counter=0)
    # the FIDO2 rejection: an assertion over SHA-256 of the approval message
    assert V["fa_signing_key"] == _public("fa_signing_scalar")
    assert V["fa_credential_id"] == transcript.credential_id(V["fa_signing_key"])
    reject = approval_message(challenge.id_bytes, V["ch_context_hash"], Decision.REJECT,
                              V["sr_verifier_id"], V["fa_credential_id"])
    assert reject == V["fa_reject_message"]
    assert hashlib.sha256(reject).digest() == V["fa_client_data_hash"]
    assert V["fa_authdata"][:32] == hashlib.sha256(b"hsm-auth").digest()
    signature = Signature(V["fa_signature"], V["fa_authdata"])
    assert check_signature(Method.BIOMETRIC, V["fa_signing_key"], reject, signature,
                           last_counter=6) == 7


def test_the_vectors_refuse_every_change() -> None:
    """Each field of the messages is bound: changing any input breaks the signature."""
    base = dict(method=V["sr_method"], target=V["sr_target"], body=V["sr_body"].encode(),
                nonce=V["sr_nonce"], verifier_id=V["sr_verifier_id"],
                credential_id=V["sr_credential_id"])
    changes = {"method": "PUT", "target": "/v1/device/claims?x=1", "body": b"{}",
               "nonce": bytes(32), "verifier_id": bytes(8), "credential_id": bytes(16)}
    for name, value in changes.items():
        message = request_message(**{**base, name: value})
        with pytest.raises(SignatureRefused):
            check_signature(Method.DEVICE, V["sr_signing_key"], message,
                            Signature(V["sr_request_signature"]), last_counter=0)
    challenge = _challenge()
    for other in (dataclasses.replace(challenge, message="Pay 1000 EUR"),
                  dataclasses.replace(challenge, context=dataclasses.replace(
                      challenge.context, ip="198.51.100.1")),
                  dataclasses.replace(challenge, user="bob")):
        assert context_hash(other) != V["ch_context_hash"]
    fido = Signature(V["fa_signature"], V["fa_authdata"])
    flags_off = bytearray(V["fa_authdata"])
    flags_off[32] = 0x01  # UP without UV
    for signature, counter in ((fido, 7), (Signature(V["fa_signature"], bytes(flags_off)), 0),
                               (Signature(V["fa_signature"]), 0)):
        with pytest.raises(SignatureRefused):
            check_signature(Method.FACE, V["fa_signing_key"], V["fa_reject_message"],
                            signature, last_counter=counter)
    with pytest.raises(SignatureRefused):  # the rpId is the policy's
        check_signature(Method.FACE, V["fa_signing_key"], V["fa_reject_message"], fido,
                        last_counter=0, rp_id="example.com")
    with pytest.raises(SignatureRefused):  # the format follows the method, not the client
        check_signature(Method.DEVICE, V["fa_signing_key"], V["fa_reject_message"], fido,
                        last_counter=0)


_CID = "credential=8b3c9bad77cd57814129aa5a2d716f60"
_NONCE = "nonce=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
_SIG = "signature=" + b64u(bytes(64))


@pytest.mark.parametrize("header", [
    None, "", "credential=00", "nonce=AA, signature=AA", f"{_CID}, {_NONCE}",
    f"{_CID.upper()}, {_NONCE}, {_SIG}",
    f"{_CID}, nonce=AAEC, {_SIG}",
    f"{_CID}, {_NONCE}, signature=" + b64u(bytes(63)),
    f"{_CID}, {_NONCE}, {_SIG}, {_SIG}",
    f"{_CID}, {_NONCE}, {_SIG}, extra=AA",
    f"{_CID}, {_NONCE[:-1]}h, {_SIG}",  # non-canonical base64url (stray bits)
    f"{_CID}; {_NONCE}; {_SIG}",
    "x" * 5000,
], ids=lambda h: "none" if h is None else str(len(h)))
def test_a_malformed_header_is_refused(header: str | None) -> None:
    with pytest.raises(SignatureRefused):
        parse_header(header)


# --- signatures made in real tokens ---------------------------------------------------


@pytest.fixture
def verifier(tmp_path):  # type: ignore[no-untyped-def]
    v = Verifier.init(tmp_path / "verifier", "Example Bank")
    yield v
    v.close()


@pytest.fixture
def soft_auth(softhsm_env, tmp_path):  # type: ignore[no-untyped-def]
    with make_authenticator(tmp_path / "auth", softhsm_methods(tmp_path / "tokens")) as auth:
        yield auth


@pytest.mark.softhsm
def test_a_softhsm_signed_request_checks_once_and_binds_everything(
    soft_auth, verifier
) -> None:  # type: ignore[no-untyped-def]
    auth = soft_auth
    online = OnlineVerifier(verifier)
    for method in (Method.DEVICE, Method.PIN):
        online.enroll(response_for(verifier, auth, "alice", method))
    vid = verifier.identity.verifier_id

    def signed(method: Method, verb: str, target: str, body: bytes) -> str:
        nonce = online.issue_nonce()
        cid = bytes.fromhex(auth.online_method(vid, method).credential_id)
        made = auth.sign_online(vid, method, request_message(verb, target, body, nonce, vid, cid),
                                auth=Authorization(pin=OFFLINE_PIN))
        return format_header(made.credential_id, nonce, made.signature)

    header = signed(Method.PIN, "POST", "/v1/device/claims", b'{"claim":"x"}')
    for verb, target, body in (("PUT", "/v1/device/claims", b'{"claim":"x"}'),
                               ("POST", "/v1/device/credentials", b'{"claim":"x"}'),
                               ("POST", "/v1/device/claims?a=1", b'{"claim":"x"}'),
                               ("POST", "/v1/device/claims", b'{"claim":"y"}')):
        with pytest.raises(SignatureRefused):
            online.authenticate(header, verb, target, body)
    # a refused request used up nothing: the right one still passes, once
    cred = online.authenticate(header, "POST", "/v1/device/claims", b'{"claim":"x"}')
    assert (cred.user, cred.method) == ("alice", Method.PIN)
    with pytest.raises(SignatureRefused):
        online.authenticate(header, "POST", "/v1/device/claims", b'{"claim":"x"}')
    # another credential's signature under this credential's id
    other = parse_header(signed(Method.DEVICE, "GET", "/v1/device/credentials", b""))
    pin_cid = bytes.fromhex(auth.online_method(vid, Method.PIN).credential_id)
    with pytest.raises(SignatureRefused):
        online.authenticate(format_header(pin_cid, other.nonce, other.signature),
                            "GET", "/v1/device/credentials", b"")


@pytest.mark.softhsm
def test_the_pin_method_needs_its_pin_and_the_policys_timeout(
    soft_auth, verifier
) -> None:  # type: ignore[no-untyped-def]
    auth = soft_auth
    OnlineVerifier(verifier).enroll(response_for(verifier, auth, "alice", Method.PIN))
    vid = verifier.identity.verifier_id
    challenge = _challenge()
    with pytest.raises(PinRequired):
        auth.sign_approval(vid, Method.PIN, challenge, Decision.APPROVE)
    now = auth._clock()
    with pytest.raises(PinRequired, match="each approval"):  # timeout 0: a cached PIN never
        auth.sign_approval(vid, Method.PIN, challenge, Decision.APPROVE,
                           auth=Authorization(pin=OFFLINE_PIN), authorized_at=now - 1)
    auth.set_approval_policy(vid, Method.PIN, 60)
    made = auth.sign_approval(vid, Method.PIN, challenge, Decision.APPROVE,
                              auth=Authorization(pin=OFFLINE_PIN), authorized_at=now - 30)
    cid = bytes.fromhex(auth.online_method(vid, Method.PIN).credential_id)
    check_signature(Method.PIN, ec.encode_point(auth_public(auth, vid)), approval_message(
        challenge.id_bytes, context_hash(challenge), Decision.APPROVE, vid, cid),
        made.signature, last_counter=0)
    with pytest.raises(PinRequired, match="60 s"):
        auth.sign_approval(vid, Method.PIN, challenge, Decision.APPROVE,
                           auth=Authorization(pin=OFFLINE_PIN), authorized_at=now - 61)


def auth_public(auth, vid):  # type: ignore[no-untyped-def]
    enrolled = auth.online_method(vid, Method.PIN)
    with auth._store(enrolled.backend, enrolled.settings, Method.PIN) as store:
        return store.public_key(enrolled.signing_key, Authorization(pin=OFFLINE_PIN))


@pytest.mark.fido2
def test_fido2_assertions_sign_requests_and_their_counter_only_moves_forward(
    tmp_path, soft_fido2_factory
) -> None:  # type: ignore[no-untyped-def]
    from hsm_auth.testing.fido2 import write_soft_policy

    device = soft_fido2_factory()
    write_soft_policy(tmp_path / "verifier", [device])
    verifier = Verifier.init(tmp_path / "verifier", "Example Bank")
    with contextlib.ExitStack() as stack:
        stack.callback(verifier.close)
        auth = make_authenticator(tmp_path / "auth", {
            Method.BIOMETRIC: fido2_method(device.path, tmp_path / "fido2-state")})
        stack.callback(auth.close)
        online = OnlineVerifier(verifier)
        online.enroll(response_for(verifier, auth, "alice", Method.BIOMETRIC))
        vid = verifier.identity.verifier_id
        cid = bytes.fromhex(auth.online_method(vid, Method.BIOMETRIC).credential_id)
        headers = []
        for _ in range(2):
            nonce = online.issue_nonce()
            made = auth.sign_online(vid, Method.BIOMETRIC, request_message(
                "GET", "/v1/device/credentials", b"", nonce, vid, cid))
            assert made.signature.authdata is not None
            headers.append(format_header(cid, nonce, made.signature))
        # the second (higher counter) first: the first is then a rolled-back counter
        online.authenticate(headers[1], "GET", "/v1/device/credentials", b"")
        with pytest.raises(SignatureRefused):
            online.authenticate(headers[0], "GET", "/v1/device/credentials", b"")
        cred = verifier.store.credential_by_id(cid)
        authdata = parse_header(headers[1]).signature.authdata
        assert authdata is not None and authdata[32] & 0x05 == 0x05  # UP and UV
        assert cred is not None and cred.sign_count == int.from_bytes(authdata[33:37], "big")


# --- one nonce, many workers -----------------------------------------------------------


def _consume(dsn: str, nonce: bytes, credential: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    store = open_store(dsn)
    try:
        barrier.wait()
        results.put(store.consume_nonce(nonce, 1000, credential=credential).value)
    finally:
        store.close()


@pytest.mark.postgres
def test_a_nonce_is_consumed_once_across_postgresql_worker_processes(postgres_dsn) -> None:  # type: ignore[no-untyped-def]
    store = open_store(postgres_dsn)
    nonce = bytes(range(32))
    store.put_nonce(nonce, 2000, 1000)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    workers = [ctx.Process(target=_consume, args=(postgres_dsn, nonce, 0, barrier, results))
               for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes.count(Consumed.DONE.value) == 1
    assert outcomes.count(Consumed.GONE.value) == 7


ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def store(request, tmp_path):  # type: ignore[no-untyped-def]
    spec = tmp_path / "v.db" if request.param == "sqlite" else request.getfixturevalue(
        "postgres_dsn")
    s = open_store(spec)
    yield s
    s.close()


def test_a_nonce_lives_once_and_briefly(store) -> None:  # type: ignore[no-untyped-def]
    fresh, old = bytes([1]) * 32, bytes([2]) * 32
    store.put_nonce(old, 1059, 999)
    store.put_nonce(fresh, 1060, 1000)
    assert store.consume_nonce(old, 1060, credential=0) is Consumed.GONE  # expired
    assert store.consume_nonce(bytes(32), 1000, credential=0) is Consumed.GONE  # unknown
    assert store.consume_nonce(fresh, 1060, credential=0) is Consumed.DONE
    assert store.consume_nonce(fresh, 1060, credential=0) is Consumed.GONE  # used


def _qr(user: str | None = None) -> Challenge:
    from hsm_auth.challenges import new_challenge_id

    return Challenge(new_challenge_id(), ChallengeKind.QR, user, "Log in", ChallengeContext(),
                     ChallengeState.PENDING, 2000, created=1000)


def test_challenge_transitions_are_compare_and_swap(store) -> None:  # type: ignore[no-untyped-def]
    qr = _qr()
    store.put_challenge(qr)
    a, b = bytes(16), bytes([1]) * 16
    assert store.claim_challenge(qr.challenge_id, credential_id=a, user="alice", now=1500)
    assert store.claim_challenge(qr.challenge_id, credential_id=a, user="alice", now=1500)
    assert store.claim_challenge(qr.challenge_id, credential_id=b, user="alice", now=1500) is None
    assert store.claim_challenge(qr.challenge_id, credential_id=b, user="bob", now=1500) is None
    answer = dict(expected=ChallengeState.CLAIMED, decision=ChallengeState.APPROVED,
                  user="alice", method=Method.PIN, credential=0, sign_count=None,
                  approval="{}", now=1500)
    assert store.answer_challenge(qr.challenge_id, credential_id=b, **answer) is Consumed.GONE
    late = {**answer, "now": 2001}
    assert store.answer_challenge(qr.challenge_id, credential_id=a, **late) is Consumed.GONE

    results: list[Consumed] = []
    barrier = threading.Barrier(8)

    def race(decision: ChallengeState) -> None:
        barrier.wait()
        results.append(store.answer_challenge(
            qr.challenge_id, credential_id=a, **{**answer, "decision": decision}))

    threads = [threading.Thread(target=race, args=(
        ChallengeState.APPROVED if i % 2 else ChallengeState.REJECTED,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(Consumed.DONE) == 1 and results.count(Consumed.GONE) == 7
    final = store.challenge(qr.challenge_id)
    assert final.state in (ChallengeState.APPROVED, ChallengeState.REJECTED)
    assert final.user == "alice" and final.credential_id == a.hex()
    assert store.answer_challenge(qr.challenge_id, credential_id=a, **answer) is Consumed.GONE
    assert store.purge(2001) >= 1 and store.challenge(qr.challenge_id) is None


# --- the approval policy ---------------------------------------------------------------


def test_the_approval_policy_says_what_each_method_proves() -> None:
    policy = VerifierPolicy.parse(tomllib.loads(
        "[approval]\nrequire_user_authentication = true\n[approval.pin]\ntimeout = 30\n"))
    assert policy.require_user_authentication
    assert policy.approval_for(Method.PIN) == ApprovalPolicy(True, 30)
    assert policy.approval_for(Method.DEVICE) == ApprovalPolicy(False, 0)
    assert policy.approval_for(Method.FACE) == ApprovalPolicy(True, 0)
    for text, match in (
        ("[approval.device]\nuser_authentication = true\n", "possession only"),
        ("[approval.pin]\nuser_authentication = false\n", "always asks the user"),
        ("[approval.device]\ntimeout = 5\n", "no user authentication"),
        ("[approval.pin]\ntimeout = -1\n", "timeout"),
        ("[approval.pin]\ntimeout = 1.5\n", "timeout"),
        ("[approval.pin]\nwhat = 1\n", "unknown key"),
        ("[approval.retina]\ntimeout = 1\n", "unknown key"),
        ("[approval]\nrequire_user_authentication = 1\n", "true or false"),
    ):
        with pytest.raises(ConfigError, match=match):
            VerifierPolicy.parse(tomllib.loads(text))
