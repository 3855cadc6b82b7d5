"""Activation codes (issue 11, build item 1; docs/PROTOCOL.md, "Activation") and the
override policy (item 4).

Whoever intercepts an offer cannot enroll: a response made with other keys, without
the code, or with the code of another offer is refused, counted and audited; five
wrong codes burn the offer; a typo is told apart before any key is made; the whole
flow with the right code passes on all four methods with real tokens (SoftHSM, swtpm,
the software FIDO2 authenticator). Re-enrollment needs the verifier's
``allow_override`` and leaves nothing in the token when refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import cli_ok, code_file, run_cli
from _verifier_device import Clock, PythonDevice

from hsm_auth import activation
from hsm_auth.activation import ActivationCodeTypo, ActivationRefused
from hsm_auth.audit import Event
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import AlreadyEnrolled, ConfigError, InvalidInput, StateError, UnknownMethod
from hsm_auth.methods import Method
from hsm_auth.protocol import EnrollmentResponse
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

CODE = re.compile(r"[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}")


ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def database(request):
    """None: the embedded SQLite file; else a DSN on a real PostgreSQL server."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_dsn")


@pytest.fixture
def verifier(tmp_path, database):
    directory = tmp_path / "verifier"
    with Verifier.init(directory, "Bank", clock=Clock(), database=database) as v:
        v.purge_every = 0
        yield v


def _trail(verifier: Verifier, user: str) -> list[tuple[str, str | None, str | None]]:
    return [
        (r.event.value, r.reason.value if r.reason else None, r.detail)
        for r in verifier.store.audit_records(user)
        if r.event in (Event.ENROLL_REFUSED, Event.OFFER_BURNED, Event.ENROLL)
    ]


def _wrong_code(right: str) -> str:
    """A well-formed code (it passes the typo check) that is not ``right``."""
    while True:
        code = activation.code_from_mac(os.urandom(32))
        if code != right:
            return code


# --- the code ------------------------------------------------------------------------------


def test_codes_are_50_bits_typeable_and_every_one_or_two_character_typo_is_caught():
    rng = random.Random(11)
    for _ in range(50):
        code = activation.code_from_mac(rng.randbytes(32))
        assert CODE.fullmatch(code)
        plain = code.replace("-", "")
        assert activation.normalize(code.lower()) == plain
        assert activation.normalize(" ".join(plain)) == plain  # spaces anywhere
        aliased = plain.replace("1", "l").replace("0", "o")
        assert activation.normalize(aliased) == plain
        for i in range(12):
            for c in activation.ALPHABET:
                if c != plain[i]:
                    with pytest.raises(ActivationCodeTypo, match="has a typo"):
                        activation.normalize(plain[:i] + c + plain[i + 1 :])
        for i in range(11):
            if plain[i] != plain[i + 1]:
                swapped = plain[:i] + plain[i + 1] + plain[i] + plain[i + 2 :]
                with pytest.raises(ActivationCodeTypo, match="has a typo"):
                    activation.normalize(swapped)
        j, k = rng.sample(range(12), 2)  # any two characters changed
        word = list(plain)
        word[j] = activation.ALPHABET[(activation.ALPHABET.index(word[j]) + 1) % 32]
        word[k] = activation.ALPHABET[(activation.ALPHABET.index(word[k]) + 7) % 32]
        with pytest.raises(ActivationCodeTypo):
            activation.normalize("".join(word))
    for bad in ("", "ABCD-EFGH-JKM", "ABCD-EFGH-JKMNP", "ABCD-EFGH-JKMU", "ÄBCD-EFGH-JKMN"):
        with pytest.raises(ActivationCodeTypo, match=r"has a typo|not text") as caught:
            activation.normalize(bad)
        assert bad.replace("-", "") not in str(caught.value) or not bad


def test_the_verifier_makes_each_offers_code_again_and_stores_none(verifier, tmp_path, database):
    issued = verifier.create_offer("alice", methods=[Method.DEVICE])
    assert CODE.fullmatch(issued.activation_code)
    assert verifier.keys.activation_code(issued.offer.offer_id) == issued.activation_code
    other = verifier.create_offer("alice", methods=[Method.DEVICE])
    assert other.activation_code != issued.activation_code
    assert issued.activation_code not in repr(issued)
    plain = issued.activation_code.replace("-", "")
    assert plain not in issued.text and issued.activation_code not in issued.text
    if database is None:
        db = (tmp_path / "verifier" / "verifier.db").read_bytes()
        assert plain.encode() not in db and issued.activation_code.encode() not in db


# --- an intercepted offer is useless ------------------------------------------------------


def test_an_intercepted_offer_is_useless(verifier):
    """Mallory sees alice's offer in transit and answers it with software keys of his
    own: without the code, with a guessed one, with the code of an offer of his own.
    Each is refused and audited; alice's own answer with her code still enrolls."""
    offer = verifier.create_offer("alice", methods=[Method.PIN])
    mallorys = verifier.create_offer("mallory", methods=[Method.PIN])
    attempts = [None, _wrong_code(offer.activation_code), mallorys.activation_code]
    for n, code in enumerate(attempts, 1):
        forged = PythonDevice().enroll(offer.text, Method.PIN, activation_code=code)
        with pytest.raises(ActivationRefused, match=f"\\({n} of 5 tries;") as caught:
            verifier.accept_enrollment(forged)
        assert caught.value.tries == n and not caught.value.burned
        assert offer.activation_code not in str(caught.value)
        if code is not None:
            assert code not in str(caught.value)
    with pytest.raises(UnknownMethod):
        verifier.credential("alice", Method.PIN)
    assert _trail(verifier, "alice") == [
        ("enroll-refused", "activation", f"{n} of 5") for n in (1, 2, 3)
    ]
    # Mallory's response with his own code for his own offer, moved to alice's offer:
    # the MAC covers the offer hash (salt) and T (which covers the user and the keys).
    his, _ = EnrollmentResponse.from_text(PythonDevice().enroll(mallorys, Method.PIN))
    moved = dataclasses.replace(his, offer_id=offer.offer.offer_id, user="alice")
    with pytest.raises(ActivationRefused, match="4 of 5"):
        verifier.accept_enrollment(moved.to_text(None))
    alice = PythonDevice()
    verifier.accept_enrollment(alice.enroll(offer, Method.PIN))  # after 4 wrong ones
    session = verifier.start_session("alice", "Log in")
    assert verifier.verify(session.session_id, alice.otp(session)).user == "alice"
    assert _trail(verifier, "alice")[-1][0] == "enroll"


def test_five_wrong_codes_burn_the_offer_and_each_is_audited(verifier, caplog):
    offer = verifier.create_offer("bob", methods=[Method.DEVICE])
    for n in range(1, 5):
        with pytest.raises(ActivationRefused, match=f"{n} of 5 tries; the offer is burned at 5"):
            verifier.accept_enrollment(
                PythonDevice().enroll(offer.text, Method.DEVICE, activation_code=_wrong_code(
                    offer.activation_code))
            )
    assert verifier.store.offer(offer.offer.offer_id).failed_activations == 4
    burns = pytest.raises(ActivationRefused, match=r"5 of 5 tries\): the offer is burned")
    with caplog.at_level("WARNING", logger="hsm_auth.audit"), burns as e:
        verifier.accept_enrollment(PythonDevice().enroll(offer.text, Method.DEVICE))
    assert e.value.burned and e.value.tries == 5 and e.value.limit == 5
    assert any('"event":"offer-burned"' in r.getMessage() for r in caplog.records)
    # Burned: even the right code no longer enrolls, and nothing more is counted.
    with pytest.raises(InvalidInput, match="unknown or already used"):
        verifier.accept_enrollment(PythonDevice().enroll(offer, Method.DEVICE))
    assert verifier.store.offer(offer.offer.offer_id) is None
    assert verifier.store.used_offers([offer.offer.offer_id]) == {offer.offer.offer_id}
    trail = _trail(verifier, "bob")
    assert trail == [("enroll-refused", "activation", f"{n} of 5") for n in range(1, 6)] + [
        ("offer-burned", "activation", "5 wrong activation codes")
    ]
    with pytest.raises(UnknownMethod):
        verifier.credential("bob", Method.DEVICE)


def test_the_count_is_one_atomic_update(tmp_path, database):
    """Counting is the store's single UPDATE ... RETURNING: a second verifier (another
    connection) sees the count move, and the limit burns exactly once."""
    directory = tmp_path / "v"
    with Verifier.init(directory, "Bank", database=database) as first, Verifier.open(
        directory, database=database
    ) as second:
        offer = first.create_offer("carol", methods=[Method.DEVICE])
        wrong = PythonDevice().enroll(offer.text, Method.DEVICE, activation_code=None)
        seen = []
        for i in range(5):
            try:
                (first if i % 2 else second).accept_enrollment(wrong)
            except ActivationRefused as e:
                seen.append((e.tries, e.burned))
        assert seen == [(1, False), (2, False), (3, False), (4, False), (5, True)]
        assert first.store.offer(offer.offer.offer_id) is None  # burned: used
        assert second.store.used_offers([offer.offer.offer_id]) == {offer.offer.offer_id}
    if database is None:
        db = sqlite3.connect(directory / "verifier.db")
        assert db.execute("SELECT failed_activations, used FROM offers").fetchall() == [(5, 1)]
        db.close()


def test_the_limit_is_the_identitys_activation_tries(tmp_path):
    directory = tmp_path / "v"
    Verifier.init(directory, "Bank").close()
    identity = json.loads((directory / "identity.json").read_text())
    assert identity["activation_tries"] == 5
    (directory / "identity.json").write_text(json.dumps({**identity, "activation_tries": 2}))
    with Verifier.open(directory) as v:
        offer = v.create_offer("dave", methods=[Method.DEVICE])
        with pytest.raises(ActivationRefused, match="1 of 2"):
            v.accept_enrollment(PythonDevice().enroll(offer.text, Method.DEVICE))
        with pytest.raises(ActivationRefused, match="2 of 2 tries\\): the offer is burned"):
            v.accept_enrollment(PythonDevice().enroll(offer.text, Method.DEVICE))
    (directory / "identity.json").write_text(json.dumps({**identity, "activation_tries": 0}))
    with pytest.raises(StateError, match="activation_tries"):
        Verifier.open(directory)


# --- the HSM's activation-code key ---------------------------------------------------------


@pytest.fixture
def hsm(softhsm_env, tmp_path):
    token = init_token(unique_label("act"), so_pin="12345678", user_pin="hsm-pin-4711")
    pin_file = tmp_path / "hsm.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    return token, str(uri)


@pytest.mark.softhsm
def test_an_hsm_verifier_makes_codes_in_the_hsm_and_a_burned_offer_loses_its_key(hsm, tmp_path):
    _, uri = hsm
    directory = tmp_path / "verifier"
    with Verifier.init(directory, "HSM Bank", clock=Clock(), hsm=uri) as v:
        v.purge_every = 0
        burned = v.create_offer("erin", methods=[Method.DEVICE])
        kept = v.create_offer("erin", methods=[Method.DEVICE])
        assert burned.activation_code != kept.activation_code
        assert v.keys.activation_code(kept.offer.offer_id) == kept.activation_code
        held = {k.offer_id for k in v.keys.offer_keys()}
        assert held == {burned.offer.offer_id, kept.offer.offer_id}
        for _ in range(5):
            with pytest.raises(ActivationRefused):
                v.accept_enrollment(PythonDevice().enroll(burned.text, Method.DEVICE))
        # the burned offer's agreement key is destroyed at once, as a used one's
        assert {k.offer_id for k in v.keys.offer_keys()} == {kept.offer.offer_id}
        device = PythonDevice()
        v.accept_enrollment(device.enroll(kept, Method.DEVICE))
        session = v.start_session("erin", "Log in")
        assert v.verify(session.session_id, device.otp(session)).atc == 1
    # Reopened (another session on the token): the same key makes the same codes.
    with Verifier.open(directory) as again:
        assert again.keys.activation_code(kept.offer.offer_id) == kept.activation_code
    identity = json.loads((directory / "identity.json").read_text())
    del identity["keys"]["activation"]
    (directory / "identity.json").write_text(json.dumps(identity))
    with pytest.raises(StateError, match="predate activation codes") as caught:
        Verifier.open(directory)
    assert "\n" not in str(caught.value)


# --- the whole flow on the four methods, real tokens ---------------------------------------


@pytest.mark.softhsm
def test_the_whole_flow_on_all_four_methods_with_the_right_code(tmp_path):
    """The demo's tokens (swtpm for device where it runs, SoftHSM for pin, the software
    FIDO2 authenticator for biometric and face), in a process of its own (SoftHSM reads
    its configuration once per process): tests/_activation_flow.py."""
    from _cli import cli_env

    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "_activation_flow.py"), str(tmp_path)],
        capture_output=True, text=True, env=cli_env(), timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "device": "ok", "pin": "ok", "biometric": "ok", "face": "ok"
    }


# --- the override policy ----------------------------------------------------------------------


@pytest.fixture
def device_token(softhsm_env, tmp_path):
    token = init_token(unique_label("ovr"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    return token, Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})


def _token_objects(token) -> set[tuple[str, bytes]]:
    import pkcs11
    from pkcs11 import Attribute

    lib = pkcs11.lib(token.module_path)
    try:
        found = lib.get_token(token_label=token.label)
    except pkcs11.NoSuchToken:
        lib.reinitialize()
        found = lib.get_token(token_label=token.label)
    try:
        session = found.open(user_pin=token.user_pin)
    except pkcs11.UserAlreadyLoggedIn:  # the authenticator's session, in this process
        session = found.open()
    with session:
        return {
            (o[Attribute.LABEL], bytes(o[Attribute.ID] or b"") if o[Attribute.CLASS] != 0 else b"")
            for o in session.get_objects()
        }


@pytest.mark.softhsm
def test_re_enrollment_needs_allow_override_and_a_refusal_leaves_nothing(
    device_token, verifier, tmp_path, database
):
    token, config = device_token
    with Authenticator(tmp_path / "auth", config) as a:
        first = verifier.create_offer("alice", methods=[Method.DEVICE])
        verifier.accept_enrollment(
            a.add_or_update(Method.DEVICE, first.text, activation_code=first.activation_code)
        )
        old = verifier.credential("alice", Method.DEVICE)
        # The verifier's default policy: no offer that replaces a method.
        assert verifier.policy.allow_override is False
        with pytest.raises(ConfigError, match=r"does not allow re-enrolling.*allow_override"):
            verifier.create_offer("alice", methods=[Method.DEVICE], replace=True)
        # The authenticator's --replace with an offer that does not allow it: refused
        # before any key is made.
        plain = verifier.create_offer("alice", methods=[Method.DEVICE])
        before = _token_objects(token)
        with pytest.raises(AlreadyEnrolled, match="does not allow replacing"):
            a.add_or_update(
                Method.DEVICE, plain.text, activation_code=plain.activation_code, replace=True
            )
        assert _token_objects(token) == before
        # allow_override = true in policy.toml: the offer may replace, and it does.
        (tmp_path / "verifier" / "policy.toml").write_text("allow_override = true\n")
        with Verifier.open(tmp_path / "verifier", clock=Clock(), database=database) as v:
            assert v.policy.allow_override is True
            again = v.create_offer("alice", methods=[Method.DEVICE], replace=True)
            response = a.add_or_update(
                Method.DEVICE, again.text, activation_code=again.activation_code, replace=True
            )
            replaced = v.accept_enrollment(response)
            assert replaced.signing_key != old.signing_key
            session = v.start_session("alice", "Log in")
            request = a.start_offline_authentication(session.text)
            otp = a.finish_offline_authentication(request, Method.DEVICE).otp
            assert v.verify(session.session_id, otp).atc == 1


# --- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory):
    from hsm_auth.demo import prepare
    from hsm_auth.testing.softhsm import softhsm_available

    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("home")
    with prepare(home, tpm=False, fido2=False):
        pass
    cli_ok(home, "verifier", "init", "--name", "CLI")
    return home


def _one_error(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hsm-auth: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.softhsm
def test_cli_offer_writes_the_code_to_a_private_file_only(cli_home):
    path = cli_home / "activation-code"
    result = run_cli(cli_home, "verifier", "offer", *code_file(cli_home), "--user", "u1",
                     "--methods", "device")  # fmt: skip
    assert result.returncode == 0, result.stderr
    code = path.read_text().strip()
    assert CODE.fullmatch(code)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result.stdout.strip().startswith("HA1:") and len(result.stdout.splitlines()) == 1
    assert code not in result.stdout and code not in result.stderr
    # no file, no terminal: refused before any offer is made
    line = _one_error(run_cli(cli_home, "verifier", "offer", "--user", "u1"))
    assert "--activation-code-file" in line
    doc = json.loads(cli_ok(cli_home, "--json", "verifier", "offer", "--user", "u1"))
    assert CODE.fullmatch(doc["activation_code"]) and doc["offer"].startswith("HA1:")


@pytest.mark.softhsm
def test_cli_enroll_tells_a_typo_and_needs_the_code(cli_home):
    offer = cli_ok(cli_home, "verifier", "offer", *code_file(cli_home), "--user", "u2",
                   "--methods", "device")  # fmt: skip
    path = cli_home / "activation-code"
    code = path.read_text().strip()
    credentials = cli_home / "authenticator" / "credentials.json"
    before = credentials.read_text() if credentials.exists() else None
    typo = cli_home / "typo"
    typo.write_text(code[1] + code[0] + code[2:] if code[0] != code[1] else code[:-1] + "U")
    typo.chmod(0o600)
    line = _one_error(run_cli(cli_home, "enroll", "--activation-code-file", str(typo),
                              "--method", "device", stdin=offer))  # fmt: skip
    assert "the activation code has a typo" in line and code not in line
    # no terminal and no file: one line, nothing read from stdin as a code
    line = _one_error(run_cli(cli_home, "enroll", "--method", "device", stdin=offer))
    assert "--activation-code-file" in line
    assert (credentials.read_text() if credentials.exists() else None) == before
    # a code file others can read is refused like a PIN file
    path.chmod(0o644)
    line = _one_error(run_cli(cli_home, "enroll", *code_file(cli_home), "--method", "device",
                              stdin=offer))  # fmt: skip
    assert "activation code file" in line
    path.chmod(0o600)
    response = cli_ok(cli_home, "enroll", *code_file(cli_home), "--method", "device",
                      stdin=offer)  # fmt: skip
    assert cli_ok(cli_home, "verifier", "enroll", stdin=response).startswith("HA1:")
    # the response's MAC was made with the code; the code is in no message
    assert code.replace("-", "") not in response and code not in response
