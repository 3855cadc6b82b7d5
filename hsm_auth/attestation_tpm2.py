"""TPM 2.0 attestation: the verifier's side (docs/PROTOCOL.md, "TPM 2.0 attestation").

Two steps, both checked here with ``cryptography`` only (a verifier needs no TPM
library):

* **Registration**, once per TPM and verifier: the authenticator sends its EK
  certificate, the EK's and an attestation key's (AK) public areas
  (:func:`registration_request`). :func:`registration_challenge` checks the EK
  certificate's chain to the policy's roots and the AK's attributes, then makes
  a TPM2_MakeCredential blob for the EK and the AK's name; inside it travels
  the **AK binding**, the verifier's signature over (AK name, EK certificate
  hash, root hash). Only the TPM that holds the EK's private key, with that AK
  loaded, gets it out (TPM2_ActivateCredential): a software AK presented with
  somebody's real EK certificate never gets a binding.
* **Enrollment** (:func:`check`, the ``hsm-auth-tpm2`` checker of
  :mod:`hsm_auth.attestation`): the response's attestation carries the AK, its
  binding by this verifier, and TPM2_Certify statements by the AK over the new
  signing key and OTP key, qualified with this enrollment. The verifier checks
  the binding with its own key and that the root is still in its policy, each
  statement's signature, the certified names against the public areas (and the
  signing key's against the response's key), and the keys' attributes.

TPM structures are parsed from their marshalled form (TPM 2.0 Part 2) by the
small readers below; only the algorithms hsm-auth uses are accepted.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import cbor
from . import ec as ecutil
from .attestation import (
    TPM2_FORMAT,
    AttestationMode,
    AttestationRefused,
    AttestationResult,
    EnrollmentContext,
    MethodPolicy,
    load_roots,
)
from .errors import DecodeError, UntrustedMessage
from .methods import Method
from .transcript import lp16

__all__ = [
    "CHALLENGE_FORMAT",
    "REGISTER_FORMAT",
    "TpmPublic",
    "binding_message",
    "certify_qualifier",
    "check",
    "encode_attestation",
    "make_credential",
    "parse_attest",
    "parse_public",
    "registration_challenge",
    "registration_request",
]

REGISTER_FORMAT: Final = "hsm-auth-tpm2-register"
CHALLENGE_FORMAT: Final = "hsm-auth-tpm2-challenge"
BINDING_DOMAIN: Final = b"hsm-auth/tpm2-ak-binding/v1"
CERTIFY_DOMAIN: Final = b"hsm-auth/tpm2-certify/v1"
MAX_BINDINGS: Final = 4

# TPM 2.0 Part 2 constants (only those used).
TPM_GENERATED: Final = 0xFF544347
ST_ATTEST_CERTIFY: Final = 0x8017
ALG_RSA, ALG_SHA256, ALG_HMAC, ALG_AES = 0x0001, 0x000B, 0x0005, 0x0006
ALG_KEYEDHASH, ALG_NULL, ALG_ECDSA, ALG_ECC, ALG_CFB = 0x0008, 0x0010, 0x0018, 0x0023, 0x0043
ECC_NIST_P256: Final = 0x0003
FIXED_TPM, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 0x2, 0x10, 0x20
USER_WITH_AUTH, ADMIN_WITH_POLICY, NO_DA = 0x40, 0x80, 0x400
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
#: tcg-kp-EKCertificate (TCG EK Credential Profile): an EK certificate's EKU, when it has one.
EK_CERTIFICATE_EKU: Final = x509.ObjectIdentifier("2.23.133.8.1")

_ATTRIBUTE_NAMES = (
    (FIXED_TPM, "fixedTPM"), (FIXED_PARENT, "fixedParent"),
    (SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"), (USER_WITH_AUTH, "userWithAuth"),
    (ADMIN_WITH_POLICY, "adminWithPolicy"), (NO_DA, "noDA"), (RESTRICTED, "restricted"),
    (DECRYPT, "decrypt"), (SIGN, "sign"),
)


def attribute_names(attributes: int) -> str:
    return ",".join(name for bit, name in _ATTRIBUTE_NAMES if attributes & bit)


# --- marshalled TPM structures ------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise AttestationRefused(f"malformed {self._what} (truncated)")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())

    def end(self) -> None:
        if self._pos != len(self._data):
            raise AttestationRefused(f"malformed {self._what} (trailing bytes)")


@dataclass(frozen=True)
class TpmPublic:
    """A TPMT_PUBLIC: the fields hsm-auth checks, and its exact bytes (for the name)."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # (algorithm, key bits, mode); (ALG_NULL, 0, 0) if none
    scheme: tuple[int, int]  # (scheme, hash); (ALG_NULL, 0) if none
    curve: int = 0
    ecc_point: tuple[bytes, bytes] = (b"", b"")
    rsa_bits: int = 0
    rsa_exponent: int = 0
    rsa_modulus: bytes = b""

    @property
    def name(self) -> bytes:
        """The object's name: nameAlg || SHA-256(TPMT_PUBLIC) (only SHA-256 names)."""
        return struct.pack(">H", ALG_SHA256) + hashlib.sha256(self.raw).digest()

    def has(self, bits: int) -> bool:
        return self.attributes & bits == bits

    def ec_public(self) -> ec.EllipticCurvePublicKey:
        if self.type != ALG_ECC or self.curve != ECC_NIST_P256:
            raise AttestationRefused("the key is not an ECC P-256 key")
        x, y = (int.from_bytes(c, "big") for c in self.ecc_point)
        try:
            return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except ValueError:
            raise AttestationRefused("the key's point is not on P-256") from None

    def rsa_public(self) -> rsa.RSAPublicKey:
        if self.type != ALG_RSA:
            raise AttestationRefused("the key is not an RSA key")
        exponent = self.rsa_exponent or 65537
        try:
            return rsa.RSAPublicNumbers(
                exponent, int.from_bytes(self.rsa_modulus, "big")
            ).public_key()
        except ValueError:
            raise AttestationRefused("the key is not a valid RSA key") from None


def parse_public(data: bytes) -> TpmPublic:
    """A marshalled TPMT_PUBLIC of an ECC, RSA or keyedhash object with a SHA-256 name."""
    r = _Reader(data, "TPM public area")
    kind, name_alg, attributes = r.u16(), r.u16(), r.u32()
    policy = r.sized()
    if name_alg != ALG_SHA256:
        raise AttestationRefused("a TPM public area whose name algorithm is not SHA-256")
    fields: dict[str, Any] = {}
    symmetric = (ALG_NULL, 0, 0)
    if kind in (ALG_RSA, ALG_ECC):
        alg = r.u16()
        if alg != ALG_NULL:
            symmetric = (alg, r.u16(), r.u16())
    scheme = (r.u16(), 0)
    if scheme[0] != ALG_NULL:
        scheme = (scheme[0], r.u16())
    if kind == ALG_ECC:
        fields["curve"] = r.u16()
        if r.u16() != ALG_NULL:  # the KDF scheme: hsm-auth's keys have none
            raise AttestationRefused("an ECC key with a KDF scheme")
        fields["ecc_point"] = (r.sized(), r.sized())
    elif kind == ALG_RSA:
        fields["rsa_bits"], fields["rsa_exponent"] = r.u16(), r.u32()
        fields["rsa_modulus"] = r.sized()
    elif kind == ALG_KEYEDHASH:
        if scheme[0] not in (ALG_HMAC, ALG_NULL):
            raise AttestationRefused("a keyedhash object that is not an HMAC key")
        r.sized()  # unique: a hash of the secret and a seed, nothing to check
    else:
        raise AttestationRefused(f"a TPM object of type 0x{kind:04x}")
    r.end()
    return TpmPublic(bytes(data), kind, name_alg, attributes, policy, symmetric, scheme, **fields)


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY."""

    signer: bytes  # qualifiedSigner
    extra_data: bytes
    name: bytes
    qualified_name: bytes


def parse_attest(data: bytes) -> Attest:
    r = _Reader(data, "TPM certify statement")
    if r.u32() != TPM_GENERATED:
        raise AttestationRefused("the certify statement was not made by a TPM (magic)")
    if r.u16() != ST_ATTEST_CERTIFY:
        raise AttestationRefused("the statement is not a TPM2_Certify statement")
    signer, extra = r.sized(), r.sized()
    r.u64(), r.u32(), r.u32(), r.u8()  # clockInfo: clock, resetCount, restartCount, safe
    r.u64()  # firmwareVersion
    name, qualified = r.sized(), r.sized()
    r.end()
    return Attest(signer, extra, name, qualified)


def parse_ecdsa_signature(data: bytes) -> bytes:
    """A TPMT_SIGNATURE, ECDSA with SHA-256, as DER."""
    r = _Reader(data, "TPM signature")
    if r.u16() != ALG_ECDSA or r.u16() != ALG_SHA256:
        raise AttestationRefused("the statement's signature is not ECDSA-SHA256")
    sig_r, sig_s = r.sized(), r.sized()
    r.end()
    return encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))


# --- TPM2_MakeCredential, in software (TPM 2.0 Part 1, "Credential Protection") ---------


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (SP 800-108 counter mode with HMAC), as the TPM computes it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key,
            struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
            + struct.pack(">I", bits),
            hashlib.sha256,
        ).digest()
    return out[: (bits + 7) // 8]


def make_credential(ek: TpmPublic, name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential for an RSA EK (AES-CFB, SHA-256 name): the marshalled
    TPM2B_ID_OBJECT credential blob and TPM2B_ENCRYPTED_SECRET. Only the TPM holding
    the EK's private key, with the object ``name`` loaded, recovers ``credential``."""
    if ek.type != ALG_RSA or ek.symmetric[0] != ALG_AES or ek.symmetric[2] != ALG_CFB:
        raise AttestationRefused("only RSA endorsement keys with AES-CFB are supported")
    if not 0 < len(credential) <= 32:
        raise ValueError("a credential is 1..32 bytes (the EK's name digest)")
    seed = os.urandom(32)
    oaep = asym_padding.OAEP(
        mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\x00"
    )
    secret = ek.rsa_public().encrypt(seed, oaep)
    sym_key = kdfa(seed, b"STORAGE", name, b"", ek.symmetric[1])
    # The TPM's parameter and credential encryption is AES-CFB (a "decrepit" mode to
    # cryptography, which keeps it there for such interoperability).
    from cryptography.hazmat.decrepit.ciphers.modes import CFB

    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(lp16(credential)) + encryptor.finalize()
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 256)
    integrity = hmac.new(hmac_key, enc_identity + name, hashlib.sha256).digest()
    return lp16(lp16(integrity) + enc_identity), lp16(secret)


# --- the EK certificate ----------------------------------------------------------------


@dataclass(frozen=True)
class _Roots:
    anchors: tuple[x509.Certificate, ...]  # self-signed: trust anchors
    intermediates: tuple[x509.Certificate, ...]  # the rest of the files: chain building only


def _load_roots(paths: Sequence[str]) -> _Roots:
    certs = load_roots(paths)
    return _Roots(
        tuple(c for c in certs if c.subject == c.issuer),
        tuple(c for c in certs if c.subject != c.issuer),
    )


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def verify_ek_certificate(
    certificate: bytes, ek: TpmPublic, roots: Sequence[str], now: datetime.datetime
) -> x509.Certificate:
    """The trust anchor that the EK certificate chains to, or AttestationRefused.

    Checked with ``cryptography.x509.verification`` (an EK certificate has no
    subject name to match and TCG extensions: its own extension policy is
    anything, the CAs' the Web PKI defaults), plus: the certified key is the
    EK's, and an extended key usage, if present, is tcg-kp-EKCertificate."""
    from cryptography.x509 import verification as v

    try:
        leaf = x509.load_der_x509_certificate(certificate)
    except ValueError:
        raise AttestationRefused("the EK certificate is not a DER certificate") from None
    loaded = _load_roots(roots)
    if not loaded.anchors:
        raise AttestationRefused("the policy names no TPM manufacturer root (roots)")
    builder = (
        v.PolicyBuilder()
        .store(v.Store(list(loaded.anchors)))
        .time(now)
        .extension_policies(
            ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=v.ExtensionPolicy.permit_all(),
        )
    )
    try:
        chain = builder.build_client_verifier().verify(leaf, list(loaded.intermediates)).chain
    except v.VerificationError as e:
        raise AttestationRefused(
            f"the TPM's EK certificate (issuer {leaf.issuer.rfc4514_string()!r}) does not "
            f"chain to a configured TPM manufacturer root: {e}"
        ) from None
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if EK_CERTIFICATE_EKU not in usage:
            raise AttestationRefused("the EK certificate's key usage is not tcg-kp-EKCertificate")
    except x509.ExtensionNotFound:
        pass
    key = leaf.public_key()
    ek_numbers = ek.rsa_public().public_numbers()
    if not isinstance(key, rsa.RSAPublicKey) or key.public_numbers() != ek_numbers:
        raise AttestationRefused("the EK certificate is not for the TPM's endorsement key")
    return chain[-1]


# --- registration ---------------------------------------------------------------------


def _check_ek(ek: TpmPublic) -> None:
    if ek.type != ALG_RSA or not ek.has(FIXED_TPM | FIXED_PARENT | RESTRICTED | DECRYPT):
        raise AttestationRefused("the endorsement key is not a restricted RSA decryption key")
    if ek.rsa_bits != 2048 or len(ek.rsa_modulus) != 256:
        raise AttestationRefused("the endorsement key is not an RSA 2048 key")


def _check_ak(ak: TpmPublic) -> None:
    """An AK signs only what the TPM makes (restricted), never leaves it (fixedTPM),
    was made in it (sensitiveDataOrigin), with ECDSA-SHA256 on P-256."""
    wanted = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN
    if not ak.has(wanted) or ak.attributes & DECRYPT:
        raise AttestationRefused(
            f"the attestation key's attributes ({attribute_names(ak.attributes)}) are not "
            "those of a TPM attestation key (fixedTPM, fixedParent, sensitiveDataOrigin, "
            "restricted, sign)"
        )
    if ak.scheme != (ALG_ECDSA, ALG_SHA256):
        raise AttestationRefused("the attestation key's scheme is not ECDSA-SHA256")
    ak.ec_public()


def registration_request(ek_certificate: bytes, ek_public: bytes, ak_public: bytes) -> bytes:
    """What the authenticator sends to register its TPM (a CBOR map)."""
    return cbor2.dumps(
        {"fmt": REGISTER_FORMAT, "ekCert": ek_certificate, "ekPub": ek_public, "akPub": ak_public},
        canonical=True,
    )


def binding_message(ak_name: bytes, ek_cert_hash: bytes, root_hash: bytes) -> bytes:
    """What the verifier signs as the AK binding: this AK is in the TPM whose EK
    certificate (by hash) chains to this root (by hash of its DER)."""
    return BINDING_DOMAIN + lp16(ak_name) + lp16(ek_cert_hash) + lp16(root_hash)


def _map(data: bytes, fmt: str, keys: Mapping[str, type], what: str) -> dict[str, Any]:
    try:
        top = cbor.loads(data, maps=True)
    except DecodeError:
        raise AttestationRefused(f"malformed {what}") from None
    if not isinstance(top, dict) or top.get("fmt") != fmt:
        raise AttestationRefused(f"not a {what}")
    if set(top) != {"fmt", *keys}:
        raise AttestationRefused(f"malformed {what} (keys)")
    for key, kind in keys.items():
        if not isinstance(top[key], kind):
            raise AttestationRefused(f"malformed {what} ({key})")
    return top


def registration_challenge(
    request: bytes,
    roots: Sequence[str],
    sign_raw: Callable[[bytes], bytes],
    *,
    now: datetime.datetime | None = None,
) -> bytes:
    """The verifier's answer to a registration request, or AttestationRefused.

    The EK certificate must chain to one of ``roots`` and the AK must be an
    attestation key. The answer is a TPM2_MakeCredential blob for the EK and the
    AK's name around a fresh 32-byte key K, and, under AES-256-GCM with K (nonce
    0, associated data the AK's name: K is used once), the root's hash and the
    AK binding ``sign_raw(binding_message(...))``."""
    top = _map(request, REGISTER_FORMAT, {"ekCert": bytes, "ekPub": bytes, "akPub": bytes},
               "TPM registration request")
    ek, ak = parse_public(top["ekPub"]), parse_public(top["akPub"])
    _check_ek(ek)
    _check_ak(ak)
    when = now or datetime.datetime.now(datetime.UTC)
    anchor = verify_ek_certificate(top["ekCert"], ek, roots, when)
    root_hash = hashlib.sha256(_der(anchor)).digest()
    ek_hash = hashlib.sha256(top["ekCert"]).digest()
    signature = sign_raw(binding_message(ak.name, ek_hash, root_hash))
    key = os.urandom(32)
    blob, secret = make_credential(ek, ak.name, key)
    sealed = AESGCM(key).encrypt(bytes(12), root_hash + signature, ak.name)
    return cbor2.dumps(
        {"fmt": CHALLENGE_FORMAT, "credential": blob, "secret": secret, "binding": sealed},
        canonical=True,
    )


def parse_challenge(challenge: bytes) -> tuple[bytes, bytes, bytes]:
    """(credential blob, encrypted secret, sealed binding) of a registration challenge."""
    top = _map(challenge, CHALLENGE_FORMAT,
               {"credential": bytes, "secret": bytes, "binding": bytes},
               "TPM registration challenge")
    return top["credential"], top["secret"], top["binding"]


def open_binding(key: bytes, ak_name: bytes, sealed: bytes) -> tuple[bytes, bytes]:
    """(root hash, AK binding) from a challenge's sealed binding and the activated K."""
    from cryptography.exceptions import InvalidTag

    try:
        plain = AESGCM(key).decrypt(bytes(12), sealed, ak_name)
    except InvalidTag:
        raise UntrustedMessage("the registration challenge is not for this TPM's key") from None
    if len(plain) != 32 + 64:
        raise UntrustedMessage("malformed AK binding")
    return plain[:32], plain[32:]


# --- enrollment -----------------------------------------------------------------------


def certify_qualifier(binding: bytes) -> bytes:
    """TPM2_Certify's qualifyingData for an enrollment: SHA-256 over a domain tag and
    the enrollment binding (offer id, user, method: webauthn_proof.enrollment_binding)."""
    return hashlib.sha256(CERTIFY_DOMAIN + lp16(binding)).digest()


def encode_attestation(
    ak_public: bytes,
    ek_cert_hash: bytes,
    bindings: Sequence[tuple[bytes, bytes]],
    certified: Sequence[tuple[bytes, bytes, bytes]],
) -> bytes:
    """The ``attestation`` of a TPM enrollment response (a CBOR map): the AK, the
    hash of the EK certificate, the AK bindings (root hash, signature) the TPM has,
    and the certify statements (public area, TPMS_ATTEST, TPMT_SIGNATURE) of the
    signing key and then the OTP key."""
    return cbor2.dumps(
        {
            "fmt": TPM2_FORMAT,
            "akPub": ak_public,
            "ekCertHash": ek_cert_hash,
            "bindings": [[r, s] for r, s in bindings],
            "certify": [[p, a, s] for p, a, s in certified],
        },
        canonical=True,
    )


def _verify_statement(ak: ec.EllipticCurvePublicKey, entry: Any, qualifier: bytes,
                      what: str) -> TpmPublic:
    from cryptography.exceptions import InvalidSignature

    if not (
        isinstance(entry, list) and len(entry) == 3 and all(isinstance(b, bytes) for b in entry)
    ):
        raise AttestationRefused("malformed TPM attestation (certify)")
    public, attest, signature = entry
    try:
        ak.verify(parse_ecdsa_signature(signature), attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationRefused(
            f"the {what}'s certify statement is not signed by the registered attestation key"
        ) from None
    statement = parse_attest(attest)
    if not hmac.compare_digest(statement.extra_data, qualifier):
        raise AttestationRefused(f"the {what}'s certify statement is not for this enrollment")
    key = parse_public(public)
    if not hmac.compare_digest(statement.name, key.name):
        raise AttestationRefused(f"the certified key is not the {what}")
    return key


def _check_key(key: TpmPublic, method: Method, what: str) -> None:
    """fixedTPM and fixedParent; the auth value as the only way in (userWithAuth, no
    policy, no admin policy); no noDA for a ``pin`` key (its auth value is the PIN).
    A TPM does not reveal whether an auth value is empty: that a ``pin`` key has
    one is the authenticator's word, noDA the TPM's."""
    wanted = FIXED_TPM | FIXED_PARENT | USER_WITH_AUTH | SIGN
    if not key.has(wanted) or key.attributes & (DECRYPT | ADMIN_WITH_POLICY) or key.auth_policy:
        raise AttestationRefused(
            f"the {what}'s attributes ({attribute_names(key.attributes)}) are not "
            "fixedTPM, fixedParent, userWithAuth, sign without a policy"
        )
    if method is Method.PIN and key.attributes & NO_DA:
        raise AttestationRefused(f"the {what} of a pin method is noDA (wrong PINs would not count)")


def check(attestation: bytes, ctx: EnrollmentContext, policy: MethodPolicy) -> AttestationResult:
    """The ``hsm-auth-tpm2`` checker (see the module docstring)."""
    from .webauthn_proof import enrollment_binding

    top = _map(
        attestation, TPM2_FORMAT,
        {"akPub": bytes, "ekCertHash": bytes, "bindings": list, "certify": list},
        "TPM attestation",
    )
    if not ctx.signed:
        raise AttestationRefused("a TPM enrollment response must be signed by its signing key")
    if len(top["certify"]) != 2 or len(top["bindings"]) > MAX_BINDINGS:
        raise AttestationRefused("malformed TPM attestation (certify, bindings)")
    ak_area = parse_public(top["akPub"])
    _check_ak(ak_area)
    ak = ak_area.ec_public()
    qualifier = certify_qualifier(enrollment_binding(ctx.offer_id, ctx.user, ctx.method))
    signing = _verify_statement(ak, top["certify"][0], qualifier, "signing key")
    otp = _verify_statement(ak, top["certify"][1], qualifier, "OTP key")
    if signing.type != ALG_ECC or not ecutil.same_key(
        signing.ec_public(), ecutil.decode_point(ctx.signing_key)
    ):
        raise AttestationRefused("the certified signing key is not the response's signing key")
    if not signing.has(SENSITIVE_DATA_ORIGIN):
        raise AttestationRefused("the signing key was not generated in the TPM")
    _check_key(signing, ctx.method, "signing key")
    if otp.type != ALG_KEYEDHASH or otp.scheme != (ALG_HMAC, ALG_SHA256):
        raise AttestationRefused("the certified OTP key is not an HMAC-SHA256 key")
    _check_key(otp, ctx.method, "OTP key")
    details = {
        "ak": ak_area.name.hex()[4:20],
        "ek_certificate": bytes(top["ekCertHash"]).hex()[:16],
        "signing_key": attribute_names(signing.attributes),
        "otp_key": attribute_names(otp.attributes) + " (imported: PROTOCOL.md 7.2)",
    }
    trust, reason = _binding(top, ak_area.name, ctx, policy)
    if reason:
        if policy.attestation is AttestationMode.REQUIRED:
            raise AttestationRefused(f"the {ctx.method.value} method requires a verified "
                                     f"TPM attestation: {reason}")
        return AttestationResult(TPM2_FORMAT, False, "", {**details, "unverified": reason})
    return AttestationResult(TPM2_FORMAT, True, trust, details)


def _binding(top: Mapping[str, Any], ak_name: bytes, ctx: EnrollmentContext,
             policy: MethodPolicy) -> tuple[str, str]:
    """(the root's subject, "") for an AK binding by this verifier whose root the
    policy names; else ("", why not)."""
    if not ctx.verifier_signing_key:
        return "", "the verifier's key is unknown to the checker"
    verifier = ecutil.decode_point(ctx.verifier_signing_key)
    anchors = {hashlib.sha256(_der(c)).digest(): c for c in _load_roots(policy.roots).anchors}
    ek_hash = top["ekCertHash"]
    for entry in top["bindings"]:
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(b, bytes) for b in entry)):
            raise AttestationRefused("malformed TPM attestation (bindings)")
        root_hash, signature = entry
        try:
            ecutil.verify(verifier, signature, binding_message(ak_name, ek_hash, root_hash))
        except UntrustedMessage:
            continue  # another verifier's binding
        anchor = anchors.get(root_hash)
        if anchor is None:
            return "", "the TPM's EK certificate chains to a root the policy no longer names"
        return anchor.subject.rfc4514_string(), ""
    return "", ("the TPM's attestation key is not registered with this verifier "
                "(no credential activation: hsm-auth tpm register)")

