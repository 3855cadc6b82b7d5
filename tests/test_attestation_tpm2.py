"""TPM 2.0 attestation on swtpm (issue 11): the enrolled keys are certified by an
attestation key that credential activation bound to an EK whose certificate the
fixture's test CA (``swtpm_localca``) made; every forgery is refused with its reason.

Real TPM commands throughout; the attacks use tpm2-pytss directly."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from hsm_auth import attestation_tpm2 as att
from hsm_auth import cbor
from hsm_auth import ec as ecutil
from hsm_auth.attestation import (
    AttestationMode,
    AttestationRefused,
    EnrollmentContext,
    MethodPolicy,
)
from hsm_auth.errors import BackendError, HsmAuthError
from hsm_auth.keystore import Authorization
from hsm_auth.methods import Method
from hsm_auth.webauthn_proof import enrollment_binding

pytestmark = pytest.mark.swtpm

PIN = "735190"
OFFER = b"\x07" * 16


class FakeVerifier:
    """The verifier's signing key and policy, as attestation_tpm2 uses them."""

    def __init__(self, roots, mode=AttestationMode.REQUIRED):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.policy = MethodPolicy(mode, tuple(str(r) for r in roots))

    def sign_raw(self, data: bytes) -> bytes:
        return ecutil.der_to_raw(self.key.sign(data, ec.ECDSA(hashes.SHA256())))

    @property
    def public(self) -> bytes:
        return ecutil.encode_point(self.key.public_key())

    def challenge(self, request: bytes) -> bytes:
        return att.registration_challenge(request, self.policy.roots, self.sign_raw)

    def check(self, attestation, signing_key, method=Method.PIN, offer=OFFER, user="alice"):
        ctx = EnrollmentContext(offer, user, method, signing_key, None, 1, True, self.public)
        return att.check(attestation, ctx, self.policy)


def _store(tpm, path):
    from hsm_auth_backends.tpm2 import Tpm2KeyStore

    return Tpm2KeyStore.open({"tcti": tpm.tcti, "state_dir": str(path), "auth": "auto"})


def _enroll(store, method=Method.PIN, offer=OFFER):
    pin = PIN if method is Method.PIN else None
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    enrollment = store.enroll(
        method, f"hsm-auth/alice/{method.value}/{os.urandom(2).hex()}", peer,
        Authorization(pin=pin), binding=enrollment_binding(offer, "alice", method),
    )
    return enrollment, ecutil.encode_point(enrollment.signing_public)


def _attestation(data: bytes) -> dict:
    return cbor.loads(data, maps=True)


def _encode(top: dict) -> bytes:
    return att.encode_attestation(
        top["akPub"], top["ekCertHash"], [tuple(b) for b in top["bindings"]],
        [tuple(c) for c in top["certify"]],
    )


@pytest.fixture
def registered(swtpm_ek, tmp_path):
    """A TPM registered with a verifier that trusts the fixture's CA: (store, verifier)."""
    tpm, ca = swtpm_ek
    verifier = FakeVerifier([ca.roots_file])
    store = _store(tpm, tmp_path / "objects")
    store.activate_registration(verifier.challenge(store.registration_request()))
    yield store, verifier
    store.close()


def test_after_the_owner_hierarchy_is_cleared_the_tpm_registers_a_new_ak(registered, tmp_path):
    """TPM2_Clear (a new owner seed: every blob, the AK's too, is dead; the EK stays)."""
    from tpm2_pytss import ESYS_TR

    store, verifier = registered
    old = store._read_ak()
    store._ectx.clear(ESYS_TR.RH_LOCKOUT)
    store.close()
    tpm_tcti = store.tcti
    from hsm_auth_backends.tpm2 import Tpm2KeyStore

    with Tpm2KeyStore.open({"tcti": tpm_tcti, "state_dir": str(tmp_path / "objects")}) as again:
        with pytest.raises(BackendError, match="attestation key was made by another TPM"):
            _enroll(again)
        again.activate_registration(verifier.challenge(again.registration_request()))
        assert again._read_ak().public != old.public
        enrollment, signing_key = _enroll(again)
        assert verifier.check(enrollment.attestation, signing_key).verified


@pytest.mark.parametrize("method", [Method.DEVICE, Method.PIN])
def test_enrolled_keys_verify_up_to_the_ek_certificate_of_the_fixture_ca(registered, method):
    store, verifier = registered
    enrollment, signing_key = _enroll(store, method)
    result = verifier.check(enrollment.attestation, signing_key, method)
    assert result.verified and result.format == "hsm-auth-tpm2"
    assert result.trust == "CN=swtpm-localca-rootca"
    assert "fixedTPM,fixedParent,sensitiveDataOrigin" in result.details["signing_key"]
    assert ("noDA" in result.details["otp_key"]) is (method is Method.DEVICE)


def test_the_ek_certificate_is_read_from_nv_and_made_by_the_test_ca(swtpm_ek, tmp_path):
    from cryptography import x509

    tpm, _ = swtpm_ek
    with _store(tpm, tmp_path / "o") as store:
        cert = x509.load_der_x509_certificate(store.ek_certificate())
    assert cert.issuer.rfc4514_string() == "CN=swtpm-localca"
    assert x509.ObjectIdentifier("2.23.133.8.1") in cert.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    ).value


def test_an_ek_certificate_from_an_unknown_ca_gets_no_challenge(swtpm_ek_factory, tmp_path):
    _, trusted = swtpm_ek_factory("tpm")
    other, _ = swtpm_ek_factory("stranger", ca="other-ca")
    verifier = FakeVerifier([trusted.roots_file])
    with _store(other, tmp_path / "o") as store:
        request = store.registration_request()
    with pytest.raises(AttestationRefused, match="does not chain to a configured TPM"):
        verifier.challenge(request)


def test_a_verifier_without_tpm_roots_refuses_registration(swtpm_ek, tmp_path):
    tpm, _ = swtpm_ek
    with _store(tpm, tmp_path / "o") as store:
        request = store.registration_request()
    with pytest.raises(AttestationRefused, match="names no TPM manufacturer root"):
        FakeVerifier([]).challenge(request)


def test_a_genuine_ek_certificate_with_another_ek_public_area_is_refused(registered):
    store, verifier = registered
    request = cbor.loads(store.registration_request(), maps=True)
    ek = request["ekPub"]
    short = ek[:-258] + att.lp16(ek[-256:-1])  # the modulus one byte short
    other = ek[:-1] + bytes([ek[-1] ^ 2])  # another modulus
    for ek_public, why in ((short, "not an RSA 2048 key"),
                           (other, "not for the TPM's endorsement key")):
        forged = att.registration_request(request["ekCert"], ek_public, request["akPub"])
        with pytest.raises(AttestationRefused, match=why):
            verifier.challenge(forged)


def _software_ak() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A software key dressed as an AK: the public area a real AK would have."""
    from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    key = ec.generate_private_key(ec.SECP256R1())
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT
             | TPMA_OBJECT.NODA)
    area = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=attrs)
    area.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    numbers = key.public_key().public_numbers()
    area.unique.ecc.x = numbers.x.to_bytes(32, "big")
    area.unique.ecc.y = numbers.y.to_bytes(32, "big")
    return key, bytes(TPM2B_PUBLIC(publicArea=area).marshal())[2:]


def _fake_certify(ak: ec.EllipticCurvePrivateKey, public: bytes, qualifier: bytes) -> list:
    """A TPMS_ATTEST a TPM would make for ``public``, signed by a software AK."""
    name = att.parse_public(public).name
    attest = (
        struct.pack(">IH", att.TPM_GENERATED, att.ST_ATTEST_CERTIFY)
        + att.lp16(b"\x00\x0b" + bytes(32)) + att.lp16(qualifier)
        + struct.pack(">QIIBQ", 1, 0, 0, 1, 0) + att.lp16(name) + att.lp16(name)
    )
    r, s = decode_dss_signature(ak.sign(attest, ec.ECDSA(hashes.SHA256())))
    signature = struct.pack(">HH", att.ALG_ECDSA, att.ALG_SHA256) + att.lp16(
        r.to_bytes(32, "big")) + att.lp16(s.to_bytes(32, "big"))
    return [public, attest, signature]


def test_a_software_ak_with_the_real_ek_certificate_never_gets_a_binding(
    registered, tmp_path
):
    store, verifier = registered
    request = cbor.loads(store.registration_request(), maps=True)
    soft_ak, soft_public = _software_ak()
    forged = att.registration_request(request["ekCert"], request["ekPub"], soft_public)
    challenge = verifier.challenge(forged)  # the EK certificate is genuine: a challenge comes
    # Without the EK's private key the blob stays shut; the real TPM refuses to open it
    # for its own AK (the blob names the software AK).
    with pytest.raises(HsmAuthError, match="activating"):
        store.activate_registration(challenge)
    # Software keys certified by the software AK, with the genuine TPM's bindings:
    enrollment, signing_key = _enroll(store)
    top = _attestation(enrollment.attestation)
    qualifier = att.certify_qualifier(enrollment_binding(OFFER, "alice", Method.PIN))
    top["akPub"] = soft_public
    top["certify"] = [_fake_certify(soft_ak, c[0], qualifier) for c in top["certify"]]
    with pytest.raises(AttestationRefused, match="not registered with this verifier"):
        verifier.check(_encode(top), signing_key)
    top["bindings"] = []
    with pytest.raises(AttestationRefused, match="not registered with this verifier"):
        verifier.check(_encode(top), signing_key)
    # Under if-available it is recorded, unverified, with the reason.
    lenient = FakeVerifier([], AttestationMode.IF_AVAILABLE)
    lenient.key = verifier.key
    result = lenient.check(_encode(top), signing_key)
    assert not result.verified and "not registered" in result.details["unverified"]


def test_a_software_ak_loaded_into_the_real_tpm_as_a_public_key_cannot_activate(registered):
    """An attacker who can run commands on the victim's TPM loads the software AK's
    public area (TPM2_LoadExternal, which the TPM allows) to have a key of that name
    there, and asks TPM2_ActivateCredential for it: the TPM refuses, as the
    activated object needs its admin auth, which a public-only object does not have."""
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_SE,
        TPM2B_ENCRYPTED_SECRET,
        TPM2B_ID_OBJECT,
        TPM2B_PUBLIC,
        TPMT_SYM_DEF,
        TSS2_Exception,
    )

    store, verifier = registered
    request = cbor.loads(store.registration_request(), maps=True)
    _, soft_public = _software_ak()
    challenge = verifier.challenge(
        att.registration_request(request["ekCert"], request["ekPub"], soft_public)
    )
    blob, secret, _ = att.parse_challenge(challenge)
    ectx = store._ectx
    public, _ = TPM2B_PUBLIC.unmarshal(att.lp16(soft_public))
    handle = ectx.load_external(public, None, ESYS_TR.RH_NULL)
    assert bytes(ectx.tr_get_name(handle)) == att.parse_public(soft_public).name
    ek = ectx.tr_from_tpmpublic(0x81010001)
    session = ectx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                      TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
    ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
    try:
        with pytest.raises(TSS2_Exception, match="authValue or authPolicy is not available"):
            ectx.activate_credential(
                handle, ek, TPM2B_ID_OBJECT.unmarshal(blob)[0],
                TPM2B_ENCRYPTED_SECRET.unmarshal(secret)[0], session2=session,
            )
    finally:
        ectx.flush_context(session)
        ectx.flush_context(handle)


def test_a_challenge_for_one_tpm_does_not_open_on_another(swtpm_ek_factory, tmp_path):
    tpm_a, ca = swtpm_ek_factory("tpm")
    tpm_b, _ = swtpm_ek_factory("second")
    verifier = FakeVerifier([ca.roots_file])
    with _store(tpm_a, tmp_path / "a") as a, _store(tpm_b, tmp_path / "b") as b:
        challenge = verifier.challenge(a.registration_request())
        b.registration_request()  # B has an AK of its own
        with pytest.raises(HsmAuthError, match="activating"):
            b.activate_registration(challenge)
        a.activate_registration(challenge)


@pytest.fixture
def two_registered(swtpm_ek_factory, tmp_path):
    """Two TPMs with EK certificates by the same CA, both registered: (a, b, verifier)."""
    tpm_a, ca = swtpm_ek_factory("tpm")
    tpm_b, _ = swtpm_ek_factory("second")
    verifier = FakeVerifier([ca.roots_file])
    a, b = _store(tpm_a, tmp_path / "a"), _store(tpm_b, tmp_path / "b")
    for store in (a, b):
        store.activate_registration(verifier.challenge(store.registration_request()))
    yield a, b, verifier
    a.close()
    b.close()


def test_a_certify_statement_from_another_tpm_is_refused(two_registered):
    a, b, verifier = two_registered
    enrollment, signing_key = _enroll(a)
    top = _attestation(enrollment.attestation)
    other, _ = _enroll(b)
    top["certify"][1] = _attestation(other.attestation)["certify"][1]  # B's OTP key, B's AK
    with pytest.raises(AttestationRefused, match="OTP key's certify statement is not signed"):
        verifier.check(_encode(top), signing_key)


def test_a_key_certified_by_another_tpm_is_refused(two_registered):
    a, b, verifier = two_registered
    enrollment_b, signing_key_b = _enroll(b)  # the response's keys live in B...
    top = _attestation(_enroll(a)[0].attestation)  # ...the AK and its binding are A's
    top["certify"] = _attestation(enrollment_b.attestation)["certify"]
    with pytest.raises(AttestationRefused, match="not signed by the registered attestation key"):
        verifier.check(_encode(top), signing_key_b)
    # B's own statements with A's key named as the response's signing key:
    a_key = _enroll(a)[1]
    with pytest.raises(AttestationRefused, match="not the response's signing key"):
        verifier.check(enrollment_b.attestation, a_key)


def test_a_blob_from_another_tpm_is_refused(two_registered, tmp_path):
    from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC, TSS2_Exception

    a, b, _ = two_registered
    enrollment_b, _ = _enroll(b)
    for uri in (enrollment_b.signing_key, enrollment_b.otp_key):  # B's files, given to A
        path = tmp_path / "b" / f"{uri.split('id=')[1].split(';')[0]}.json"
        (tmp_path / "a" / path.name).write_text(path.read_text())
        (tmp_path / "a" / path.name).chmod(0o600)
    record = json.loads(
        (tmp_path / "b" / f"{enrollment_b.signing_key.split('id=')[1].split(';')[0]}.json")
        .read_text()
    )
    with pytest.raises(BackendError, match="made by another TPM"):
        a.attest([enrollment_b.signing_key, enrollment_b.otp_key], b"x", Authorization(pin=PIN))
    # Directly: A's TPM refuses to load B's blob under A's storage key.
    public, _ = TPM2B_PUBLIC.unmarshal(bytes.fromhex(record["public"]))
    private, _ = TPM2B_PRIVATE.unmarshal(bytes.fromhex(record["private"]))
    a._make_room(1)
    with pytest.raises(TSS2_Exception, match="integrity"):
        a._ectx.load(a._storage_key(), private, public)


def test_a_certify_statement_of_another_enrollment_is_refused(registered):
    store, verifier = registered
    enrollment, signing_key = _enroll(store, offer=b"\x08" * 16)
    with pytest.raises(AttestationRefused, match="not for this enrollment"):
        verifier.check(enrollment.attestation, signing_key, offer=OFFER)
    with pytest.raises(AttestationRefused, match="not for this enrollment"):
        verifier.check(enrollment.attestation, signing_key, offer=b"\x08" * 16, user="bob")


def test_a_pin_key_made_nodA_in_the_tpm_is_refused(registered):
    """A key with the PIN as auth value but noDA (wrong PINs never counted): made with
    tpm2-pytss in the real TPM, certified by the real AK, refused for its attributes."""
    from tpm2_pytss import (
        TPM2B_DATA,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPMA_OBJECT,
        TPMS_SENSITIVE_CREATE,
        TPMT_PUBLIC,
        TPMT_SIG_SCHEME,
    )

    store, verifier = registered
    enrollment, _ = _enroll(store)
    ectx = store._ectx
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA)
    template = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC.parse("ecc256:ecdsa-sha256",
                                                         objectAttributes=attrs))
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=PIN.encode()))
    store._make_room(store._cache_size)
    srk = store._storage_key()
    private, public, *_ = ectx.create(srk, sensitive, template)
    qualifier = att.certify_qualifier(enrollment_binding(OFFER, "alice", Method.PIN))
    with store._scratch_ak(store._read_ak()) as ak:
        key = ectx.load(srk, private, public)
        ectx.tr_set_auth(key, PIN.encode())
        attest, signature = ectx.certify(key, ak, TPM2B_DATA(qualifier),
                                         TPMT_SIG_SCHEME(scheme=0x0010))
        ectx.flush_context(key)
    top = _attestation(enrollment.attestation)
    top["certify"][0] = [bytes(public.marshal())[2:], bytes(attest), bytes(signature.marshal())]
    point = ecutil.encode_point(att.parse_public(top["certify"][0][0]).ec_public())
    with pytest.raises(AttestationRefused, match="pin method is noDA"):
        verifier.check(_encode(top), point)


def test_a_binding_by_another_verifier_or_for_a_dropped_root_is_not_verified(registered):
    store, verifier = registered
    enrollment, signing_key = _enroll(store)
    stranger = FakeVerifier(verifier.policy.roots)
    with pytest.raises(AttestationRefused, match="not registered with this verifier"):
        stranger.check(enrollment.attestation, signing_key)
    dropped = FakeVerifier([])
    dropped.key = verifier.key
    with pytest.raises(AttestationRefused, match="root the policy no longer names"):
        dropped.check(enrollment.attestation, signing_key)


def test_tampered_statements_are_refused(registered):
    store, verifier = registered
    enrollment, signing_key = _enroll(store)
    top = _attestation(enrollment.attestation)
    flipped = bytearray(top["certify"][0][1])
    flipped[-1] ^= 1
    top["certify"][0][1] = bytes(flipped)
    with pytest.raises(AttestationRefused, match="signing key's certify statement is not signed"):
        verifier.check(_encode(top), signing_key)
    top = _attestation(enrollment.attestation)
    top["ekCertHash"] = hashlib.sha256(b"another EK certificate").digest()
    with pytest.raises(AttestationRefused, match="not registered"):
        verifier.check(_encode(top), signing_key)
    for garbage in (b"", b"\xa0", b"\x80", b"\xa1cfmtmhsm-auth-tpm2"):
        with pytest.raises(AttestationRefused):
            verifier.check(garbage, signing_key)
