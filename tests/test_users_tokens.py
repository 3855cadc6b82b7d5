"""Several users of one verifier on one workstation, and several tokens per method
(a backup key), on real SoftHSM tokens through the library API (issue 14):

* alice and bob, two users of one verifier, enroll on one authenticator, each with
  their own token, and each authenticates with it: neither's token answers for the
  other, and the OTPs count on each one's own credential;
* a third token enrolled as alice's backup (its own label, ATC and lockout) is
  listed beside her first; after the first is revoked (and lost), the backup alone
  answers her sessions, and the first one's OTPs are refused;
* a wrong OTP counts against every credential it was checked against, an
  acceptance resets them all, a locked or revoked credential leaves the others be.
"""

from __future__ import annotations

import subprocess

import pytest
from _verifier_device import Clock

from hsm_auth import transcript
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import (
    AlreadyEnrolled,
    InvalidInput,
    InvalidToken,
    TokenNotFound,
    UnknownMethod,
)
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(tmp_path, clock):
    v = Verifier.init(tmp_path / "verifier", "Workstation", clock=clock)
    yield v
    v.close()


@pytest.fixture
def make_token(softhsm_env, tmp_path):
    """A fresh SoftHSM token for the device method: (its label, a Config naming it)."""

    def make(name: str) -> tuple[str, Config]:
        token = init_token(unique_label(name), so_pin="12345678", user_pin=f"{name}-secret")
        pin_file = tmp_path / f"{token.label}.pin"
        pin_file.write_text(token.user_pin)
        pin_file.chmod(0o600)
        uri = Pkcs11Uri(
            token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}"
        )
        device = MethodConfig("pkcs11", {"uri": str(uri)})
        return token.label, Config(methods={Method.DEVICE: device})

    return make


def _enroll(verifier, home, config, clock, user, *, label=None, token=None):
    """Enroll ``user``'s device method on the token ``config`` names, into the
    authenticator in ``home`` (the one workstation)."""
    named = {} if label is None else {"label": label}
    issued = verifier.create_offer(user, methods=[Method.DEVICE], **named)
    with Authenticator(home, config, clock=clock) as a:
        response = a.add_or_update(
            Method.DEVICE, issued.text, activation_code=issued.activation_code,
            **({} if token is None else {"token": token}),
        )
    return verifier.accept_enrollment(response)


def _otp(home, verifier, clock, user, *, token=None):
    session = verifier.start_session(user, f"log in as {user}")
    with Authenticator(home, Config(), clock=clock) as a:
        request = a.start_offline_authentication(session.text)
        assert request.user == user
        result = a.finish_offline_authentication(
            request, Method.DEVICE, **({} if token is None else {"token": token})
        )
    return session, result


def _delete_token(label: str) -> None:
    subprocess.run(
        ["softhsm2-util", "--delete-token", "--token", label],
        check=True, capture_output=True, timeout=30,
    )


def test_two_users_of_one_verifier_on_one_workstation_each_use_their_own_token(
    verifier, make_token, tmp_path, clock
):
    home = tmp_path / "workstation"
    _, alice_token = make_token("alice")
    _, bob_token = make_token("bob")
    alice = _enroll(verifier, home, alice_token, clock, "alice")
    bob = _enroll(verifier, home, bob_token, clock, "bob")
    with Authenticator(home, Config(), clock=clock) as a:
        assert [(m.user, m.settings) for m in a.enrolled] == [
            ("alice", alice_token.methods[Method.DEVICE].settings),
            ("bob", bob_token.methods[Method.DEVICE].settings),
        ]
    for user, cred in (("alice", alice), ("bob", bob), ("bob", bob), ("alice", alice)):
        session, result = _otp(home, verifier, clock, user)
        accepted = verifier.verify(session.session_id, result.otp)
        assert (accepted.user, accepted.method) == (user, Method.DEVICE)
        assert verifier.credential(user, Method.DEVICE).id == cred.id
    # Each counter moved on its own credential only: two uses each.
    assert verifier.credential("alice", Method.DEVICE).atc == alice.atc + 2
    assert verifier.credential("bob", Method.DEVICE).atc == bob.atc + 2
    # bob's code is not answered by alice's token: the OTP is bound to bob's
    # credential, and alice's OTP for bob's session is refused.
    session = verifier.start_session("bob", "log in as bob")
    with Authenticator(home, Config(), clock=clock) as a:
        request = a.start_offline_authentication(session.text)
        assert request.user == "bob"
        with pytest.raises(UnknownMethod):
            a.finish_offline_authentication(request, Method.DEVICE, token=alice.label)


def test_a_backup_token_has_its_own_label_atc_and_works_alone_after_the_first_is_revoked(
    verifier, make_token, tmp_path, clock
):
    home = tmp_path / "workstation"
    first_label, first = make_token("alice1")
    _, bob_token = make_token("bob")
    _, backup = make_token("alice2")
    main = _enroll(verifier, home, first, clock, "alice")
    _enroll(verifier, home, bob_token, clock, "bob")
    # A second device credential for alice needs a name on both sides...
    with pytest.raises(AlreadyEnrolled):
        _enroll(verifier, home, backup, clock, "alice")
    spare = _enroll(verifier, home, backup, clock, "alice", label="yubikey-backup",
                    token="backup")
    assert (main.label, spare.label) == ("device", "yubikey-backup")
    assert [(c.label, c.method) for c in verifier.credentials("alice")] == [
        ("device", Method.DEVICE), ("yubikey-backup", Method.DEVICE)
    ]
    with pytest.raises(AlreadyEnrolled):  # a label is unique per user
        verifier.create_offer("alice", methods=[Method.DEVICE], label="yubikey-backup")
    with pytest.raises(InvalidInput, match="2 such credentials"):
        verifier.credential("alice", Method.DEVICE)

    # Both tokens answer, each on its own ATC: the first present by default, the
    # backup by name.
    session, result = _otp(home, verifier, clock, "alice")
    verifier.verify(session.session_id, result.otp)
    session, result = _otp(home, verifier, clock, "alice", token="backup")
    assert result.token == "backup"
    verifier.verify(session.session_id, result.otp)
    session, result = _otp(home, verifier, clock, "alice", token="backup")
    verifier.verify(session.session_id, result.otp)
    assert verifier.credential("alice", credential="device").atc == main.atc + 1
    assert verifier.credential("alice", credential="yubikey-backup").atc == spare.atc + 2

    # The first token is lost: revoked at the verifier, alone.
    revoked = verifier.revoke("alice", credential="device")
    assert revoked.id == main.id
    assert [c.label for c in verifier.credentials("alice")] == ["yubikey-backup"]
    assert [c.label for c in verifier.credentials("bob")] == ["device"]
    # Its OTPs are refused from now on (were it found again)...
    session, result = _otp(home, verifier, clock, "alice")
    assert result.token != "backup"
    with pytest.raises(InvalidToken):
        verifier.verify(session.session_id, result.otp)
    # ...and with it gone from the workstation, the backup alone answers, by default.
    _delete_token(first_label)
    session = verifier.start_session("alice", "log in as alice")
    with Authenticator(home, Config(), clock=clock) as a:
        request = a.start_offline_authentication(session.text)
        lost = a.enrolled[0]  # named by its credential id: the lost token is told so
        assert lost.user == "alice" and lost.token_label == ""
        with pytest.raises(TokenNotFound):
            a.finish_offline_authentication(request, Method.DEVICE, token=lost.credential_id[:8])
        result = a.finish_offline_authentication(request, Method.DEVICE)
    assert result.token == "backup"
    accepted = verifier.verify(session.session_id, result.otp)
    assert accepted.user == "alice"
    assert verifier.credential("alice").atc == spare.atc + 3
    # bob is untouched.
    session, result = _otp(home, verifier, clock, "bob")
    assert verifier.verify(session.session_id, result.otp).user == "bob"


def test_a_wrong_otp_counts_against_every_credential_it_was_checked_against(
    verifier, make_token, tmp_path, clock
):
    home = tmp_path / "workstation"
    _, first = make_token("alice1")
    _, backup = make_token("alice2")
    _, bob_token = make_token("bob")
    _enroll(verifier, home, first, clock, "alice")
    _enroll(verifier, home, backup, clock, "alice", label="backup", token="backup")
    _enroll(verifier, home, bob_token, clock, "bob")
    for _ in range(3):
        session = verifier.start_session("alice", "log in")
        with pytest.raises(InvalidToken):
            verifier.verify(session.session_id, "00000000")
    assert [c.failures for c in verifier.credentials("alice")] == [3, 3]
    assert verifier.credential("bob").failures == 0
    # An acceptance with the backup token resets the count of both.
    session, result = _otp(home, verifier, clock, "alice", token="backup")
    verifier.verify(session.session_id, result.otp)
    assert [c.failures for c in verifier.credentials("alice")] == [0, 0]
    # Locking is per credential: the threshold locks both (each was guessed at)...
    for _ in range(verifier.identity.lockout_threshold):
        session = verifier.start_session("alice", "log in")
        with pytest.raises(InvalidToken):
            verifier.verify(session.session_id, "00000000")
    assert [c.locked for c in verifier.credentials("alice")] == [True, True]
    # ...and unlocking one leaves the other locked; an acceptance keeps it locked.
    verifier.unlock("alice", credential="backup")
    assert [c.locked for c in verifier.credentials("alice")] == [True, False]
    session, result = _otp(home, verifier, clock, "alice", token="backup")
    verifier.verify(session.session_id, result.otp)
    assert [(c.locked, c.failures) for c in verifier.credentials("alice")] == [
        (True, verifier.identity.lockout_threshold), (False, 0)
    ]


def test_alice_of_a_tenant_and_alice_without_one_are_two_accounts_on_one_workstation(
    verifier, make_token, tmp_path, clock
):
    home = tmp_path / "workstation"
    _, plain_token = make_token("alice")
    _, acme_token = make_token("acme")
    plain = _enroll(verifier, home, plain_token, clock, "alice")
    issued = verifier.create_offer("alice", methods=[Method.DEVICE], tenant="acme")
    with Authenticator(home, acme_token, clock=clock) as a:
        response = a.add_or_update(
            Method.DEVICE, issued.text, activation_code=issued.activation_code
        )
        assert [(m.user, m.tenant) for m in a.enrolled] == [("alice", ""), ("alice", "acme")]
    acme = verifier.accept_enrollment(response)
    assert (plain.tenant, acme.tenant, acme.label) == ("", "acme", "device")
    for tenant, cred in ((None, plain), ("acme", acme), ("acme", acme), (None, plain)):
        session = verifier.start_session("alice", "log in", tenant=tenant)
        with Authenticator(home, Config(), clock=clock) as a:
            request = a.start_offline_authentication(session.text)
            assert request.tenant == tenant
            result = a.finish_offline_authentication(request, Method.DEVICE)
        accepted = verifier.verify(session.session_id, result.otp)
        assert accepted.credential_id == transcript.credential_id(cred.signing_key)
        assert verifier.credential("alice", tenant=tenant).id == cred.id
        assert verifier.credential("alice", tenant=tenant).atc > cred.atc
    # Revoking the tenant's alice leaves the other alice be.
    verifier.revoke("alice", tenant="acme", credential="device")
    with pytest.raises(UnknownMethod):
        verifier.start_session("alice", "log in", tenant="acme")
    session, result = _otp(home, verifier, clock, "alice")
    assert verifier.verify(session.session_id, result.otp).user == "alice"


def test_a_sync_names_one_token_and_moves_its_own_atc_only(
    verifier, make_token, tmp_path, clock
):
    home = tmp_path / "workstation"
    _, first = make_token("alice1")
    _, backup = make_token("alice2")
    main = _enroll(verifier, home, first, clock, "alice")
    spare = _enroll(verifier, home, backup, clock, "alice", label="backup", token="backup")
    for _ in range(3):  # OTPs made with the backup, never submitted
        _otp(home, verifier, clock, "alice", token="backup")
    with pytest.raises(InvalidInput, match="2 such credentials"):
        verifier.sync_message("alice", Method.DEVICE)
    text = verifier.sync_message("alice", Method.DEVICE, credential="backup")
    with Authenticator(home, Config(), clock=clock) as a:
        synced = a.sync(text)
    assert synced.method.token_label == "backup"
    accepted = verifier.apply_sync(synced.report)
    assert (accepted.credential_id, accepted.atc) == (
        transcript.credential_id(spare.signing_key), spare.atc + 4)
    assert verifier.credential("alice", credential="device").atc == main.atc
    assert verifier.credential("alice", credential="backup").atc == spare.atc + 4
    session, result = _otp(home, verifier, clock, "alice", token="backup")
    assert verifier.verify(session.session_id, result.otp).label == "backup"
