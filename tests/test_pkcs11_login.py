"""A PIN counts only when the token checked it in this very call (issue 10, finding 5).

PKCS#11 login state belongs to the application and the token: once another
session of this process logged in (here: a python-pkcs11 session opened with
the user PIN, as an application embedding hsm-auth may hold), ``C_Login``
answers ``CKR_USER_ALREADY_LOGGED_IN`` whatever PIN it is given. That answer
checked nothing, so it must never make a PIN accepted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

from hsm_auth.errors import PinInvalid
from hsm_auth.keystore import Authorization, Enrollment
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import SoftHsmToken
from hsm_auth.uri import Pkcs11Uri

pytestmark = pytest.mark.softhsm

WRONG = Authorization(pin="wrong-pin-0000")


def _settings(token: SoftHsmToken) -> dict[str, Any]:
    return {"uri": token.uri, "allow_unenforced_pin": True}


def _question(atc: int) -> bytes:
    return b"question" + atc.to_bytes(8, "big")


@pytest.fixture
def enrolled(softhsm_token: SoftHsmToken) -> Iterator[Enrollment]:
    good = Authorization(pin=softhsm_token.user_pin)
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as store:
        verifier = ec.generate_private_key(ec.SECP256R1()).public_key()
        enrollment = store.enroll(Method.PIN, "hsm-auth/alice/pin/x", verifier, good)
    # The last store closed: this process is logged out of the token again.
    yield enrollment


@pytest.fixture
def foreign_login(softhsm_token: SoftHsmToken) -> Iterator[Any]:
    """Another session of this process, logged in with the right PIN (not one of ours)."""
    import pkcs11

    token = pkcs11.lib(softhsm_token.module_path).get_token(token_label=softhsm_token.label)
    session = token.open(rw=True, user_pin=softhsm_token.user_pin)
    yield session
    session.close()


def test_wrong_pin_after_user_already_logged_in_releases_no_otp(
    softhsm_token: SoftHsmToken, enrolled: Enrollment, foreign_login: Any
) -> None:
    good = Authorization(pin=softhsm_token.user_pin)
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as store:
        with pytest.raises(PinInvalid):
            store.counted_hmac(enrolled.otp_key, enrolled.counter, _question, WRONG)
        with pytest.raises(PinInvalid):  # a second try is checked by the token again
            store.hmac(enrolled.otp_key, b"data", WRONG)
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as store:
        assert store.counter_value(enrolled.counter, good) == enrolled.initial_atc  # unchanged


def test_wrong_pin_given_to_open_is_refused_too(
    softhsm_token: SoftHsmToken, enrolled: Enrollment, foreign_login: Any, tmp_path: Any
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("wrong-pin-0000")
    pin_file.chmod(0o600)
    uri = str(
        Pkcs11Uri(
            token=softhsm_token.label,
            module_path=softhsm_token.module_path,
            pin_source=f"file:{pin_file}",
        )
    )
    with pytest.raises(PinInvalid):
        Pkcs11KeyStore.open({"uri": uri, "allow_unenforced_pin": True})


def test_right_pin_after_user_already_logged_in_is_checked_and_works(
    softhsm_token: SoftHsmToken, enrolled: Enrollment, foreign_login: Any
) -> None:
    good = Authorization(pin=softhsm_token.user_pin)
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as store:
        atc, mac = store.counted_hmac(enrolled.otp_key, enrolled.counter, _question, good)
        assert atc == enrolled.initial_atc + 1 and len(mac) == 32
        # The PIN the token checked now is the one later calls are compared with.
        with pytest.raises(PinInvalid):
            store.hmac(enrolled.otp_key, b"data", WRONG)
    # The other session is still logged in (the login it had was not taken away).
    import pkcs11

    assert list(foreign_login.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.DATA}))
