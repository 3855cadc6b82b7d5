"""The verifier's device CA: an X.509 certificate for each enrolled signing key
(docs/PROTOCOL.md, "The device certificate").

The CA key is one of the verifier's keys (:class:`~hsm_auth.verifier_keys.VerifierKeys`,
``ca_public`` / ``ca_sign``): derived from the key file's root secret, or a
sign-only P-256 key in the HSM. It signs two kinds of certificate only:

* the **CA certificate**, self-signed, made once at ``verifier init`` and kept
  in the verifier's directory (``ca.pem``, public, mode 0644), printed by
  ``hsm-auth verifier ca-cert``;
* a **device certificate** for each successful enrollment and renewal: subject
  ``UID=<user>, OU=<method>, serialNumber=<credential id, hex>``, issuer the CA
  certificate's subject, a random 159-bit serial, keyUsage digitalSignature
  and basicConstraints CA=false (both critical), subject and authority key
  identifiers, ``notAfter`` the credential's offline expiry (:mod:`hsm_auth.expiry`;
  3 years when it never expires), and the verifier's
  :class:`~hsm_auth.attestation.AttestationResult` in a non-critical private extension
  (:data:`ATTESTATION_OID`)::

      hsmAuthAttestation EXTENSION ::= { SYNTAX UTF8String IDENTIFIED BY
          2.25.247082669378731429492814363386460064207 }

  whose UTF8String is the result's JSON (:meth:`AttestationResult.to_json`:
  ``{"details": {...}, "format": ..., "trust": ..., "verified": ...}``, keys sorted).
  The OID is in the ``2.25`` (UUID) arc of ITU-T X.667, which needs no registration.

Both are built and signed by ``cryptography``'s :class:`~cryptography.x509.CertificateBuilder`.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import ec as ecutil
from . import transcript
from .attestation import AttestationResult
from .errors import StateError, UntrustedMessage
from .files import atomic_write, check_state
from .methods import Method
from .verifier_keys import VerifierKeys

log = logging.getLogger("hsm_auth.device_ca")

#: The CA certificate in the verifier's directory.
CA_CERT_FILE: Final = "ca.pem"
#: The private extension holding the attestation result (a UTF8String of its JSON).
ATTESTATION_OID: Final = x509.ObjectIdentifier("2.25.247082669378731429492814363386460064207")
#: How long the CA certificate and a device certificate are valid.
CA_VALIDITY: Final = datetime.timedelta(days=20 * 365)
DEVICE_VALIDITY: Final = datetime.timedelta(days=3 * 365)
#: ``notBefore`` is this much before the moment of issue, for clocks that lag a little.
BACKDATE: Final = datetime.timedelta(hours=1)
#: What the CA certificate's subject says besides the verifier's name and id.
CA_ORGANIZATION: Final = "hsm-auth device CA"
#: The most UTF-8 the attestation extension holds: a longer result keeps its format,
#: verdict and trust (shortened) and leaves its details out, so that a certificate
#: always fits an EnrollmentResult (``enrollment_messages.MAX_CERTIFICATE``).
MAX_ATTESTATION_JSON: Final = 1024


class _CaKey(ec.EllipticCurvePrivateKey):
    """The verifier's CA key as the X.509 builder takes it: ``sign`` goes to
    :meth:`VerifierKeys.ca_sign` (in the HSM, with one), and nothing else is possible.

    Why the TBSCertificate is not built, signed and assembled into DER by hand (the
    usual way with a key the builder cannot hold): ``cryptography``'s builder takes
    any subclass of ``ec.EllipticCurvePrivateKey`` and calls only its
    ``sign(tbs_bytes, ECDSA(SHA256()))`` (cryptography 50, measured), so the whole
    certificate, its signature algorithm and its encoding come from the builder,
    and one path serves the key file and the HSM. The tests parse every
    certificate back and have ``openssl verify`` check it, so a cryptography that
    stopped taking such a key would fail them, not issue bad certificates."""

    def __init__(self, keys: VerifierKeys) -> None:
        self._keys = keys

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(signature_algorithm, ec.ECDSA) or not isinstance(
            algorithm, hashes.SHA256
        ):
            raise StateError("the device CA key signs with ECDSA P-256 / SHA-256 only")
        return self._keys.ca_sign(bytes(data))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._keys.ca_public

    @property
    def curve(self) -> ec.EllipticCurve:
        return ecutil.CURVE

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise StateError("the device CA key only signs")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise StateError("the device CA key is not exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise StateError("the device CA key is not exported")

    def __copy__(self) -> _CaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _CaKey:
        return self


def _utc(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(now), datetime.UTC)


def _common_name(text: str) -> str:
    """The longest start of ``text`` whose UTF-8 is at most 64 bytes: cryptography
    holds a commonName to 64 bytes (RFC 5280's bound is 64 characters), and a
    verifier name may be 64 characters of up to 4 bytes each."""
    while len(text.encode("utf-8")) > 64:
        text = text[:-1]
    return text


def ca_name(verifier_name: str, verifier_id: bytes) -> x509.Name:
    """The CA's name: :data:`CA_ORGANIZATION`, the verifier's name (cut to fit a
    commonName) and its id (hex), which tells verifiers of one name apart."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name(verifier_name)),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, verifier_id.hex()),
        ]
    )


def device_name(user: str, method: Method, signing_key: bytes) -> x509.Name:
    """A device certificate's subject: the user (userid, RFC 4519: whole, which a
    commonName could not hold for every user name), the method and the credential id."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, user),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, method.value),
            x509.NameAttribute(
                NameOID.SERIAL_NUMBER, transcript.credential_id(signing_key).hex()
            ),
        ]
    )


def make_ca_certificate(
    keys: VerifierKeys, verifier_name: str, verifier_id: bytes, now: float
) -> x509.Certificate:
    """The self-signed CA certificate of ``keys``' CA key."""
    name = ca_name(verifier_name, verifier_id)
    public = keys.ca_public
    start = _utc(now) - BACKDATE
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(_CaKey(keys), hashes.SHA256())
    )


def create_ca_certificate(
    directory: Path, keys: VerifierKeys, verifier_name: str, verifier_id: bytes, now: float
) -> x509.Certificate:
    """Make the CA certificate and write it to ``directory/ca.pem`` (0644: it is public)."""
    cert = make_ca_certificate(keys, verifier_name, verifier_id, now)
    atomic_write(directory / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def load_ca_certificate(
    directory: Path | None, keys: VerifierKeys, verifier_name: str, verifier_id: bytes,
    now: float,
) -> x509.Certificate:
    """The CA certificate in ``directory`` (refused unless it is for ``keys``' CA key).
    A verifier made before the device CA has none: it is made now, once. Without a
    directory (a verifier assembled in memory) one is made and not written."""
    if directory is None:
        return make_ca_certificate(keys, verifier_name, verifier_id, now)
    path = directory / CA_CERT_FILE
    check_state(path, missing_ok=True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("making the device CA certificate of a verifier made before it")
        return create_ca_certificate(directory, keys, verifier_name, verifier_id, now)
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise StateError(f"{path} holds no PEM certificate") from None
    if not ecutil.same_key(_ec_public(cert, str(path)), keys.ca_public):
        raise StateError(f"{path} is not the certificate of this verifier's device CA key")
    return cert


def _ec_public(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise UntrustedMessage(f"{what}: the certificate's key is not a P-256 key")
    return public


def issue(
    keys: VerifierKeys,
    ca_certificate: x509.Certificate,
    *,
    user: str,
    method: Method,
    signing_key: bytes,
    attestation: AttestationResult,
    now: float,
    expires: int = 0,
) -> bytes:
    """The DER device certificate for the credential's ``signing_key`` (SEC1 point).
    ``expires`` is the credential's offline expiry (:mod:`hsm_auth.expiry`): the
    certificate's ``notAfter``; 0 (never): :data:`DEVICE_VALIDITY` after issue."""
    public = ecutil.decode_point(signing_key)
    ca_public = keys.ca_public
    start = _utc(now) - BACKDATE
    end = _utc(expires) if expires else start + DEVICE_VALIDITY
    cert = (
        x509.CertificateBuilder()
        .subject_name(device_name(user, method, signing_key))
        .issuer_name(ca_certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(
                ATTESTATION_OID, _utf8_string(bounded_attestation(attestation).to_json())
            ),
            critical=False,
        )
        .sign(_CaKey(keys), hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def bounded_attestation(result: AttestationResult) -> AttestationResult:
    """``result`` as the certificate carries it: whole if its JSON is at most
    :data:`MAX_ATTESTATION_JSON` bytes, else without details (the verifier's record
    keeps them) and with format and trust cut to 64 and 256 characters."""
    if len(result.to_json().encode("utf-8")) <= MAX_ATTESTATION_JSON:
        return result
    return AttestationResult(
        result.format[:64], result.verified, result.trust[:256],
        {"omitted": "too long for the certificate"},
    )


def _utf8_string(text: str) -> bytes:
    """DER of an ASN.1 UTF8String (tag 12, definite length)."""
    data = text.encode("utf-8")
    if len(data) < 0x80:
        length = bytes([len(data)])
    else:
        size = (len(data).bit_length() + 7) // 8
        length = bytes([0x80 | size]) + len(data).to_bytes(size, "big")
    return b"\x0c" + length + data


def _read_utf8_string(der: bytes) -> str:
    """The text of a DER UTF8String (ValueError if ``der`` is not exactly one)."""
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a UTF8String")
    first, body = der[1], der[2:]
    if first & 0x80:
        size = first & 0x7F
        if not 1 <= size <= 4 or len(body) < size:
            raise ValueError("bad length")
        length, body = int.from_bytes(body[:size], "big"), body[size:]
    else:
        length = first
    if length != len(body):
        raise ValueError("bad length")
    return body.decode("utf-8")


def attestation_of(cert: x509.Certificate) -> AttestationResult | None:
    """The attestation result a device certificate carries (None: no such extension)."""
    try:
        ext = cert.extensions.get_extension_for_oid(ATTESTATION_OID)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension):  # extensions are parsed when first asked for
        raise UntrustedMessage("the certificate's extensions are malformed") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    try:
        return AttestationResult.from_json(_read_utf8_string(value.value))
    except (ValueError, UnicodeDecodeError):
        raise UntrustedMessage("the certificate's attestation extension is malformed") from None


def check_device_certificate(
    certificate: bytes,
    ca_certificate: bytes,
    *,
    user: str,
    method: Method,
    credential_id: bytes,
) -> tuple[x509.Certificate, x509.Certificate]:
    """What the authenticator checks before it stores a certificate (UntrustedMessage
    otherwise): both parse; the CA certificate is self-signed and a CA; the device
    certificate is issued by it, names ``user`` and ``method``, and its key is the
    enrolled credential's signing key (its credential id is ``credential_id``)."""
    try:
        return _check_device_certificate(
            certificate, ca_certificate, user=user, method=method, credential_id=credential_id
        )
    # Names and extensions are parsed when first asked for (a repeated extension is not
    # a ValueError in cryptography).
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension):
        raise UntrustedMessage("the enrollment result's certificate is malformed") from None


def _check_device_certificate(
    certificate: bytes,
    ca_certificate: bytes,
    *,
    user: str,
    method: Method,
    credential_id: bytes,
) -> tuple[x509.Certificate, x509.Certificate]:
    cert = x509.load_der_x509_certificate(certificate)
    ca = x509.load_der_x509_certificate(ca_certificate)
    try:
        ca.verify_directly_issued_by(ca)
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, TypeError, UnsupportedAlgorithm) as e:
        raise UntrustedMessage(
            f"the enrollment result's certificate does not verify ({e.__class__.__name__})"
        ) from None
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UntrustedMessage("the enrollment result's CA certificate is not a CA")
    point = ecutil.encode_point(_ec_public(cert, "the enrollment result"))
    if not hmac.compare_digest(transcript.credential_id(point), credential_id):
        raise UntrustedMessage(
            "the enrollment result's certificate is for another key than the enrolled "
            f"{method.value} method's signing key"
        )
    if cert.subject != device_name(user, method, point):
        raise UntrustedMessage(
            f"the enrollment result's certificate does not name {user!r} and {method.value}"
        )
    return cert, ca


@dataclass(frozen=True)
class CertificateSummary:
    """What ``hsm-auth methods`` shows of a device certificate."""

    subject: str
    issuer: str
    not_before: int
    not_after: int
    serial: str
    fingerprint: str  # SHA-256 of the DER, hex
    attestation: str  # the attestation result's summary ("" if none)

    def to_json(self) -> dict[str, object]:
        return {
            "subject": self.subject, "issuer": self.issuer, "not_before": self.not_before,
            "not_after": self.not_after, "serial": self.serial,
            "fingerprint": self.fingerprint, "attestation": self.attestation,
        }


def name_text(name: x509.Name) -> str:
    """``name`` as its attributes read in order (``UID=alice, OU=device, serialNumber=…``),
    each escaped as RFC 4514 says."""
    names = {NameOID.SERIAL_NUMBER: "serialNumber"}
    return ", ".join(attribute.rfc4514_string(names) for attribute in name)


def summary(cert: x509.Certificate) -> CertificateSummary:
    """What ``hsm-auth methods`` shows of ``cert`` (UntrustedMessage if it is malformed:
    cryptography parses its names and extensions only here)."""
    try:
        return _summary(cert)
    except (ValueError, UnsupportedAlgorithm, x509.DuplicateExtension):
        raise UntrustedMessage("a stored certificate is malformed") from None


def _summary(cert: x509.Certificate) -> CertificateSummary:
    result = attestation_of(cert)
    return CertificateSummary(
        subject=name_text(cert.subject),
        issuer=name_text(cert.issuer),
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
        serial=f"{cert.serial_number:x}",
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        attestation=result.summary if result is not None else "",
    )
