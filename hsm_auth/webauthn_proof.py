"""Proof of possession for enrollments made by a FIDO2 authenticator.

A FIDO2 credential cannot sign arbitrary data, so a FIDO2 enrollment
response is not signed by the new key. Instead it carries, in
``EnrollmentResponse.attestation``, what the authenticator produced while
enrolling, both over the same client data hash:

* the makeCredential attestation (``fmt``, ``authData``, ``attStmt``): the
  credential's public key, its flags (user verified), its extensions
  (``hmac-secret``, ``credProtect``) and, where the format has one, a signature;
* the getAssertion that derived the OTP key (``authData``, ``sig``): a
  signature by the *credential key itself*, whatever the attestation format
  (``packed`` with a vendor certificate is signed by the attestation key,
  ``none`` by nothing), so this is the actual proof of possession. Its
  signature counter must be working (above the credential's); the ATC is not
  the signature counter but the host's own, per credential, starting at 0.

The client data hash binds both to this enrollment: SHA-256 over
:func:`enrollment_binding` (offer id, user, method) and the ephemeral public
point of the wrapped OTP key (:mod:`hsm_auth.key_transport`). Only someone
holding that ephemeral private key or the verifier's agreement key can make
a key-wrap ciphertext under it, so binding the point binds the wrapped OTP
key too: nobody can swap in an OTP key of their own without failing the check.

These are the project's own checks, which python-fido2 does not make. Pure
``cryptography`` + ``cbor2``. The attestation *statement* (its signature, the
``x5c`` certificate requirements and chain) is checked by
:mod:`hsm_auth.attestation_fido2` with python-fido2's verifiers, against the
method's policy; :class:`EnrollmentProof` hands it the statement, the
authenticator data and the client data hash they must cover.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import cbor
from . import ec as ecutil
from .errors import UntrustedMessage
from .methods import Method

__all__ = [
    "BINDING_DOMAIN",
    "EnrollmentProof",
    "client_data_hash",
    "encode_enrollment_attestation",
    "enrollment_binding",
    "verify_enrollment_attestation",
]

BINDING_DOMAIN = b"hsm-auth/enroll/v1"
_CDH_DOMAIN = b"hsm-auth/fido2-client-data/v1"
_MAX_ATTESTATION = 4096

# authenticatorData flags (WebAuthn 6.1)
_UP, _UV, _AT, _ED = 0x01, 0x04, 0x40, 0x80
_ES256 = -7


def _lp(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("field too long for a binding")
    return struct.pack(">H", len(data)) + data


def enrollment_binding(offer_id: bytes, user: str, method: Method | str) -> bytes:
    """The bytes an enrollment proof must cover: which offer, for whom, which method.

    Both sides compute it: the authenticator from the offer it enrolls, the
    verifier from the offer it issued (``offer_id`` is random per offer).
    """
    name = method.value if isinstance(method, Method) else str(method)
    return BINDING_DOMAIN + _lp(offer_id) + _lp(user.encode()) + _lp(name.encode())


def client_data_hash(binding: bytes, otp_key_ephemeral: bytes = b"") -> bytes:
    """The clientDataHash given to makeCredential and to the enrollment getAssertion.

    ``otp_key_ephemeral`` is the SEC1 ephemeral point that starts the wrapped
    OTP key (its first 33 bytes), or empty when no OTP key is wrapped.
    """
    return hashlib.sha256(_CDH_DOMAIN + _lp(binding) + _lp(otp_key_ephemeral)).digest()


def encode_enrollment_attestation(
    fmt: str,
    auth_data: bytes,
    att_stmt: Mapping[str, Any],
    assertion_auth_data: bytes,
    assertion_signature: bytes,
) -> bytes:
    """The ``attestation`` bytes of a FIDO2 enrollment response (canonical CBOR map)."""
    return cbor2.dumps(
        {
            "fmt": fmt,
            "authData": bytes(auth_data),
            "attStmt": dict(att_stmt),
            "assertion": {"authData": bytes(assertion_auth_data), "sig": assertion_signature},
        },
        canonical=True,
    )


@dataclass(frozen=True)
class EnrollmentProof:
    """What a checked FIDO2 enrollment proof says (for the verifier's policy and log)."""

    aaguid: bytes
    credential_id: bytes
    rp_id_hash: bytes
    fmt: str
    sign_count: int  # of the enrollment assertion (the ATC is the host's, from 0)
    cred_protect: int
    #: The makeCredential authenticator data and attestation statement (NOT checked
    #: here: :mod:`hsm_auth.attestation_fido2` does), and the client data hash they cover.
    auth_data: bytes
    statement: Mapping[str, Any]
    client_data_hash: bytes


@dataclass(frozen=True)
class _AuthData:
    rp_id_hash: bytes
    flags: int
    sign_count: int
    aaguid: bytes | None
    credential_id: bytes | None
    cose_key: Mapping[Any, Any] | None
    extensions: Mapping[Any, Any] | None


def _decode_one(stream: io.BytesIO) -> Any:
    return cbor.decode_from(stream, maps=True)


def _parse_auth_data(data: bytes) -> _AuthData:
    if len(data) < 37:
        raise UntrustedMessage("authenticator data too short")
    rp_id_hash, flags, sign_count = data[:32], data[32], struct.unpack(">I", data[33:37])[0]
    stream = io.BytesIO(data[37:])
    aaguid = cred_id = cose = extensions = None
    if flags & _AT:
        head = stream.read(18)
        if len(head) != 18:
            raise UntrustedMessage("attested credential data truncated")
        aaguid, length = head[:16], struct.unpack(">H", head[16:])[0]
        cred_id = stream.read(length)
        if len(cred_id) != length:
            raise UntrustedMessage("credential id truncated")
        cose = _decode_one(stream)
        if not isinstance(cose, dict):
            raise UntrustedMessage("credential public key is not a COSE key")
    if flags & _ED:
        extensions = _decode_one(stream)
        if not isinstance(extensions, dict):
            raise UntrustedMessage("authenticator extensions are not a map")
    if stream.read(1):
        raise UntrustedMessage("trailing bytes after authenticator data")
    return _AuthData(rp_id_hash, flags, sign_count, aaguid, cred_id, cose, extensions)


def _cose_point(cose: Mapping[Any, Any]) -> bytes:
    if cose.get(1) != 2 or cose.get(3) != _ES256 or cose.get(-1) != 1:
        raise UntrustedMessage("the credential is not an ES256 (P-256) key")
    x, y = cose.get(-2), cose.get(-3)
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == 32):
        raise UntrustedMessage("malformed COSE EC2 key")
    return b"\x04" + x + y


def _verify(public: ec.EllipticCurvePublicKey, signature: Any, data: bytes, what: str) -> None:
    if not isinstance(signature, bytes):
        raise UntrustedMessage(f"{what}: no signature")
    try:
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise UntrustedMessage(f"{what}: signature does not verify") from None


def verify_enrollment_attestation(
    attestation: bytes,
    signing_key: bytes,
    binding: bytes,
    wrapped_otp_key: bytes | None = None,
    *,
    initial_atc: int | None = None,
) -> EnrollmentProof:
    """Check a FIDO2 enrollment proof of possession; raise :class:`UntrustedMessage`
    on any failure. The attestation statement is not checked here.

    ``signing_key`` is the SEC1 point the response claims, ``binding`` is
    :func:`enrollment_binding` of the offer, ``wrapped_otp_key`` the
    response's wrapped OTP key (its ephemeral point is bound into the proof),
    ``initial_atc`` (when given) must be 0: the FIDO2 backend keeps each
    credential's ATC on the host, from 0 (the signature counter, shared by all
    of an authenticator's credentials, only guards against clones).
    """
    if not isinstance(attestation, bytes) or not 0 < len(attestation) <= _MAX_ATTESTATION:
        raise UntrustedMessage("missing or oversized FIDO2 enrollment proof")
    try:
        top = cbor.loads(attestation, maps=True)
        if not (isinstance(top, dict) and set(top) == {"fmt", "authData", "attStmt", "assertion"}):
            raise UntrustedMessage("not a FIDO2 enrollment proof")
        fmt, mc_data, stmt, assertion = (
            top["fmt"], top["authData"], top["attStmt"], top["assertion"]
        )
        if not (isinstance(fmt, str) and isinstance(mc_data, bytes) and isinstance(stmt, dict)):
            raise UntrustedMessage("malformed FIDO2 attestation object")
        if not (isinstance(assertion, dict) and set(assertion) == {"authData", "sig"}):
            raise UntrustedMessage("malformed FIDO2 enrollment assertion")
        ga_data, ga_sig = assertion["authData"], assertion["sig"]
        if not isinstance(ga_data, bytes):
            raise UntrustedMessage("malformed FIDO2 enrollment assertion")
        mc, ga = _parse_auth_data(mc_data), _parse_auth_data(ga_data)
        claimed = ecutil.decode_point(signing_key)
    except UntrustedMessage:
        raise
    except Exception:  # cbor2 and struct raise several types on garbage
        raise UntrustedMessage("malformed FIDO2 enrollment proof") from None

    if mc.cose_key is None or mc.credential_id is None or mc.aaguid is None:
        raise UntrustedMessage("the attestation carries no credential")
    point = _cose_point(mc.cose_key)
    if point != claimed.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint):
        raise UntrustedMessage("the attested credential is not the enrolled signing key")
    if not (mc.flags & _UP and mc.flags & _UV):
        raise UntrustedMessage("the credential was not made with user verification")
    ext = mc.extensions or {}
    if ext.get("hmac-secret") is not True:
        raise UntrustedMessage("the credential has no hmac-secret")
    protect = ext.get("credProtect")
    if protect not in (2, 3):
        raise UntrustedMessage("the credential is not protected by credProtect 2 or 3")

    cdh = client_data_hash(binding, (wrapped_otp_key or b"")[:33])

    if ga.rp_id_hash != mc.rp_id_hash:
        raise UntrustedMessage("the enrollment assertion is for another relying party")
    if ga.flags & _AT or not (ga.flags & _UP and ga.flags & _UV):
        raise UntrustedMessage("the enrollment assertion lacks user verification")
    _verify(claimed, ga_sig, ga_data + cdh, "enrollment assertion")
    if ga.sign_count == 0 or ga.sign_count <= mc.sign_count:
        raise UntrustedMessage("the authenticator has no working signature counter")
    if initial_atc is not None and initial_atc != 0:
        raise UntrustedMessage("the initial ATC of a FIDO2 credential must be 0")
    return EnrollmentProof(
        aaguid=mc.aaguid,
        credential_id=mc.credential_id,
        rp_id_hash=mc.rp_id_hash,
        fmt=fmt,
        sign_count=ga.sign_count,
        cred_protect=int(protect),
        auth_data=mc_data,
        statement=stmt,
        client_data_hash=cdh,
    )
