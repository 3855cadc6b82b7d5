"""The decoders that take outside input, each as a fuzz target ``(bytes) -> None``.

A target may return or raise :class:`~hsm_auth.errors.HsmAuthError`; anything
else is a finding. Each comes with seeds: valid inputs to mutate from.
Targets that read files write the input to a private temporary directory
first, so that the real reading code (size limits, UTF-8, JSON) is fuzzed too.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_auth import cbor, config, ocra, protocol, qr, textcode, transcript, uri
from hsm_auth import ec as ecutil
from hsm_auth.errors import HsmAuthError, StateError
from hsm_auth.methods import Method
from hsm_auth.sync_messages import AtcAck
from hsm_auth.webauthn_proof import encode_enrollment_attestation, verify_enrollment_attestation

Target = Callable[[bytes], object]


@dataclass(frozen=True)
class FuzzTarget:
    name: str
    run: Target
    seeds: tuple[bytes, ...]


def _text(data: bytes) -> str:
    """Bytes as argv gives them: UTF-8, undecodable bytes as lone surrogates."""
    return data.decode("utf-8", "surrogateescape")


# --- seeds ----------------------------------------------------------------------

_KEY = ec.derive_private_key(7, ec.SECP256R1())
_POINT = ecutil.encode_point(_KEY.public_key())
_VID = b"\x01" * 16


def _sign(body: bytes) -> bytes:
    return b"\x00" * 64


def _messages() -> dict[str, bytes]:
    offer = protocol.EnrollmentOffer(
        verifier_id=_VID, verifier_name="v", user="alice", offer_id=b"\x02" * 16,
        verifier_signing_key=_POINT, verifier_agreement_key=_POINT,
        suite="OCRA-1:HOTP-SHA256-8:C-QH64",
        window=10, methods=(Method.DEVICE, Method.PIN), replace=False, expires=2**40,
        tenant="retail",
    )
    response = protocol.EnrollmentResponse(
        verifier_id=_VID, offer_id=b"\x02" * 16, user="alice", method=Method.DEVICE,
        backend="pkcs11", signing_key=_POINT, agreement_key=_POINT, wrapped_otp_key=None,
        initial_atc=0, attestation=None, confirmation=b"\x07" * 32,
    )
    data = protocol.VerificationData(
        verifier_id=_VID, user="alice", challenge=b"\x03" * 16, context="Log in",
        methods=(Method.DEVICE,), expires=2**40, tenant="retail",
        transaction=(("Amount", "1.00 EUR"), ("Payee", "DE89")), user_data=4,
    )
    sync = protocol.SyncMessage(
        verifier_id=_VID, user="alice", method=Method.PIN, atc=5, session_id=b"\x05" * 16,
        expires=2**40, credential_id=b"\x08" * 16,
    )
    report = protocol.SyncReport(
        verifier_id=_VID, session_id=b"\x05" * 16, user="alice", method=Method.PIN, atc=6,
        credential_id=b"\x08" * 16,
    )
    ack = AtcAck(
        verifier_id=_VID, user="alice", method=Method.PIN, credential_id=b"\x08" * 16,
        session_id=b"\x05" * 16, atc=6,
    )
    cert, ca = _certificates()
    result = protocol.EnrollmentResult(
        verifier_id=_VID, user="alice", method=Method.DEVICE,
        credential_id=transcript.credential_id(_POINT), certificate=cert, ca_certificate=ca,
        attestation="unattested", offline_expires=2**40, pin_cache=60,
    )
    return {
        "offer": offer.encode(_sign), "response": response.encode(_sign),
        "data": data.encode(_sign), "sync": sync.encode(_sign),
        "report": report.encode(lambda body: b"\x06" * 32), "result": result.encode(_sign),
        "ack": ack.encode(_sign),
    }


_CERTIFICATES: list[tuple[bytes, bytes]] = []


def _certificates() -> tuple[bytes, bytes]:
    """A device certificate for ``_POINT`` (alice, device) and its CA certificate (DER)."""
    if not _CERTIFICATES:
        from cryptography.hazmat.primitives import serialization

        from hsm_auth import device_ca
        from hsm_auth.attestation import AttestationResult
        from hsm_auth.verifier_keys import FileVerifierKeys

        keys = FileVerifierKeys(_KEY, ec.derive_private_key(11, ec.SECP256R1()), cache_bytes=0)
        ca = device_ca.make_ca_certificate(keys, "v", _VID, 2**31)
        cert = device_ca.issue(keys, ca, user="alice", method=Method.DEVICE, signing_key=_POINT,
                               attestation=AttestationResult("packed", True, "root", {"a": "b"}),
                               now=2**31)
        _CERTIFICATES.append((cert, ca.public_bytes(serialization.Encoding.DER)))
    return _CERTIFICATES[0]


def _device_certificate(data: bytes) -> None:
    """What the authenticator checks of a result's certificates, and what ``methods``
    shows of a stored one: each fuzzed as the device and as the CA certificate."""
    from cryptography import x509

    from hsm_auth import device_ca

    cert, ca = _certificates()
    for device, authority in ((data, ca), (cert, data)):
        with contextlib.suppress(HsmAuthError):
            device_ca.check_device_certificate(
                device, authority, user="alice", method=Method.DEVICE,
                credential_id=transcript.credential_id(_POINT),
            )
    try:
        parsed = x509.load_der_x509_certificate(data)
    except ValueError:
        return
    device_ca.summary(parsed)


def _attestation() -> bytes:
    numbers = _KEY.public_key().public_numbers()
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    cose = {1: 2, 3: -7, -1: 1, -2: x, -3: y}
    cred_id = b"\x04" * 16
    auth_data = (
        b"\x11" * 32 + bytes([0x45 | 0x80]) + struct.pack(">I", 1) + b"\x22" * 16
        + struct.pack(">H", len(cred_id)) + cred_id + cbor2.dumps(cose)
        + cbor2.dumps({"hmac-secret": True, "credProtect": 3})
    )
    return encode_enrollment_attestation(
        "packed", auth_data, {"alg": -7, "sig": b"\x30\x06\x02\x01\x01\x02\x01\x01"},
        b"\x11" * 32 + b"\x05" + struct.pack(">I", 2), b"\x30\x06\x02\x01\x01\x02\x01\x01",
    )


_CONFIG = b'''[methods.device]
backend = "pkcs11"
uri = "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so"

[methods.pin]
backend = "tpm2"
tcti = "swtpm:path=/run/s.sock"
allow_unenforced_pin = true

[environment]
SOFTHSM2_CONF = "/etc/softhsm2.conf"

[verifier]
database = "postgresql://localhost/x"

[login]
authdir = "/etc/hsm-auth/login"
timeout = 5
'''

_LOGIN_CRED = {
    "method": "device", "backend": "pkcs11", "settings": {"uri": "pkcs11:token=t"},
    "signing_key": "pkcs11:token=t;id=%01;type=private", "counter_uri": None,
    "public_key": _POINT.hex(),
    "format": "ecdsa-p256-sha256", "counter": 3, "created": 1, "backend_ref": "",
}


# --- file-reading targets ---------------------------------------------------------

_DIR = Path(tempfile.mkdtemp(prefix="hsm-auth-fuzz-"))
os.chmod(_DIR, 0o700)
atexit.register(shutil.rmtree, _DIR, True)


def cleanup() -> None:
    """Remove the scratch directory now (for exits that skip ``atexit``)."""
    shutil.rmtree(_DIR, ignore_errors=True)


def _write(name: str, data: bytes) -> Path:
    path = _DIR / name
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def _config_file(data: bytes) -> None:
    _write("config.toml", data)
    config.load(config.Paths(_DIR))


def _pam_config(data: bytes) -> None:
    """What the PAM module's Python side does with its config before it touches a token."""
    from hsm_auth import pam

    raw = pam.read_config(_write("pam.toml", data))
    config.parse(raw)  # the schema first, as pam.serve does


def _authfile(data: bytes) -> None:
    from hsm_auth.login import AuthDir

    authdir = _DIR / "login"
    authdir.mkdir(mode=0o755, exist_ok=True)
    _write("login/alice", data).chmod(0o644)
    with AuthDir(authdir) as d:
        for cred in d.read("alice") or []:
            _ = cred.public


def _authenticator_state(data: bytes) -> None:
    from hsm_auth.authenticator import Authenticator

    state = _DIR / "authenticator"
    state.mkdir(mode=0o700, exist_ok=True)
    _write("authenticator/credentials.json", data)
    Authenticator(state, config.Config())


def _verifier_identity(data: bytes) -> None:
    from hsm_auth.files import read_json
    from hsm_auth.verifier import VerifierIdentity

    VerifierIdentity.from_json(read_json(_write("identity.json", data)))


def _fido2_state(data: bytes) -> None:
    from hsm_auth_backends.fido2 import STATE_FILE, _CredentialFile

    state = _DIR / "fido2"
    state.mkdir(mode=0o700, exist_ok=True)
    _write(f"fido2/{STATE_FILE}", data)
    _CredentialFile(state).load()


def _tpm2_record(data: bytes) -> None:
    from hsm_auth_backends.tpm2 import Tpm2KeyStore

    state = _DIR / "tpm2"
    state.mkdir(mode=0o700, exist_ok=True)
    _write(f"tpm2/{'0' * 32}.json", data)
    store = Tpm2KeyStore.__new__(Tpm2KeyStore)  # only its state-file reader is used
    store._state_dir = state
    store._read("0" * 32)


# --- the targets ----------------------------------------------------------------


def _decode_all(data: bytes) -> None:
    for kind in (protocol.EnrollmentOffer, protocol.EnrollmentResponse,
                 protocol.VerificationData, protocol.SyncMessage, protocol.SyncReport,
                 protocol.EnrollmentResult, AtcAck):
        with contextlib.suppress(HsmAuthError):
            kind.decode(data)
    protocol.message_kind(data)


def _from_text(data: bytes) -> None:
    text = _text(data)
    for kind in (protocol.EnrollmentOffer, protocol.VerificationData):
        with contextlib.suppress(HsmAuthError):
            kind.from_text(text)
    protocol.SyncMessage.from_text(text)


def _attestation_target(data: bytes) -> None:
    verify_enrollment_attestation(data, _POINT, b"binding", b"\x02" * 60, initial_atc=0)


@functools.cache
def _fido2_statement_setup() -> tuple[Any, Any, Any, bytes]:
    """A FIDO2 proof of possession as webauthn_proof leaves it, a required policy whose
    root file holds a test root, and a packed statement (x5c) that verifies: the seed."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    from hsm_auth.attestation import (
        AttestationMode,
        EnrollmentContext,
        MethodPolicy,
    )
    from hsm_auth.testing import soft_fido2
    from hsm_auth.webauthn_proof import EnrollmentProof

    ca = soft_fido2.make_attestation_ca()
    key = soft_fido2._attestation_key(b"\x22" * 16, ca)
    top = cbor.loads(_attestation(), maps=True)
    auth_data, cdh = top["authData"], b"\x33" * 32
    sig = soft_fido2._p256_key(key.scalar).sign(auth_data + cdh, ec.ECDSA(hashes.SHA256()))
    statement = {"alg": -7, "sig": sig, "x5c": [key.certificate]}
    roots = _write("fido2-roots.pem", ca[0].public_bytes(Encoding.PEM))
    proof = EnrollmentProof(b"\x22" * 16, b"\x04" * 16, b"\x11" * 32, "packed", 2, 3,
                            auth_data, statement, cdh)
    ctx = EnrollmentContext(b"\x01" * 16, "alice", Method.BIOMETRIC, _POINT, None, 0, False)
    policy = MethodPolicy(AttestationMode.REQUIRED, (str(roots),))
    return proof, ctx, policy, cbor2.dumps(statement, canonical=True)


def _fido2_statement(data: bytes) -> None:
    """The attestation statement through python-fido2's verifiers and the policy's roots
    (hsm_auth.attestation_fido2), behind a proof of possession that holds."""
    import dataclasses

    from hsm_auth import attestation_fido2

    proof, ctx, policy, _ = _fido2_statement_setup()
    try:  # leniently: most mutations are not strict CBOR, and the verifiers are the target
        statement = cbor2.loads(data)
    except Exception:  # cbor2 raises many types; its decoding is not what is fuzzed
        return
    if not isinstance(statement, dict):
        return
    fmt = "none" if len(data) % 7 == 0 else "packed"  # both verifiers
    attestation_fido2._check_statement(
        dataclasses.replace(proof, statement=statement, fmt=fmt), ctx, policy, {}
    )


def _uri(data: bytes) -> None:
    text = _text(data)
    with contextlib.suppress(HsmAuthError):
        uri.Pkcs11Uri.parse(text)
    uri.parse_attr_uri(text, "tpm2")


def _methods(data: bytes) -> None:
    from hsm_auth.cli import parse_methods, parse_session_id

    text = _text(data)
    with contextlib.suppress(HsmAuthError):
        parse_session_id(text)
    with contextlib.suppress(HsmAuthError):
        Method.from_code(int.from_bytes(data[:2], "big"))
    parse_methods(text)


def _qr_target(data: bytes) -> None:
    qr.image_target(_text(data))


_VERIFIER: list[object] = []


@functools.cache
def _verifier_enroll_seeds() -> tuple[bytes, ...]:
    """A real verifier (file keys, SQLite) and responses to its offer, signed by a key
    that is not the enrolled one: the whole check runs, up to proof of possession."""
    from hsm_auth.verifier import Verifier

    v = Verifier.init(_DIR / "verifier", "fuzz")
    _VERIFIER.append(v)
    seeds = []
    for method, agreement, wrapped, attestation in (
        (Method.DEVICE, _POINT, None, None),
        (Method.BIOMETRIC, None, b"\x02" * 73, _attestation()),
    ):
        offer = v.create_offer("alice", methods=[method]).offer
        response = protocol.EnrollmentResponse(
            verifier_id=v.identity.verifier_id, offer_id=offer.offer_id, user="alice",
            method=method, backend="pkcs11", signing_key=_POINT, agreement_key=agreement,
            wrapped_otp_key=wrapped, initial_atc=0, attestation=attestation,
            confirmation=b"\x07" * 32,
        )
        sign = None if attestation else _sign_by_another_key
        seeds.append(response.to_text(sign).encode())
    return tuple(seeds)


def _sign_by_another_key(body: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes

    other = ec.derive_private_key(11, ec.SECP256R1())
    return ecutil.der_to_raw(other.sign(body, ec.ECDSA(hashes.SHA256())))


def _verifier_enroll(data: bytes) -> None:
    from hsm_auth.verifier import Verifier

    verifier = _VERIFIER[0]
    assert isinstance(verifier, Verifier)
    logging.disable(logging.CRITICAL)  # the audit log of each refusal
    try:
        verifier.accept_enrollment(_text(data))
    finally:
        logging.disable(logging.NOTSET)


# --- TPM 2.0 attestation (hsm_auth.attestation_tpm2): seeds made in software ------


def _tpm_ecc(x: int, y: int, attributes: int) -> bytes:
    """A TPMT_PUBLIC of an ECC P-256 ECDSA-SHA256 key."""
    return (struct.pack(">HHI", 0x23, 0x0B, attributes) + struct.pack(">H", 0)
            + struct.pack(">HHHHH", 0x10, 0x18, 0x0B, 0x03, 0x10)
            + struct.pack(">H", 32) + x.to_bytes(32, "big") + struct.pack(">H", 32)
            + y.to_bytes(32, "big"))


def _tpm_seeds() -> tuple[bytes, bytes, Any]:
    """(an hsm-auth-tpm2 attestation, a registration request, its checking context)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from hsm_auth import attestation_tpm2 as att
    from hsm_auth.attestation import EnrollmentContext
    from hsm_auth.webauthn_proof import enrollment_binding

    ak = ec.derive_private_key(13, ec.SECP256R1())
    n = ak.public_key().public_numbers()
    ak_public = _tpm_ecc(n.x, n.y, 0x00050472)  # restricted sign, fixedTPM, ...
    n = _KEY.public_key().public_numbers()
    signing = _tpm_ecc(n.x, n.y, 0x00040072)
    otp = (struct.pack(">HHIH", 0x08, 0x0B, 0x00040052, 0) + struct.pack(">HH", 0x05, 0x0B)
           + struct.pack(">H", 32) + bytes(32))
    qualifier = att.certify_qualifier(enrollment_binding(b"\x02" * 16, "alice", Method.PIN))

    def certify(public: bytes) -> tuple[bytes, bytes, bytes]:
        name = att.parse_public(public).name
        attest = (struct.pack(">IH", att.TPM_GENERATED, att.ST_ATTEST_CERTIFY)
                  + att.lp16(name) + att.lp16(qualifier) + bytes(25)
                  + att.lp16(name) + att.lp16(name))
        r, s_ = decode_dss_signature(ak.sign(attest, ec.ECDSA(hashes.SHA256())))
        signature = struct.pack(">HH", 0x18, 0x0B) + att.lp16(r.to_bytes(32, "big")) + att.lp16(
            s_.to_bytes(32, "big"))
        return public, attest, signature

    binding = ecutil.der_to_raw(_KEY.sign(b"x", ec.ECDSA(hashes.SHA256())))
    attestation = att.encode_attestation(
        ak_public, bytes(32), [(bytes(32), binding)], [certify(signing), certify(otp)]
    )
    ek = (struct.pack(">HHIH", 0x01, 0x0B, 0x000300B2, 32) + bytes(32)
          + struct.pack(">HHHHHI", 0x06, 128, 0x43, 0x10, 2048, 0)
          + struct.pack(">H", 256) + b"\xc1" * 256)
    request = att.registration_request(b"0\x82\x01\x00" + bytes(16), ek, ak_public)
    context = EnrollmentContext(b"\x02" * 16, "alice", Method.PIN, _POINT, None, 1, True, _POINT)
    return attestation, request, context


def _tpm_attestation(data: bytes) -> None:
    from hsm_auth import attestation_tpm2
    from hsm_auth.attestation import AttestationMode, MethodPolicy

    _, _, context = _TPM_SEEDS
    attestation_tpm2.check(data, context, MethodPolicy(AttestationMode.IF_AVAILABLE))


def _tpm_registration(data: bytes) -> None:
    from hsm_auth import attestation_tpm2

    attestation_tpm2.registration_challenge(data, (), lambda m: bytes(64))
    attestation_tpm2.parse_challenge(data)


_TPM_SEEDS = _tpm_seeds()


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def targets() -> list[FuzzTarget]:
    messages = _messages()
    texts = tuple(textcode.encode(m).encode() for m in messages.values())
    return [
        FuzzTarget("cbor", lambda d: (cbor.loads(d), cbor.loads(d, maps=True)),
                   tuple(messages.values())),
        FuzzTarget("protocol", _decode_all, tuple(messages.values())),
        FuzzTarget("protocol-text", _from_text, texts),
        FuzzTarget("textcode", lambda d: textcode.decode(_text(d)), texts),
        FuzzTarget("attestation", _attestation_target, (_attestation(),)),
        FuzzTarget("device-certificate", _device_certificate, _certificates()),
        FuzzTarget("fido2-statement", _fido2_statement, (_fido2_statement_setup()[3],)),
        FuzzTarget("verifier-enroll", _verifier_enroll, _verifier_enroll_seeds()),
        FuzzTarget("uri", _uri, (
            b"pkcs11:token=a%20b;id=%01%02;slot-id=3;type=private?module-path=/x.so&pin-source=file:/p",
            b"tpm2:handle=0x81000001;id=abc?tcti=swtpm:path=/s.sock",
        )),
        FuzzTarget("ocra-suite", lambda d: ocra.OcraSuite.parse(_text(d)), (
            b"OCRA-1:HOTP-SHA256-8:C-QH64", b"OCRA-1:HOTP-SHA1-6:QN08-PSHA1-S064-T1M",
        )),
        FuzzTarget("methods", _methods, (b"device,pin", b"00112233445566778899aabbccddeeff")),
        FuzzTarget("qr-target", _qr_target, (b"png:/nonexistent/q.png", b"svg:q.svg")),
        FuzzTarget("config", _config_file, (_CONFIG,)),
        FuzzTarget("pam-config", _pam_config, (_CONFIG,)),
        FuzzTarget("authfile", _authfile, (
            _json({"version": 1, "user": "alice", "credentials": [_LOGIN_CRED]}),
        )),
        FuzzTarget("authenticator-state", _authenticator_state, (
            _json({"version": 1, "verifiers": [{"verifier_id": "01" * 16, "name": "v",
                                                 "signing_key": _POINT.hex()}],
                   "methods": []}),
        )),
        FuzzTarget("verifier-identity", _verifier_identity, (
            _json({"verifier_id": "01" * 16, "name": "v", "lockout_threshold": 5}),
        )),
        FuzzTarget("fido2-state", _fido2_state, (
            _json({"version": 2, "credentials": [{
                "id": "AQID", "rp_id": "hsm-auth", "label": "l", "public": _POINT.hex(),
                "last_sign_count": 1, "atc": 0, "roles": ["otp"], "aaguid": "00" * 16}]}),
        )),
        FuzzTarget("tpm2-attestation", _tpm_attestation, (_TPM_SEEDS[0],)),
        FuzzTarget("tpm2-registration", _tpm_registration, (_TPM_SEEDS[1],)),
        FuzzTarget("tpm2-record", _tpm2_record, (
            _json({"format": 1, "id": "0" * 32, "kind": "counter", "label": "l", "pin": False,
                   "nv_index": "0x01000000"}),
        )),
    ]


def expected(error: BaseException) -> bool:
    """Whether ``error`` keeps the contract (only HsmAuthError subclasses)."""
    return isinstance(error, HsmAuthError)


__all__ = ["FuzzTarget", "StateError", "expected", "targets"]
