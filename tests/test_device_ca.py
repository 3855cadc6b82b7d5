"""The verifier's device CA (docs/PROTOCOL.md §13.3): every enrollment gets an X.509
certificate for its signing key, which ``openssl verify`` accepts under the
``verifier ca-cert`` output, which names the user and the method, and whose key is
the token's own signing key (a signature made in a real SoftHSM token verifies
with it); the authenticator stores it from a signed EnrollmentResult, refusing
one signed by another key or for another signing key. With file keys and with
the verifier's keys in a SoftHSM token."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from _cli import cli_env, cli_ok, code_file, run_cli
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec as cec
from cryptography.x509.oid import NameOID

from hsm_auth import device_ca, ec
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig, Paths
from hsm_auth.errors import (
    DecodeError,
    HsmAuthError,
    StateError,
    UnknownMethod,
    UntrustedMessage,
)
from hsm_auth.files import atomic_write_json, read_json
from hsm_auth.keystore import NO_AUTH
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentResult
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

OFFLINE_PIN = "482916"
HSM_PIN = "device-ca-hsm-pin-0815"


def _pin_file(tmp_path: Path, name: str, pin: str) -> Path:
    path = tmp_path / name
    path.write_text(pin)
    path.chmod(0o600)
    return path


@pytest.fixture
def tokens(softhsm_env, tmp_path):
    device = init_token(unique_label("dev"), so_pin="12345678", user_pin="device-secret")
    pin = init_token(unique_label("pin"), so_pin="12345678", user_pin=OFFLINE_PIN)
    device_pin = _pin_file(tmp_path, "device.pin", device.user_pin)
    device_uri = Pkcs11Uri(
        token=device.label, module_path=device.module_path, pin_source=f"file:{device_pin}"
    )
    pin_uri = Pkcs11Uri(token=pin.label, module_path=pin.module_path)
    return Config(
        methods={
            Method.DEVICE: MethodConfig("pkcs11", {"uri": str(device_uri)}),
            Method.PIN: MethodConfig("pkcs11", {"uri": str(pin_uri), "allow_unenforced_pin": True}),
        }
    )


@pytest.fixture(params=["file", "hsm"])
def home(request, tokens, tmp_path):
    """An hsm-auth home whose verifier keeps its keys in a key file or a SoftHSM token
    (made after the authenticator's tokens: SoftHSM lists new tokens only to a process
    holding no session)."""
    home = tmp_path / "home"
    hsm = None
    if request.param == "hsm":
        token = init_token(unique_label("verifier"), so_pin="12345678", user_pin=HSM_PIN)
        pin_file = _pin_file(tmp_path, "hsm.pin", HSM_PIN)
        hsm = str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                            pin_source=f"file:{pin_file}"))
    Verifier.init(Paths.from_env(home).verifier_dir, "Device CA Bank", hsm=hsm).close()
    return home


@pytest.fixture
def verifier(home):
    with Verifier.open(Paths.from_env(home).verifier_dir) as v:
        yield v


@pytest.fixture
def authenticator(tmp_path, tokens):
    with Authenticator(tmp_path / "auth", tokens) as a:
        yield a


def _enroll(verifier: Verifier, authenticator: Authenticator, user: str, method: Method):
    offer = verifier.create_offer(user, methods=[method])
    pin = OFFLINE_PIN if method is Method.PIN else None
    response = authenticator.add_or_update(
        method, offer.text, activation_code=offer.activation_code, pin=pin
    )
    return verifier.accept_enrollment(response)


def _ca_cert_from_cli(home: Path, tmp_path: Path) -> Path:
    """What ``hsm-auth verifier ca-cert`` prints, in a file (the SoftHSM config passes
    to the CLI so that an HSM verifier opens its token)."""
    env = {**cli_env(), "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}
    pem = cli_ok(home, "verifier", "ca-cert", env=env)
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    path = tmp_path / "ca-from-cli.pem"
    path.write_text(pem + "\n")
    return path


def _openssl_verify(ca: Path, cert_der: bytes, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    leaf = tmp_path / "device.pem"
    cert = x509.load_der_x509_certificate(cert_der)
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(ca), str(leaf)],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_certificate_verifies_with_openssl_names_user_and_method_and_is_the_token_key(
    home, verifier, authenticator, tmp_path
):
    record = _enroll(verifier, authenticator, "alice", Method.DEVICE)
    assert record.certificate is not None
    stored = verifier.credential("alice", Method.DEVICE)
    assert stored.certificate == record.certificate  # saved with the credential

    ca = _ca_cert_from_cli(home, tmp_path)
    checked = _openssl_verify(ca, record.certificate, tmp_path)
    assert checked.returncode == 0 and checked.stdout.strip().endswith(": OK"), checked

    cert = x509.load_der_x509_certificate(record.certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "alice"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "device")
    assert cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Device CA Bank"
    assert cert.issuer == verifier.ca_certificate.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert (constraints.critical, constraints.value.ca) == (True, False)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    result = device_ca.attestation_of(cert)
    assert result is not None and result.to_json() == stored.attestation  # what was checked
    assert not cert.extensions.get_extension_for_oid(device_ca.ATTESTATION_OID).critical

    # A signature made in the token verifies with the certificate's key (and only
    # over what was signed).
    from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

    [enrolled] = authenticator.enrolled
    data = b"signed in the SoftHSM token by the enrolled signing key"
    with Pkcs11KeyStore.open(enrolled.settings) as store:
        signature = store.sign(enrolled.signing_key, data, NO_AUTH)
    public = cert.public_key()
    assert isinstance(public, cec.EllipticCurvePublicKey)
    public.verify(signature, data, cec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, data + b"!", cec.ECDSA(hashes.SHA256()))


def test_a_certificate_from_another_ca_key_fails_openssl(home, verifier, authenticator, tmp_path):
    """The control for the openssl check: another verifier's CA certificate does not
    verify this one's device certificate."""
    record = _enroll(verifier, authenticator, "alice", Method.DEVICE)
    assert record.certificate is not None
    other = Verifier.init(tmp_path / "other", "Device CA Bank")
    try:
        other_ca = tmp_path / "other-ca.pem"
        other_ca.write_bytes(other.ca_certificate.public_bytes(serialization.Encoding.PEM))
    finally:
        other.close()
    checked = _openssl_verify(other_ca, record.certificate, tmp_path)
    assert checked.returncode != 0, checked


def test_authenticator_stores_the_result_and_methods_shows_it(
    home, verifier, authenticator
):
    record = _enroll(verifier, authenticator, "alice", Method.PIN)
    updated = authenticator.store_result(verifier.enrollment_result(record))
    assert updated.certificate and updated.ca_certificate
    cert = x509.load_pem_x509_certificate(updated.certificate.encode())
    assert cert.public_bytes(serialization.Encoding.DER) == record.certificate
    [again] = Authenticator(authenticator.directory, authenticator.config).enrolled  # on disk
    assert again.certificate == updated.certificate


def _forged(verifier: Verifier, result: EnrollmentResult, sign=None) -> str:
    return result.to_text(sign or verifier.keys.sign_raw)


def _result_of(verifier: Verifier, record) -> EnrollmentResult:
    return EnrollmentResult.from_text(verifier.enrollment_result(record))[0]


def test_a_result_signed_by_another_key_is_refused(verifier, authenticator):
    record = _enroll(verifier, authenticator, "alice", Method.DEVICE)
    result = _result_of(verifier, record)
    other = cec.generate_private_key(cec.SECP256R1())

    def sign(body: bytes) -> bytes:
        return ec.der_to_raw(other.sign(body, cec.ECDSA(hashes.SHA256())))

    with pytest.raises(UntrustedMessage, match="signature does not verify"):
        authenticator.store_result(result.to_text(sign))
    assert authenticator.enrolled[0].certificate == ""
    authenticator.store_result(result.to_text(verifier.keys.sign_raw))  # the control
    assert authenticator.enrolled[0].certificate


def test_a_result_for_another_signing_key_is_refused(verifier, authenticator):
    device = _enroll(verifier, authenticator, "alice", Method.DEVICE)
    pin = _enroll(verifier, authenticator, "alice", Method.PIN)
    good = _result_of(verifier, device)
    other = _result_of(verifier, pin)
    # The pin method's (valid, CA-issued) certificate sent for the device method, with
    # the device method's credential id, signed by the verifier: not the device's key.
    swapped = dataclasses.replace(good, certificate=other.certificate)
    with pytest.raises(UntrustedMessage, match="for another key than the enrolled device"):
        authenticator.store_result(_forged(verifier, swapped))
    # The pin method's credential id for the device method: another credential.
    with pytest.raises(UntrustedMessage, match="another device credential"):
        authenticator.store_result(
            _forged(verifier, dataclasses.replace(good, credential_id=other.credential_id))
        )
    # A certificate the CA did not sign (its signature's last byte changed).
    tampered = bytearray(good.certificate)
    tampered[-1] ^= 1
    with pytest.raises(UntrustedMessage, match="does not verify"):
        authenticator.store_result(
            _forged(verifier, dataclasses.replace(good, certificate=bytes(tampered)))
        )
    # Another verifier's CA certificate.
    with pytest.raises(UntrustedMessage, match="does not verify"):
        authenticator.store_result(_forged(verifier, dataclasses.replace(
            good, ca_certificate=device_ca.make_ca_certificate(
                _OtherKeys(), "Device CA Bank", verifier.identity.verifier_id, 1_800_000_000
            ).public_bytes(serialization.Encoding.DER))))
    # A method or user not enrolled here.
    with pytest.raises(UnknownMethod):
        authenticator.store_result(
            _forged(verifier, dataclasses.replace(good, user="mallory"))
        )
    assert all(m.certificate == "" for m in authenticator.enrolled)  # nothing was stored
    authenticator.store_result(_forged(verifier, good))
    authenticator.store_result(_forged(verifier, other))
    assert all(m.certificate for m in authenticator.enrolled)


class _OtherKeys:
    """Only what make_ca_certificate asks of VerifierKeys: a CA key of its own."""

    def __init__(self) -> None:
        self._key = cec.generate_private_key(cec.SECP256R1())

    @property
    def ca_public(self) -> cec.EllipticCurvePublicKey:
        return self._key.public_key()

    def ca_sign(self, data: bytes) -> bytes:
        return self._key.sign(data, cec.ECDSA(hashes.SHA256()))


def test_a_result_from_an_unpinned_verifier_is_refused(verifier, authenticator, tmp_path):
    record = _enroll(verifier, authenticator, "alice", Method.DEVICE)
    text = verifier.enrollment_result(record)
    with (
        Authenticator(tmp_path / "elsewhere", authenticator.config) as fresh,
        pytest.raises(UntrustedMessage, match="not enrolled with"),
    ):
        fresh.store_result(text)
    with pytest.raises(UntrustedMessage, match="signature does not verify"):
        authenticator.store_result(text[:-8] + "AAAAAAAA")  # the signature's end changed
    with pytest.raises(DecodeError):
        authenticator.store_result(text[:40])


def test_a_long_attestation_result_still_fits_the_enrollment_result(tmp_path):
    """Whatever the attestation's details (and a client-chosen format), the certificate
    fits the EnrollmentResult: the details are left out of an extension that would be
    longer than MAX_ATTESTATION_JSON, and the verifier's record keeps them."""
    from hsm_auth.attestation import AttestationResult
    from hsm_auth.protocol import MAX_CERTIFICATE

    with Verifier.init(tmp_path / "v", "\u00e9" * 64) as v:  # 128 bytes of UTF-8
        signing_key = ec.encode_point(cec.generate_private_key(cec.SECP256R1()).public_key())
        long = AttestationResult("f" * 2000, True, "CN=" + "r" * 1000,
                                 {f"k{i}": "v" * 100 for i in range(40)})
        der = device_ca.issue(v.keys, v.ca_certificate, user="\u00e9" * 64,
                              method=Method.BIOMETRIC, signing_key=signing_key,
                              attestation=long, now=v._now())
        assert len(der) <= MAX_CERTIFICATE
        cert = x509.load_der_x509_certificate(der)
        # the whole user name (userid); the verifier's name cut to a 64-byte commonName
        assert cert.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "\u00e9" * 64
        assert cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
            "\u00e9" * 32)
        carried = device_ca.attestation_of(cert)
        assert carried is not None and carried.details == {
            "omitted": "too long for the certificate"}
        assert (carried.format, carried.verified) == ("f" * 64, True)
        short = AttestationResult("packed", True, "CN=root", {"aaguid": "00" * 16})
        assert device_ca.bounded_attestation(short) == short


def test_a_ca_certificate_file_for_another_key_is_refused(home, tmp_path):
    directory = Paths.from_env(home).verifier_dir
    other = Verifier.init(tmp_path / "other", "Other")
    try:
        (directory / "ca.pem").write_bytes(
            other.ca_certificate.public_bytes(serialization.Encoding.PEM)
        )
    finally:
        other.close()
    with Verifier.open(directory) as v, pytest.raises(StateError, match="device CA key"):
        v.ca_certificate  # noqa: B018


def test_a_verifier_made_before_the_device_ca_gets_its_certificate(tmp_path):
    """File keys: the CA key is derived from the root secret, so a verifier directory
    made before the device CA gets its ca.pem the first time it is needed."""
    directory = tmp_path / "v"
    Verifier.init(directory, "Old").close()
    first = (directory / "ca.pem").read_bytes()
    (directory / "ca.pem").unlink()
    with Verifier.open(directory) as v:
        made = v.ca_certificate
    assert (directory / "ca.pem").read_bytes() == made.public_bytes(serialization.Encoding.PEM)
    assert oct((directory / "ca.pem").stat().st_mode & 0o777) == "0o644"
    assert x509.load_pem_x509_certificate(first).public_key() == made.public_key()


def test_an_hsm_verifier_without_a_ca_key_is_one_clear_error(softhsm_env, tmp_path):
    token = init_token(unique_label("verifier"), so_pin="12345678", user_pin=HSM_PIN)
    pin_file = _pin_file(tmp_path, "hsm.pin", HSM_PIN)
    hsm = str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin_file}"))
    directory = tmp_path / "v"
    Verifier.init(directory, "HSM", hsm=hsm).close()
    identity = read_json(directory / "identity.json")
    keys = dict(identity["keys"])
    del keys["ca"]
    atomic_write_json(directory / "identity.json", {**identity, "keys": keys})
    with pytest.raises(StateError, match=r"predate the device CA .*: make a new verifier"):
        Verifier.open(directory)
    # The signing key named as the CA key: refused (one job each).
    atomic_write_json(directory / "identity.json",
                      {**identity, "keys": {**keys, "ca": keys["signing"]}})
    with pytest.raises(StateError, match="names its signing key as its device CA key"):
        Verifier.open(directory)
    # The KEK named as the CA key: no key pair of that name.
    atomic_write_json(directory / "identity.json",
                      {**identity, "keys": {**keys, "ca": keys["kek"]}})
    with pytest.raises(HsmAuthError, match="no public key"):
        Verifier.open(directory)


def test_an_hsm_ca_key_that_could_do_more_than_sign_is_refused(softhsm_env, tmp_path):
    """The CA key is checked like the signing key whenever the keys are opened: a key
    pair that could also derive (and is modifiable) is refused."""
    import pkcs11
    from hsm_auth_backends.pkcs11 import _P256_PARAMS
    from hsm_auth_backends.pkcs11_verifier import Pkcs11VerifierKeys

    token = init_token(unique_label("verifier"), so_pin="12345678", user_pin=HSM_PIN)
    pin_file = _pin_file(tmp_path, "hsm.pin", HSM_PIN)
    hsm = str(Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin_file}"))
    directory = tmp_path / "v"
    with Verifier.init(directory, "HSM", hsm=hsm) as v:
        keys = v.keys
        assert isinstance(keys, Pkcs11VerifierKeys)
        attr, ident, label = pkcs11.Attribute, os.urandom(16), "hsm-auth-verifier/weak/ca"
        params = keys._session.create_domain_parameters(
            pkcs11.KeyType.EC, {attr.EC_PARAMS: _P256_PARAMS}, local=True
        )
        params.generate_keypair(
            id=ident, label=label, store=True,
            capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.DERIVE,
            public_template={attr.TOKEN: True},
            private_template={attr.TOKEN: True, attr.PRIVATE: True, attr.SENSITIVE: True,
                              attr.EXTRACTABLE: False, attr.SIGN: True, attr.DERIVE: True},
        )
        weak = Pkcs11VerifierKeys._key_uri(keys._session, hsm, "private", label, ident)
    identity = read_json(directory / "identity.json")
    atomic_write_json(directory / "identity.json",
                      {**identity, "keys": {**identity["keys"], "ca": weak}})
    with pytest.raises(StateError, match="device CA key in the HSM is not a sensitive, "
                                         "unextractable, unmodifiable sign-only key"):
        Verifier.open(directory)


def test_cli_flow_stores_the_certificate_and_methods_shows_it(tmp_path):
    from hsm_auth.demo import prepare
    from hsm_auth.testing.softhsm import softhsm_available

    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "cli-home"
    with prepare(home, tpm=False, fido2=False):
        pass
    cli_ok(home, "verifier", "init", "--name", "CLI CA")
    code = code_file(home)
    offer = cli_ok(home, "verifier", "offer", *code, "--user", "alice", "--methods", "device")
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", stdin=offer)
    shown = run_cli(home, "verifier", "enroll", stdin=response)
    assert shown.returncode == 0, shown.stderr
    assert "give this result to the authenticator" in shown.stderr
    result = shown.stdout.strip()
    assert result.startswith("HA1:")
    before = cli_ok(home, "methods")
    assert "no certificate" in before
    (tmp_path / "result.txt").write_text(result)
    cli_ok(home, "certificate", f"@{tmp_path / 'result.txt'}")
    listing = cli_ok(home, "methods")
    assert "certificate: UID=alice, OU=device, serialNumber=" in listing
    assert "issuer:      O=hsm-auth device CA, CN=CLI CA, serialNumber=" in listing
    assert "valid:" in listing and "attestation: unattested" in listing
    [row] = json.loads(cli_ok(home, "--json", "methods"))["methods"]
    cert = row["certificate"]
    stored = read_json(Paths.from_env(home).authenticator_dir / "credentials.json")
    pem = stored["methods"][0]["certificate"]
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    assert cert["fingerprint"] == hashlib.sha256(der).hexdigest()
    assert cert["pem"] == pem
    assert cert["fingerprint"] in listing
    ca = tmp_path / "ca.pem"
    ca.write_text(cli_ok(home, "verifier", "ca-cert") + "\n")
    checked = _openssl_verify(ca, der, tmp_path)
    assert checked.returncode == 0, checked
    # A stored certificate edited into something else is one error line.
    creds = Paths.from_env(home).authenticator_dir / "credentials.json"
    saved = creds.read_bytes()
    for bad in (5, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "\u00e9"):
        edited = read_json(creds)
        edited["methods"][0]["certificate"] = bad
        atomic_write_json(creds, edited)
        broken = run_cli(home, "methods")
        assert broken.returncode != 0 and "Traceback" not in broken.stderr, broken.stderr
        assert broken.stderr.strip().splitlines()[-1].startswith("hsm-auth: error: ")
    creds.write_bytes(saved)
    # A second store of the same result is fine, and so is the result printed again;
    # garbage is one error line.
    cli_ok(home, "certificate", result)
    again = cli_ok(home, "verifier", "result", "--user", "alice", "--method", "device")
    assert again != result  # a new signature over the same body
    assert EnrollmentResult.from_text(again)[0] == EnrollmentResult.from_text(result)[0]
    cli_ok(home, "certificate", again)
    [row] = json.loads(cli_ok(home, "--json", "verifier", "credentials"))["credentials"]
    assert row["certificate_sha256"] == cert["fingerprint"]
    bad = run_cli(home, "certificate", "HA1:AAAA")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("hsm-auth: error: ")


def test_a_certificate_with_a_repeated_extension_is_one_untrusted_message():
    """A fuzz finding: cryptography raises DuplicateExtension (not a ValueError) when a
    certificate repeats an extension, first when its extensions are read."""
    import datetime

    key = cec.generate_private_key(cec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    built = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2030, 1, 1))
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.5"), b"\x05\x00"),
                       critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    repeated = built.replace(bytes.fromhex("06032a0305"), bytes.fromhex("06032a0304"))
    cert = x509.load_der_x509_certificate(repeated)
    with pytest.raises(x509.DuplicateExtension):
        _ = cert.extensions  # what the library met unguarded
    with pytest.raises(UntrustedMessage, match="malformed"):
        device_ca.summary(cert)
    with pytest.raises(UntrustedMessage):  # its signature, or its extensions
        device_ca.check_device_certificate(
            repeated, repeated, user="alice", method=Method.DEVICE, credential_id=b"\x00" * 16
        )
