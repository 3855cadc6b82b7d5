"""The whole offline flow for the biometric and face methods on software FIDO2
authenticators (fingerprint-only and face-only), through the library API:
enroll, start, finish, verify, replay refused; the ATC moves by one per OTP
even when the authenticator is used elsewhere in between; failed UV, clones
and bad input refused without releasing an OTP or losing state."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _verifier_device import Clock
from cryptography.hazmat.primitives.asymmetric import ec as cec

pytest.importorskip("fido2", reason="python-fido2 (the fido2 extra) is not installed")

from hsm_auth import ec, key_transport
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    Cancelled,
    CounterError,
    InvalidToken,
    LoginRequired,
    MechanismNotSupported,
    TokenNotFound,
    UserVerificationFailed,
)
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentResponse
from hsm_auth.testing.fido2 import use_elsewhere, write_soft_policy
from hsm_auth.testing.soft_fido2 import MAX_UV_RETRIES, SoftAuthenticator, UvModality
from hsm_auth.verifier import Verifier
from hsm_auth.webauthn_proof import enrollment_binding, verify_enrollment_attestation

pytestmark = pytest.mark.fido2

METHODS = (Method.BIOMETRIC, Method.FACE)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def devices(soft_fido2_factory) -> dict[Method, SoftAuthenticator]:  # type: ignore[no-untyped-def]
    return {
        Method.BIOMETRIC: soft_fido2_factory(uv_modality=UvModality.FINGERPRINT),
        Method.FACE: soft_fido2_factory(uv_modality=UvModality.FACE),
    }


def _settings(device: SoftAuthenticator, state: Path) -> dict[str, object]:
    return {
        "device": f"soft:{device.path}",
        "state_dir": str(state),
        "prompts": False,
        "allow_software_authenticator": True,
    }


@pytest.fixture
def config(devices, tmp_path) -> Config:  # type: ignore[no-untyped-def]
    state = tmp_path / "fido2-state"
    return Config(
        methods={m: MethodConfig("fido2", _settings(d, state)) for m, d in devices.items()}
    )


@pytest.fixture
def verifier(tmp_path, clock, devices):  # type: ignore[no-untyped-def]
    # The default policy refuses the software authenticator: this one names it and its roots.
    write_soft_policy(tmp_path / "verifier", devices.values())
    v = Verifier.init(tmp_path / "verifier", "Workstation", clock=clock)
    yield v
    v.close()


@pytest.fixture
def authenticator(tmp_path, config, clock):  # type: ignore[no-untyped-def]
    with Authenticator(tmp_path / "auth", config, clock=clock) as a:
        yield a


@pytest.fixture
def enrolled(verifier, authenticator):  # type: ignore[no-untyped-def]
    for method in METHODS:
        issued = verifier.create_offer("alice", methods=[method])
        response_text = authenticator.add_or_update(
            method, issued.text, activation_code=issued.activation_code
        )
        # What the verifier should check for a FIDO2 response (see the report):
        response, signed = EnrollmentResponse.from_text(response_text)
        assert signed.signature == b"" and response.attestation is not None
        verify_enrollment_attestation(
            response.attestation,
            response.signing_key,
            enrollment_binding(issued.offer.offer_id, issued.offer.user, method),
            response.wrapped_otp_key,
            initial_atc=response.initial_atc,
        )
        verifier.accept_enrollment(response_text)
    return authenticator


def _request(verifier, authenticator, method, context="Log in to ws-7 as alice"):  # type: ignore[no-untyped-def]
    session = verifier.start_session("alice", context, methods=[method])
    return session, authenticator.start_offline_authentication(session.text)


@pytest.mark.parametrize("method", METHODS)
def test_offline_flow_accepts_once_then_refuses_replay(verifier, enrolled, devices, method):  # type: ignore[no-untyped-def]
    session = verifier.start_session("alice", "Log in to ws-7 as alice")
    request = enrolled.start_offline_authentication(session.text)
    assert request.verifier_name == "Workstation"
    assert set(request.methods) == set(METHODS)
    result = enrolled.finish_offline_authentication(request, method)
    assert len(result.otp) == 8 and result.otp.isdigit()
    assert result.atc == 1  # the credential's own ATC, from 0 at enrollment
    accepted = verifier.verify(session.session_id, result.otp)
    assert (accepted.method, accepted.atc) == (method, result.atc)
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, result.otp)


@pytest.mark.parametrize("method", METHODS)
def test_counter_advances_by_one_assertion_per_otp(verifier, enrolled, method):  # type: ignore[no-untyped-def]
    atcs = []
    for _ in range(3):
        session, request = _request(verifier, enrolled, method)
        result = enrolled.finish_offline_authentication(request, method)
        atcs.append(verifier.verify(session.session_id, result.otp).atc)
    assert atcs == [1, 2, 3]


def test_use_elsewhere_moves_neither_the_window_nor_the_offline_count(  # type: ignore[no-untyped-def]
    verifier, enrolled, devices
):
    """Between OTPs the authenticator logs in to a website 25 times (the shared
    signature counter jumps by 26 each time): every OTP still has ATC = previous + 1,
    the verifier accepts each within its window of 10, and the authenticator counts
    exactly one offline use per OTP: login required after 10, not after the first."""
    device = devices[Method.BIOMETRIC]
    window = next(m for m in enrolled.enrolled if m.method is Method.BIOMETRIC).window
    assert window == 10  # the verifier's look-ahead window
    for expected in range(1, window + 1):
        before = device.status().sign_count
        use_elsewhere(device, 25)
        assert device.status().sign_count == before + 26
        session, request = _request(verifier, enrolled, Method.BIOMETRIC)
        result = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
        assert result.atc == expected
        assert verifier.verify(session.session_id, result.otp).atc == expected
    use_elsewhere(device, 25)
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    with pytest.raises(LoginRequired, match=f"{window} offline uses"):
        enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    synced = enrolled.sync(verifier.sync_message("alice", Method.BIOMETRIC))
    applied = verifier.apply_sync(synced.report)
    assert applied.atc == window + 1  # the report used ATC window+1
    enrolled.apply_sync_ack(applied.ack)  # offline use counts from there
    result = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    assert result.atc == window + 2
    assert verifier.verify(session.session_id, result.otp).atc == window + 2


def test_failed_uv_gives_retries_left_and_releases_no_otp(verifier, enrolled, devices):  # type: ignore[no-untyped-def]
    device = devices[Method.BIOMETRIC]
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    count = device.status().sign_count
    device.configure(uv_outcome="fail")
    with pytest.raises(UserVerificationFailed) as caught:
        enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    assert caught.value.retry.retries_left == MAX_UV_RETRIES - 1
    assert device.status().sign_count == count  # no assertion, so no OTP
    device.configure(uv_outcome="succeed")
    result = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    assert result.atc == 1 and device.status().sign_count == count + 1
    assert verifier.verify(session.session_id, result.otp).atc == 1


@pytest.mark.parametrize(
    ("method", "device_of", "has"),
    [(Method.BIOMETRIC, Method.FACE, "face"), (Method.FACE, Method.BIOMETRIC, "fingerprint")],
)
def test_authenticator_without_the_modality_is_refused(  # type: ignore[no-untyped-def]
    tmp_path, verifier, devices, clock, method, device_of, has
):
    wrong = Config(
        methods={method: MethodConfig("fido2", _settings(devices[device_of], tmp_path / "s"))}
    )
    with Authenticator(tmp_path / "wrong", wrong, clock=clock) as a:
        offer = verifier.create_offer("bob", methods=[method])
        with pytest.raises(MechanismNotSupported, match=f"verifies by {has}"):
            a.add_or_update(method, offer.text, activation_code=offer.activation_code)
        assert a.enrolled == []


def test_cloned_authenticator_otps_are_refused(verifier, enrolled, devices, tmp_path):  # type: ignore[no-untyped-def]
    device = devices[Method.BIOMETRIC]
    clone = tmp_path / "clone.json"
    shutil.copy2(device.path, clone)  # the clone: a copy of the authenticator's state
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    first = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    assert verifier.verify(session.session_id, first.otp).atc == first.atc
    # The clone is plugged in where the authenticator was: its counter is behind.
    shutil.copy2(clone, device.path)
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    with pytest.raises(CounterError, match="cloned"):
        enrolled.finish_offline_authentication(request, Method.BIOMETRIC)


def test_clone_with_cloned_host_state_is_refused_by_the_verifier(  # type: ignore[no-untyped-def]
    verifier, enrolled, devices, tmp_path, config
):
    """An attacker who copies the authenticator AND the host's state gets past the
    host check, but the OTP carries a counter the verifier has already accepted."""
    device = devices[Method.BIOMETRIC]
    state_file = Path(config.methods[Method.BIOMETRIC].settings["state_dir"]) / "credentials.json"
    snapshot = (device.path.read_bytes(), state_file.read_bytes())
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    genuine = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    verifier.verify(session.session_id, genuine.otp)
    device.path.write_bytes(snapshot[0])
    state_file.write_bytes(snapshot[1])
    session, request = _request(verifier, enrolled, Method.BIOMETRIC)
    cloned = enrolled.finish_offline_authentication(request, Method.BIOMETRIC)
    assert cloned.atc == genuine.atc
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, cloned.otp)


def test_uv_cancelled_then_missing_authenticator_lose_no_state(  # type: ignore[no-untyped-def]
    verifier, enrolled, devices, tmp_path
):
    device = devices[Method.FACE]
    session, request = _request(verifier, enrolled, Method.FACE)
    credentials = (tmp_path / "auth" / "credentials.json").read_bytes()
    count = device.status().sign_count
    device.configure(uv_outcome="cancel")
    with pytest.raises(Cancelled):
        enrolled.finish_offline_authentication(request, Method.FACE)
    device.configure(uv_outcome="succeed")
    enrolled.close()  # drop the open store: the next finish opens the device again
    unplugged = device.path.with_suffix(".away")
    device.path.rename(unplugged)
    with pytest.raises(TokenNotFound):
        enrolled.finish_offline_authentication(request, Method.FACE)
    unplugged.rename(device.path)
    assert (tmp_path / "auth" / "credentials.json").read_bytes() == credentials
    result = enrolled.finish_offline_authentication(request, Method.FACE)
    assert result.atc == 1 and device.status().sign_count == count + 1
    assert verifier.verify(session.session_id, result.otp).method is Method.FACE


def test_enrollment_response_is_unsigned_and_carries_the_wrapped_key(verifier, authenticator):  # type: ignore[no-untyped-def]
    issued = verifier.create_offer("carol", methods=[Method.FACE])
    offer = issued.offer
    response, _ = EnrollmentResponse.from_text(
        authenticator.add_or_update(
            Method.FACE, issued.text, activation_code=issued.activation_code
        )
    )
    assert response.backend == "fido2" and response.agreement_key is None
    wrapped = response.wrapped_otp_key
    assert wrapped is not None
    shared = verifier.keys.offer_private(offer.offer_id).exchange(  # the offer's own key
        cec.ECDH(), key_transport.ephemeral_point(wrapped)
    )
    assert key_transport.open_with_shared(shared, wrapped)  # decrypts for the verifier
    ec.decode_point(response.signing_key)


def test_verifier_refuses_an_attestation_bound_to_another_offer(verifier, authenticator):  # type: ignore[no-untyped-def]
    """The verifier itself checks the FIDO2 enrollment proof: a response moved to
    another offer (a replayed or redirected enrollment) is refused, and the
    untouched response is accepted."""
    import dataclasses

    from hsm_auth.errors import UntrustedMessage
    from hsm_auth.protocol import EnrollmentOffer, EnrollmentResponse

    offer_a = verifier.create_offer("mallory", methods=[Method.BIOMETRIC])
    offer_b = verifier.create_offer("mallory", methods=[Method.BIOMETRIC])
    response_a = authenticator.add_or_update(
        Method.BIOMETRIC, offer_a.text, activation_code=offer_a.activation_code
    )
    parsed, _ = EnrollmentResponse.from_text(response_a)
    other, _ = EnrollmentOffer.from_text(offer_b.text)
    moved = dataclasses.replace(parsed, offer_id=other.offer_id)
    with pytest.raises(UntrustedMessage):
        verifier.accept_enrollment(moved.to_text(None))
    assert verifier.accept_enrollment(response_a).method is Method.BIOMETRIC
