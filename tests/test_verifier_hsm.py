"""The verifier's own keys in a PKCS#11 HSM (SoftHSM): generated there, not
extractable, no key file; one agreement key per offer, gone once the offer is
used; each check unwraps the credential's sealed OTP key inside the HSM as a
session key, HMACs there and destroys it."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import hmac
import json
import types

import pytest
from _unattested import allow_unattested_fido2_methods
from _verifier_device import Clock, PythonDevice, enroll
from hsm_auth_backends.pkcs11_verifier import Pkcs11VerifierKeys

from hsm_auth import cli, ec
from hsm_auth.errors import InvalidToken, StateError
from hsm_auth.files import atomic_write_json, read_json
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

pytestmark = pytest.mark.softhsm

HSM_PIN = "hsm-verifier-pin-4711"


@pytest.fixture
def hsm_uri(softhsm_env, tmp_path):
    token = init_token(unique_label("verifier"), so_pin="12345678", user_pin=HSM_PIN)
    pin_file = tmp_path / "hsm.pin"
    pin_file.write_text(HSM_PIN)
    pin_file.chmod(0o600)
    return str(
        Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    )


@pytest.fixture
def verifier(tmp_path, hsm_uri):
    allow_unattested_fido2_methods(tmp_path / "verifier")  # software FIDO2 stand-ins
    v = Verifier.init(tmp_path / "verifier", "HSM verifier", clock=Clock(), hsm=hsm_uri)
    yield v
    v.close()


def _objects(keys: Pkcs11VerifierKeys, object_class):
    import pkcs11

    return list(keys._session.get_objects({pkcs11.Attribute.CLASS: object_class}))


def test_keys_live_in_the_hsm_and_are_not_extractable(tmp_path, verifier):
    assert isinstance(verifier.keys, Pkcs11VerifierKeys)
    assert not (tmp_path / "verifier" / "keys.pem").exists()
    identity = (tmp_path / "verifier" / "identity.json").read_text()
    assert HSM_PIN not in identity
    assert json.loads(identity)["keys"]["type"] == "pkcs11"
    import pkcs11

    attr = pkcs11.Attribute
    # the signing key and the device CA key; no agreement key
    ca, signing = sorted(_objects(verifier.keys, pkcs11.ObjectClass.PRIVATE_KEY),
                         key=lambda k: k[attr.LABEL])
    assert (ca[attr.LABEL].rsplit("/", 1)[1], signing[attr.LABEL].rsplit("/", 1)[1]) == (
        "ca", "sign")
    secrets = _objects(verifier.keys, pkcs11.ObjectClass.SECRET_KEY)
    [kek] = [k for k in secrets if k[attr.LABEL].endswith("/kek")]
    [act] = [k for k in secrets if k[attr.LABEL].endswith("/activation")]
    assert len(secrets) == 2
    for key in (signing, ca, kek, act):
        assert key[attr.SENSITIVE] is True
        assert key[attr.EXTRACTABLE] is False
        assert (key[attr.MODIFIABLE], key[attr.COPYABLE]) == (False, False)
    for key in (signing, ca):
        assert (key[attr.SIGN], key[attr.DERIVE], key[attr.DECRYPT], key[attr.UNWRAP]) == (
            True, False, False, False)
    usage = {a: kek[a] for a in (attr.WRAP, attr.UNWRAP, attr.ENCRYPT, attr.DECRYPT,
                                 attr.DERIVE, attr.SIGN)}
    assert usage == {attr.WRAP: True, attr.UNWRAP: True, attr.ENCRYPT: False,
                     attr.DECRYPT: False, attr.DERIVE: False, attr.SIGN: False}
    # the activation-code key: a 256-bit generic secret that can only HMAC (CKA_SIGN)
    usage = {a: act[a] for a in (attr.SIGN, attr.VERIFY, attr.WRAP, attr.UNWRAP, attr.ENCRYPT,
                                 attr.DECRYPT, attr.DERIVE)}
    assert usage == {attr.SIGN: True, attr.VERIFY: False, attr.WRAP: False, attr.UNWRAP: False,
                     attr.ENCRYPT: False, attr.DECRYPT: False, attr.DERIVE: False}
    assert (act[attr.KEY_TYPE], act[attr.VALUE_LEN], act[attr.TOKEN]) == (
        pkcs11.KeyType.GENERIC_SECRET, 32, True
    )
    assert set(json.loads(identity)["keys"]) == {
        "type", "token", "signing", "kek", "ca", "activation"
    }


def test_each_offer_has_its_own_agreement_key_until_it_is_used(tmp_path, verifier):
    import pkcs11

    attr = pkcs11.Attribute
    first = verifier.create_offer("alice", methods=[Method.DEVICE]).offer
    issued = verifier.create_offer("bob", methods=[Method.DEVICE])
    second = issued.offer
    assert first.verifier_agreement_key != second.verifier_agreement_key
    assert first.verifier_agreement_key != ec.encode_point(verifier.keys.signing_public)
    held = {k.offer_id: k.expires for k in verifier.keys.offer_keys()}
    assert held == {first.offer_id: first.expires, second.offer_id: second.expires}
    [key] = [k for k in _objects(verifier.keys, pkcs11.ObjectClass.PRIVATE_KEY)
             if k[attr.ID] == second.offer_id]
    assert (key[attr.SENSITIVE], key[attr.EXTRACTABLE], key[attr.DERIVE], key[attr.SIGN],
            key[attr.TOKEN], key[attr.MODIFIABLE], key[attr.COPYABLE]) == (
        True, False, True, False, True, False, False
    )
    assert key[attr.LABEL].endswith(f"/offer/{second.offer_id.hex()}/{second.expires}")
    verifier.accept_enrollment(PythonDevice().enroll(issued, Method.DEVICE))
    assert [k.offer_id for k in verifier.keys.offer_keys()] == [first.offer_id]
    # the offers' public halves were destroyed at once: only the signing and CA keys' are left
    publics = _objects(verifier.keys, pkcs11.ObjectClass.PUBLIC_KEY)
    assert sorted(p[attr.LABEL].rsplit("/", 1)[1] for p in publics) == ["ca", "sign"]


def test_a_verifier_made_before_the_kek_is_one_clear_error(tmp_path, verifier):
    directory = tmp_path / "verifier"
    verifier.close()
    identity = read_json(directory / "identity.json")
    keys = dict(identity["keys"])
    del keys["kek"]
    keys["agreement"] = keys["signing"]
    atomic_write_json(directory / "identity.json", {**identity, "keys": keys})
    with pytest.raises(StateError, match=r"names no key-encryption key\): make a new verifier"):
        Verifier.open(directory)


def test_otp_checks_run_in_the_hsm_and_leave_no_key_behind(tmp_path, verifier):
    import pkcs11

    device = enroll(verifier, "alice")
    cred = verifier.credential("alice", Method.DEVICE)
    data = b"ocra data input"
    assert verifier.keys.otp_mac(cred, data) == hmac.digest(device.otp_key, data, hashlib.sha256)
    s = verifier.start_session("alice", "Log in")
    otp = device.otp(s)
    assert verifier.verify(s.session_id, otp).atc == 1
    with pytest.raises(InvalidToken):
        verifier.verify(s.session_id, otp)
    # Only the KEK and the activation-code key remain: the per-check keys were destroyed,
    # and so was the offer's agreement key (only the signing and CA keys are left).
    secrets = _objects(verifier.keys, pkcs11.ObjectClass.SECRET_KEY)
    labels = [k[pkcs11.Attribute.LABEL] for k in secrets]
    assert sorted(label.rsplit("/", 1)[1] for label in labels) == ["activation", "kek"]
    assert len(_objects(verifier.keys, pkcs11.ObjectClass.PRIVATE_KEY)) == 2


def test_wrapped_keys_and_reopening_with_the_recorded_token(tmp_path, verifier):
    fido = enroll(verifier, "bob", Method.FACE, wrapped=True)
    verifier.close()
    with Verifier.open(tmp_path / "verifier", clock=Clock()) as again:
        assert again.keys.kind == "pkcs11"
        s = again.start_session("bob", "ctx")
        assert again.verify(s.session_id, fido.otp(s)).method is Method.FACE


def test_cli_init_with_hsm_and_admin_commands(tmp_path, hsm_uri, capsys):
    home = str(tmp_path / "home")
    assert cli.main(["--home", home, "verifier", "init", "--hsm", hsm_uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["keys"], out["database"]) == ("pkcs11", "sqlite")
    with Verifier.open(tmp_path / "home" / "verifier") as v:
        enroll(v, "carol")
    assert cli.main(["--home", home, "verifier", "show", "--user", "carol", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["credentials"][0]["failures_until_lockout"] == 10


# --- no derived key is cached on the host ------------------------------------------


def _reachable_bytes(*roots: object) -> list[bytes]:
    """Every bytes-like value reachable from ``roots`` through objects, containers,
    hsm_auth classes and the closures and defaults of hsm_auth functions (not
    through other modules, which is where a cache of ours would not live)."""
    seen: set[int] = set()
    found: list[bytes] = []
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray, memoryview)):
            found.append(bytes(obj))
        elif isinstance(obj, types.ModuleType):
            if obj.__name__.startswith(("hsm_auth", "hsm_auth_backends")):
                stack.extend(vars(obj).values())
        elif isinstance(obj, type):
            if obj.__module__.startswith(("hsm_auth", "hsm_auth_backends")):
                stack.extend(vars(obj).values())
        elif isinstance(obj, types.FunctionType):
            if obj.__module__.startswith(("hsm_auth", "hsm_auth_backends")):
                stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
                stack.extend(obj.__defaults__ or ())
                stack.extend((obj.__kwdefaults__ or {}).values())
                stack.append(getattr(obj, "__wrapped__", None))
        elif not isinstance(obj, (types.BuiltinFunctionType, types.CodeType, types.FrameType)):
            stack.extend(gc.get_referents(obj))
    return found


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _holds(values: list[bytes], secret: bytes) -> bool:
    return any(secret in v for v in values)


def test_hsm_mode_keeps_no_derived_key_on_the_host(tmp_path, verifier):
    import hsm_auth_backends.pkcs11_verifier as hsm_keys_module

    import hsm_auth.verifier as verifier_module
    import hsm_auth.verifier_keys as keys_module

    device = enroll(verifier, "alice")
    fido = enroll(verifier, "bob", Method.FACE, wrapped=True)
    for user, dev in (("alice", device), ("bob", fido)):
        for _ in range(2):
            s = verifier.start_session(user, "Log in")
            verifier.verify(s.session_id, dev.otp(s))
    values = _reachable_bytes(verifier, verifier_module, keys_module, hsm_keys_module)
    assert verifier.identity.verifier_id in values  # the walk does reach the verifier's state
    assert not _holds(values, device.otp_key)
    assert not _holds(values, fido.otp_key)


def test_the_walk_finds_a_cached_key_with_file_keys(tmp_path):
    """The control: file keys do cache the derived key, and the walk above sees it."""
    with Verifier.init(tmp_path / "file-verifier", "file", clock=Clock()) as v:
        device = enroll(v, "carol")
        s = v.start_session("carol", "Log in")
        v.verify(s.session_id, device.otp(s))
        assert _holds(_reachable_bytes(v), device.otp_key)


def test_a_token_uri_without_module_path_uses_the_backends_default(tmp_path, hsm_uri, monkeypatch):
    """The keys find their token as the pkcs11 backend does (its default module)."""
    from hsm_auth_backends.pkcs11 import MODULE_ENV

    uri = Pkcs11Uri.parse(hsm_uri)
    monkeypatch.setenv(MODULE_ENV, str(uri.module_path))
    bare = str(dataclasses.replace(uri, module_path=None))
    with Verifier.init(tmp_path / "bare", "bare", clock=Clock(), hsm=bare) as v:
        device = enroll(v, "alice")
        assert Pkcs11Uri.parse(v.keys.kek_uri).module_path == uri.module_path
    with Verifier.open(tmp_path / "bare", clock=Clock()) as v:
        s = v.start_session("alice", "ctx")
        assert v.verify(s.session_id, device.otp(s)).user == "alice"
