"""The OTP computed by the token equals the pure-Python OCRA of the verifier.

SoftHSM gets a test-only *imported* HMAC key (the RFC 6287 32-byte key) so the
token's CKM_SHA256_HMAC can be checked against the RFC's published values and
against hsm_auth.ocra for the product suite. Production OTP keys are never
imported: they are derived inside the token (see test_flow_pkcs11.py).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

from hsm_auth import ocra
from hsm_auth.keystore import Authorization
from hsm_auth.uri import Pkcs11Uri

pytestmark = pytest.mark.softhsm

KEY32 = b"12345678901234567890123456789012"  # RFC 6287 Appendix C, SHA-256 key
PIN_SHA1 = hashlib.sha1(b"1234").digest()
RFC_C1_SHA256_COUNTER = [
    "65347737", "86775851", "78192410", "71565254", "10104329",
    "65983500", "70069104", "91771096", "75011558", "08522129",
]  # fmt: skip  (OCRA-1:HOTP-SHA256-8:C-QN08-PSHA1, Q = "12345678", C = 0..9)


@pytest.fixture
def imported(softhsm_token):
    """A Pkcs11KeyStore on a fresh token plus the URI of KEY32 imported into it."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    lib = pkcs11.lib(softhsm_token.module_path)
    lib.reinitialize()
    store = Pkcs11KeyStore.open({"uri": softhsm_token.uri})
    auth = Authorization(pin=softhsm_token.user_pin)
    store.list_keys(auth)  # logs in (login state is per process and token)
    ident = os.urandom(16)
    token = lib.get_token(token_label=softhsm_token.label)
    with token.open(rw=True) as session:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.VALUE: KEY32,
                Attribute.ID: ident,
                Attribute.LABEL: "rfc6287-test-key",
            }
        )
    uri = Pkcs11Uri(
        token=softhsm_token.label,
        object="rfc6287-test-key",
        id=ident,
        type="secret-key",
        module_path=softhsm_token.module_path,
    )
    yield store, str(uri), auth
    store.close()


def test_token_hmac_gives_the_rfc_6287_values(imported):
    store, uri, auth = imported
    suite = ocra.OcraSuite.parse("OCRA-1:HOTP-SHA256-8:C-QN08-PSHA1")
    for counter, expected in enumerate(RFC_C1_SHA256_COUNTER):
        data = suite.data_input(counter=counter, question="12345678", password=PIN_SHA1)
        assert ocra.truncate(store.hmac(uri, data, auth), suite.digits) == expected


def test_token_otp_equals_python_ocra_for_the_product_suite(imported):
    store, uri, auth = imported
    suite = ocra.OcraSuite.parse(ocra.OTP_SUITE)
    for atc in (1, 2, 77, 2**40):
        question = hashlib.sha256(os.urandom(16)).hexdigest()
        data = suite.data_input(counter=atc, question=question)
        token_otp = ocra.truncate(store.hmac(uri, data, auth), suite.digits)
        assert token_otp == ocra.generate(suite, KEY32, counter=atc, question=question)
