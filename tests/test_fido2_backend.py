"""The FIDO2 backend on the software CTAP2 authenticator: the shared contract,
modality checks, user verification failures, cancel / timeout, the host-kept
ATC (unmoved by other uses of the authenticator), clone detection by the
signature counter, bad device answers, and the enrollment proof.

Nothing stands in for the authenticator: every call goes through python-fido2's
``Ctap2`` to :class:`SoftAuthenticator`. Where a test needs a device that
misbehaves (garbage CBOR, a user who never touches), :class:`FaultyDevice`
wraps the real soft authenticator and alters only that one answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from threading import Event
from typing import Any

import pytest

pytest.importorskip("fido2", reason="python-fido2 (the fido2 extra) is not installed")

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.hid import CTAPHID
from fido2.webauthn import (
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialRequestOptions,
    PublicKeyCredentialType,
    UserVerificationRequirement,
)
from hsm_auth_backends.fido2 import ALLOW_SOFT_SETTING, ENV_SOFT_DEVICE, OTP_SALT, Fido2KeyStore

from hsm_auth import ec as ecutil
from hsm_auth import key_transport
from hsm_auth.cli import describe
from hsm_auth.errors import (
    BackendError,
    Cancelled,
    ConfigError,
    CounterError,
    HsmAuthError,
    InvalidInput,
    KeyNotFound,
    LoginRequired,
    MechanismNotSupported,
    PinInvalid,
    RetryStatus,
    StateError,
    TokenNotFound,
    UntrustedMessage,
    UserVerificationFailed,
)
from hsm_auth.key_transport import wrap, wrap_otp_key
from hsm_auth.keystore import Authorization, Capability, KeyKind, UserInteraction
from hsm_auth.methods import Method
from hsm_auth.testing import soft_fido2
from hsm_auth.testing.contract import KeyStoreContract, Reopen
from hsm_auth.testing.fido2 import make_client, use_elsewhere
from hsm_auth.testing.soft_fido2 import MAX_UV_RETRIES, SoftAuthenticator, UvModality
from hsm_auth.uri import parse_attr_uri
from hsm_auth.verifier_keys import FileVerifierKeys
from hsm_auth.webauthn_proof import (
    enrollment_binding,
    verify_enrollment_attestation,
)

pytestmark = pytest.mark.fido2

Factory = Callable[..., SoftAuthenticator]
AUTH = Authorization(prompt="Verify with your fingerprint on the authenticator")
BINDING = enrollment_binding(b"\x01" * 16, "alice", Method.BIOMETRIC)
_GET_ASSERTION, _CLIENT_PIN, _GET_INFO = 0x02, 0x06, 0x04
_GET_TOKEN_USING_UV = 0x06


def settings_for(device: SoftAuthenticator, state: Path, **extra: Any) -> dict[str, Any]:
    return {
        "device": f"soft:{device.path}",
        "state_dir": str(state),
        "prompts": False,
        ALLOW_SOFT_SETTING: True,
        **extra,
    }


def credential_id(uri: str) -> bytes:
    text = parse_attr_uri(uri, "fido2")[0]["id"]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def otp_key_from_python_fido2(device: SoftAuthenticator, uri: str) -> bytes:
    """The hmac-secret output for our salt, fetched by python-fido2's own client:
    an independent path to the key the backend derives."""
    client = make_client(device, origin="https://hsm-auth")
    result = client.get_assertion(
        PublicKeyCredentialRequestOptions(
            challenge=os.urandom(32),
            rp_id="hsm-auth",
            allow_credentials=[
                PublicKeyCredentialDescriptor(
                    type=PublicKeyCredentialType.PUBLIC_KEY, id=credential_id(uri)
                )
            ],
            user_verification=UserVerificationRequirement.REQUIRED,
            extensions={"hmacGetSecret": {"salt1": OTP_SALT}},
        )
    )
    output = result.get_response(0).client_extension_results["hmacGetSecret"]["output1"]
    return base64.urlsafe_b64decode(output + "=" * (-len(output) % 4))


def stored(store: Fido2KeyStore, uri: str) -> dict[str, Any]:
    """The host's record of the credential of ``uri``, read from the state file."""
    key = parse_attr_uri(uri, "fido2")[0]["id"]
    data = json.loads(store.state_file.read_text())
    return next(c for c in data["credentials"] if c["id"] == key)  # type: ignore[no-any-return]


def one_line(error: BaseException) -> None:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text


class FaultyDevice(CtapDevice):
    """The real soft authenticator, with one scripted misbehaviour:

    * ``garbage``: replace the next answer to CTAP command ``garbage[0]`` by ``garbage[1]``;
    * ``hang_uv``: on getPinUvAuthTokenUsingUv, wait (a user who never touches)
      until the CTAP cancel event is set, then answer KEEPALIVE_CANCEL;
    * ``hide_uv``: getInfo without the ``uv`` option (no built-in UV at all).
    """

    def __init__(self, inner: SoftAuthenticator) -> None:
        self.inner = inner
        self.garbage: tuple[int, bytes] | None = None
        self.hang_uv = False
        self.hide_uv = False
        self.cancelled = Event()

    @property
    def capabilities(self) -> int:
        return self.inner.capabilities

    @classmethod
    def list_devices(cls):  # type: ignore[no-untyped-def]
        return iter(())

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: Event | None = None,
        on_keepalive: Callable[[Any], None] | None = None,
    ) -> bytes:
        command = data[0] if cmd == CTAPHID.CBOR and data else None
        hang = self.hang_uv and command == _CLIENT_PIN
        if hang and cbor.decode(data[1:]).get(2) == _GET_TOKEN_USING_UV:
            assert event is not None
            if on_keepalive is not None:
                on_keepalive(STATUS.UPNEEDED)
            if event.wait(10):
                self.cancelled.set()
                return bytes([CtapError.ERR.KEEPALIVE_CANCEL])
            return bytes([CtapError.ERR.USER_ACTION_TIMEOUT])
        answer = self.inner.call(cmd, data, event, on_keepalive)
        if self.garbage is not None and command == self.garbage[0]:
            answer, self.garbage = self.garbage[1], None
        if self.hide_uv and command == _GET_INFO:
            info = cbor.decode(answer[1:])
            info[4] = {k: v for k, v in info[4].items() if k != "uv"}
            answer = b"\x00" + cbor.encode(info)
        return answer


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture
def device(soft_fido2: SoftAuthenticator) -> SoftAuthenticator:
    return soft_fido2


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "fido2-state"


@pytest.fixture
def opened(device: SoftAuthenticator, state: Path):  # type: ignore[no-untyped-def]
    stores: list[Fido2KeyStore] = []

    def open_store(**extra: Any) -> Fido2KeyStore:
        stores.append(Fido2KeyStore.open(settings_for(device, state, **extra)))
        return stores[-1]

    yield open_store
    for s in stores:
        s.close()


@pytest.fixture
def store(opened):  # type: ignore[no-untyped-def]
    return opened()


@pytest.fixture
def reopen(opened) -> Reopen:  # type: ignore[no-untyped-def]
    return opened  # type: ignore[no-any-return]


@pytest.fixture
def auth() -> Authorization:
    return AUTH


class OfferAgreement:
    """The verifier's side of one offer's key transport: the offer's agreement key
    (as the verifier's key file derives it) and the unwrap of a wrapped OTP key."""

    def __init__(self, keys: FileVerifierKeys, offer_id: bytes) -> None:
        self._private = keys.offer_private(offer_id)
        self.agreement_public = self._private.public_key()

    def unwrap_otp_key(self, wrapped: bytes) -> bytes:
        shared = self._private.exchange(ec.ECDH(), key_transport.ephemeral_point(wrapped))
        return key_transport.open_with_shared(shared, wrapped)


@pytest.fixture
def verifier_keys(tmp_path: Path) -> OfferAgreement:
    return OfferAgreement(FileVerifierKeys.create(tmp_path / "verifier-keys.pem"), b"O" * 16)


# --- the shared contract ------------------------------------------------------------


class TestFido2Contract(KeyStoreContract):
    expected_capabilities = frozenset(
        {
            Capability.HMAC,
            Capability.COUNTER,
            Capability.USER_VERIFICATION,
        }
    )
    enroll_method = Method.BIOMETRIC

    # A FIDO2 credential cannot sign arbitrary data: it signs its own assertions
    # (authenticatorData || clientDataHash). The signing tests check that instead.

    def test_signing_key_is_p256_and_signature_verifies(self, store, auth):  # type: ignore[no-untyped-def]
        uri = store.generate_key("contract-sign", KeyKind.SIGNING, auth)
        public = store.public_key(uri, auth)
        assert isinstance(public.curve, ec.SECP256R1)
        with pytest.raises(MechanismNotSupported):
            store.sign(uri, b"offline authentication contract", auth)
        cdh = hashlib.sha256(b"login challenge").digest()
        auth_data, signature = store.login_assertion(uri, cdh, auth)
        public.verify(signature, auth_data + cdh, ec.ECDSA(hashes.SHA256()))
        assert auth_data[32] & 0x05 == 0x05  # user present and verified
        with pytest.raises(InvalidSignature):
            public.verify(signature, auth_data + cdh[:-1] + b"!", ec.ECDSA(hashes.SHA256()))
        second, _ = store.login_assertion(uri, cdh, auth)
        assert int.from_bytes(second[33:37], "big") > int.from_bytes(auth_data[33:37], "big")

    def test_list_keys_shows_generated_key(self, store, auth):  # type: ignore[no-untyped-def]
        uri = store.generate_key("contract-list", KeyKind.SIGNING, auth)
        listed = {info.uri: info for info in store.list_keys(auth)}
        assert listed[uri].kind is KeyKind.SIGNING
        assert listed[uri].label == "contract-list"

    def test_delete_removes_key_and_twice_is_fine(self, store, auth):  # type: ignore[no-untyped-def]
        keep = store.generate_key("contract-keep", KeyKind.SIGNING, auth)
        uri = store.generate_key("contract-delete", KeyKind.SIGNING, auth)
        store.delete_key(uri, auth)
        uris = {info.uri for info in store.list_keys(auth)}
        assert uri not in uris and keep in uris
        store.delete_key(uri, auth)
        with pytest.raises(KeyNotFound):
            store.public_key(uri, auth)
        with pytest.raises(KeyNotFound):
            store.login_assertion(uri, bytes(32), auth)
        store.login_assertion(keep, bytes(32), auth)

    def test_unknown_uri_after_reopen_is_key_not_found(self, store, auth, reopen):  # type: ignore[no-untyped-def]
        uri = store.generate_key("contract-gone", KeyKind.SIGNING, auth)
        store.delete_key(uri, auth)
        store.close()
        fresh = reopen()
        with pytest.raises(KeyNotFound):
            fresh.login_assertion(uri, bytes(32), auth)
        with pytest.raises(KeyNotFound):
            fresh.public_key(uri, auth)

    # No ECDH in FIDO2: the OTP key is hmac-secret output, checked against the key
    # that python-fido2's own client gets from the same credential and salt.

    def test_derived_otp_key_matches_python_ecdh(  # type: ignore[no-untyped-def]
        self, store, auth, device, verifier_keys
    ):
        peer = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(MechanismNotSupported):
            store.derive_otp_key("x", "fido2:id=AA", peer.public_key(), auth)
        enrollment = store.enroll(Method.BIOMETRIC, "contract-otp", verifier_keys.agreement_public,
                                  auth)
        key = otp_key_from_python_fido2(device, enrollment.otp_key)
        assert key == verifier_keys.unwrap_otp_key(enrollment.otp_key_for_verifier)
        for data in (b"", b"challenge", bytes(range(256)) * 3):
            assert store.hmac(enrollment.otp_key, data, auth) == hmac.new(
                key, data, hashlib.sha256
            ).digest()
        kinds = {info.uri: info.kind for info in store.list_keys(auth)}
        assert kinds[enrollment.otp_key] is KeyKind.OTP

    def test_deleted_otp_key_is_key_not_found(self, store, auth, verifier_keys):  # type: ignore[no-untyped-def]
        enrollment = store.enroll(Method.BIOMETRIC, "contract-otp2",
                                  verifier_keys.agreement_public, auth)
        store.hmac(enrollment.otp_key, b"warm", auth)
        store.delete_key(enrollment.otp_key, auth)
        store.delete_key(enrollment.otp_key, auth)
        with pytest.raises(KeyNotFound):
            store.hmac(enrollment.otp_key, b"x", auth)

    # The ATC is the host's, per credential: 0, then exactly +1 per increment, while
    # each increment is one assertion (the signature counter, shared, moves too).

    def test_counter_starts_at_zero_and_increments_strictly(self, store, auth, device):  # type: ignore[no-untyped-def]
        counter = store.create_counter("contract-atc", auth)
        assert store.counter_value(counter, auth) == 0
        start = device.status().sign_count
        assert [store.counter_increment(counter, auth) for _ in range(5)] == [1, 2, 3, 4, 5]
        assert device.status().sign_count == start + 5  # one assertion each
        assert store.counter_value(counter, auth) == 5
        assert stored(store, counter)["last_sign_count"] == start + 5

    def test_counters_are_independent(self, store, auth):  # type: ignore[no-untyped-def]
        first = store.create_counter("contract-atc-a", auth)
        second = store.create_counter("contract-atc-b", auth)
        assert first != second
        assert [store.counter_increment(first, auth) for _ in range(3)] == [1, 2, 3]
        assert store.counter_value(second, auth) == 0  # the shared signCount moved by 3
        assert store.counter_increment(second, auth) == 1
        assert store.counter_value(first, auth) == 3

    def test_counted_hmac_returns_new_counter_value(self, store, auth, verifier_keys, device):  # type: ignore[no-untyped-def]
        enrollment = store.enroll(Method.BIOMETRIC, "contract-hmac",
                                  verifier_keys.agreement_public, auth)
        key = verifier_keys.unwrap_otp_key(enrollment.otp_key_for_verifier)
        assert enrollment.initial_atc == store.counter_value(enrollment.counter, auth) == 0
        durable: list[dict[str, Any]] = []

        def message_for(value: int) -> bytes:
            durable.append(stored(store, enrollment.counter))  # on disk before the MAC
            return value.to_bytes(8, "big") + b"question"

        before = device.status().sign_count
        value, mac = store.counted_hmac(enrollment.otp_key, enrollment.counter, message_for, auth)
        after = device.status().sign_count
        assert value == 1 and after == before + 1  # ONE assertion per OTP
        assert durable[-1]["atc"] == 1 and durable[-1]["last_sign_count"] == after
        assert store.counter_value(enrollment.counter, auth) == value
        assert mac == hmac.new(key, message_for(value), hashlib.sha256).digest()
        again, _ = store.counted_hmac(enrollment.otp_key, enrollment.counter, message_for, auth)
        assert again == 2 and durable[-1]["atc"] == 2

    def test_counted_hmac_stops_at_limit(self, store, auth, verifier_keys, device):  # type: ignore[no-untyped-def]
        enrollment = store.enroll(Method.BIOMETRIC, "contract-limit",
                                  verifier_keys.agreement_public, auth)
        otp, counter = enrollment.otp_key, enrollment.counter
        value, _ = store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=1)
        assert value == 1
        before = device.status().sign_count
        with pytest.raises(LoginRequired) as refused:
            store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=1)
        assert (refused.value.atc, refused.value.limit) == (1, 1)
        assert device.status().sign_count == before  # refused before any assertion (no UV)
        assert store.counter_value(counter, auth) == 1
        assert store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=2)[0] == 2

    def test_enroll_otp_matches_verifier_ecdh(self, store, auth, verifier_keys, device):  # type: ignore[no-untyped-def]
        enrollment = store.enroll(
            Method.BIOMETRIC, "contract-enroll", verifier_keys.agreement_public, auth,
            binding=BINDING,
        )
        assert enrollment.agreement_public is None and enrollment.agreement_key is None
        key = verifier_keys.unwrap_otp_key(enrollment.otp_key_for_verifier)
        data = b"ocra data input"
        assert store.hmac(enrollment.otp_key, data, auth) == hmac.new(
            key, data, hashlib.sha256
        ).digest()
        proof = verify_enrollment_attestation(
            enrollment.attestation,
            ecutil.encode_point(enrollment.signing_public),
            BINDING,
            enrollment.otp_key_for_verifier,
            initial_atc=enrollment.initial_atc,
        )
        assert proof.aaguid == soft_fido2.SOFT_AAGUID
        assert proof.cred_protect == 3 and proof.fmt == "packed" and "x5c" in proof.statement
        assert proof.credential_id == credential_id(enrollment.otp_key)
        store.unenroll(enrollment, auth)
        with pytest.raises(KeyNotFound):
            store.hmac(enrollment.otp_key, data, auth)


# --- modality and built-in UV ------------------------------------------------------


@pytest.mark.parametrize(
    ("modality", "refused", "accepted", "named"),
    [
        (UvModality.FACE, Method.BIOMETRIC, Method.FACE, "face"),
        (UvModality.FINGERPRINT, Method.FACE, Method.BIOMETRIC, "fingerprint"),
    ],
)
def test_modality_refuses_the_other_method_and_names_what_it_has(  # type: ignore[no-untyped-def]
    soft_fido2_factory, state, verifier_keys, modality, refused, accepted, named
):
    device = soft_fido2_factory(uv_modality=modality)
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        before = device.status()
        with pytest.raises(MechanismNotSupported, match=f"verifies by {named}") as caught:
            store.enroll(refused, "wrong", verifier_keys.agreement_public, AUTH)
        one_line(caught.value)
        assert device.status() == before  # refused before anything reached the device
        assert store.list_keys(AUTH) == []
        enrollment = store.enroll(accepted, "right", verifier_keys.agreement_public, AUTH)
        assert enrollment.initial_atc == 0
        assert device.status().sign_count == before.sign_count + 2  # made, then asserted


def test_authenticator_without_builtin_uv_is_refused(device, state):  # type: ignore[no-untyped-def]
    faulty = FaultyDevice(device)
    faulty.hide_uv = True
    with pytest.raises(MechanismNotSupported, match="built-in user verification") as caught:
        Fido2KeyStore.from_device(faulty, settings_for(device, state))
    one_line(caught.value)


def test_uv_not_set_up_needs_explicit_pin_fallback(soft_fido2_factory, state):  # type: ignore[no-untyped-def]
    device = soft_fido2_factory(pin="314159")
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        counter = store.create_counter("atc", AUTH)
    device.configure(uv_enrolled=False)
    pinned = Authorization(pin="314159")
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        assert Capability.USER_VERIFICATION not in store.capabilities()
        with pytest.raises(UserVerificationFailed, match="allow_pin_fallback"):
            store.counter_increment(counter, pinned)
    with Fido2KeyStore.open(settings_for(device, state, allow_pin_fallback=True)) as store:
        assert store.pin_status().enforced
        with pytest.raises(PinInvalid) as wrong:
            store.counter_increment(counter, Authorization(pin="000000"))
        assert wrong.value.retry.retries_left == soft_fido2.MAX_PIN_RETRIES - 1
        before = device.status().sign_count
        assert store.counter_increment(counter, pinned) == 1
        assert device.status().sign_count == before + 1


# --- user verification failures, cancel, timeout ---------------------------------------


def test_failed_uv_reports_retries_left_and_releases_nothing(store, device, verifier_keys):  # type: ignore[no-untyped-def]
    enrollment = store.enroll(Method.BIOMETRIC, "uv", verifier_keys.agreement_public, AUTH)
    state_before = store.state_file.read_bytes()
    count_before = device.status().sign_count
    device.configure(uv_outcome="fail")
    for left in (MAX_UV_RETRIES - 1, MAX_UV_RETRIES - 2):
        with pytest.raises(UserVerificationFailed) as caught:
            store.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
        assert caught.value.retry == RetryStatus(retries_left=left)
        assert caught.value.native_code == 0x3F
        assert "retr" not in str(caught.value)  # the data, not the message, has the count
        assert describe(caught.value) == f"user verification failed ({left} retries left)"
        one_line(caught.value)
    assert store.state_file.read_bytes() == state_before
    assert device.status().sign_count == count_before  # no assertion happened
    device.configure(uv_outcome="succeed")
    value, _ = store.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
    assert value == enrollment.initial_atc + 1 == 1
    assert device.status().sign_count == count_before + 1
    assert device.status().uv_retries == MAX_UV_RETRIES


def test_blocked_uv_falls_back_to_pin_only_where_allowed(soft_fido2_factory, state):  # type: ignore[no-untyped-def]
    device = soft_fido2_factory(pin="271828")
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        counter = store.create_counter("atc", AUTH)
        device.configure(uv_outcome="fail")
        for _ in range(MAX_UV_RETRIES - 1):
            with pytest.raises(UserVerificationFailed):
                store.counter_increment(counter, AUTH)
        with pytest.raises(UserVerificationFailed) as caught:
            store.counter_increment(counter, Authorization(pin="271828"))
        assert caught.value.retry == RetryStatus(retries_left=0, locked=True)
        assert "blocked" in str(caught.value)
        with pytest.raises(UserVerificationFailed, match="blocked"):  # PIN given, not allowed
            store.counter_increment(counter, Authorization(pin="271828"))
    with Fido2KeyStore.open(settings_for(device, state, allow_pin_fallback=True)) as store:
        value = store.counter_increment(counter, Authorization(pin="271828"))
        assert value == 1  # the failed and blocked attempts moved nothing


def test_uv_cancelled_on_the_device_is_cancelled_and_changes_nothing(store, device):  # type: ignore[no-untyped-def]
    counter = store.create_counter("atc", AUTH)
    before = (store.state_file.read_bytes(), device.status())
    device.configure(uv_outcome="cancel")
    with pytest.raises(Cancelled) as caught:
        store.counter_increment(counter, AUTH)
    one_line(caught.value)
    assert (store.state_file.read_bytes(), device.status()) == before
    device.configure(uv_outcome="succeed")
    assert store.counter_increment(counter, AUTH) == 1
    assert device.status().sign_count == before[1].sign_count + 1


def _hanging_store(
    device: SoftAuthenticator, state: Path
) -> tuple[Fido2KeyStore, FaultyDevice, str]:
    with Fido2KeyStore.open(settings_for(device, state)) as plain:
        counter = plain.create_counter("atc", AUTH)
    faulty = FaultyDevice(device)
    faulty.hang_uv = True
    store = Fido2KeyStore.from_device(faulty, settings_for(device, state, prompts=True))
    return store, faulty, counter


def test_ctrl_c_sends_ctap_cancel_and_raises_cancelled(device, state, capfd):  # type: ignore[no-untyped-def]
    store, faulty, counter = _hanging_store(device, state)
    before = (store.state_file.read_bytes(), device.status())
    main = threading.get_ident()
    timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    prompts: list[str] = []

    class Prompts(UserInteraction):
        def prompt_up(self, prompt: str) -> None:
            prompts.append(prompt)

    try:
        with pytest.raises(Cancelled, match="Ctrl"):
            store.counter_increment(counter, replace(AUTH, interaction=Prompts()))
    finally:
        timer.cancel()
    assert faulty.cancelled.is_set()  # the CTAP cancel reached the authenticator
    assert (store.state_file.read_bytes(), device.status()) == before
    assert prompts == [AUTH.prompt]  # told the caller, and wrote nothing itself
    assert capfd.readouterr() == ("", "")
    faulty.hang_uv = False
    assert store.counter_increment(counter, AUTH) == 1
    assert device.status().sign_count == before[1].sign_count + 1
    store.close()


def test_timeout_is_configurable_and_cancels(device, state):  # type: ignore[no-untyped-def]
    store, faulty, counter = _hanging_store(device, state)
    with pytest.raises(Cancelled, match=r"within 0\.2 s"):
        store.counter_increment(counter, Authorization(timeout=0.2))
    assert faulty.cancelled.is_set()
    store.close()
    with pytest.raises(ConfigError):
        Fido2KeyStore.open(settings_for(device, state, timeout=0))


# --- clones ------------------------------------------------------------------------------


def test_cloned_authenticator_is_refused_once_the_other_moved_the_counter(  # type: ignore[no-untyped-def]
    device, state, verifier_keys, tmp_path
):
    clone_path = tmp_path / "clone.json"
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        enrollment = store.enroll(Method.BIOMETRIC, "clone", verifier_keys.agreement_public, AUTH)
    shutil.copy2(device.path, clone_path)  # two copies of one authenticator's state
    clone = SoftAuthenticator.load(clone_path)
    with Fido2KeyStore.open(settings_for(device, state)) as original:
        first, _ = original.counted_hmac(enrollment.otp_key, enrollment.counter,
                                         lambda c: b"m", AUTH)
        assert first == 1
    with Fido2KeyStore.open(settings_for(clone, state)) as cloned:
        with pytest.raises(CounterError, match="cloned") as caught:
            cloned.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
        one_line(caught.value)
        assert cloned.counter_value(enrollment.counter, AUTH) == first  # not moved back
        # Retrying does not help the clone once its counter catches up: the credential is latched.
        for _ in range(3):
            with pytest.raises(CounterError):
                cloned.hmac(enrollment.otp_key, b"m", AUTH)
    with Fido2KeyStore.open(settings_for(device, state)) as original, pytest.raises(CounterError):
        original.hmac(enrollment.otp_key, b"m", AUTH)


# --- the host-kept ATC -----------------------------------------------------------------------


def test_atc_moves_by_one_per_otp_whatever_else_the_authenticator_signs(  # type: ignore[no-untyped-def]
    store, device, verifier_keys
):
    """A website login between two OTPs moves the shared signature counter by 26;
    the credential's ATC still moves by exactly 1 per OTP."""
    enrollment = store.enroll(Method.BIOMETRIC, "elsewhere", verifier_keys.agreement_public, AUTH)
    key = verifier_keys.unwrap_otp_key(enrollment.otp_key_for_verifier)

    def message_for(value: int) -> bytes:
        return value.to_bytes(8, "big") + b"question"

    first, _ = store.counted_hmac(enrollment.otp_key, enrollment.counter, message_for, AUTH)
    before = device.status().sign_count
    use_elsewhere(device, 25)
    assert device.status().sign_count == before + 26
    assert store.counter_value(enrollment.counter, AUTH) == first == 1
    value, mac = store.counted_hmac(enrollment.otp_key, enrollment.counter, message_for, AUTH)
    assert value == first + 1
    assert mac == hmac.new(key, message_for(value), hashlib.sha256).digest()
    assert stored(store, enrollment.counter)["last_sign_count"] == before + 27
    assert store.counter_increment(enrollment.counter, AUTH) == value + 1
    # Host-kept, so not claimed as a hardware counter (the signature counter is the guard).
    assert Capability.HARDWARE_COUNTER not in store.capabilities()


def test_login_assertion_checks_the_signature_counter_and_leaves_the_atc(  # type: ignore[no-untyped-def]
    store, device, verifier_keys, tmp_path
):
    enrollment = store.enroll(Method.BIOMETRIC, "login", verifier_keys.agreement_public, AUTH)
    atc, _ = store.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
    snapshot = device.path.read_bytes()  # the authenticator before the login
    use_elsewhere(device, 3)
    auth_data, _ = store.login_assertion(enrollment.signing_key, bytes(32), AUTH)
    raw = int.from_bytes(auth_data[33:37], "big")
    assert raw == device.status().sign_count  # the raw signature counter, for the authfile
    assert stored(store, enrollment.signing_key)["last_sign_count"] == raw
    assert store.counter_value(enrollment.counter, AUTH) == atc  # the ATC did not move
    device.path.write_bytes(snapshot)  # a clone of the authenticator as it was before
    with pytest.raises(CounterError, match="cloned"):
        store.login_assertion(enrollment.signing_key, bytes(32), AUTH)
    with pytest.raises(CounterError):
        store.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
    assert store.counter_value(enrollment.counter, AUTH) == atc


def test_state_version_1_keeps_the_atc_where_the_signature_counter_was(  # type: ignore[no-untyped-def]
    store, device, verifier_keys
):
    """Version 1 used the signature counter as the ATC, and the verifier stands
    there: reading it starts the host-kept ATC at that value, then +1 per OTP."""
    enrollment = store.enroll(Method.BIOMETRIC, "v1", verifier_keys.agreement_public, AUTH)
    data = json.loads(store.state_file.read_text())
    for record in data["credentials"]:
        record["sign_count"] = record.pop("last_sign_count")
        del record["atc"]
    data["version"] = 1
    store.state_file.write_text(json.dumps(data))
    old = device.status().sign_count
    assert store.counter_value(enrollment.counter, AUTH) == old
    value, _ = store.counted_hmac(enrollment.otp_key, enrollment.counter, lambda c: b"m", AUTH)
    assert value == old + 1
    rewritten = json.loads(store.state_file.read_text())
    assert rewritten["version"] == 2
    assert stored(store, enrollment.counter)["atc"] == old + 1
    data["version"] = 3
    store.state_file.write_text(json.dumps(data))
    with pytest.raises(StateError):
        store.counter_value(enrollment.counter, AUTH)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"\x00\xa1\x01",  # truncated map
        b"\x00\xff\xff\xff",  # not CBOR
        b"\x00\x83\x01\x02\x03",  # an array, not a map
        b"\x00\xa2\x02\x00\x01\x00",  # non-canonical order
        b"\x00\xa1\x01\xa0",  # a map missing every required field
    ],
    ids=["truncated", "garbage", "array", "non-canonical", "missing-fields"],
)
def test_malformed_cbor_from_the_device_is_a_backend_error(device, state, answer):  # type: ignore[no-untyped-def]
    with Fido2KeyStore.open(settings_for(device, state)) as plain:
        counter = plain.create_counter("atc", AUTH)
    faulty = FaultyDevice(device)
    with Fido2KeyStore.from_device(faulty, settings_for(device, state)) as store:
        state_before = store.state_file.read_bytes()
        faulty.garbage = (_GET_ASSERTION, answer)
        with pytest.raises(BackendError) as caught:
            store.counter_increment(counter, AUTH)
        one_line(caught.value)
        assert caught.value.native_code is not None
        assert store.state_file.read_bytes() == state_before  # no state lost or changed
        assert store.counter_increment(counter, AUTH) == 1
        assert stored(store, counter)["last_sign_count"] == device.status().sign_count


def test_wrong_credential_is_key_not_found(store, device, soft_fido2_factory, state):  # type: ignore[no-untyped-def]
    counter = store.create_counter("atc", AUTH)
    with pytest.raises(KeyNotFound):  # unknown on this host
        store.counter_increment("fido2:rp=hsm-auth;id=AAAA;type=counter", AUTH)
    with pytest.raises(InvalidInput):
        store.counter_value("fido2:rp=hsm-auth;id=!!;type=counter", AUTH)
    with pytest.raises(InvalidInput):
        store.counter_value("pkcs11:token=x", AUTH)
    other = soft_fido2_factory()  # the host knows the credential, this device does not
    with Fido2KeyStore.open(settings_for(other, state)) as elsewhere:
        with pytest.raises(KeyNotFound, match="not on this authenticator") as caught:
            elsewhere.counter_increment(counter, AUTH)
        assert caught.value.native_code == 0x2E
    assert store.counter_increment(counter, AUTH) > 0


def test_missing_authenticator_is_token_not_found(tmp_path, state, monkeypatch):  # type: ignore[no-untyped-def]
    missing = {
        "device": f"soft:{tmp_path / 'absent.json'}",
        "state_dir": str(state),
        ALLOW_SOFT_SETTING: True,
    }
    for call in (Fido2KeyStore.open, Fido2KeyStore.probe):
        with pytest.raises(TokenNotFound) as caught:
            call(missing)
        one_line(caught.value)
    monkeypatch.setenv(ENV_SOFT_DEVICE, str(tmp_path / "absent.json"))
    with pytest.raises(TokenNotFound):
        Fido2KeyStore.open({"state_dir": str(state), ALLOW_SOFT_SETTING: True})
    with pytest.raises(ConfigError):
        Fido2KeyStore.open({"device": "usb:1", "state_dir": str(state)})


def test_env_variable_selects_the_soft_authenticator(device, state, monkeypatch):  # type: ignore[no-untyped-def]
    assert ENV_SOFT_DEVICE == soft_fido2.ENV_STATE_FILE
    monkeypatch.setenv(ENV_SOFT_DEVICE, str(device.path))
    allowed = {ALLOW_SOFT_SETTING: True}
    assert Fido2KeyStore.probe(allowed)["device"] == f"soft:{device.path}"
    with Fido2KeyStore.open({"state_dir": str(state), "prompts": False, **allowed}) as store:
        assert store.description == f"soft:{device.path}"


@pytest.mark.parametrize("how", ["device", "environment"])
@pytest.mark.parametrize("allow", [None, False])
def test_software_authenticator_is_refused_unless_allowed(device, state, monkeypatch, how, allow):  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {"state_dir": str(state)}
    if allow is not None:
        settings[ALLOW_SOFT_SETTING] = allow
    if how == "device":
        settings["device"] = f"soft:{device.path}"
    else:
        monkeypatch.setenv(ENV_SOFT_DEVICE, str(device.path))
    for call in (Fido2KeyStore.open, Fido2KeyStore.probe):
        with pytest.raises(ConfigError) as caught:
            call(settings)
        one_line(caught.value)
        assert f"set {ALLOW_SOFT_SETTING} = true" in str(caught.value)
    assert not (state / "credentials.json").exists()
    with pytest.raises(ConfigError, match="true or false"):
        Fido2KeyStore.open({**settings, ALLOW_SOFT_SETTING: "yes"})


def test_state_file_is_private_and_damage_is_a_state_error(store, state):  # type: ignore[no-untyped-def]
    counter = store.create_counter("atc", AUTH)
    assert (store.state_file.stat().st_mode & 0o777) == 0o600
    good = store.state_file.read_bytes()
    store.state_file.write_bytes(b"{not json")
    with pytest.raises(StateError) as caught:
        store.counter_value(counter, AUTH)
    one_line(caught.value)
    store.state_file.write_bytes(good)
    store.state_file.chmod(0o644)
    with pytest.raises(StateError, match="chmod 600"):
        store.counter_value(counter, AUTH)


def test_uris_are_rfc7512_shaped(store):  # type: ignore[no-untyped-def]
    uri = store.generate_key("uri", KeyKind.SIGNING, AUTH)
    path, query = parse_attr_uri(uri, "fido2")
    assert path["rp"] == "hsm-auth" and path["type"] == "signing" and not query
    assert len(credential_id(uri)) > 16
    with pytest.raises(MechanismNotSupported):
        store.generate_key("x", KeyKind.AGREEMENT, AUTH)


def test_errors_are_one_line_hsm_auth_errors(store, device):  # type: ignore[no-untyped-def]
    counter = store.create_counter("atc", AUTH)
    device.configure(uv_outcome="fail")
    with pytest.raises(HsmAuthError) as caught:
        store.counter_increment(counter, AUTH)
    one_line(caught.value)


# --- the enrollment proof ----------------------------------------------------------------


@pytest.fixture
def enrolled(store, verifier_keys):  # type: ignore[no-untyped-def]
    return store.enroll(Method.BIOMETRIC, "proof", verifier_keys.agreement_public, AUTH,
                        binding=BINDING)


def _check(enrollment, **changes):  # type: ignore[no-untyped-def]
    args = {
        "attestation": enrollment.attestation,
        "signing_key": ecutil.encode_point(enrollment.signing_public),
        "binding": BINDING,
        "wrapped_otp_key": enrollment.otp_key_for_verifier,
    }
    args.update(changes)
    return verify_enrollment_attestation(
        args["attestation"], args["signing_key"], args["binding"], args["wrapped_otp_key"]
    )


def test_proof_refuses_another_offer_key_or_wrapped_otp_key(enrolled, verifier_keys):  # type: ignore[no-untyped-def]
    proof = _check(enrolled)
    assert enrolled.initial_atc == 0 < proof.sign_count  # a working counter, not the ATC
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    swapped = wrap_otp_key(os.urandom(32), verifier_keys.agreement_public)
    flipped = bytearray(enrolled.attestation)
    flipped[-5] ^= 1
    for changes in (
        {"binding": enrollment_binding(b"\x02" * 16, "alice", Method.BIOMETRIC)},
        {"binding": enrollment_binding(b"\x01" * 16, "mallory", Method.BIOMETRIC)},
        {"binding": enrollment_binding(b"\x01" * 16, "alice", Method.FACE)},
        {"signing_key": ecutil.encode_point(other_key)},
        {"wrapped_otp_key": swapped},
        {"attestation": bytes(flipped)},
        {"attestation": b"\xa0"},
        {"attestation": os.urandom(200)},
        {"attestation": b""},
    ):
        with pytest.raises(UntrustedMessage):
            _check(enrolled, **changes)
    for claimed in (proof.sign_count, 1, 2**32):  # the ATC starts at 0, whatever signCount is
        with pytest.raises(UntrustedMessage, match="initial ATC"):
            verify_enrollment_attestation(
                enrolled.attestation, ecutil.encode_point(enrolled.signing_public), BINDING,
                enrolled.otp_key_for_verifier, initial_atc=claimed,
            )


def test_proof_with_none_attestation_still_proves_possession(  # type: ignore[no-untyped-def]
    soft_fido2_factory, state, verifier_keys
):
    device = soft_fido2_factory(attestation="none")
    with Fido2KeyStore.open(settings_for(device, state)) as store:
        enrollment = store.enroll(Method.BIOMETRIC, "none", verifier_keys.agreement_public,
                                  AUTH, binding=BINDING)
    proof = _check(enrollment)
    assert proof.fmt == "none" and proof.statement == {}


def test_wrap_with_chosen_ephemeral_is_unwrapped_by_the_verifier(verifier_keys):  # type: ignore[no-untyped-def]
    key = os.urandom(32)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    wrapped = wrap(bytearray(key), verifier_keys.agreement_public, ephemeral)
    assert wrapped[:33] == ecutil.encode_point(ephemeral.public_key())
    assert verifier_keys.unwrap_otp_key(wrapped) == key
