"""docs/PROTOCOL.md is enough to implement a verifier: its formulas, implemented here
from the document alone, give its test vectors and the OTP a real SoftHSM token released.

This file uses only ``cryptography``, ``hmac``, ``hashlib``, ``struct``, ``cbor2`` and the
standard library. Its checks run in a fresh interpreter (``python -I`` this file): the
test process has hsm_auth loaded by conftest.py, the child never imports it, and says
so (``hsm_auth`` not in ``sys.modules``) before it reports.

The functions below follow the sections of docs/PROTOCOL.md; where the verifier's key
custody changes, only :func:`recover_otp_key` has to follow it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sqlite3
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

HERE = Path(__file__).resolve()
CURVE = ec.SECP256R1()

# --- Notation -------------------------------------------------------------------------

VERSION = 3
METHOD_CODES = {"device": 1, "pin": 2, "biometric": 3, "face": 4}
OFFER, RESPONSE, VERIFICATION, SYNC, SYNC_REPORT, ENROLLMENT_RESULT, ATC_ACK = 1, 2, 3, 4, 5, 6, 7


def lp16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def lp32(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def u8(method: str) -> bytes:
    return struct.pack(">B", METHOD_CODES[method])


def utf8(text: str) -> bytes:
    return text.encode("utf-8")


# --- Keys and points ---------------------------------------------------------------------


def private_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), CURVE)


def sec1(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def point(scalar: bytes) -> bytes:
    return sec1(private_key(scalar).public_key())


def ecdh_x(private: ec.EllipticCurvePrivateKey, peer: bytes) -> bytes:
    """Z: the x-coordinate of ECDH(private, peer), 32 bytes."""
    return private.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(CURVE, peer))


def verify_signature(signing_key: bytes, raw: bytes, body: bytes) -> bool:
    """The envelope's signature: raw r||s (32 + 32 bytes), ECDSA P-256 / SHA-256 over body."""
    if len(raw) != 64:
        return False
    public = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, signing_key)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(der, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# --- The envelope and the text form ------------------------------------------------------


def body(kind: int, *fields: Any) -> bytes:
    return cbor2.dumps([VERSION, kind, *fields])


def envelope(body_bytes: bytes, signature: bytes) -> bytes:
    return cbor2.dumps([body_bytes, signature])


def to_text(message: bytes) -> str:
    return "HA1:" + base64.b32encode(message).decode("ascii").rstrip("=")


def from_text(text: str) -> bytes:
    compact = "".join(text.split()).upper()
    assert compact.startswith("HA1:")
    data = compact[4:]
    return base64.b32decode(data + "=" * (-len(data) % 8))


def open_envelope(message: bytes) -> tuple[bytes, list[Any], bytes]:
    """(body bytes, body fields, signature) of a message (no strictness: the test's input
    comes from the real verifier)."""
    body_bytes, signature = cbor2.loads(message)
    fields = cbor2.loads(body_bytes)
    assert fields[0] == VERSION, fields[0]
    return body_bytes, fields, signature


# --- Enrollment: transcript, key confirmation, credential id --------------------------------


def transcript(offer_hash: bytes, user: str, method: str, signing_key: bytes, k: bytes) -> bytes:
    return hashlib.sha256(
        b"hsm-auth/enrollment-transcript/v3"
        + lp16(offer_hash) + lp16(utf8(user)) + u8(method) + lp16(signing_key) + lp16(k)
    ).digest()


def confirmation(otp_key: bytes, t: bytes) -> bytes:
    return hmac.digest(otp_key, b"hsm-auth/key-confirmation/v3" + b"\x00" + t, hashlib.sha256)


def credential_id(signing_key: bytes) -> bytes:
    return hashlib.sha256(b"hsm-auth/credential-id/v3" + signing_key).digest()[:16]


# --- Activation --------------------------------------------------------------------------------

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def gf32_mul(a: int, b: int) -> int:
    """Product in GF(32) = GF(2)[x] / (x^5 + x^2 + 1)."""
    out = 0
    for i in range(5):
        if b >> i & 1:
            out ^= a << i
    for bit in range(8, 4, -1):  # reduce: x^5 = x^2 + 1
        if out >> bit & 1:
            out ^= 0b100101 << (bit - 5)
    return out


def gf32_pow(a: int, n: int) -> int:
    out = 1
    for _ in range(n):
        out = gf32_mul(out, a)
    return out


def code_is_valid(symbols: list[int]) -> bool:
    """S_j = sum of v_i * alpha^(j(11-i)) is 0 for j = 1, 2 (alpha = 2)."""
    for j in (1, 2):
        s = 0
        for i, v in enumerate(symbols):
            s ^= gf32_mul(v, gf32_pow(2, j * (11 - i)))
        if s:
            return False
    return True


def activation_code(code_mac: bytes) -> str:
    """The first 50 bits of code_mac as 10 symbols, then the one check pair that makes a
    valid word (found by trying all 1024), in groups of four."""
    bits = int.from_bytes(code_mac, "big") >> (256 - 50)
    data = [bits >> (5 * (9 - i)) & 31 for i in range(10)]
    [check] = [[a, b] for a in range(32) for b in range(32) if code_is_valid([*data, a, b])]
    text = "".join(CROCKFORD[v] for v in data + check)
    return f"{text[0:4]}-{text[4:8]}-{text[8:12]}"


def normalize_code(typed: str) -> str | None:
    """The 12 normalized characters, or None for a typo."""
    chars = typed.upper().replace("-", "").replace(" ", "").replace("\t", "")
    chars = chars.replace("I", "1").replace("L", "1").replace("O", "0")
    if len(chars) != 12 or any(c not in CROCKFORD for c in chars):
        return None
    return chars if code_is_valid([CROCKFORD.index(c) for c in chars]) else None


def activation_key(code: str, offer_hash: bytes) -> bytes:
    normalized = normalize_code(code)
    assert normalized is not None
    return HKDF(hashes.SHA256(), 32, salt=offer_hash, info=b"hsm-auth/activation-key/v3").derive(
        normalized.encode("ascii")
    )


# --- FIDO2 key transport ----------------------------------------------------------------------


def wrap_otp_key(otp_key: bytes, ephemeral: ec.EllipticCurvePrivateKey, agreement: bytes) -> bytes:
    return sec1(ephemeral.public_key()) + aes_key_wrap(ecdh_x(ephemeral, agreement), otp_key)


def unwrap_otp_key(wrapped: bytes, agreement: ec.EllipticCurvePrivateKey) -> bytes:
    assert len(wrapped) == 73
    return aes_key_unwrap(ecdh_x(agreement, wrapped[:33]), wrapped[33:])


def client_data_hash(offer_id: bytes, user: str, method: str, ephemeral_point: bytes) -> bytes:
    binding = b"hsm-auth/enroll/v1" + lp16(offer_id) + lp16(utf8(user)) + lp16(utf8(method))
    return hashlib.sha256(
        b"hsm-auth/fido2-client-data/v1" + lp16(binding) + lp16(ephemeral_point)
    ).digest()


# --- The OTP ------------------------------------------------------------------------------------


def transaction_digest(items: list[list[str]] | None) -> bytes:
    """TH of section 17: empty without a transaction."""
    if items is None:
        return b""
    out = b"hsm-auth/transaction/v1" + bytes([len(items)])
    for label, value in items:
        out += lp16(utf8(label)) + lp16(utf8(value))
    return hashlib.sha256(out).digest()


def question(
    verifier_id: bytes, user: str, method: str, cid: bytes, challenge: bytes, context: str,
    tenant: str | None = None, items: list[list[str]] | None = None, data: str = "",
) -> str:
    return hashlib.sha256(
        b"hsm-auth/otp-question/v3"
        + lp16(verifier_id) + lp16(utf8(user)) + u8(method) + lp16(cid)
        + lp16(challenge) + lp32(utf8(context))
        + lp16(utf8(tenant or "")) + lp16(transaction_digest(items)) + lp16(utf8(data))
    ).hexdigest()


def sync_question(session_id: bytes, user: str, method: str, cid: bytes) -> str:
    return hashlib.sha256(
        b"hsm-auth/sync-question/v2" + lp16(session_id) + lp16(utf8(user)) + u8(method)
        + lp16(cid)
    ).hexdigest()


def data_input(suite: str, counter: int, question_hex: str) -> bytes:
    """RFC 6287 DataInput for a ``C-QHnn`` suite: suite, 0x00, C (8 bytes), Q (128 bytes)."""
    return (
        suite.encode("ascii") + b"\x00" + counter.to_bytes(8, "big")
        + bytes.fromhex(question_hex.ljust(256, "0"))
    )


def truncate(mac: bytes, digits: int) -> str:
    offset = mac[-1] & 0x0F
    code = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


def otp(otp_key: bytes, suite: str, counter: int, question_hex: str) -> str:
    digits = int(suite.split(":")[1].rsplit("-", 1)[1])  # HOTP-SHA256-<digits>
    mac = hmac.digest(otp_key, data_input(suite, counter, question_hex), "sha256")
    return truncate(mac, digits)


# --- the vectors of the document ----------------------------------------------------------------


def compute(v: dict[str, Any]) -> dict[str, Any]:
    """Every output vector, from the input vectors ``v``, by the formulas above."""
    out: dict[str, Any] = {}
    vs, va = private_key(v["verifier_signing_scalar"]), private_key(v["verifier_agreement_scalar"])
    out["verifier_signing_key"] = sec1(vs.public_key())
    out["verifier_agreement_key"] = sec1(va.public_key())
    out["signing_key"] = point(v["signing_scalar"])
    out["agreement_key"] = point(v["agreement_scalar"])

    out["offer_body"] = ob = body(
        OFFER, v["verifier_id"], v["verifier_name"], v["user"], v["offer_id"],
        out["verifier_signing_key"], out["verifier_agreement_key"], v["suite"], v["window"],
        v["offer_methods"], v["offer_replace"], v["offer_expires"], v["offer_enrolled"],
        None,
    )
    out["offer_hash"] = offer_hash = hashlib.sha256(ob).digest()

    out["z"] = z = ecdh_x(private_key(v["agreement_scalar"]), out["verifier_agreement_key"])
    assert ecdh_x(va, out["agreement_key"]) == z  # both sides get the same Z
    out["transcript"] = t = transcript(
        offer_hash, v["user"], v["method"], out["signing_key"], out["agreement_key"]
    )
    out["confirmation"] = conf = confirmation(z, t)
    root = v["file_root_secret"]
    k_code = HKDF(
        hashes.SHA256(), 32, salt=None, info=b"hsm-auth/file-keys/activation-code-key/v1"
    ).derive(root)
    out["activation_code_mac"] = code_mac = hmac.digest(
        k_code, b"hsm-auth/activation-code/v3" + b"\x00" + v["offer_id"], "sha256"
    )
    out["activation_code"] = code = activation_code(code_mac)
    assert normalize_code(v["activation_code_typed"]) == code.replace("-", "")
    assert normalize_code(v["activation_code_typo"]) is None
    out["activation_key"] = k_act = activation_key(code, offer_hash)
    out["activation_mac"] = act_mac = hmac.digest(
        k_act, b"hsm-auth/activation/v3" + b"\x00" + t, "sha256"
    )
    out["response_body"] = body(
        RESPONSE, v["verifier_id"], v["offer_id"], v["user"], METHOD_CODES[v["method"]],
        v["backend"], out["signing_key"], out["agreement_key"], None, v["initial_atc"], None,
        conf, act_mac,
    )
    out["credential_id"] = cid = credential_id(out["signing_key"])

    out["verification_body"] = vb = body(
        VERIFICATION, v["verifier_id"], v["user"], v["challenge"], v["context"],
        [METHOD_CODES[m] for m in v["verification_methods"]], v["verification_expires"],
        None, None, 0,
    )
    out["context_utf8"] = utf8(v["context"])
    out["question"] = q = question(
        v["verifier_id"], v["user"], v["method"], cid, v["challenge"], v["context"]
    )
    out["data_input"] = data_input(v["suite"], v["counter"], q)
    out["otp_mac"] = hmac.digest(z, out["data_input"], "sha256")
    out["otp"] = otp(z, v["suite"], v["counter"], q)
    out["verification_text"] = to_text(envelope(vb, v["verification_signature"]))

    # Section 17: a tenant, transaction data and data the user typed (trimmed, NFC).
    out["tx_verification_body"] = tb = body(
        VERIFICATION, v["verifier_id"], v["user"], v["challenge"], v["tx_context"],
        [METHOD_CODES[m] for m in v["verification_methods"]], v["verification_expires"],
        v["tx_tenant"], v["tx_items"], v["tx_user_data"],
    )
    out["tx_verification_text"] = to_text(envelope(tb, v["tx_verification_signature"]))
    out["tx_digest"] = transaction_digest(v["tx_items"])
    out["tx_data"] = entered = unicodedata.normalize("NFC", v["tx_data_typed"].strip())
    out["tx_question"] = tq = question(
        v["verifier_id"], v["user"], v["method"], cid, v["challenge"], v["tx_context"],
        v["tx_tenant"], v["tx_items"], entered,
    )
    out["tx_otp"] = otp(z, v["suite"], v["tx_counter"], tq)

    e = private_key(v["fido2_ephemeral_scalar"])
    out["fido2_ephemeral_key"] = sec1(e.public_key())
    out["fido2_signing_key"] = point(v["fido2_signing_scalar"])
    out["fido2_z"] = ecdh_x(e, out["verifier_agreement_key"])
    out["fido2_wrapped_otp_key"] = wrapped = wrap_otp_key(
        v["fido2_otp_key"], e, out["verifier_agreement_key"]
    )
    assert unwrap_otp_key(wrapped, va) == v["fido2_otp_key"]
    out["fido2_transcript"] = ft = transcript(
        offer_hash, v["user"], v["fido2_method"], out["fido2_signing_key"], wrapped
    )
    out["fido2_confirmation"] = confirmation(v["fido2_otp_key"], ft)
    out["fido2_client_data_hash"] = client_data_hash(
        v["offer_id"], v["user"], v["fido2_method"], out["fido2_ephemeral_key"]
    )

    out["sync_question"] = sq = sync_question(
        v["sync_session_id"], v["user"], v["method"], cid
    )
    out["sync_data_input"] = data_input(v["suite"], v["sync_atc"], sq)
    out["sync_mac"] = mac = hmac.digest(z, out["sync_data_input"], "sha256")
    out["sync_report"] = envelope(
        body(SYNC_REPORT, v["verifier_id"], v["sync_session_id"], v["user"],
             METHOD_CODES[v["method"]], v["sync_atc"], cid),
        mac,
    )
    out["atc_ack_body"] = body(
        ATC_ACK, v["verifier_id"], v["user"], METHOD_CODES[v["method"]], cid,
        v["sync_session_id"], v["sync_atc"],
    )

    # Section 13.1: the key file's device CA key; section 5.6: the enrollment result.
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    ca_scalar = int.from_bytes(HKDF(hashes.SHA256(), 48, salt=None,
                                    info=b"hsm-auth/file-keys/device-ca-key/v1")
                               .derive(v["file_root_secret"]), "big") % (n - 1) + 1
    out["device_ca_key"] = sec1(ec.derive_private_key(ca_scalar, CURVE).public_key())
    out["enrollment_result_body"] = body(
        ENROLLMENT_RESULT, v["verifier_id"], v["user"], METHOD_CODES[v["method"]], cid,
        v["device_certificate"], v["device_ca_certificate"], "unattested", 0, 0,
    )

    # RFC 6287 Appendix C.1, OCRA-1:HOTP-SHA512-8:C-QN08: a numeric question goes in as
    # its value in hex, left-aligned (RFC 6287 section 5.1).
    rfc_q = format(int(v["rfc6287_question"]), "X")
    rfc_input = data_input(v["rfc6287_suite"], v["rfc6287_counter"], rfc_q)
    out["rfc6287_data_input"] = rfc_input
    out["rfc6287_otp"] = truncate(hmac.digest(v["rfc6287_key"], rfc_input, "sha512"), 8)
    return out


def check_vectors(document: Path) -> int:
    sys.path.insert(0, str(HERE.parent))
    import _vectors

    v = _vectors.load(document)
    computed = compute(v)
    wrong = sorted(name for name, value in computed.items() if v.get(name) != value)
    assert not wrong, f"the document and its formulas disagree on: {', '.join(wrong)}"
    for what in ("offer", "verification", "tx_verification"):
        assert verify_signature(
            v["verifier_signing_key"], v[f"{what}_signature"], v[f"{what}_body"]
        ), what
    assert verify_signature(
        v["verifier_signing_key"], v["result_signature"], v["enrollment_result_body"]
    )
    assert verify_signature(v["verifier_signing_key"], v["atc_ack_signature"], v["atc_ack_body"])
    check_device_certificate(v)
    return len(computed)


def check_device_certificate(v: dict[str, Any]) -> None:
    """Section 13.3: the device certificate verifies under the device CA key, certifies
    the signing key, names the user, method and credential id, and carries the
    attestation result in its extension."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(v["device_certificate"])
    ca = x509.load_der_x509_certificate(v["device_ca_certificate"])
    ca_key = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, v["device_ca_key"])
    for c in (cert, ca):
        ca_key.verify(c.signature, c.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert sec1(cert.public_key()) == v["signing_key"]
    subject = [(a.oid, a.value) for a in cert.subject]
    assert subject == [(NameOID.USER_ID, v["user"]),
                       (NameOID.ORGANIZATIONAL_UNIT_NAME, v["method"]),
                       (NameOID.SERIAL_NUMBER, v["credential_id"].hex())]
    ext = cert.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("2.25.247082669378731429492814363386460064207")
    ).value.value
    assert ext[0] == 0x0C and ext[1] == len(ext) - 2  # a short UTF8String
    assert json.loads(ext[2:]) == {"details": {}, "format": "unattested", "trust": "",
                                   "verified": False}


# --- the verifier's key file: what recomputing a real OTP needs ---------------------------------


def _file_keys(verifier_dir: Path) -> list[ec.EllipticCurvePrivateKey]:
    """The private keys of ``keys.pem``, in order (PKCS#8 PEM blocks)."""
    pem = (verifier_dir / "keys.pem").read_bytes()
    marker = b"-----END PRIVATE KEY-----"
    keys = [
        serialization.load_pem_private_key(b + marker, None)
        for b in pem.split(marker)
        if b.strip()
    ]
    assert all(isinstance(k, ec.EllipticCurvePrivateKey) for k in keys)
    return keys  # type: ignore[return-value]


def recover_otp_key(verifier_dir: Path, user: str, method: str) -> tuple[bytes, bytes, str, int]:
    """(OTP key, signing key, suite, ATC) of the credential of ``user``/``method``, from the
    verifier's files (docs/PROTOCOL.md, section 13, "Verifier key custody"): with file
    keys, ``keys.pem`` holds the signing key then the key whose private scalar is the
    root secret; the KEK is HKDF-SHA256 of the root secret; ``verifier.db`` holds the
    credential's OTP key sealed under it with AES-256-GCM, its row's user, method and
    public keys the associated data.

    The one function to adapt when the verifier's key custody changes."""
    root = _file_keys(verifier_dir)[1].private_numbers().private_value.to_bytes(32, "big")
    kek = HKDF(hashes.SHA256(), 32, salt=None, info=b"hsm-auth/file-keys/kek/v1").derive(root)
    db = sqlite3.connect(f"file:{verifier_dir / 'verifier.db'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT sealed_otp_key, signing_key, agreement_key, wrapped_otp_key, suite, atc"
            " FROM credentials WHERE user_name=? AND method=?",
            (user, method),
        ).fetchone()
    finally:
        db.close()
    assert row is not None, (user, method)
    sealed, signing_key, agreement_key, wrapped, suite, atc = (
        bytes(row[0]), bytes(row[1]), row[2], row[3], row[4], row[5]
    )
    key_agreement = bytes(agreement_key if agreement_key is not None else wrapped)
    aad = (
        b"hsm-auth/file-keys/sealed-otp-key/v1" + lp16(user.encode("utf-8")) + u8(method)
        + lp16(signing_key) + lp16(key_agreement)
    )
    otp_key = AESGCM(kek).decrypt(sealed[:12], sealed[12:], aad)
    return otp_key, signing_key, str(suite), int(atc)


def recompute_otp(verifier_dir: Path, data_text: str, method: str, counter: int) -> str:
    """The OTP for the verification data ``data_text`` at ATC ``counter``."""
    identity = json.loads((verifier_dir / "identity.json").read_text())
    body_bytes, fields, signature = open_envelope(from_text(data_text))
    verifier_signing_key = sec1(_file_keys(verifier_dir)[0].public_key())
    assert verify_signature(verifier_signing_key, signature, body_bytes)
    assert fields[1] == VERIFICATION
    verifier_id, user, challenge, context, methods, _expires, tenant, items, _data = fields[2:]
    assert verifier_id == bytes.fromhex(identity["verifier_id"])
    assert METHOD_CODES[method] in methods
    key, signing_key, suite, atc = recover_otp_key(verifier_dir, user, method)
    assert atc < counter  # the verifier has not seen this ATC yet
    q = question(
        verifier_id, user, method, credential_id(signing_key), challenge, context, tenant, items
    )
    return otp(key, suite, counter, q)


def _main(argv: list[str]) -> int:
    if argv[0] == "vectors":
        count = check_vectors(Path(argv[1]))
        result = f"{count} vectors"
    else:
        assert argv[0] == "otp"
        result = recompute_otp(Path(argv[1]), argv[2], argv[3], int(argv[4]))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("hsm_auth", "hsm_auth_backends"))
    assert not loaded, f"hsm_auth was imported: {loaded}"
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


# --- the tests (in the pytest process; each runs the checks above in a child) --------------------
# Below the __main__ exit, so the child never imports pytest either.

import pytest  # noqa: E402


def _child(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-I", str(HERE), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_vectors_follow_from_the_formulas_alone() -> None:
    import _vectors

    assert _child("vectors", str(_vectors.DOCUMENT)).endswith(" vectors")


@pytest.mark.softhsm
def test_a_softhsm_otp_is_recomputed_from_the_document(tmp_path: Path) -> None:
    from _cli import cli_ok, code_file

    from hsm_auth.demo import prepare
    from hsm_auth.testing.softhsm import softhsm_available

    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    # The whole flow runs in CLI processes, as a user runs it.
    with prepare(home, tpm=False, fido2=False):
        pass
    cli_ok(home, "verifier", "init", "--name", "Independent verifier")
    offer = cli_ok(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", "device"
    )
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", "--offer", offer)
    cli_ok(home, "verifier", "enroll", response)
    context = "Zahlung an Müller: 9,99 €"
    session = json.loads(
        cli_ok(home, "--json", "verifier", "session", "--user", "alice", "--context", context)
    )
    released = json.loads(cli_ok(home, "--json", "finish", "--method", "device", session["data"]))
    verifier_dir = next(p.parent for p in home.rglob("identity.json"))
    recomputed = _child("otp", str(verifier_dir), session["data"], "device", str(released["atc"]))
    assert recomputed == released["otp"]
    other = _child("otp", str(verifier_dir), session["data"], "device", str(released["atc"] + 1))
    assert other != recomputed  # the counter is in it
    assert len(recomputed) == 8 and recomputed.isdigit()
    # ...and it is the OTP the real verifier accepts.
    cli_ok(home, "verifier", "verify", "--session", session["session"], stdin=recomputed)
