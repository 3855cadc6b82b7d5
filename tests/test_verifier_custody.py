"""Issue 10, finding 2: with its keys in an HSM, the verifier holds no key that
can produce an enrolled credential's OTP key in the clear.

* An attacker process logs in to the verifier's SoftHSM token with python-pkcs11
  (no hsm-auth code) and tries every derive, unwrap, decrypt, wrap and read it
  can think of on every object (``_hsm_attack.py``); none of its outputs is an
  enrolled credential's OTP key (PKCS#11-style and FIDO2-style credentials from
  ``PythonDevice``, and one enrolled through a real SoftHSM authenticator), while
  the same attack does get the key of an offer still pending (the control).
* The verifier reads no secret key's CKA_VALUE during a whole flow (the
  python-pkcs11 objects are instrumented).
* A process SIGKILLed inside ``accept_enrollment`` (at many points, and between
  the commit and the destruction of the offer's key) leaves no per-offer key
  that ``purge`` does not destroy, and every credential works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _unattested import allow_unattested_fido2_methods
from _verifier_device import Clock, PythonDevice, activated, enroll
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import cli, ec, key_transport
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

HSM_PIN = "hsm-verifier-pin-4711"
HERE = Path(__file__).parent
PROBE = b"hsm-auth test: is this the OTP key?"


@pytest.fixture
def hsm(softhsm_env, tmp_path):
    token = init_token(unique_label("custody"), so_pin="12345678", user_pin=HSM_PIN)
    pin_file = tmp_path / "hsm.pin"
    pin_file.write_text(HSM_PIN)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    return token, str(uri)


@pytest.fixture
def authenticator(softhsm_env, tmp_path):
    """An authenticator whose ``device`` method is a real SoftHSM token."""
    token = init_token(unique_label("custody-dev"), so_pin="12345678", user_pin="device-pin")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
    with Authenticator(tmp_path / "auth", config, clock=Clock()) as a:
        yield a


def _attack(token, points: list[bytes], blobs: list[bytes]) -> dict:
    spec = {
        "module": token.module_path,
        "token": token.label,
        "pin": HSM_PIN,
        "points": [p.hex() for p in points],
        "blobs": [b.hex() for b in blobs],
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "_hsm_attack.py")],
        input=json.dumps(spec), capture_output=True, text=True, timeout=300, check=False,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _windows(outputs: list[str]) -> set[bytes]:
    """Every 32-byte window of every output: an OTP key hidden inside a longer string counts."""
    found: set[bytes] = set()
    for text in outputs:
        data = bytes.fromhex(text)
        found.update(data[i : i + 32] for i in range(len(data) - 31))
    return found


def test_an_attacker_driving_the_hsm_gets_no_enrolled_otp_key(hsm, authenticator, tmp_path):
    token, uri = hsm
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    with Verifier.init(tmp_path / "verifier", "Custody", clock=Clock(), hsm=uri) as v:
        v.purge_every = 0
        alice = enroll(v, "alice")  # PKCS#11-style: OTP key = ECDH x-coordinate
        bob = enroll(v, "bob", Method.FACE, wrapped=True)  # FIDO2-style: wrapped key
        offer = v.create_offer("carol", methods=[Method.DEVICE])  # a real SoftHSM token
        v.accept_enrollment(
            authenticator.add_or_update(
                Method.DEVICE, offer.text, activation_code=offer.activation_code
            )
        )
        # The control: an offer still pending, and the key a device would get from it.
        pending = v.create_offer("dave", methods=[Method.DEVICE]).offer
        dave = cec.generate_private_key(ec.CURVE)
        dave_key = dave.exchange(cec.ECDH(), ec.decode_point(pending.verifier_agreement_key))

        creds = v.store.all_credentials()
        assert {c.user for c in creds} == {"alice", "bob", "carol"}
        # What each enrolled credential's OTP key MACs, computed in the HSM: the oracle
        # that recognises carol's key too, which nobody outside her token knows.
        probes = {c.user: v.keys.otp_mac(c, PROBE) for c in creds}
        points = [ec.encode_point(dave.public_key()), ec.encode_point(v.keys.signing_public)]
        blobs: list[bytes] = []
        for cred in creds:
            if cred.agreement_key is not None:
                points.append(cred.agreement_key)
            if cred.wrapped_otp_key is not None:
                wrapped = cred.wrapped_otp_key
                points.append(wrapped[:33])  # the FIDO2 ephemeral point E
                blobs += [wrapped, key_transport.key_wrap_part(wrapped)]
            sealed = getattr(cred, "sealed_otp_key", None)
            if sealed is not None:
                blobs.append(sealed)

    report = _attack(token, points, blobs)

    got = _windows(report["outputs"])
    assert dave_key in got, "the control failed: the attack cannot even find a pending key"
    assert report["attempts"] > 200 and report["refused"] > 100
    assert probes["alice"] == hmac.digest(alice.otp_key, PROBE, hashlib.sha256)  # the oracle
    assert probes["bob"] == hmac.digest(bob.otp_key, PROBE, hashlib.sha256)
    leaked = sorted(
        user
        for user, expected in probes.items()
        if any(hmac.compare_digest(hmac.digest(k, PROBE, hashlib.sha256), expected) for k in got)
    )
    assert leaked == [], f"the OTP keys of {leaked} came out of the HSM"
    # What the attacker found: the signing and device CA key pairs, the KEK, the
    # pending offer's key.
    inventory = sorted(report["inventory"])
    assert len([i for i in inventory if i.startswith("PRIVATE_KEY")]) == 3, inventory
    assert any(i == f"PRIVATE_KEY {i.split()[1].rsplit('/', 1)[0]}/ca" for i in inventory)
    assert any(i.endswith("/kek") for i in inventory), inventory
    assert any(
        i.endswith(f"/offer/{pending.offer_id.hex()}/{pending.expires}") for i in inventory
    ), inventory

    # The attack destroyed nothing: every credential still verifies.
    with Verifier.open(tmp_path / "verifier", clock=Clock()) as v:
        for user, device in (("alice", alice), ("bob", bob)):
            s = v.start_session(user, "after the attack")
            assert v.verify(s.session_id, device.otp(s)).user == user
        s = v.start_session("carol", "after the attack")
        request = authenticator.start_offline_authentication(s.text)
        otp = authenticator.finish_offline_authentication(request, Method.DEVICE).otp
        assert v.verify(s.session_id, otp).user == "carol"


# --- no CKA_VALUE read of a secret key ---------------------------------------------


@pytest.fixture
def value_reads(monkeypatch):
    """Every attempt to read CKA_VALUE of a secret or private key through python-pkcs11
    (``obj[CKA_VALUE]`` or ``get_attributes``), successful or not, by anyone in this process."""
    import pkcs11
    from pkcs11._pkcs11 import Object

    attr = pkcs11.Attribute
    reads: list[str] = []
    getitem, get_attributes = Object.__getitem__, Object.get_attributes

    def note(obj, keys) -> None:
        if attr.VALUE in keys:
            kind = getitem(obj, attr.CLASS)
            if kind in (pkcs11.ObjectClass.SECRET_KEY, pkcs11.ObjectClass.PRIVATE_KEY):
                reads.append(f"{kind.name} {getitem(obj, attr.LABEL)!r}")

    def spy_getitem(self, key):
        note(self, [key])
        return getitem(self, key)

    def spy_get_attributes(self, keys):
        note(self, list(keys))
        return get_attributes(self, keys)

    monkeypatch.setattr(Object, "__getitem__", spy_getitem)
    monkeypatch.setattr(Object, "get_attributes", spy_get_attributes)
    return reads


def test_no_secret_key_value_is_read_in_a_whole_hsm_flow(hsm, authenticator, tmp_path, value_reads):
    import pkcs11

    _, uri = hsm
    clock = Clock()
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    with Verifier.init(tmp_path / "verifier", "Custody", clock=clock, hsm=uri) as v:
        alice = enroll(v, "alice")
        bob = enroll(v, "bob", Method.FACE, wrapped=True)
        offer = v.create_offer("carol", methods=[Method.DEVICE])
        v.accept_enrollment(
            authenticator.add_or_update(
                Method.DEVICE, offer.text, activation_code=offer.activation_code
            )
        )
        v.create_offer("dave")  # left pending, then expired and purged
        for user, device in (("alice", alice), ("bob", bob)):
            s = v.start_session(user, "Log in")
            assert v.verify(s.session_id, device.otp(s)).user == user
        s = v.start_session("carol", "Log in")
        request = authenticator.start_offline_authentication(s.text)
        otp = authenticator.finish_offline_authentication(request, Method.DEVICE).otp
        assert v.verify(s.session_id, otp).user == "carol"
        synced = authenticator.sync(v.sync_message("carol", Method.DEVICE))
        assert v.apply_sync(synced.report).user == "carol"
        clock.now += v.identity.offer_ttl + 1
        assert v.purge_offer_keys() == 1
        assert v.keys.offer_keys() == []
        assert value_reads == []
        # The control: the instrument does see a read (which the HSM refuses).
        with pytest.raises(pkcs11.AttributeSensitive):
            v.keys._kek[pkcs11.Attribute.VALUE]
        assert value_reads == [f"SECRET_KEY {v.keys._kek[pkcs11.Attribute.LABEL]!r}"]


def test_a_refused_wrapped_key_and_a_missing_offer_key_under_the_hsm(hsm, tmp_path):
    """FIDO2: a key wrapped to another offer's key does not open in the HSM under this
    offer's (a key-confirmation refusal, nothing recorded); an offer whose key is gone
    is refused in one line."""
    from hsm_auth.errors import StateError, UntrustedMessage
    from hsm_auth.protocol import EnrollmentResponse

    _, uri = hsm
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    with Verifier.init(tmp_path / "verifier", "Custody", clock=Clock(), hsm=uri) as v:
        v.purge_every = 0
        this_issued = v.create_offer("erin", methods=[Method.FACE])
        this = this_issued.offer
        other_text = v.create_offer("erin", methods=[Method.FACE])
        device = PythonDevice(wrapped=True)
        response, _ = EnrollmentResponse.from_text(device.enroll(other_text, Method.FACE))
        # erin holds both codes: the activation MAC is right for this offer
        moved = activated(dataclasses.replace(response, offer_id=this.offer_id), this_issued)
        text = moved.to_text(
            lambda body: ec.der_to_raw(device.signing.sign(body, cec.ECDSA(hashes.SHA256())))
        )
        with pytest.raises(UntrustedMessage, match="key confirmation"):
            v.accept_enrollment(text)
        v.keys.drop_offer_key(this.offer_id)
        with pytest.raises(StateError, match="agreement key is not in the HSM"):
            v.accept_enrollment(text)
        assert v.store.all_credentials() == []


# --- a kill between the commit and the key's destruction ----------------------------

KILLER = HERE / "_accept_kill.py"


def _accept_in_child(directory: Path, response: str, kill_at: int, tmp_path: Path) -> int:
    """Run accept_enrollment in a child process killed at step ``kill_at``; returns
    the number of steps it counted (``kill_at=0``) or -9 (killed)."""
    path = tmp_path / "response.txt"
    path.write_text(response)
    done = subprocess.run(
        [sys.executable, str(KILLER), str(directory), str(path), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ.copy(),
    )
    if done.returncode == -9:
        return -9
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stderr.strip().splitlines()[-1])


def _check_no_stale_offer_key(v: Verifier) -> None:
    """The invariant: every per-offer key left belongs to an offer still pending."""
    now = int(time.time())
    for key in v.keys.offer_keys():
        offer = v.store.offer(key.offer_id)
        assert offer is not None and offer.expires >= now, "a used or expired offer kept its key"


@pytest.mark.slow
def test_a_kill_inside_accept_enrollment_leaves_nothing_that_purge_does_not_remove(
    hsm,
    tmp_path,
    capsys,
):
    _, uri = hsm
    home = tmp_path / "home"
    directory = home / "verifier"
    Verifier.init(directory, "Custody", hsm=uri).close()

    def offer_for(v: Verifier, user: str) -> tuple[PythonDevice, bytes, str]:
        device = PythonDevice()
        issued = v.create_offer(user, methods=[Method.DEVICE])
        return device, issued.offer.offer_id, device.enroll(issued, Method.DEVICE)

    with Verifier.open(directory) as v:
        v.purge_every = 0
        first = offer_for(v, "u0")
    steps = _accept_in_child(directory, first[2], 0, tmp_path)
    assert steps > 20
    devices = {"u0": first[0]}
    # Spread over the whole call, and dense at its end (the commit, then the key's drop).
    spread = {1 + steps * i // 6 for i in range(6)} | {steps - d for d in (2, 5, 10, 20, 40)}
    plan = [-1, -1, -1, *sorted(k for k in spread if 0 < k <= steps)]
    outcomes = []
    for n, kill_at in enumerate(plan, start=1):
        user = f"u{n}"
        with Verifier.open(directory) as v:
            v.purge_every = 0
            device, offer_id, response = offer_for(v, user)
        assert _accept_in_child(directory, response, kill_at, tmp_path) == -9
        with Verifier.open(directory) as v:
            v.purge_every = 0
            enrolled = any(c.user == user for c in v.store.all_credentials())
            held = {k.offer_id for k in v.keys.offer_keys()}
            outcomes.append((kill_at, enrolled))
            if kill_at == -1:  # killed after the commit, before the key went
                assert enrolled and offer_id in held
            if not enrolled:  # killed before the commit: the offer is still usable
                assert offer_id in held
                v.accept_enrollment(response)
        if kill_at == -1 and n == 1:
            assert cli.main(["--home", str(home), "--json", "verifier", "purge"]) == 0
            assert json.loads(capsys.readouterr().out)["purged"] == 1
        else:
            with Verifier.open(directory) as v:
                v.purge()
        with Verifier.open(directory) as v:
            _check_no_stale_offer_key(v)
            assert offer_id not in {k.offer_id for k in v.keys.offer_keys()}
        devices[user] = device
    # some kills landed before the commit, some after it
    assert {enrolled for k, enrolled in outcomes if k > 0} == {True, False}, (steps, outcomes)
    # Every credential works, whatever instant its enrollment was killed at.
    with Verifier.open(directory) as v:
        for user, device in devices.items():
            s = v.start_session(user, "after the kills")
            assert v.verify(s.session_id, device.otp(s)).user == user
        assert v.keys.offer_keys() == []


def test_purge_removes_the_keys_of_expired_offers_only(hsm, tmp_path):
    _, uri = hsm
    clock = Clock()
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    with Verifier.init(tmp_path / "verifier", "Custody", clock=clock, hsm=uri) as v:
        v.purge_every = 0
        v.create_offer("alice")
        clock.now += v.identity.offer_ttl // 2
        late = v.create_offer("bob").offer
        assert v.purge() == 0
        clock.now += v.identity.offer_ttl // 2 + 1  # the first expired, not the second
        assert v.purge_offer_keys() == 1
        assert [k.offer_id for k in v.keys.offer_keys()] == [late.offer_id]
        # a key whose offer was never stored (create_offer killed in between) stays
        # until the expiry its label names
        orphan = os.urandom(16)
        v.keys.offer_key(orphan, int(clock.now) + 10)
        assert v.purge_offer_keys() == 0
        clock.now += 11
        assert v.purge_offer_keys() == 1
        assert [k.offer_id for k in v.keys.offer_keys()] == [late.offer_id]
