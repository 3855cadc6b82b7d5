"""The test vectors of docs/PROTOCOL.md, recomputed with the hsm_auth library.

Every output vector in the document is made here by the code both sides run (the
message classes, :mod:`hsm_auth.transcript`, :mod:`hsm_auth.key_transport`,
:class:`~hsm_auth.otp_scheme.OtpScheme`, the verifier's file keys), so the document
and the code cannot drift apart. tests/test_protocol_independent.py recomputes the
same vectors from the document's formulas alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import cbor2
import pytest
from _vectors import DOCUMENT, load, parse
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import (
    activation,
    device_ca,
    ec,
    key_transport,
    ocra,
    qr,
    textcode,
    transaction,
    transcript,
)
from hsm_auth.methods import Method
from hsm_auth.otp_scheme import OtpScheme
from hsm_auth.protocol import (
    VERSION,
    EnrollmentOffer,
    EnrollmentResponse,
    EnrollmentResult,
    SyncReport,
    VerificationData,
)
from hsm_auth.store.base import CredentialRecord
from hsm_auth.sync_messages import AtcAck
from hsm_auth.verifier_keys import FileVerifierKeys
from hsm_auth.webauthn_proof import client_data_hash, enrollment_binding

V = load()


def _key(name: str) -> cec.EllipticCurvePrivateKey:
    return cec.derive_private_key(int.from_bytes(V[name], "big"), ec.CURVE)


def _point(name: str) -> bytes:
    return ec.encode_point(_key(name).public_key())


def _methods(codes: list[int]) -> tuple[Method, ...]:
    return tuple(Method.from_code(c) for c in codes)


def _offer() -> EnrollmentOffer:
    return EnrollmentOffer(
        verifier_id=V["verifier_id"],
        verifier_name=V["verifier_name"],
        user=V["user"],
        offer_id=V["offer_id"],
        verifier_signing_key=_point("verifier_signing_scalar"),
        verifier_agreement_key=_point("verifier_agreement_scalar"),
        suite=V["suite"],
        window=V["window"],
        methods=_methods(V["offer_methods"]),
        replace=V["offer_replace"],
        expires=V["offer_expires"],
        enrolled=_methods(V["offer_enrolled"]),
    )


def _verification_data() -> VerificationData:
    return VerificationData(
        verifier_id=V["verifier_id"],
        user=V["user"],
        challenge=V["challenge"],
        context=V["context"],
        methods=tuple(Method.parse(m) for m in V["verification_methods"]),
        expires=V["verification_expires"],
    )


def _transaction_data() -> VerificationData:
    """Section 17's verification data: a tenant, a transaction and 8 characters of data."""
    return dataclasses.replace(
        _verification_data(),
        context=V["tx_context"],
        tenant=V["tx_tenant"],
        transaction=transaction.check(V["tx_items"]),
        user_data=V["tx_user_data"],
    )


class _VectorKeys(FileVerifierKeys):
    """File keys whose agreement key for the vectors' offer is the vectors' own (a key
    file derives its per-offer keys from its root secret; the vectors fix the key)."""

    def offer_private(self, offer_id: bytes) -> cec.EllipticCurvePrivateKey:
        assert offer_id == V["offer_id"]
        return _key("verifier_agreement_scalar")


def _file_keys() -> FileVerifierKeys:
    return _VectorKeys(_key("verifier_signing_scalar"), _key("file_root_secret"), cache_bytes=0)


def _sealed(keys: FileVerifierKeys, credential: CredentialRecord) -> CredentialRecord:
    """``credential`` as the verifier records it: its OTP key sealed by the offer's key."""
    return dataclasses.replace(credential, sealed_otp_key=keys.seal(V["offer_id"], credential))


def _credential(method: Method, **key: bytes) -> CredentialRecord:
    return CredentialRecord(
        user=V["user"], method=method, backend=V["backend"], signing_key=b"", suite=V["suite"],
        atc=V["initial_atc"], created=0, **{"agreement_key": None, "wrapped_otp_key": None, **key},
    )


def _transcript(method: Method, signing_key: bytes, key_agreement: bytes) -> bytes:
    return transcript.enrollment_transcript(
        offer_hash=transcript.offer_hash(_offer().body()),
        user=V["user"],
        method=method,
        signing_key=signing_key,
        key_agreement=key_agreement,
    )


def _computed() -> dict[str, Any]:
    """Every output vector of the document, as the library makes it."""
    out: dict[str, Any] = {}
    for role in ("verifier_signing", "verifier_agreement"):
        out[f"{role}_key"] = _point(f"{role}_scalar")
    out["signing_key"] = _point("signing_scalar")
    out["agreement_key"] = _point("agreement_scalar")

    offer = _offer()
    # The body as an authenticator receives it: through the strict decoder.
    decoded, signed = EnrollmentOffer.decode(offer.encode(lambda body: V["offer_signature"]))
    assert decoded == offer
    out["offer_body"] = signed.body
    out["offer_hash"] = transcript.offer_hash(signed.body)

    keys = _file_keys()
    method = Method.parse(V["method"])
    out["z"] = z = keys.offer_private(V["offer_id"]).exchange(
        cec.ECDH(), ec.decode_point(out["agreement_key"])
    )
    # MACs by the verifier's own path: the credential's OTP key made from its agreement
    # key by the offer's key, sealed, and opened for each MAC.
    device = _sealed(keys, _credential(method, agreement_key=out["agreement_key"]))
    assert keys.otp_key(device) == z

    def mac(data: bytes) -> bytes:
        return keys.otp_mac(device, data)

    out["transcript"] = t = _transcript(method, out["signing_key"], out["agreement_key"])
    out["confirmation"] = confirmation = mac(transcript.confirmation_message(t))
    # Activation: the code the key file makes of the offer id, and the response's MAC.
    out["activation_code_mac"] = keys.activation_hmac(activation.code_input(V["offer_id"]))
    out["activation_code"] = code = keys.activation_code(V["offer_id"])
    assert activation.normalize(V["activation_code_typed"]) == code.replace("-", "")
    with pytest.raises(activation.ActivationCodeTypo):
        activation.normalize(V["activation_code_typo"])
    out["activation_key"] = activation.activation_key(code, out["offer_hash"])
    out["activation_mac"] = activation_mac = activation.activation_mac(code, out["offer_hash"], t)
    response = EnrollmentResponse(
        verifier_id=V["verifier_id"],
        offer_id=V["offer_id"],
        user=V["user"],
        method=method,
        backend=V["backend"],
        signing_key=out["signing_key"],
        agreement_key=out["agreement_key"],
        wrapped_otp_key=None,
        initial_atc=V["initial_atc"],
        attestation=None,
        confirmation=confirmation,
        activation_mac=activation_mac,
    )
    decoded_response, signed_response = EnrollmentResponse.decode(response.encode(None))
    assert decoded_response == response and signed_response.signature == b""
    out["response_body"] = signed_response.body
    out["credential_id"] = cid = transcript.credential_id(out["signing_key"])

    data = _verification_data()
    message = data.encode(lambda body: V["verification_signature"])
    assert VerificationData.decode(message)[0] == data
    out["verification_body"] = data.body()
    out["verification_text"] = textcode.encode(message)
    out["context_utf8"] = data.context.encode("utf-8")
    scheme = OtpScheme.for_suite(V["suite"])
    out["question"] = q = scheme.question(
        verifier_id=data.verifier_id,
        user=data.user,
        method=method,
        credential_id=cid,
        challenge=data.challenge,
        context=data.context,
    )
    out["data_input"] = scheme.message(V["counter"], q)
    out["otp_mac"] = mac(out["data_input"])
    out["otp"] = scheme.otp(mac, counter=V["counter"], question=q)
    assert scheme.otp(z, counter=V["counter"], question=q) == out["otp"]

    # Section 17: transaction data, a tenant and data the user entered.
    tx = _transaction_data()
    tx_message = tx.encode(lambda body: V["tx_verification_signature"])
    assert VerificationData.decode(tx_message)[0] == tx
    out["tx_verification_body"] = tx.body()
    out["tx_verification_text"] = textcode.encode(tx_message)
    out["tx_digest"] = transaction.digest(tx.transaction)
    out["tx_data"] = entered = transaction.user_data(V["tx_data_typed"], tx.user_data)
    out["tx_question"] = tq = scheme.question(
        verifier_id=tx.verifier_id, user=tx.user, method=method, credential_id=cid,
        challenge=tx.challenge, context=tx.context, tenant=tx.tenant,
        transaction=tx.transaction, data=entered,
    )
    out["tx_otp"] = scheme.otp(mac, counter=V["tx_counter"], question=tq)

    ephemeral = _key("fido2_ephemeral_scalar")
    agreement_public = ec.decode_point(out["verifier_agreement_key"])
    out["fido2_ephemeral_key"] = ec.encode_point(ephemeral.public_key())
    out["fido2_signing_key"] = _point("fido2_signing_scalar")
    out["fido2_z"] = ephemeral.exchange(cec.ECDH(), agreement_public)
    out["fido2_wrapped_otp_key"] = wrapped = key_transport.wrap(
        V["fido2_otp_key"], agreement_public, ephemeral
    )
    fido2_method = Method.parse(V["fido2_method"])
    fido2 = _sealed(keys, _credential(fido2_method, wrapped_otp_key=wrapped))
    assert keys.otp_key(fido2) == V["fido2_otp_key"]
    out["fido2_transcript"] = ft = _transcript(fido2_method, out["fido2_signing_key"], wrapped)
    out["fido2_confirmation"] = keys.otp_mac(fido2, transcript.confirmation_message(ft))
    out["fido2_client_data_hash"] = client_data_hash(
        enrollment_binding(V["offer_id"], V["user"], fido2_method), out["fido2_ephemeral_key"]
    )

    out["sync_question"] = sq = scheme.sync_question(
        session_id=V["sync_session_id"], user=V["user"], method=method, credential_id=cid
    )
    out["sync_data_input"] = scheme.message(V["sync_atc"], sq)
    out["sync_mac"] = sync_mac = mac(out["sync_data_input"])
    report = SyncReport(
        verifier_id=V["verifier_id"],
        session_id=V["sync_session_id"],
        user=V["user"],
        method=method,
        atc=V["sync_atc"],
        credential_id=cid,
    )
    out["sync_report"] = report.encode(lambda body: sync_mac)
    assert SyncReport.decode(out["sync_report"])[0] == report
    assert scheme.verify_mac(mac, sync_mac, counter=V["sync_atc"], question=sq)
    ack = AtcAck(
        verifier_id=V["verifier_id"],
        user=V["user"],
        method=method,
        credential_id=cid,
        session_id=V["sync_session_id"],
        atc=V["sync_atc"],
    )
    out["atc_ack_body"] = ack.body()
    assert AtcAck.decode(ack.encode(lambda body: V["atc_ack_signature"]))[0] == ack

    # The device CA of a key file with the vectors' root secret, and the result message.
    ca_keys = FileVerifierKeys(_key("verifier_signing_scalar"), _key("file_root_secret"))
    out["device_ca_key"] = ec.encode_point(ca_keys.ca_public)
    result = EnrollmentResult(
        verifier_id=V["verifier_id"],
        user=V["user"],
        method=method,
        credential_id=cid,
        certificate=V["device_certificate"],
        ca_certificate=V["device_ca_certificate"],
        attestation="unattested",
    )
    out["enrollment_result_body"] = result.body()
    assert EnrollmentResult.decode(result.encode(lambda body: V["result_signature"]))[0] == result

    rfc = ocra.OcraSuite.parse(V["rfc6287_suite"])
    inputs = {"counter": V["rfc6287_counter"], "question": V["rfc6287_question"]}
    out["rfc6287_data_input"] = rfc.data_input(**inputs)
    out["rfc6287_otp"] = ocra.generate(rfc, V["rfc6287_key"], **inputs)
    return out


COMPUTED = _computed()
INPUTS = {name for name in V if name not in COMPUTED}


@pytest.mark.parametrize("name", sorted(COMPUTED))
def test_vector(name: str) -> None:
    assert name in V, f"{name} is computed but not in {DOCUMENT.name}"
    assert V[name] == COMPUTED[name]


def test_every_vector_is_an_input_or_checked() -> None:
    inputs = {
        "verifier_signing_scalar", "verifier_agreement_scalar", "signing_scalar",
        "agreement_scalar", "fido2_ephemeral_scalar", "fido2_signing_scalar",
        "fido2_otp_key", "verifier_id", "verifier_name", "user", "offer_id", "suite",
        "window", "offer_methods", "offer_replace", "offer_expires", "offer_enrolled",
        "method", "backend", "initial_atc", "challenge", "context", "verification_methods",
        "verification_expires", "counter", "fido2_method", "sync_session_id", "sync_atc",
        "rfc6287_suite", "rfc6287_key", "rfc6287_counter", "rfc6287_question",
        "offer_signature", "verification_signature",
        "file_root_secret", "device_ca_certificate", "device_certificate", "result_signature",
        "atc_ack_signature",
        "activation_code_typed", "activation_code_typo",
        "tx_tenant", "tx_context", "tx_items", "tx_user_data", "tx_data_typed", "tx_counter",
        "tx_verification_signature",
    }  # fmt: skip
    assert inputs == INPUTS


def test_the_signatures_verify() -> None:
    signing = ec.decode_point(COMPUTED["verifier_signing_key"])
    ec.verify(signing, V["offer_signature"], V["offer_body"])
    ec.verify(signing, V["verification_signature"], V["verification_body"])
    ec.verify(signing, V["result_signature"], V["enrollment_result_body"])
    ec.verify(signing, V["tx_verification_signature"], V["tx_verification_body"])
    ec.verify(signing, V["atc_ack_signature"], V["atc_ack_body"])


def test_the_device_certificate_is_what_the_authenticator_stores() -> None:
    from cryptography import x509

    cert, ca = device_ca.check_device_certificate(
        V["device_certificate"], V["device_ca_certificate"], user=V["user"],
        method=Method.parse(V["method"]), credential_id=COMPUTED["credential_id"],
    )
    assert ec.encode_point(ca.public_key()) == COMPUTED["device_ca_key"]
    assert ca.subject == device_ca.ca_name(V["verifier_name"], V["verifier_id"])
    result = device_ca.attestation_of(cert)
    assert result is not None and (result.format, result.verified) == ("unattested", False)
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def test_the_otp_is_what_the_verifier_accepts() -> None:
    """The document's OTP passes the verifier's own check (OtpScheme.verify, with the
    verifier's MAC function) at its counter, and no other counter nearby."""
    scheme = OtpScheme.for_suite(V["suite"])
    z = V["z"]
    for counter in range(V["initial_atc"] + 1, V["initial_atc"] + 11):
        ok = scheme.verify(z, V["otp"], counter=counter, question=V["question"])
        assert ok is (counter == V["counter"])


def test_the_rfc6287_anchor_is_the_published_response() -> None:
    assert V["rfc6287_otp"] == "63947962"  # RFC 6287 Appendix C.1, C = 1


def test_the_version_and_the_qr_code() -> None:
    assert V["offer_body"][1] == VERSION == 3
    assert cbor2.loads(V["verification_body"])[:2] == [3, 3]
    assert qr.version_of(V["verification_text"]) == 9  # as section 4 says


def test_the_qr_version_of_a_transaction() -> None:
    """Section 4 and 17: a 60-character context, an amount and an IBAN (and a tenant and
    8 characters of user data) need QR version 12 at level M, within the bound of 13."""
    assert len(V["tx_context"]) == 60
    assert [label for label, _ in V["tx_items"]] == ["Amount", "Payee"]
    assert qr.version_of(V["tx_verification_text"]) == 12 <= 13
    bare = dataclasses.replace(_transaction_data(), tenant=None, user_data=0)
    assert qr.version_of(bare.to_text(lambda body: V["tx_verification_signature"])) == 12


def test_the_vector_format_is_strict() -> None:
    fence = "```vectors\n{}\n```\n"
    assert parse(fence.format("a = h'00 ff'\nb = \"x\"\nc = [1]\n# note")) == {
        "a": b"\x00\xff", "b": "x", "c": [1]
    }
    for bad in ("a = h'0'", "a = h'00FF'", "A = 1", "a = 1\na = 2", "a 1"):
        with pytest.raises(ValueError):
            parse(fence.format(bad))


def test_the_document_links_resolve() -> None:
    """Every ``(#anchor)`` link names a heading (GitHub's slugs: lower case, punctuation
    dropped, spaces to hyphens), and every section the code cites exists."""
    import re

    text = DOCUMENT.read_text(encoding="utf-8")
    headings = re.findall(r"^#{1,4} (.+)$", text, re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= slugs, sorted(links - slugs)
    root = DOCUMENT.parent.parent
    cited = {
        title
        for path in [*root.glob("hsm_auth/**/*.py"), *root.glob("backends/*.py")]
        for title in re.findall(r'PROTOCOL\.md,\s+(?:section\s+)?"([^"]+)"', path.read_text())
    }
    missing = [t for t in cited if not any(t.lower() in h.lower() for h in headings)]
    assert not missing, missing
