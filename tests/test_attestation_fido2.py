"""FIDO2 attestation under the verifier's policy (issue 11), end to end: the software
authenticator behind python-fido2's CTAP client makes a packed attestation whose
certificate chains to its test root; the verifier checks it with python-fido2's
verifiers against policy.toml. Forged chains are made by editing the real response."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsm_auth.attestation import (
    POLICY_FILE,
    SOFT_AUTHENTICATOR_AAGUID,
    AttestationMode,
    AttestationRefused,
    AttestationResult,
    MethodPolicy,
    VerifierPolicy,
)
from hsm_auth.audit import Event, Reason
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig, Paths
from hsm_auth.errors import ConfigError, UnknownMethod
from hsm_auth.files import atomic_write
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentResponse
from hsm_auth.verifier import Verifier

pytest.importorskip("fido2")
from hsm_auth.testing.fido2 import SOFT_ROOTS_FILE, write_soft_policy
from hsm_auth.testing.soft_fido2 import (
    SOFT_AAGUID,
    SoftAuthenticator,
    UvModality,
    make_attestation_ca,
)

pytestmark = pytest.mark.fido2

Factory = Callable[..., SoftAuthenticator]


@dataclasses.dataclass
class Setup:
    home: Path
    device: SoftAuthenticator
    verifier: Verifier

    @property
    def verifier_dir(self) -> Path:
        return Paths(self.home).verifier_dir

    config: Config
    authenticators: list[Authenticator] = dataclasses.field(default_factory=list)

    def response(self, method: Method = Method.BIOMETRIC) -> str:
        """A fresh enrollment response (each from a fresh authenticator directory, on
        the same device: the refused ones stay enrolled on the authenticator side)."""
        offer = self.verifier.create_offer("alice", methods=[method])
        auth = Authenticator(self.home / f"auth{len(self.authenticators)}", self.config)
        self.authenticators.append(auth)
        return auth.add_or_update(method, offer.text, activation_code=offer.activation_code)

    def policy(self, text: str) -> None:
        atomic_write(self.verifier_dir / POLICY_FILE, text.encode())
        self.verifier.policy = VerifierPolicy.load(self.verifier_dir)

    def refusals(self) -> list[tuple[Reason | None, str | None]]:
        return [
            (r.reason, r.detail) for r in self.verifier.store.audit_records("alice")
            if r.event is Event.ENROLL_REFUSED
        ]


def _settings(device: SoftAuthenticator, home: Path) -> dict[str, object]:
    return {
        "device": f"soft:{device.path}",
        "state_dir": str(home / "fido2-state"),
        "prompts": False,
        "allow_software_authenticator": True,
    }


@pytest.fixture
def make_setup(tmp_path: Path, soft_fido2_factory: Factory) -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(device: SoftAuthenticator | None = None, *, policy: bool = True) -> Setup:
        home = tmp_path / f"home{len(made)}"
        device = device or soft_fido2_factory(uv_modality=UvModality.FINGERPRINT)
        if policy:
            write_soft_policy(Paths(home).verifier_dir, [device])
        verifier = Verifier.init(Paths(home).verifier_dir, "Bank")
        config = Config(methods={
            m: MethodConfig("fido2", _settings(device, home))
            for m in (Method.BIOMETRIC, Method.FACE)
        })
        setup = Setup(home, device, verifier, config)
        made.append(setup)
        return setup

    yield make
    for s in made:
        for a in s.authenticators:
            a.close()
        s.verifier.close()


def _stored(setup: Setup, method: Method = Method.BIOMETRIC) -> AttestationResult:
    stored = setup.verifier.credential("alice", method).attestation
    assert stored is not None
    return AttestationResult.from_json(stored)


def _edit_statement(text: str, edit: Callable[[dict[str, Any]], None]) -> str:
    """The same enrollment response with its attestation statement edited."""
    response, _ = EnrollmentResponse.from_text(text)
    assert response.attestation is not None
    top = cbor2.loads(response.attestation)
    edit(top["attStmt"])
    forged = cbor2.dumps(top, canonical=True)
    return dataclasses.replace(response, attestation=forged).to_text(None)


def _refused(setup: Setup, text: str, match: str) -> str:
    with pytest.raises(AttestationRefused, match=match) as raised:
        setup.verifier.accept_enrollment(text)
    with pytest.raises(UnknownMethod):
        setup.verifier.credential("alice", Method.BIOMETRIC)  # nothing stored
    reason, detail = setup.refusals()[-1]
    assert reason is Reason.ATTESTATION and detail == str(raised.value)[:200]
    assert "\n" not in str(raised.value)
    return str(raised.value)


# --- accepted --------------------------------------------------------------------------


def test_a_packed_attestation_chaining_to_the_test_root_is_verified_stored_and_shown(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    assert setup.verifier.policy.for_method(Method.BIOMETRIC).attestation is (
        AttestationMode.REQUIRED
    )
    setup.verifier.accept_enrollment(setup.response())
    result = _stored(setup)
    root = setup.device.attestation_root.subject.rfc4514_string()
    assert result == AttestationResult("packed", True, root, {"aaguid": SOFT_AAGUID.hex()})
    setup.verifier.close()
    shown = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(setup.home), "verifier", "show",
         "--user", "alice"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert f"packed, verified ({root}), aaguid {SOFT_AAGUID.hex()}" in shown


def test_the_default_policy_requires_attestation_for_fido2_methods_only() -> None:
    policy = VerifierPolicy.default()
    for method in Method:
        want = AttestationMode.REQUIRED if method in (Method.BIOMETRIC, Method.FACE) else (
            AttestationMode.IF_AVAILABLE
        )
        assert policy.for_method(method).attestation is want
    # a table that does not say keeps the method's default
    parsed = VerifierPolicy.parse({"methods": {"face": {"aaguid_deny": []}, "pin": {}}})
    assert parsed.for_method(Method.FACE).attestation is AttestationMode.REQUIRED
    assert parsed.for_method(Method.PIN).attestation is AttestationMode.IF_AVAILABLE
    assert SOFT_AUTHENTICATOR_AAGUID == SOFT_AAGUID


# --- refused under the default policy, each with its one-line reason -------------------


def test_the_software_authenticator_is_refused_by_the_default_policy(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup(policy=False)
    _refused(setup, setup.response(), "software test authenticator .* aaguid_allow")


def test_none_attestation_is_refused_by_required_and_recorded_under_if_available(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    setup = make_setup(soft_fido2_factory(attestation="none"))
    _refused(setup, setup.response(), "requires a verified attestation: .*'none'")
    setup.policy((setup.verifier_dir / POLICY_FILE).read_text().replace(
        '"required"', '"if-available"'))
    setup.verifier.accept_enrollment(setup.response())
    assert _stored(setup) == AttestationResult("none", False, "", {"aaguid": SOFT_AAGUID.hex()})


def test_self_attestation_has_no_chain(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    setup = make_setup(soft_fido2_factory(attestation="self"))
    _refused(setup, setup.response(), "self attestation has no certificate chain")


def test_a_chain_to_an_unknown_root_is_refused(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    trusted = soft_fido2_factory()
    other = soft_fido2_factory(attestation_ca=make_attestation_ca("another vendor root"))
    setup = make_setup(other, policy=False)
    write_soft_policy(setup.verifier_dir, [other])
    atomic_write(  # the policy's roots file holds only the trusted device's root
        setup.verifier_dir / SOFT_ROOTS_FILE,
        trusted.attestation_root.public_bytes(Encoding.PEM),
    )
    setup.policy((setup.verifier_dir / POLICY_FILE).read_text())
    reason = _refused(setup, setup.response(), "ends at no configured root")
    assert "CN=another vendor root" in reason


def test_an_unknown_root_with_the_same_name_is_refused(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    # Same subject as the configured root, another key: the chain's signature decides.
    trusted, other = soft_fido2_factory(), soft_fido2_factory()
    assert trusted.attestation_root.subject == other.attestation_root.subject
    setup = make_setup(other)
    atomic_write(setup.verifier_dir / SOFT_ROOTS_FILE,
                 trusted.attestation_root.public_bytes(Encoding.PEM))
    _refused(setup, setup.response(), "does not verify up to the configured root")


def _flip_in_leaf_name(stmt: dict[str, Any]) -> None:
    leaf = bytearray(stmt["x5c"][0])
    at = bytes(leaf).index(b"soft-fido2 (software")
    leaf[at] ^= 0x01  # "roft-fido2": still a certificate, its issuer's signature broken
    stmt["x5c"][0] = bytes(leaf)


def test_a_flipped_byte_in_the_certificate_is_refused(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    text = _edit_statement(setup.response(), _flip_in_leaf_name)
    _refused(setup, text, "does not verify up to the configured root")


def test_a_certificate_of_another_key_is_refused_under_every_checking_policy(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    # Another authenticator's certificate from the SAME test CA: its chain is good,
    # but its key did not sign this attestation.
    ca = make_attestation_ca()
    device, other = soft_fido2_factory(attestation_ca=ca), soft_fido2_factory(attestation_ca=ca)
    setup = make_setup(device)
    swapped = other.attestation_certificate.public_bytes(Encoding.DER)

    def swap(stmt: dict[str, Any]) -> None:
        stmt["x5c"] = [swapped]

    _refused(setup, _edit_statement(setup.response(), swap), "statement does not verify")
    setup.policy((setup.verifier_dir / POLICY_FILE).read_text().replace(
        '"required"', '"if-available"'))
    _refused(setup, _edit_statement(setup.response(), swap), "statement does not verify")


def _unknown_key_algorithm_cert() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation")])
    now = datetime.datetime.now(datetime.UTC)
    der = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    ).public_bytes(Encoding.DER)
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey -> an unknown OID
    return der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(x5c=[_unknown_key_algorithm_cert()]), "statement does not verify"),
        (lambda s: s.update(x5c=[b"\x30\x03\x02\x01\x00"]), "statement does not verify"),
        (lambda s: s.update(x5c=[]), "self attestation|statement does not verify"),
        (lambda s: s.update(alg=-257), "statement does not verify"),
        (lambda s: s.pop("sig"), "statement does not verify"),
    ],
    ids=["unknown-key-algorithm", "garbage-certificate", "empty-x5c", "wrong-alg", "no-sig"],
)
def test_a_malformed_statement_is_one_clear_refusal(
    make_setup: Callable[..., Setup], edit: Callable[[dict[str, Any]], None], match: str,
) -> None:
    setup = make_setup()
    _refused(setup, _edit_statement(setup.response(), edit), match)


# --- allowed when the policy says so ---------------------------------------------------


def test_each_refusal_is_allowed_when_the_policy_says_so(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory,
) -> None:
    setup = make_setup(policy=False)
    aaguid = SOFT_AAGUID.hex()
    # the software authenticator's AAGUID named, attestation not checked at all
    setup.policy(f'[methods.biometric]\nattestation = "none"\naaguid_allow = ["{aaguid}"]\n')
    setup.verifier.accept_enrollment(_edit_statement(setup.response(), _flip_in_leaf_name))
    assert _stored(setup) == AttestationResult("not-checked", False, "", {"aaguid": aaguid})
    # if-available: an unverified chain is recorded as such
    setup = make_setup(policy=False)
    setup.policy(f'[methods.biometric]\nattestation = "if-available"\n'
                 f'aaguid_allow = ["{aaguid}"]\n')
    setup.verifier.accept_enrollment(_edit_statement(setup.response(), _flip_in_leaf_name))
    assert _stored(setup) == AttestationResult("packed", False, "", {"aaguid": aaguid})


def test_allow_and_deny_lists(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    aaguid = SOFT_AAGUID.hex()
    text = (setup.verifier_dir / POLICY_FILE).read_text()
    setup.policy(text.replace(f'aaguid_allow = ["{aaguid}"]',
                              f'aaguid_allow = ["{aaguid}"]\naaguid_deny = ["{aaguid}"]'))
    _refused(setup, setup.response(), "denied by the policy")
    setup.policy(text.replace(aaguid, "00" * 16))
    _refused(setup, setup.response(), "not in the policy's aaguid_allow")


# --- the policy's files ----------------------------------------------------------------


def test_relative_policy_files_are_in_the_verifier_directory(tmp_path: Path) -> None:
    text = ('[methods.face]\nroots = ["r.pem", "/abs/r.pem"]\n'
            'mds_blob = "blob.jwt"\nmds_ca = "ca.pem"\n')
    atomic_write(tmp_path / POLICY_FILE, text.encode())
    face = VerifierPolicy.load(tmp_path).for_method(Method.FACE)
    assert face == MethodPolicy(
        AttestationMode.REQUIRED, (str(tmp_path / "r.pem"), "/abs/r.pem"), (), (),
        str(tmp_path / "blob.jwt"), str(tmp_path / "ca.pem"),
    )
    with pytest.raises(ConfigError, match="go together"):
        VerifierPolicy.parse({"methods": {"face": {"mds_blob": "b"}}})


def test_a_roots_file_others_can_write_is_refused(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    (setup.verifier_dir / SOFT_ROOTS_FILE).chmod(0o666)
    with pytest.raises(Exception, match=r"soft-fido2-roots\.pem") as raised:
        setup.verifier.accept_enrollment(setup.response())
    assert type(raised.value).__name__ in ("StateError", "ConfigError")


def test_the_stored_result_is_json(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    setup.verifier.accept_enrollment(setup.response())
    stored = setup.verifier.credential("alice", Method.BIOMETRIC).attestation
    assert stored is not None and json.loads(stored)["verified"] is True


# --- a FIDO Metadata Service BLOB (signed by a test CA, RS256 like the real one) -------


def _rsa_ca(name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _blob(
    ca: tuple[x509.Certificate, rsa.RSAPrivateKey], device: SoftAuthenticator,
    status: str = "FIDO_CERTIFIED_L1", uv: tuple[str, ...] = ("fingerprint_internal",),
) -> bytes:
    """An MDS3 BLOB (a JWS) with one entry for the device's AAGUID and root, signed by a
    signer certificate that ``ca`` issued."""
    ca_cert, ca_key = ca
    signer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    signer = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test MDS signer")]))
        .issuer_name(ca_cert.subject).public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )
    aaguid = str(uuid.UUID(bytes=device.aaguid))
    root = base64.b64encode(device.attestation_root.public_bytes(Encoding.DER)).decode()
    payload = {
        "legalHeader": "test BLOB", "no": 7, "nextUpdate": "2099-01-01",
        "entries": [{
            "aaguid": aaguid,
            "statusReports": [{"status": status, "effectiveDate": "2026-01-01"}],
            "timeOfLastStatusChange": "2026-01-01",
            "metadataStatement": {
                "description": "hsm-auth soft-fido2 (test entry)", "aaguid": aaguid,
                "authenticatorVersion": 1, "schema": 3, "upv": [{"major": 1, "minor": 1}],
                "attestationTypes": ["basic_full"],
                "userVerificationDetails": [
                    [{"userVerificationMethod": m}] for m in (*uv, "presence_internal")
                ],
                "keyProtection": ["software"], "matcherProtection": ["software"],
                "attachmentHint": ["external"], "tcDisplay": [],
                "attestationRootCertificates": [root],
            },
        }],
    }
    header = {"alg": "RS256", "typ": "JWT",
              "x5c": [base64.b64encode(signer.public_bytes(Encoding.DER)).decode()]}
    message = _b64url(json.dumps(header).encode()) + b"." + _b64url(json.dumps(payload).encode())
    signature = signer_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return message + b"." + _b64url(signature)


@pytest.fixture(scope="module")
def mds_ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    return _rsa_ca("test FIDO MDS root")


def _mds_policy(
    setup: Setup, blob: bytes, ca: x509.Certificate, method: Method = Method.BIOMETRIC,
) -> None:
    atomic_write(setup.verifier_dir / "mds.jwt", blob)
    atomic_write(setup.verifier_dir / "mds-ca.pem", ca.public_bytes(Encoding.PEM))
    setup.policy(  # no roots: the BLOB's entry gives the root
        f'[methods.{method.value}]\nmds_blob = "mds.jwt"\nmds_ca = "mds-ca.pem"\n'
        f'aaguid_allow = ["{SOFT_AAGUID.hex()}"]\n'
    )


def test_a_metadata_blob_gives_the_root_and_the_certified_uv_methods(
    make_setup: Callable[..., Setup], mds_ca: Any,
) -> None:
    setup = make_setup(policy=False)
    _mds_policy(setup, _blob(mds_ca, setup.device), mds_ca[0])
    setup.verifier.accept_enrollment(setup.response())
    result = _stored(setup)
    assert result.verified
    assert result.trust == setup.device.attestation_root.subject.rfc4514_string()
    assert result.details == {
        "aaguid": SOFT_AAGUID.hex(),
        "uv_modalities": "fingerprint_internal,presence_internal",
        "mds_status": "FIDO_CERTIFIED_L1",
        "mds_description": "hsm-auth soft-fido2 (test entry)",
    }


def test_a_revoked_metadata_entry_vouches_for_nothing(
    make_setup: Callable[..., Setup], mds_ca: Any,
) -> None:
    setup = make_setup(policy=False)
    _mds_policy(setup, _blob(mds_ca, setup.device, status="REVOKED"), mds_ca[0])
    _refused(setup, setup.response(), "ends at no configured root")


def test_a_blob_not_signed_under_mds_ca_is_a_configuration_error(
    make_setup: Callable[..., Setup], mds_ca: Any,
) -> None:
    setup = make_setup(policy=False)
    other = _rsa_ca("another MDS root")
    _mds_policy(setup, _blob(other, setup.device), mds_ca[0])
    with pytest.raises(ConfigError, match="not a Metadata Service BLOB signed under mds_ca"):
        setup.verifier.accept_enrollment(setup.response())
    good = _blob(mds_ca, setup.device)
    message, _, signature = good.rpartition(b".")
    header, _, payload = message.partition(b".")
    doc = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    doc["no"] = 8  # one field changed after signing
    tampered = header + b"." + _b64url(json.dumps(doc).encode()) + b"." + signature
    atomic_write(setup.verifier_dir / "mds.jwt", tampered)
    with pytest.raises(ConfigError, match="mds_blob"):
        setup.verifier.accept_enrollment(setup.response())


def test_a_verifier_without_python_fido2_refuses_fido2_enrollments_clearly(
    make_setup: Callable[..., Setup], tmp_path: Path,
) -> None:
    setup = make_setup()
    response = tmp_path / "response.txt"
    response.write_text(setup.response())
    setup.verifier.close()
    script = (
        "import sys; sys.modules['fido2'] = None\n"  # as if python-fido2 were not installed
        "from pathlib import Path\n"
        "from hsm_auth.errors import HsmAuthError\n"
        "from hsm_auth.verifier import Verifier\n"
        f"v = Verifier.open(Path({str(setup.verifier_dir)!r}))\n"
        "try:\n"
        f"    v.accept_enrollment(Path({str(response)!r}).read_text())\n"
        "except HsmAuthError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.startswith("HsmAuthError checking a FIDO2 enrollment's attestation needs "
                          "python-fido2 on the verifier (pip install 'hsm-auth[fido2]')"), out


def test_metadata_that_certifies_another_uv_method_refuses_the_method(
    make_setup: Callable[..., Setup], soft_fido2_factory: Factory, mds_ca: Any,
) -> None:
    # getInfo says "face" (the backend believes it); the metadata certifies a fingerprint.
    setup = make_setup(soft_fido2_factory(uv_modality=UvModality.FACE), policy=False)
    _mds_policy(setup, _blob(mds_ca, setup.device), mds_ca[0], Method.FACE)
    with pytest.raises(AttestationRefused, match=r"face method needs faceprint_internal; .* "
                       r"certifies fingerprint_internal,presence_internal$"):
        setup.verifier.accept_enrollment(setup.response(Method.FACE))
    _mds_policy(setup, _blob(mds_ca, setup.device, uv=("faceprint_internal",)), mds_ca[0],
                Method.FACE)
    setup.verifier.accept_enrollment(setup.response(Method.FACE))
    assert _stored(setup, Method.FACE).details["uv_modalities"] == (
        "faceprint_internal,presence_internal"
    )
