"""The software CTAP2 authenticator against python-fido2's own client and server.

Nothing here is mocked: python-fido2's unmodified ``Ctap2``, ``ClientPin``,
``Fido2Client`` and ``Fido2Server`` talk real CTAP2 CBOR to the authenticator,
and the server verifies attestations and assertions.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

pytest.importorskip("fido2", reason="python-fido2 (the fido2 extra) is not installed")

from fido2.attestation import (
    AttestationResult,
    AttestationType,
    AttestationVerifier,
    PackedAttestation,
    UntrustedAttestation,
)
from fido2.client import ClientError
from fido2.ctap import CtapError
from fido2.ctap2 import Ctap2
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin, PinProtocol, PinProtocolV1, PinProtocolV2
from fido2.hid import CTAPHID
from fido2.server import Fido2Server
from fido2.utils import sha256
from fido2.webauthn import (
    AttestedCredentialData,
    AuthenticatorData,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
)

from hsm_auth.errors import InvalidInput, StateError
from hsm_auth.testing.fido2 import ScriptedUser, authenticator_factory, make_client
from hsm_auth.testing.soft_fido2 import (
    MAX_PIN_RETRIES,
    MAX_UV_RETRIES,
    SOFT_AAGUID,
    SoftAuthenticator,
    UvModality,
    make_attestation_ca,
)

pytestmark = pytest.mark.fido2

RP_ID = "example.com"
ERR = CtapError.ERR
Factory = Callable[..., SoftAuthenticator]
FLAG = AuthenticatorData.FLAG


@pytest.fixture
def soft_fido2_factory(tmp_path: Path) -> Factory:
    return authenticator_factory(tmp_path)


@pytest.fixture
def soft_fido2(soft_fido2_factory: Factory) -> SoftAuthenticator:
    return soft_fido2_factory()


class _RootVerifier(AttestationVerifier):
    """python-fido2's own verifier: the packed statement, then the chain to ``root``."""

    def __init__(self, root: bytes) -> None:
        super().__init__()
        self.root = root
        self.results: list[AttestationResult] = []

    def ca_lookup(self, attestation_result: AttestationResult, auth_data: Any) -> bytes:
        self.results.append(attestation_result)
        return self.root


def _server(device: SoftAuthenticator | None = None) -> Fido2Server:
    root = b"" if device is None else device.attestation_root.public_bytes(Encoding.DER)
    return Fido2Server(
        PublicKeyCredentialRpEntity(id=RP_ID, name="Example"),
        attestation="direct",
        verify_attestation=_RootVerifier(root),
    )


def _register(
    device: SoftAuthenticator,
    *,
    name: str = "alice",
    rk: bool = False,
    uv: str = "required",
    extensions: dict[str, Any] | None = None,
    pin: str | None = None,
) -> tuple[AttestedCredentialData, Any]:
    """Register through Fido2Client; the server checks the packed attestation and its
    certificate chain to the authenticator's test root."""
    server = _server(device)
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=name.encode(), name=name, display_name=name.title()),
        resident_key_requirement="required" if rk else "discouraged",
        user_verification=uv,
        extensions=extensions,
    )
    response = make_client(device, pin=pin).make_credential(options.public_key)
    auth_data = server.register_complete(state, response)
    assert auth_data.credential_data is not None
    return auth_data.credential_data, response.client_extension_results


def _authenticate(
    device: SoftAuthenticator,
    creds: list[AttestedCredentialData],
    *,
    uv: str = "required",
    allow: bool = True,
    extensions: dict[str, Any] | None = None,
    pin: str | None = None,
    user: ScriptedUser | None = None,
) -> tuple[AuthenticatorData, Any]:
    """Authenticate through Fido2Client; the server verifies the signature."""
    server = _server()
    options, state = server.authenticate_begin(
        creds if allow else None, user_verification=uv, extensions=extensions
    )
    selection = make_client(device, pin=pin, user=user).get_assertion(options.public_key)
    response = selection.get_response(0)
    server.authenticate_complete(state, creds, response)
    return response.response.authenticator_data, response.client_extension_results


def _uv_token(ctap: Ctap2, permissions: ClientPin.PERMISSION, rp_id: str = RP_ID) -> bytes:
    return ClientPin(ctap, PinProtocolV2()).get_uv_token(permissions, rp_id)


def _raw_make(
    ctap: Ctap2,
    *,
    rk: bool = False,
    extensions: dict[str, Any] | None = None,
    user_id: bytes = b"u1",
    rp_id: str = RP_ID,
) -> tuple[bytes, Any]:
    """MakeCredential over plain Ctap2 with a UV token; returns (cred id, public key)."""
    cdh = os.urandom(32)
    token = _uv_token(ctap, ClientPin.PERMISSION.MAKE_CREDENTIAL, rp_id)
    att = ctap.make_credential(
        cdh,
        {"id": rp_id, "name": rp_id},
        {"id": user_id, "name": user_id.decode(), "displayName": user_id.decode()},
        [{"type": "public-key", "alg": -7}],
        extensions=extensions,
        options={"rk": True} if rk else None,
        pin_uv_param=PinProtocolV2().authenticate(token, cdh),
        pin_uv_protocol=2,
    )
    cred = att.auth_data.credential_data
    assert cred is not None
    return cred.credential_id, cred.public_key


def _raw_assert(
    ctap: Ctap2,
    cred_ids: list[bytes] | None,
    *,
    rp_id: str = RP_ID,
    options: dict[str, bool] | None = None,
) -> Any:
    cdh = os.urandom(32)
    allow = [{"type": "public-key", "id": i} for i in cred_ids] if cred_ids else None
    return ctap.get_assertion(rp_id, cdh, allow, options=options), cdh


# --- getInfo ------------------------------------------------------------------------


@pytest.mark.parametrize("modality", [UvModality.FINGERPRINT, UvModality.FACE])
def test_get_info_reports_the_configured_modality(
    soft_fido2_factory: Factory, modality: UvModality
) -> None:
    info = Ctap2(soft_fido2_factory(uv_modality=modality)).get_info()
    assert (
        info.uv_modality
        == modality
        == {UvModality.FINGERPRINT: 0x2, UvModality.FACE: 0x10}[modality]
    )
    assert info.versions == ["FIDO_2_0", "FIDO_2_1"]
    assert set(info.extensions) == {"hmac-secret", "credProtect"}
    assert info.options["rk"] and info.options["up"] and info.options["uv"]
    assert info.options["pinUvAuthToken"] and info.options["clientPin"] is False
    assert info.pin_uv_protocols == [2, 1]
    assert bytes(info.aaguid) == SOFT_AAGUID
    assert info.algorithms == [{"type": "public-key", "alg": -7}]


def test_uv_option_follows_enrollment_and_pin_shows_in_client_pin(
    soft_fido2_factory: Factory,
) -> None:
    info = Ctap2(soft_fido2_factory(uv_enrolled=False, pin="4321")).get_info()
    assert info.options["uv"] is False
    assert info.options["clientPin"] is True


# --- registration and authentication through Fido2Client + Fido2Server ----------------------


@pytest.mark.parametrize("rk", [False, True], ids=["server-side", "discoverable"])
def test_register_and_authenticate_with_the_fido2_server(
    soft_fido2: SoftAuthenticator, rk: bool
) -> None:
    cred, _ = _register(soft_fido2, rk=rk)
    assert bytes(cred.aaguid) == SOFT_AAGUID
    assert len(cred.credential_id) <= Ctap2(soft_fido2).info.max_cred_id_length
    assert len(soft_fido2.resident_credentials()) == (1 if rk else 0)

    auth_data, _ = _authenticate(soft_fido2, [cred], allow=not rk)
    assert auth_data.flags & FLAG.UP and auth_data.flags & FLAG.UV
    later, _ = _authenticate(soft_fido2, [cred], uv="discouraged", allow=not rk)
    assert later.counter > auth_data.counter
    assert not later.flags & FLAG.UV


def test_packed_attestation_chains_to_the_exported_root(soft_fido2: SoftAuthenticator) -> None:
    server = _server(soft_fido2)
    verifier = server._verify_attestation
    assert isinstance(verifier, _RootVerifier)
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=b"alice", name="alice", display_name="Alice"),
        user_verification="required",
    )
    server.register_complete(state, make_client(soft_fido2).make_credential(options.public_key))
    (result,) = verifier.results
    assert result.attestation_type == AttestationType.BASIC
    (leaf_der,) = result.trust_path
    leaf = x509.load_der_x509_certificate(leaf_der)
    assert leaf == soft_fido2.attestation_certificate
    # The FIDO attestation certificate requirements (WebAuthn 8.2.1), read back.
    assert leaf.version is x509.Version.v3
    ou = leaf.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [a.value for a in ou] == ["Authenticator Attestation"]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.45724.1.1.4"))
    assert not ext.critical and ext.value.value == b"\x04\x10" + SOFT_AAGUID
    assert leaf.issuer == soft_fido2.attestation_root.subject


def test_another_root_does_not_verify_the_chain(soft_fido2_factory: Factory) -> None:
    device, other = soft_fido2_factory(), soft_fido2_factory()
    server = Fido2Server(
        PublicKeyCredentialRpEntity(id=RP_ID, name="Example"), attestation="direct",
        verify_attestation=_RootVerifier(other.attestation_root.public_bytes(Encoding.DER)),
    )
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=b"alice", name="alice", display_name="Alice"),
        user_verification="required",
    )
    response = make_client(device).make_credential(options.public_key)
    with pytest.raises(UntrustedAttestation):  # the root's key did not sign the leaf
        server.register_complete(state, response)


def test_a_shared_test_ca_issues_each_authenticator_its_own_key(
    soft_fido2_factory: Factory,
) -> None:
    ca = make_attestation_ca()
    one, two = soft_fido2_factory(attestation_ca=ca), soft_fido2_factory(attestation_ca=ca)
    assert one.attestation_root == two.attestation_root == ca[0]
    assert one.attestation_certificate.public_key() != two.attestation_certificate.public_key()
    one.replug()
    assert soft_fido2_factory().attestation_root != ca[0]  # the default: a root of its own


def test_none_attestation(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(attestation="none")
    ctap = Ctap2(device)
    token = _uv_token(ctap, ClientPin.PERMISSION.MAKE_CREDENTIAL)
    cdh = os.urandom(32)
    att = ctap.make_credential(
        cdh,
        {"id": RP_ID},
        {"id": b"u"},
        [{"type": "public-key", "alg": -7}],
        pin_uv_param=PinProtocolV2().authenticate(token, cdh),
        pin_uv_protocol=2,
    )
    assert att.fmt == "none" and att.att_stmt == {}


def test_only_es256_is_offered(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    token = _uv_token(ctap, ClientPin.PERMISSION.MAKE_CREDENTIAL)
    cdh = os.urandom(32)
    with pytest.raises(CtapError) as e:
        ctap.make_credential(
            cdh,
            {"id": RP_ID},
            {"id": b"u"},
            [{"type": "public-key", "alg": -8}],
            pin_uv_param=PinProtocolV2().authenticate(token, cdh),
            pin_uv_protocol=2,
        )
    assert e.value.code == ERR.UNSUPPORTED_ALGORITHM


def test_make_credential_without_uv_needs_a_token(soft_fido2: SoftAuthenticator) -> None:
    with pytest.raises(CtapError) as e:
        Ctap2(soft_fido2).make_credential(
            os.urandom(32), {"id": RP_ID}, {"id": b"u"}, [{"type": "public-key", "alg": -7}]
        )
    assert e.value.code == ERR.PUAT_REQUIRED


def test_credential_id_is_bound_to_its_rp_and_authenticated(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    cred_id, public_key = _raw_make(ctap)
    assertion, cdh = _raw_assert(ctap, [cred_id])
    assertion.verify(cdh, public_key)
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, [cred_id], rp_id="evil.example.com")
    assert e.value.code == ERR.NO_CREDENTIALS
    tampered = cred_id[:-1] + bytes([cred_id[-1] ^ 1])
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, [tampered])
    assert e.value.code == ERR.NO_CREDENTIALS


def test_user_presence_denied_and_cancelled(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    cred_id, _ = _raw_make(ctap)
    soft_fido2.configure(up_outcome="deny")
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, [cred_id])
    assert e.value.code == ERR.OPERATION_DENIED
    _raw_assert(ctap, [cred_id], options={"up": False})  # silent: no presence needed
    soft_fido2.configure(up_outcome="approve")
    cancel = Event()
    cancel.set()
    with pytest.raises(CtapError) as e:
        ctap.get_assertion(
            RP_ID, os.urandom(32), [{"type": "public-key", "id": cred_id}], event=cancel
        )
    assert e.value.code == ERR.KEEPALIVE_CANCEL
    with pytest.raises(CtapError) as e:
        ctap.selection(event=cancel)
    assert e.value.code == ERR.KEEPALIVE_CANCEL
    ctap.selection()


# --- discoverable credentials and getNextAssertion ----------------------------------


def test_discovery_returns_newest_first_and_get_next_assertion(
    soft_fido2: SoftAuthenticator,
) -> None:
    ctap = Ctap2(soft_fido2)
    made = [_raw_make(ctap, rk=True, user_id=f"user{i}".encode()) for i in range(3)]
    _raw_make(ctap, rk=True, user_id=b"other", rp_id="other.example")
    token = _uv_token(ctap, ClientPin.PERMISSION.GET_ASSERTION)
    cdh = os.urandom(32)
    assertions = ctap.get_assertions(
        RP_ID, cdh, pin_uv_param=PinProtocolV2().authenticate(token, cdh), pin_uv_protocol=2
    )
    assert assertions[0].number_of_credentials == 3
    assert [a.user["id"] for a in assertions] == [b"user2", b"user1", b"user0"]
    assert assertions[0].user["name"] == "user2"  # identifying data only after UV
    keys = {cred_id: pk for cred_id, pk in made}
    counters = []
    for a in assertions:
        a.verify(cdh, keys[a.credential["id"]])
        assert a.auth_data.flags & FLAG.UV
        counters.append(a.auth_data.counter)
    assert counters == sorted(set(counters))
    with pytest.raises(CtapError) as e:
        ctap.get_next_assertion()
    assert e.value.code == ERR.NOT_ALLOWED

    no_uv, _ = _raw_assert(ctap, None)
    assert set(no_uv.user) == {"id"}  # no name without UV


def test_re_registering_a_user_replaces_the_resident_credential(
    soft_fido2: SoftAuthenticator,
) -> None:
    ctap = Ctap2(soft_fido2)
    first, _ = _raw_make(ctap, rk=True)
    second, _ = _raw_make(ctap, rk=True)
    assert [r.credential_id for r in soft_fido2.resident_credentials()] == [second]
    assert first != second


# --- clientPIN ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [PinProtocolV1, PinProtocolV2])
def test_set_change_pin_and_retries(soft_fido2: SoftAuthenticator, protocol: type) -> None:
    ctap = Ctap2(soft_fido2)
    client_pin = ClientPin(ctap, protocol())
    with pytest.raises(CtapError) as e:
        client_pin.get_pin_token("1234")
    assert e.value.code == ERR.PIN_NOT_SET
    client_pin.set_pin("1234")
    assert Ctap2(soft_fido2).get_info().options["clientPin"] is True
    assert client_pin.get_pin_retries() == (MAX_PIN_RETRIES, False)
    with pytest.raises(CtapError) as e:
        client_pin.set_pin("5678")
    assert e.value.code == ERR.NOT_ALLOWED
    token = client_pin.get_pin_token("1234", ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert len(token) == 32

    client_pin.change_pin("1234", "98765")
    with pytest.raises(CtapError) as e:
        client_pin.get_pin_token("1234", ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert e.value.code == ERR.PIN_INVALID
    assert client_pin.get_pin_retries()[0] == MAX_PIN_RETRIES - 1
    client_pin.get_pin_token("98765", ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert client_pin.get_pin_retries()[0] == MAX_PIN_RETRIES
    with pytest.raises(CtapError) as e:
        client_pin.change_pin("1234", "55555")
    assert e.value.code == ERR.PIN_INVALID


def test_short_pin_is_refused(soft_fido2: SoftAuthenticator) -> None:
    client_pin = ClientPin(Ctap2(soft_fido2))
    # _pad_pin refuses < 4 characters, so send a 3-byte PIN padded by hand.
    key_agreement, shared = client_pin._get_shared_secret()
    pin_enc = client_pin.protocol.encrypt(shared, b"123".ljust(64, b"\0"))
    with pytest.raises(CtapError) as e:
        client_pin.ctap.client_pin(
            2,
            ClientPin.CMD.SET_PIN,
            key_agreement=key_agreement,
            new_pin_enc=pin_enc,
            pin_uv_param=client_pin.protocol.authenticate(shared, pin_enc),
        )
    assert e.value.code == ERR.PIN_POLICY_VIOLATION


def test_three_wrong_pins_block_until_replug(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234")
    client_pin = ClientPin(Ctap2(device))
    codes = []
    for _ in range(3):
        with pytest.raises(CtapError) as e:
            client_pin.get_pin_token("0000")
        codes.append(e.value.code)
    assert codes == [ERR.PIN_INVALID, ERR.PIN_INVALID, ERR.PIN_AUTH_BLOCKED]
    with pytest.raises(CtapError) as e:
        client_pin.get_pin_token("1234")  # even the right PIN, until a power cycle
    assert e.value.code == ERR.PIN_AUTH_BLOCKED
    assert client_pin.get_pin_retries() == (MAX_PIN_RETRIES - 3, True)
    # a second process sees the same blocked device
    assert SoftAuthenticator.load(device.path).status().pin_auth_blocked

    device.replug()
    client_pin.get_pin_token("1234")
    assert client_pin.get_pin_retries() == (MAX_PIN_RETRIES, False)


def test_eight_wrong_pins_block_the_pin(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234")
    client_pin = ClientPin(Ctap2(device))
    last = None
    for attempt in range(MAX_PIN_RETRIES):
        if attempt % 3 == 0:
            device.replug()
        with pytest.raises(CtapError) as e:
            client_pin.get_pin_token("0000")
        last = e.value.code
    assert last == ERR.PIN_BLOCKED
    device.replug()
    with pytest.raises(CtapError) as e:
        client_pin.get_pin_token("1234")
    assert e.value.code == ERR.PIN_BLOCKED
    assert client_pin.get_pin_retries()[0] == 0


def test_token_permissions_and_rp_binding(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234")
    ctap = Ctap2(device)
    client_pin = ClientPin(ctap, PinProtocolV2())
    cdh = os.urandom(32)
    ga_only = client_pin.get_pin_token("1234", ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    with pytest.raises(CtapError) as e:
        ctap.make_credential(
            cdh,
            {"id": RP_ID},
            {"id": b"u"},
            [{"type": "public-key", "alg": -7}],
            pin_uv_param=PinProtocolV2().authenticate(ga_only, cdh),
            pin_uv_protocol=2,
        )
    assert e.value.code == ERR.PIN_AUTH_INVALID
    mc_other_rp = client_pin.get_pin_token(
        "1234", ClientPin.PERMISSION.MAKE_CREDENTIAL, "other.example"
    )
    with pytest.raises(CtapError) as e:
        ctap.make_credential(
            cdh,
            {"id": RP_ID},
            {"id": b"u"},
            [{"type": "public-key", "alg": -7}],
            pin_uv_param=PinProtocolV2().authenticate(mc_other_rp, cdh),
            pin_uv_protocol=2,
        )
    assert e.value.code == ERR.PIN_AUTH_INVALID
    with pytest.raises(CtapError) as e:
        client_pin.get_pin_token("1234", ClientPin.PERMISSION.CREDENTIAL_MGMT)
    assert e.value.code == ERR.UNAUTHORIZED_PERMISSION
    # a token is spent by an operation with user presence
    token = client_pin.get_pin_token("1234", ClientPin.PERMISSION.MAKE_CREDENTIAL, RP_ID)
    for expected in (None, ERR.PIN_AUTH_INVALID):
        try:
            ctap.make_credential(
                cdh,
                {"id": RP_ID},
                {"id": b"u"},
                [{"type": "public-key", "alg": -7}],
                pin_uv_param=PinProtocolV2().authenticate(token, cdh),
                pin_uv_protocol=2,
            )
            code = None
        except CtapError as err:
            code = err.code
        assert code == expected


def test_fido2_client_uses_the_pin_when_uv_is_not_enrolled(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234", uv_enrolled=False)
    cred, _ = _register(device, pin="1234")
    user = ScriptedUser("1234")
    auth_data, _ = _authenticate(device, [cred], user=user)
    assert auth_data.flags & FLAG.UV
    assert user.pin_requests == 1 and user.uv_requests == 0


# --- built-in user verification -----------------------------------------------------------


def test_failed_uv_is_an_error_and_costs_a_retry(soft_fido2: SoftAuthenticator) -> None:
    cred, _ = _register(soft_fido2)
    client_pin = ClientPin(Ctap2(soft_fido2))
    soft_fido2.configure(uv_outcome="fail")
    with pytest.raises(ClientError) as e:
        _authenticate(soft_fido2, [cred])
    assert isinstance(e.value.cause, CtapError) and e.value.cause.code == ERR.UV_INVALID
    assert client_pin.get_uv_retries() == MAX_UV_RETRIES - 1

    soft_fido2.configure(uv_outcome="cancel")
    with pytest.raises(ClientError):
        _authenticate(soft_fido2, [cred])
    assert client_pin.get_uv_retries() == MAX_UV_RETRIES - 1  # cancelling costs nothing

    soft_fido2.configure(uv_outcome="succeed")
    _authenticate(soft_fido2, [cred])
    assert client_pin.get_uv_retries() == MAX_UV_RETRIES


def test_uv_blocked_after_eight_failures_then_pin_fallback(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234")
    cred, _ = _register(device, pin="1234")
    ctap = Ctap2(device)
    device.configure(uv_outcome="fail")
    codes = []
    for _ in range(MAX_UV_RETRIES):
        with pytest.raises(CtapError) as e:
            _uv_token(ctap, ClientPin.PERMISSION.GET_ASSERTION)
        codes.append(e.value.code)
    assert codes == [ERR.UV_INVALID] * (MAX_UV_RETRIES - 1) + [ERR.UV_BLOCKED]
    device.configure(uv_outcome="succeed")
    with pytest.raises(CtapError) as e:
        _uv_token(ctap, ClientPin.PERMISSION.GET_ASSERTION)
    assert e.value.code == ERR.UV_BLOCKED  # blocked even when the finger is right now

    user = ScriptedUser("1234")
    auth_data, _ = _authenticate(device, [cred], user=user)  # the client falls back to the PIN
    assert auth_data.flags & FLAG.UV and user.pin_requests == 1
    assert ClientPin(ctap).get_uv_retries() == MAX_UV_RETRIES  # the PIN unblocks UV


def test_uv_option_without_token(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    cred_id, public_key = _raw_make(ctap)
    assertion, cdh = _raw_assert(ctap, [cred_id], options={"uv": True})
    assertion.verify(cdh, public_key)
    assert assertion.auth_data.flags & FLAG.UV
    soft_fido2.configure(uv_outcome="fail")
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, [cred_id], options={"uv": True})
    assert e.value.code == ERR.UV_INVALID


# --- hmac-secret --------------------------------------------------------------------------


def _prf(
    device: SoftAuthenticator,
    cred: AttestedCredentialData,
    first: bytes,
    second: bytes | None = None,
    *,
    uv: str,
) -> tuple[bytes, bytes | None]:
    salts: dict[str, bytes] = {"first": first}
    if second is not None:
        salts["second"] = second
    auth_data, ext = _authenticate(device, [cred], uv=uv, extensions={"prf": {"eval": salts}})
    assert bool(auth_data.flags & FLAG.UV) == (uv == "required")
    return ext.prf.results.first, ext.prf.results.second


def test_hmac_secret_through_fido2_client(soft_fido2: SoftAuthenticator) -> None:
    cred, reg_ext = _register(soft_fido2, extensions={"prf": {}})
    assert reg_ext.prf.enabled is True
    salt_a, salt_b = b"salt A", b"salt B"

    uv_a, uv_b = _prf(soft_fido2, cred, salt_a, salt_b, uv="required")
    assert len(uv_a) == 32 and uv_b is not None
    assert _prf(soft_fido2, cred, salt_a, uv="required")[0] == uv_a  # deterministic
    assert uv_a != uv_b  # different salts, different outputs
    no_uv_a, _ = _prf(soft_fido2, cred, salt_a, uv="discouraged")
    assert no_uv_a != uv_a  # CredRandomWithoutUV differs from CredRandomWithUV
    assert _prf(soft_fido2, cred, salt_a, uv="discouraged")[0] == no_uv_a

    # prf is hmac-secret with salt = SHA-256("WebAuthn PRF" || 0x00 || input)
    _, ext = _authenticate(
        soft_fido2,
        [cred],
        uv="required",
        extensions={"hmacGetSecret": {"salt1": sha256(b"WebAuthn PRF\0" + salt_a)}},
    )
    assert ext.hmac_get_secret.output1 == uv_a

    # another credential, other outputs
    other, _ = _register(soft_fido2, name="bob", extensions={"prf": {}})
    assert _prf(soft_fido2, other, salt_a, uv="required")[0] != uv_a


def test_hmac_secret_over_pin_protocol_1_matches_protocol_2(
    soft_fido2: SoftAuthenticator,
) -> None:
    cred, _ = _register(soft_fido2, extensions={"hmacCreateSecret": True})
    salt = os.urandom(32)
    _, ext = _authenticate(
        soft_fido2, [cred], uv="discouraged", extensions={"hmacGetSecret": {"salt1": salt}}
    )
    via_v2 = ext.hmac_get_secret.output1

    ctap = Ctap2(soft_fido2)
    proto: PinProtocol = PinProtocolV1()
    key_agreement, shared = ClientPin(ctap, proto)._get_shared_secret()
    salt_enc = proto.encrypt(shared, salt)
    hmac_in = {1: key_agreement, 2: salt_enc, 3: proto.authenticate(shared, salt_enc), 4: 1}
    assertion = ctap.get_assertion(
        RP_ID,
        os.urandom(32),
        [{"type": "public-key", "id": cred.credential_id}],
        extensions={HmacSecretExtension.NAME: hmac_in},
    )
    via_v1 = proto.decrypt(shared, assertion.auth_data.extensions[HmacSecretExtension.NAME])
    assert via_v1 == via_v2

    hmac_in[3] = bytes(16)  # a wrong saltAuth
    with pytest.raises(CtapError) as e:
        ctap.get_assertion(
            RP_ID,
            os.urandom(32),
            [{"type": "public-key", "id": cred.credential_id}],
            extensions={HmacSecretExtension.NAME: hmac_in},
        )
    assert e.value.code == ERR.EXTENSION_FIRST


# --- credProtect ----------------------------------------------------------------------------


def test_cred_protect_3_hides_the_credential_without_uv(soft_fido2: SoftAuthenticator) -> None:
    policy = {
        "credentialProtectionPolicy": "userVerificationRequired",
        "enforceCredentialProtectionPolicy": True,
    }
    cred, _ = _register(soft_fido2, rk=True, extensions=policy)
    assert soft_fido2.resident_credentials()[0].cred_protect == 3
    for allow in (True, False):
        with pytest.raises(ClientError):
            _authenticate(soft_fido2, [cred], uv="discouraged", allow=allow)
    ctap = Ctap2(soft_fido2)
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, [cred.credential_id])
    assert e.value.code == ERR.NO_CREDENTIALS
    auth_data, _ = _authenticate(soft_fido2, [cred], uv="required", allow=False)
    assert auth_data.flags & FLAG.UV


def test_cred_protect_2_needs_the_id_without_uv(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    cred_id, _ = _raw_make(ctap, rk=True, extensions={"credProtect": 2})
    with pytest.raises(CtapError) as e:
        _raw_assert(ctap, None)  # discovery without UV
    assert e.value.code == ERR.NO_CREDENTIALS
    assertion, _ = _raw_assert(ctap, [cred_id])  # with the credential id: fine
    assert assertion.credential["id"] == cred_id
    discovered, _ = _raw_assert(ctap, None, options={"uv": True})
    assert discovered.credential["id"] == cred_id


def test_cred_protect_is_reported_in_the_attestation(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    token = _uv_token(ctap, ClientPin.PERMISSION.MAKE_CREDENTIAL)
    cdh = os.urandom(32)
    att = ctap.make_credential(
        cdh,
        {"id": RP_ID},
        {"id": b"u"},
        [{"type": "public-key", "alg": -7}],
        extensions={"credProtect": 3, "hmac-secret": True},
        pin_uv_param=PinProtocolV2().authenticate(token, cdh),
        pin_uv_protocol=2,
    )
    assert att.auth_data.extensions == {"credProtect": 3, "hmac-secret": True}
    PackedAttestation().verify(att.att_stmt, att.auth_data, cdh)


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"\x02\xff",
        b"\x02\xa1\x01",
        b"\x01\xa1\x01\x58\x20",
        b"\x02\x83\x01\x02\x03",
        b"\x02\xa2\x02\x40\x01\x60",  # keys out of canonical order
    ],
    ids=["break", "truncated-map", "short-bytes", "not-a-map", "non-canonical"],
)
def test_malformed_cbor_is_invalid_cbor(soft_fido2: SoftAuthenticator, payload: bytes) -> None:
    assert soft_fido2.call(CTAPHID.CBOR, payload)[:1] == bytes([ERR.INVALID_CBOR])


def test_missing_and_mistyped_parameters(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    with pytest.raises(CtapError) as e:
        ctap.send_cbor(Ctap2.CMD.GET_ASSERTION, {1: RP_ID})
    assert e.value.code == ERR.MISSING_PARAMETER
    with pytest.raises(CtapError) as e:
        ctap.send_cbor(Ctap2.CMD.GET_ASSERTION, {1: RP_ID, 2: "not bytes"})
    assert e.value.code == ERR.CBOR_UNEXPECTED_TYPE
    with pytest.raises(CtapError) as e:
        ctap.send_cbor(0x55)
    assert e.value.code == ERR.INVALID_COMMAND


# --- state file, several processes, reset -------------------------------------------------------


def test_state_file_is_private_and_checked(soft_fido2_factory: Factory, tmp_path: Path) -> None:
    device = soft_fido2_factory(pin="1234")
    assert stat.S_IMODE(device.path.stat().st_mode) == 0o600
    text = device.path.read_text()
    assert "1234" not in text
    assert json.loads(text)["kind"].startswith("hsm-auth soft-fido2 test authenticator")
    with pytest.raises(StateError):
        SoftAuthenticator.create(device.path)  # no silent overwrite
    os.chmod(device.path, 0o644)
    with pytest.raises(StateError):
        SoftAuthenticator.load(device.path)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    broken.chmod(0o600)
    with pytest.raises(StateError):
        SoftAuthenticator.load(broken)
    with pytest.raises(StateError):
        SoftAuthenticator.load(tmp_path / "missing.json")
    with pytest.raises(InvalidInput):
        SoftAuthenticator.create(tmp_path / "x.json", uv_outcome="maybe")


_CHILD = textwrap.dedent(
    """
    import os, sys
    from fido2.ctap2 import Ctap2
    from hsm_auth.testing.soft_fido2 import SoftAuthenticator
    ctap = Ctap2(SoftAuthenticator.load(sys.argv[1]))
    allow = [{"type": "public-key", "id": bytes.fromhex(sys.argv[2])}]
    for _ in range(int(sys.argv[3])):
        a = ctap.get_assertion("example.com", os.urandom(32), allow)
        print(a.auth_data.counter, flush=True)
    """
)


def _child(device: SoftAuthenticator, cred_id: bytes, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(device.path), cred_id.hex(), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _counters(proc: subprocess.Popen[str]) -> list[int]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return [int(line) for line in out.split()]


def test_two_processes_share_one_authenticator(soft_fido2: SoftAuthenticator) -> None:
    ctap = Ctap2(soft_fido2)
    cred_id, _ = _raw_make(ctap)
    (first,) = _counters(_child(soft_fido2, cred_id, 1))
    mine, _ = _raw_assert(ctap, [cred_id])
    (third,) = _counters(_child(soft_fido2, cred_id, 1))
    assert first < mine.auth_data.counter < third

    n = 15
    procs = [_child(soft_fido2, cred_id, n) for _ in range(2)]
    seen = [_counters(p) for p in procs]
    for counters in seen:
        assert counters == sorted(counters) and len(set(counters)) == n
    merged = seen[0] + seen[1]
    assert len(set(merged)) == 2 * n  # the lock made every increment count once
    assert min(merged) > third
    assert soft_fido2.status().sign_count == max(merged) == third + 2 * n


def test_reset_wipes_credentials_and_pin(soft_fido2_factory: Factory) -> None:
    device = soft_fido2_factory(pin="1234")
    ctap = Ctap2(device)
    resident_id, _ = _raw_make(ctap, rk=True)
    server_side_id, _ = _raw_make(ctap, user_id=b"u2")
    before = device.status().sign_count
    ctap.reset()
    assert device.resident_credentials() == []
    assert Ctap2(device).get_info().options["clientPin"] is False
    for ids in ([resident_id], [server_side_id], None):
        with pytest.raises(CtapError) as e:
            _raw_assert(ctap, ids)
        assert e.value.code == ERR.NO_CREDENTIALS
    assert device.status().sign_count == before  # the counter never goes back
