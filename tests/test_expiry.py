"""Expiry of offline credentials, the verifier's side (docs/PROTOCOL.md §20), on both
store engines, against a device simulated in pure Python: ``[offline] validity_days``
sets each credential's expiry at enrollment, which the device certificate states
(notAfter); after it, session start, verify and sync refuse with the one
CredentialExpired advice (audited "expired", counted as no failure); renewal sets a
new expiry and certificate from the moment of renewal. The authenticator's side and
the online renewal: tests/test_expiry_flow.py."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from _verifier_device import Clock, PythonDevice
from cryptography import x509
from test_verifier_sync import report_from

from hsm_auth import device_ca
from hsm_auth.attestation import POLICY_FILE, VerifierPolicy
from hsm_auth.audit import Event, Reason
from hsm_auth.errors import (
    CREDENTIAL_EXPIRED,
    ConfigError,
    CredentialExpired,
    ExpiredMessage,
    InvalidInput,
    InvalidToken,
)
from hsm_auth.expiry import DAY, OfflineValidity, parse_validity
from hsm_auth.files import atomic_write, ensure_private_dir
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
VALIDITY = 90


@pytest.fixture(params=ENGINES)
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock, database):
    directory = tmp_path / "verifier"
    ensure_private_dir(directory)
    atomic_write(directory / POLICY_FILE, f"[offline]\nvalidity_days = {VALIDITY}\n".encode())
    v = Verifier.init(directory, "Bank", clock=clock, database=database)
    yield v
    v.close()


def _enroll(verifier: Verifier, method: Method = Method.DEVICE) -> PythonDevice:
    device = PythonDevice()
    offer = verifier.create_offer("alice", methods=[method])
    verifier.accept_enrollment(device.enroll(offer, method))
    return device


def _advice(method: Method, expires: int) -> str:
    date = datetime.datetime.fromtimestamp(expires, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return CREDENTIAL_EXPIRED.format(method=method.value, date=f"{date} UTC")


# --- the policy ------------------------------------------------------------------------


def test_the_policy_parses_validity_days_and_refuses_bad_values():
    assert VerifierPolicy.parse({}).offline_validity == OfflineValidity(0)  # never expire
    assert VerifierPolicy.parse({"offline": {"validity_days": 90}}).offline_validity.days == 90
    # Tables under [offline] are other settings' (the PIN cache): left to their parser.
    assert parse_validity({"validity_days": 7, "pin": {"pin_cache": 60}}).days == 7
    for bad in (-1, 3651, 1.5, "90", True):
        with pytest.raises(ConfigError, match="validity_days"):
            VerifierPolicy.parse({"offline": {"validity_days": bad}})
    with pytest.raises(ConfigError, match="unknown key 'validity'"):
        VerifierPolicy.parse({"offline": {"validity": 90}})
    with pytest.raises(ConfigError, match=r"\[offline\] must be a table"):
        VerifierPolicy.parse({"offline": 90})
    assert OfflineValidity(0).expires(1000) == 0
    assert OfflineValidity(2).expires(1000) == 1000 + 2 * DAY


def test_a_bad_policy_file_stops_the_verifier(tmp_path):
    directory = tmp_path / "v"
    ensure_private_dir(directory)
    atomic_write(directory / POLICY_FILE, b"[offline]\nvalidity_days = 0.5\n")
    with pytest.raises(ConfigError, match=r"policy\.toml: .*validity_days"):
        Verifier.init(directory, "Bank")


# --- enrollment states the expiry -------------------------------------------------------


def test_enrollment_sets_the_expiry_and_the_certificate_states_it(verifier, clock):
    _enroll(verifier)
    cred = verifier.credential("alice", Method.DEVICE)
    assert cred.expires == int(clock.now) + VALIDITY * DAY
    cert = x509.load_der_x509_certificate(cred.certificate)
    assert int(cert.not_valid_after_utc.timestamp()) == cred.expires
    assert device_ca.summary(cert).not_after == cred.expires


def test_without_a_validity_a_credential_never_expires(tmp_path, clock):
    with Verifier.init(tmp_path / "v", "Bank", clock=clock) as v:
        device = _enroll(v)
        cred = v.credential("alice", Method.DEVICE)
        assert cred.expires == 0
        cert = x509.load_der_x509_certificate(cred.certificate)
        issued = cert.not_valid_before_utc + device_ca.DEVICE_VALIDITY
        assert cert.not_valid_after_utc == issued  # as before expiry existed
        clock.now += 20 * 365 * DAY
        session = v.start_session("alice", "much later")
        assert v.verify(session.session_id, device.otp(session)).atc == 1


# --- the refusals -------------------------------------------------------------------------


def test_an_expired_credential_is_refused_at_session_start_verify_and_sync(verifier, clock):
    device = _enroll(verifier)
    cred = verifier.credential("alice", Method.DEVICE)
    clock.now = cred.expires  # inclusive: usable at its expiry
    early = verifier.start_session("alice", "Log in")
    pending = verifier.start_session("alice", "Log in again")
    assert verifier.verify(early.session_id, device.otp(early)).atc == 1
    message = verifier.sync_message("alice", Method.DEVICE)
    report = report_from(device, message)
    otp = device.otp(pending)

    clock.now = cred.expires + 1
    advice = _advice(Method.DEVICE, cred.expires)
    with pytest.raises(CredentialExpired) as e:
        verifier.start_session("alice", "Log in")
    assert str(e.value) == advice
    assert (e.value.method, e.value.expires) == ("device", cred.expires)
    assert isinstance(e.value, ExpiredMessage) and e.value.exit_code == 38
    with pytest.raises(CredentialExpired) as e:  # a session started before, the right OTP
        verifier.verify(pending.session_id, otp)
    assert str(e.value) == advice
    with pytest.raises(CredentialExpired) as e:
        verifier.sync_message("alice", Method.DEVICE)
    assert str(e.value) == advice
    with pytest.raises(CredentialExpired) as e:  # a report made before the expiry
        verifier.apply_sync(report)
    assert str(e.value) == advice

    after = verifier.credential("alice", Method.DEVICE)
    assert (after.atc, after.failures, after.locked) == (1, 0, False)  # nothing moved
    refused = [r for r in verifier.store.audit_records("alice") if r.reason is Reason.EXPIRED]
    assert len(refused) == 2  # verify and apply_sync: each audited with the expiry
    assert all(r.detail == str(cred.expires) and r.method == "device" for r in refused)


def test_a_wrong_otp_for_an_expired_credential_gets_the_advice_too(verifier, clock):
    _enroll(verifier)
    clock.now = verifier.credential("alice", Method.DEVICE).expires - 10
    session = verifier.start_session("alice", "Log in")
    clock.now += 11
    with pytest.raises(CredentialExpired):
        verifier.verify(session.session_id, "00000000")
    assert verifier.credential("alice", Method.DEVICE).failures == 0


def test_an_expired_method_is_left_out_of_a_session_while_another_is_live(verifier, clock):
    device = _enroll(verifier, Method.DEVICE)
    clock.now += 30 * DAY
    _enroll(verifier, Method.PIN)
    clock.now = verifier.credential("alice", Method.DEVICE).expires + 1
    session = verifier.start_session("alice", "Log in")
    assert session.data.methods == (Method.PIN,)
    with pytest.raises(InvalidToken):  # the device's OTP: not a method of this session
        verifier.verify(session.session_id, device.otp(session))
    with pytest.raises(CredentialExpired, match="the device credential expired"):
        verifier.start_session("alice", "Log in", methods=[Method.DEVICE])


# --- renewal ------------------------------------------------------------------------------


def test_renewal_sets_a_new_expiry_and_certificate_from_now(verifier, clock):
    device = _enroll(verifier)
    old = verifier.credential("alice", Method.DEVICE)
    clock.now = old.expires + 10 * DAY  # expired: renewal is how it comes back
    done = verifier.renew(old)
    new = verifier.credential("alice", Method.DEVICE)
    assert done.credential == new
    assert new.expires == int(clock.now) + VALIDITY * DAY
    assert new.certificate != old.certificate and (new.atc, new.id) == (old.atc, old.id)
    cert = x509.load_der_x509_certificate(new.certificate)
    assert int(cert.not_valid_after_utc.timestamp()) == new.expires
    assert cert.subject == x509.load_der_x509_certificate(old.certificate).subject
    assert done.result.startswith("HA")  # a signed EnrollmentResult (text form)
    session = verifier.start_session("alice", "Log in")
    assert verifier.verify(session.session_id, device.otp(session)).atc == 1
    [renewed] = [r for r in verifier.store.audit_records("alice") if r.event is Event.RENEW]
    assert renewed.detail == str(new.expires)


def test_a_locked_or_revoked_credential_is_not_renewed(verifier, clock):
    _enroll(verifier)
    cred = verifier.credential("alice", Method.DEVICE)
    locked = dataclasses.replace(cred, locked=True)
    with pytest.raises(InvalidInput, match="locked"):
        verifier.renew(locked)
    verifier.revoke("alice", Method.DEVICE)
    with pytest.raises(InvalidInput):
        verifier.renew(cred)
