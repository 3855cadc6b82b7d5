"""docs/PROTOCOL.md §17 on the wire: the tenant, transaction data and user data of the
verification data, the offer's tenant and the result's expiry and PIN cache, decoded
strictly; the user's data normalized once; the enrolled method keeps the new fields."""

from __future__ import annotations

import os

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, transaction
from hsm_auth.authenticator import EnrolledMethod
from hsm_auth.enrollment_messages import EnrollmentOffer, EnrollmentResult
from hsm_auth.errors import DecodeError, InvalidInput, StateError
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData

PAY = (("Amount", "120.00 EUR"), ("Payee", "DE89 3704 0044 0532 0130 00"))


def _data(**over: object) -> VerificationData:
    fields: dict[str, object] = dict(
        verifier_id=os.urandom(8), user="alice", challenge=os.urandom(16),
        context="Pay your rent", methods=(Method.DEVICE,), expires=2_000_000_000,
        tenant="retail", transaction=PAY, user_data=8,
    )
    fields.update(over)
    return VerificationData(**fields)  # type: ignore[arg-type]


def _body(message: bytes) -> list[object]:
    return cbor2.loads(cbor2.loads(message)[0])  # type: ignore[no-any-return]


def _wire(values: list[object]) -> bytes:
    return cbor2.dumps([cbor2.dumps(values), b"s" * 64])


def test_the_new_fields_round_trip_and_are_at_the_end() -> None:
    data = _data()
    message = data.encode(None)
    assert VerificationData.decode(message)[0] == data
    assert _body(message)[-3:] == ["retail", [list(p) for p in PAY], 8]
    plain = _data(tenant=None, transaction=None, user_data=0)
    assert _body(plain.encode(None))[-3:] == [None, None, 0]
    assert VerificationData.decode(plain.encode(None))[0] == plain


def test_the_earlier_layout_is_refused() -> None:
    values = _body(_data().encode(None))
    with pytest.raises(DecodeError, match="wrong number of fields"):
        VerificationData.decode(_wire(values[:-3]))


@pytest.mark.parametrize(
    "tenant",
    ["", "a b", "x" * 65, 5, b"retail", "re\u202etail", "e\u0301", "tab\t"],
)
def test_a_bad_tenant_is_refused(tenant: object) -> None:
    values = _body(_data().encode(None))
    values[2 + 6] = tenant
    with pytest.raises(DecodeError, match="bad field tenant"):
        VerificationData.decode(_wire(values))


@pytest.mark.parametrize(
    "items",
    [
        [],  # an empty transaction is null, never []
        [["Amount", "1"]] * 2,  # a label twice
        [[f"L{i}", "v"] for i in range(9)],  # 9 pairs
        [["Amount: 5 EUR", "1"]],  # a colon in the label fakes a field
        [["x" * 33, "v"]],
        [["Amount", "v" * 65]],
        [["Amount", ""]],
        [["", "v"]],
        [["Amount"]],
        [["Amount", "1", "2"]],
        [["Amount", 120]],
        [[b"Amount", "1"]],
        [["Amount", "1\n2"]],
        [["Amount", "1\u200b2"]],  # zero-width
        [["Amount", "Mu\u0308ller"]],  # not NFC
        "Amount=1",
        {"Amount": "1"},
    ],
)
def test_a_bad_transaction_is_refused(items: object) -> None:
    values = _body(_data().encode(None))
    values[2 + 7] = items
    with pytest.raises(DecodeError):
        VerificationData.decode(_wire(values))


@pytest.mark.parametrize("user_data", [-1, 65, True, "8", None])
def test_a_bad_user_data_count_is_refused(user_data: object) -> None:
    values = _body(_data().encode(None))
    values[2 + 8] = user_data
    with pytest.raises(DecodeError, match="bad field user_data"):
        VerificationData.decode(_wire(values))


def test_the_offer_carries_the_tenant() -> None:
    point = ec.encode_point(cec.generate_private_key(ec.CURVE).public_key())
    offer = EnrollmentOffer(
        verifier_id=b"\x01" * 8, verifier_name="Bank", user="alice", offer_id=b"\x02" * 16,
        verifier_signing_key=point, verifier_agreement_key=point, suite="s", window=10,
        methods=(Method.DEVICE,), replace=False, expires=1, tenant="retail",
    )
    assert EnrollmentOffer.decode(offer.encode(None))[0] == offer
    values = _body(offer.encode(None))
    assert values[-1] == "retail"
    for bad in ("", "re tail", 7):
        values[-1] = bad
        with pytest.raises(DecodeError, match="bad field tenant"):
            EnrollmentOffer.decode(_wire(values))


def test_the_result_carries_expiry_and_pin_cache() -> None:
    result = EnrollmentResult(
        verifier_id=b"\x01" * 8, user="alice", method=Method.PIN, credential_id=b"\x03" * 16,
        certificate=b"c", ca_certificate=b"a", attestation="unattested",
        offline_expires=1_900_000_000, pin_cache=60,
    )
    message = result.encode(None)
    assert EnrollmentResult.decode(message)[0] == result
    values = _body(message)
    assert values[-2:] == [1_900_000_000, 60]
    for index, bad in ((-2, -1), (-2, True), (-1, 3601), (-1, None)):
        changed = list(values)
        changed[index] = bad
        with pytest.raises(DecodeError, match=("offline_expires", "pin_cache")[index + 2]):
            EnrollmentResult.decode(_wire(changed))
    with pytest.raises(DecodeError, match="wrong number of fields"):
        EnrollmentResult.decode(_wire(values[:-2]))


def test_the_transaction_digest_and_lines() -> None:
    assert transaction.digest(None) == b""
    assert len(transaction.digest(PAY)) == 32
    assert transaction.digest(PAY) != transaction.digest(PAY[::-1])
    assert transaction.lines(PAY) == ["Amount: 120.00 EUR", "Payee: DE89 3704 0044 0532 0130 00"]
    assert transaction.check({"Amount": "1", "Payee": "B"}) == (("Amount", "1"), ("Payee", "B"))
    with pytest.raises(InvalidInput, match="the transaction label 1 contains ':'"):
        transaction.check([("a:b", "1")])
    assert transaction.parse_item(" Amount = 120.00 EUR ") == ("Amount", "120.00 EUR")
    with pytest.raises(InvalidInput, match="LABEL=VALUE"):
        transaction.parse_item("Amount")


def test_user_data_is_normalized_once_for_both_sides() -> None:
    assert transaction.user_data(" Mu\u0308ller\n", 8) == "Müller"
    assert transaction.user_data(None, 0) == ""
    with pytest.raises(InvalidInput, match="takes no data"):
        transaction.user_data("1234", 0)
    with pytest.raises(InvalidInput, match="needs data"):
        transaction.user_data(None, 4)
    for bad in ("", "   ", "12345", "1\u00072", "a\u202eb"):
        with pytest.raises(InvalidInput, match="the data"):
            transaction.user_data(bad, 4)


def _enrolled_json(**over: object) -> dict[str, object]:
    d = EnrolledMethod(
        verifier_id=b"\x01" * 8, user="alice", method=Method.PIN, backend="pkcs11",
        settings={}, signing_key="s", otp_key="o", counter="c", agreement_key=None,
        suite="OCRA-1:HOTP-SHA256-8:C-QH64", window=10, synced_atc=0, created=0,
    ).to_json()
    d.update(over)
    return d


def test_the_enrolled_method_keeps_tenant_expiry_and_pin_cache() -> None:
    old = _enrolled_json()
    for name in ("tenant", "offline_expires", "pin_cache"):
        del old[name]  # written before these fields: the defaults
    m = EnrolledMethod.from_json(old)
    assert (m.tenant, m.offline_expires, m.pin_cache) == ("", 0, 0)
    m = EnrolledMethod.from_json(_enrolled_json(tenant="retail", offline_expires=5, pin_cache=60))
    assert (m.tenant, m.offline_expires, m.pin_cache) == ("retail", 5, 60)
    assert EnrolledMethod.from_json(m.to_json()) == m
    for bad in ({"tenant": 5}, {"pin_cache": 3601}, {"offline_expires": -1}, {"pin_cache": "6"}):
        with pytest.raises(StateError):
            EnrolledMethod.from_json(_enrolled_json(**bad))
