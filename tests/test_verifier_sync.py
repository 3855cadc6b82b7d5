"""The verifier's side of sync on both store engines, against a device simulated
in pure Python: the report's MAC is checked at exactly the stated ATC, the ATC
moves forward by compare-and-swap with the sync session burned, and a sync
session never takes an OTP."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from _verifier_device import Clock, PythonDevice

from hsm_auth.errors import InvalidToken
from hsm_auth.methods import Method
from hsm_auth.protocol import SyncMessage, SyncReport
from hsm_auth.verifier import Verifier

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def database(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def verifier(tmp_path, database):
    v = Verifier.init(tmp_path / "verifier", "Sync", clock=Clock(), database=database)
    yield v
    v.close()


def report_from(device: PythonDevice, message_text: str, *, atc: int | None = None) -> str:
    """What a token does for ``hsm-auth sync``: advance, then MAC the report."""
    message, _ = SyncMessage.from_text(message_text)
    if atc is None:
        device.atc += 1
        atc = device.atc
    report = SyncReport(
        message.verifier_id, message.session_id, message.user, message.method, atc,
        message.credential_id,
    )
    q = device.scheme.sync_question(
        session_id=message.session_id, user=message.user, method=message.method,
        credential_id=message.credential_id,
    )
    data = device.scheme.message(atc, q)
    mac = hmac.digest(device.otp_key, data, hashlib.sha256)
    return report.to_text(lambda body: mac)


def test_unsubmitted_otps_then_a_report_then_the_next_otp(verifier):
    device = PythonDevice()
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))
    for _ in range(25):  # far beyond the window: never submitted
        device.otp(verifier.start_session("alice", "lost"))
    late = verifier.start_session("alice", "late")
    with pytest.raises(InvalidToken):
        verifier.verify(late.session_id, device.otp(late))
    message = verifier.sync_message("alice", Method.DEVICE)
    assert verifier.apply_sync(report_from(device, message)).atc == 27
    with pytest.raises(InvalidToken):  # the sync session takes no OTP
        verifier.verify(SyncMessage.from_text(message)[0].session_id, device.otp(late))
    session = verifier.start_session("alice", "back in the window")
    assert verifier.verify(session.session_id, device.otp(session)).atc == 29


def test_a_report_with_a_wrong_atc_is_refused_and_counted(verifier):
    device = PythonDevice()
    offer = verifier.create_offer("alice", methods=[Method.DEVICE])
    verifier.accept_enrollment(device.enroll(offer, Method.DEVICE))
    message = verifier.sync_message("alice", Method.DEVICE)
    good = report_from(device, message)
    _, signed = SyncReport.from_text(good)
    bad = SyncReport.from_text(good)[0]
    forged = SyncReport(
        bad.verifier_id, bad.session_id, bad.user, bad.method, 500, bad.credential_id
    ).to_text(lambda body: signed.signature)
    with pytest.raises(InvalidToken):
        verifier.apply_sync(forged)
    cred = verifier.credential("alice", Method.DEVICE)
    assert (cred.atc, cred.failures) == (0, 1)
    assert verifier.apply_sync(good).atc == 1
    assert verifier.credential("alice", Method.DEVICE).failures == 0
