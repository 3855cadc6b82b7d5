"""The contract every :class:`~hsm_auth.keystore.KeyStore` passes.

Subclass :class:`KeyStoreContract` in a test module (name the subclass
``Test...`` so that pytest collects it) and provide three fixtures:

* ``store`` — an open key store on a fresh token (closed at teardown);
* ``auth`` — an :class:`~hsm_auth.keystore.Authorization` that unlocks it;
* ``reopen`` — a callable that opens a *new* store on the same token (the
  fixture closes what it opened at teardown).

Set ``expected_capabilities`` to what the backend must claim on that token.
Tests for a capability the store does not claim are skipped with a reason;
a backend where a test does not apply (FIDO2 has no ECDH derive) overrides it.
Verification is independent of the backend: signatures are checked and the
OTP key recomputed with pyca/cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import ClassVar

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import KeyNotFound, LoginRequired
from ..keystore import Authorization, Capability, KeyKind, KeyStore
from ..methods import Method

Reopen = Callable[[], KeyStore]


def require(store: KeyStore, *capabilities: Capability) -> None:
    """Skip the calling test unless ``store`` claims every capability."""
    missing = set(capabilities) - store.capabilities()
    if missing:
        pytest.skip(f"{store.name} does not claim {', '.join(sorted(c.value for c in missing))}")


def verify_signature(public: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    public.verify(signature, data, ec.ECDSA(hashes.SHA256()))


class KeyStoreContract:
    """Backend-independent tests; see the module docstring for the fixtures to provide."""

    #: What the backend must claim on the test token.
    expected_capabilities: ClassVar[frozenset[Capability]] = frozenset()
    #: The method used by :meth:`test_enroll_otp_matches_verifier_ecdh`.
    enroll_method: ClassVar[Method] = Method.DEVICE

    # --- capabilities -----------------------------------------------------

    def test_capabilities_include_expected(self, store: KeyStore) -> None:
        claimed = store.capabilities()
        assert isinstance(claimed, frozenset)
        assert self.expected_capabilities <= claimed, self.expected_capabilities - claimed

    # --- signing ------------------------------------------------------------

    def test_signing_key_is_p256_and_signature_verifies(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.SIGN)
        uri = store.generate_key("contract-sign", KeyKind.SIGNING, auth)
        public = store.public_key(uri, auth)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP256R1)
        data = b"offline authentication contract"
        signature = store.sign(uri, data, auth)
        verify_signature(public, signature, data)
        with pytest.raises(InvalidSignature):
            verify_signature(public, signature, data + b"!")
        # ECDSA is randomised: a second signature differs and verifies too.
        second = store.sign(uri, data, auth)
        assert second != signature
        verify_signature(public, second, data)

    def test_list_keys_shows_generated_key(self, store: KeyStore, auth: Authorization) -> None:
        require(store, Capability.SIGN)
        uri = store.generate_key("contract-list", KeyKind.SIGNING, auth)
        listed = {info.uri: info for info in store.list_keys(auth)}
        assert uri in listed
        assert listed[uri].kind is KeyKind.SIGNING
        assert listed[uri].label == "contract-list"

    def test_delete_removes_key_and_twice_is_fine(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.SIGN)
        keep = store.generate_key("contract-keep", KeyKind.SIGNING, auth)
        uri = store.generate_key("contract-delete", KeyKind.SIGNING, auth)
        store.delete_key(uri, auth)
        uris = {info.uri for info in store.list_keys(auth)}
        assert uri not in uris
        assert keep in uris
        store.delete_key(uri, auth)
        with pytest.raises(KeyNotFound):
            store.public_key(uri, auth)
        with pytest.raises(KeyNotFound):
            store.sign(uri, b"x", auth)
        verify_signature(store.public_key(keep, auth), store.sign(keep, b"x", auth), b"x")

    def test_unknown_uri_after_reopen_is_key_not_found(
        self, store: KeyStore, auth: Authorization, reopen: Reopen
    ) -> None:
        require(store, Capability.SIGN)
        uri = store.generate_key("contract-gone", KeyKind.SIGNING, auth)
        store.delete_key(uri, auth)
        store.close()
        fresh = reopen()  # no handle cache: the lookup itself must fail
        with pytest.raises(KeyNotFound):
            fresh.sign(uri, b"x", auth)
        with pytest.raises(KeyNotFound):
            fresh.public_key(uri, auth)

    # --- OTP key --------------------------------------------------------------

    def test_derived_otp_key_matches_python_ecdh(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.ECDH_DERIVE, Capability.HMAC)
        agreement = store.generate_key("contract-ecdh", KeyKind.AGREEMENT, auth)
        token_public = store.public_key(agreement, auth)
        assert isinstance(token_public.curve, ec.SECP256R1)
        peer = ec.generate_private_key(ec.SECP256R1())
        otp = store.derive_otp_key("contract-otp", agreement, peer.public_key(), auth)
        shared = peer.exchange(ec.ECDH(), token_public)
        for data in (b"", b"challenge", bytes(range(256)) * 3):
            expected = hmac.new(shared, data, hashlib.sha256).digest()
            assert store.hmac(otp, data, auth) == expected
        kinds = {info.uri: info.kind for info in store.list_keys(auth)}
        assert kinds.get(otp) is KeyKind.OTP
        assert kinds.get(agreement) is KeyKind.AGREEMENT

    def test_deleted_otp_key_is_key_not_found(self, store: KeyStore, auth: Authorization) -> None:
        require(store, Capability.ECDH_DERIVE, Capability.HMAC)
        agreement = store.generate_key("contract-ecdh2", KeyKind.AGREEMENT, auth)
        peer = ec.generate_private_key(ec.SECP256R1())
        otp = store.derive_otp_key("contract-otp2", agreement, peer.public_key(), auth)
        store.hmac(otp, b"warm the cache", auth)
        store.delete_key(otp, auth)
        store.delete_key(otp, auth)
        with pytest.raises(KeyNotFound):
            store.hmac(otp, b"x", auth)

    # --- counter ----------------------------------------------------------

    def test_counter_starts_at_zero_and_increments_strictly(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.COUNTER)
        counter = store.create_counter("contract-atc", auth)
        assert store.counter_value(counter, auth) == 0
        seen = [store.counter_increment(counter, auth) for _ in range(5)]
        assert all(b > a for a, b in zip([0, *seen], seen, strict=False))
        assert store.counter_value(counter, auth) == seen[-1]

    def test_counters_are_independent(self, store: KeyStore, auth: Authorization) -> None:
        require(store, Capability.COUNTER)
        first = store.create_counter("contract-atc-a", auth)
        second = store.create_counter("contract-atc-b", auth)
        assert first != second
        value = store.counter_increment(first, auth)
        assert store.counter_value(first, auth) == value
        assert store.counter_value(second, auth) == 0

    def test_counter_survives_reopen(
        self, store: KeyStore, auth: Authorization, reopen: Reopen
    ) -> None:
        require(store, Capability.COUNTER)
        counter = store.create_counter("contract-atc-durable", auth)
        for _ in range(3):
            value = store.counter_increment(counter, auth)
        store.close()
        fresh = reopen()
        assert fresh.counter_value(counter, auth) == value
        assert fresh.counter_increment(counter, auth) > value

    def test_deleted_counter_is_key_not_found(self, store: KeyStore, auth: Authorization) -> None:
        require(store, Capability.COUNTER)
        counter = store.create_counter("contract-atc-gone", auth)
        store.counter_increment(counter, auth)
        store.delete_key(counter, auth)
        store.delete_key(counter, auth)
        with pytest.raises(KeyNotFound):
            store.counter_value(counter, auth)
        with pytest.raises(KeyNotFound):
            store.counter_increment(counter, auth)

    def test_counted_hmac_returns_new_counter_value(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.COUNTER, Capability.ECDH_DERIVE, Capability.HMAC)
        agreement = store.generate_key("contract-ecdh3", KeyKind.AGREEMENT, auth)
        peer = ec.generate_private_key(ec.SECP256R1())
        otp = store.derive_otp_key("contract-otp3", agreement, peer.public_key(), auth)
        shared = peer.exchange(ec.ECDH(), store.public_key(agreement, auth))
        counter = store.create_counter("contract-atc-hmac", auth)
        before = store.counter_value(counter, auth)

        def message_for(value: int) -> bytes:
            return value.to_bytes(8, "big") + b"question"

        value, mac = store.counted_hmac(otp, counter, message_for, auth)
        assert value > before
        assert store.counter_value(counter, auth) == value
        assert mac == hmac.new(shared, message_for(value), hashlib.sha256).digest()
        again, _ = store.counted_hmac(otp, counter, message_for, auth)
        assert again > value

    def test_counted_hmac_stops_at_limit(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.COUNTER, Capability.ECDH_DERIVE, Capability.HMAC)
        agreement = store.generate_key("contract-ecdh4", KeyKind.AGREEMENT, auth)
        peer = ec.generate_private_key(ec.SECP256R1())
        otp = store.derive_otp_key("contract-otp4", agreement, peer.public_key(), auth)
        counter = store.create_counter("contract-atc-limit", auth)
        start = store.counter_value(counter, auth)
        value, _ = store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=start + 1)
        assert value == start + 1
        for limit in (value, value - 1, 0):
            with pytest.raises(LoginRequired) as refused:
                store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=limit)
            assert (refused.value.atc, refused.value.limit) == (value, limit)
            assert store.counter_value(counter, auth) == value  # not advanced
        again, _ = store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=value + 1)
        assert again == value + 1

    # --- enrollment -------------------------------------------------------

    def test_agree_otp_key_leaves_no_agreement_key(
        self, store: KeyStore, auth: Authorization
    ) -> None:
        require(store, Capability.ECDH_DERIVE, Capability.HMAC)
        before = {i.uri for i in store.list_keys(auth)}
        # The backend's own agree_otp_key, and the default built on the primitives.
        for agree in (store.agree_otp_key,
                      lambda *a: KeyStore.agree_otp_key(store, *a)):
            verifier = ec.generate_private_key(ec.SECP256R1())
            otp, public = agree("contract-agree", verifier.public_key(), auth)
            shared = verifier.exchange(ec.ECDH(), public)
            expected = hmac.new(shared, b"q", hashlib.sha256).digest()
            assert store.hmac(otp, b"q", auth) == expected
            left = {i.uri: i.kind for i in store.list_keys(auth) if i.uri not in before}
            assert left == {otp: KeyKind.OTP}
            store.delete_key(otp, auth)

    def test_enroll_otp_matches_verifier_ecdh(self, store: KeyStore, auth: Authorization) -> None:
        require(
            store, Capability.SIGN, Capability.HMAC, Capability.ECDH_DERIVE, Capability.COUNTER
        )
        verifier = ec.generate_private_key(ec.SECP256R1())
        enrollment = store.enroll(
            self.enroll_method, "contract-enroll", verifier.public_key(), auth
        )
        if enrollment.agreement_public is None:
            pytest.skip("the backend hands the OTP key to the verifier; test that in the subclass")
        shared = verifier.exchange(ec.ECDH(), enrollment.agreement_public)
        data = b"ocra data input"
        expected = hmac.new(shared, data, hashlib.sha256).digest()
        assert store.hmac(enrollment.otp_key, data, auth) == expected
        # No agreement key outlives enrollment (issue 10, finding 1).
        assert enrollment.agreement_key is None
        assert KeyKind.AGREEMENT not in {i.kind for i in store.list_keys(auth)}
        assert enrollment.initial_atc == store.counter_value(enrollment.counter, auth) == 0
        signature = store.sign(enrollment.signing_key, data, auth)
        verify_signature(enrollment.signing_public, signature, data)
        store.unenroll(enrollment, auth)
        with pytest.raises(KeyNotFound):
            store.hmac(enrollment.otp_key, data, auth)
