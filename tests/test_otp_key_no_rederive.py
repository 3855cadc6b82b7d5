"""Finding 1 of issue 10: no agreement key outlives enrollment on the authenticator.

After a real enrollment, the token is attacked without hsm-auth: on SoftHSM a
python-pkcs11 session logged in with the token PIN tries ``C_DeriveKey``
(``CKM_ECDH1_DERIVE``) into an extractable, non-sensitive secret from every private
key it finds; on swtpm every blob in the state directory is loaded with tpm2-pytss
and ``TPM2_ECDH_ZGen`` is run with it. Neither may produce anything, so nobody
holding the PIN (or, on a TPM ``device``, nothing) can re-derive the OTP key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_auth import config as configmod
from hsm_auth.authenticator import Authenticator
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier


def _home(tmp_path: Path, config_toml: str) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text(config_toml)
    (home / "config.toml").chmod(0o600)
    return home


def _enroll_and_check(home: Path) -> list[object]:
    """Enroll ``device`` for alice and check an OTP; returns the enrolled records."""
    paths = configmod.Paths(home)
    with Verifier.init(home / "verifier", "Bank") as v:
        offer = v.create_offer("alice", methods=[Method.DEVICE])
        with Authenticator(paths.authenticator_dir, configmod.load(paths)) as a:
            v.accept_enrollment(
                a.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
            )
            session = v.start_session("alice", "Log in to ws-7")
            request = a.start_offline_authentication(session.text)
            otp = a.finish_offline_authentication(request, Method.DEVICE).otp
            assert v.verify(session.session_id, otp).user == "alice"
            enrolled = a.enrolled
    assert len(enrolled) == 1
    return list(enrolled)


def _private_key_usages(token) -> list[str]:
    """The ``Usage:`` line of each private key object ``pkcs11-tool -O`` lists (the
    token's throwaway test PIN on its command line)."""
    listing = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            token.module_path,
            "--token-label",
            token.label,
            "--login",
            "--pin",
            token.user_pin,
            "-O",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    ).stdout
    return [
        line.strip()
        for block in listing.split("Private Key Object")[1:]
        for line in block.split(" Object")[0].splitlines()
        if "Usage:" in line
    ]


def _peer_point() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="needs OpenSC's pkcs11-tool")
def test_no_token_object_can_derive_after_enrollment_on_softhsm(softhsm_env, tmp_path):
    import pkcs11
    from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11._pkcs11 import DeriveMixin  # the native C_DeriveKey

    token = init_token(unique_label("agr"), so_pin="12345678", user_pin="device-secret")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    home = _home(tmp_path, f'[methods.device]\nbackend = "pkcs11"\nuri = "{uri}"\n')
    enrolled = _enroll_and_check(home)

    lib = pkcs11.lib(token.module_path)
    try:
        found = lib.get_token(token_label=token.label)
    except pkcs11.NoSuchToken:
        lib.reinitialize()
        found = lib.get_token(token_label=token.label)
    leaked: list[str] = []
    derivers: list[str] = []
    with found.open(user_pin=token.user_pin, rw=True) as session:
        privates = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        assert privates, "the signing key is there"
        for key in privates:
            if key[Attribute.DERIVE]:
                derivers.append(key[Attribute.LABEL])
            # First make it an ECDH key, as an attacker with the PIN would try.
            with contextlib.suppress(pkcs11.PKCS11Error):
                key[Attribute.DERIVE] = True
            assert not key[Attribute.DERIVE], "a signing key became an ECDH key"
            assert not key[Attribute.MODIFIABLE]
            try:
                # C_DeriveKey whatever python-pkcs11 thinks the key can do.
                secret = DeriveMixin.derive_key(
                    key,
                    KeyType.GENERIC_SECRET,
                    256,
                    store=False,
                    mechanism=Mechanism.ECDH1_DERIVE,
                    mechanism_param=(KDF.NULL, None, _peer_point()),
                    template={
                        Attribute.TOKEN: False,
                        Attribute.SENSITIVE: False,
                        Attribute.EXTRACTABLE: True,
                    },
                )
            except pkcs11.PKCS11Error:
                continue
            leaked.append(f"{key[Attribute.LABEL]}: {len(secret[Attribute.VALUE])} bytes")
        secrets_ = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True})
        )
        assert len(secrets_) == 1
        otp = secrets_[0]
        assert not otp[Attribute.DERIVE]
        assert otp[Attribute.SENSITIVE] and not otp[Attribute.EXTRACTABLE]
        assert not otp[Attribute.MODIFIABLE]
        with pytest.raises(pkcs11.PKCS11Error):
            otp[Attribute.VALUE]
    assert leaked == [] and derivers == []
    usages = _private_key_usages(token)  # and as pkcs11-tool -O sees it
    assert usages and not any("derive" in u for u in usages), usages
    assert enrolled[0].agreement_key is None  # type: ignore[attr-defined]


def test_no_blob_in_the_state_dir_can_run_ecdh_zgen_on_swtpm(swtpm, tmp_path):
    from tpm2_pytss import TPM2B_ECC_POINT, TPM2B_PRIVATE, TPM2B_PUBLIC, TPMS_ECC_POINT
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT

    from hsm_auth import registry

    home = _home(tmp_path, f'[methods.device]\nbackend = "tpm2"\ntcti = "{swtpm.tcti}"\n')
    enrolled = _enroll_and_check(home)
    state = home / "state" / "tpm2"
    blobs = []
    for path in sorted(state.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("public"):
            blobs.append(data)

    peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    point = TPM2B_ECC_POINT(
        TPMS_ECC_POINT(x=peer.x.to_bytes(32, "big"), y=peer.y.to_bytes(32, "big"))
    )
    store = registry.load_backend("tpm2").open({"tcti": swtpm.tcti, "state_dir": str(state)})
    zs, ecdh_keys = [], []
    try:
        ectx, srk = store._ectx, store._storage_key()  # the raw ESAPI context and the SRK
        for blob in blobs:
            public, _ = TPM2B_PUBLIC.unmarshal(bytes.fromhex(blob["public"]))
            private, _ = TPM2B_PRIVATE.unmarshal(bytes.fromhex(blob["private"]))
            area = public.publicArea
            is_ecdh = area.type == TPM2_ALG.ECC and area.objectAttributes & TPMA_OBJECT.DECRYPT
            if is_ecdh:
                ecdh_keys.append(blob["label"])
            handle = ectx.load(srk, private, public)
            try:
                ectx.ecdh_zgen(handle, point)
                zs.append(blob["label"])
            except Exception:  # the TPM refuses: what we want
                pass
            finally:
                ectx.flush_context(handle)
    finally:
        store.close()
    assert zs == [] and ecdh_keys == []
    assert sorted(b["kind"] for b in blobs) == ["otp", "signing"]
    assert enrolled[0].agreement_key is None  # type: ignore[attr-defined]


# --- methods enrolled before this: their agreement key is pruned ----------------------


def _make_old(home: Path) -> str:
    """Turn the enrolled method into one made before issue 10: a token agreement key
    named by the record (as ``KeyStore.enroll`` made it then). Returns its URI."""
    from hsm_auth import registry
    from hsm_auth.keystore import NO_AUTH, KeyKind

    paths = configmod.Paths(home)
    with Authenticator(paths.authenticator_dir, configmod.load(paths)) as a:
        (m,) = a.enrolled
        backend, settings = registry.choose_backend(a.config, Method.DEVICE)
        with a._store(backend, settings, Method.DEVICE) as store:
            agreement = store.generate_key(f"{m.label}/ecdh", KeyKind.AGREEMENT, NO_AUTH)
        a._save(a._verifiers, [dataclasses.replace(m, agreement_key=agreement)], a._pending)
    return agreement


@pytest.mark.parametrize("backend", ["pkcs11", "tpm2"])
def test_keys_prune_removes_an_old_methods_agreement_key(backend, request, tmp_path):
    from hsm_auth.authenticator import KeyState

    if backend == "pkcs11":
        request.getfixturevalue("softhsm_env")
        token = init_token(unique_label("agr"), so_pin="12345678", user_pin="device-secret")
        pin_file = tmp_path / "device.pin"
        pin_file.write_text(token.user_pin)
        pin_file.chmod(0o600)
        uri = Pkcs11Uri(
            token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}"
        )
        home = _home(tmp_path, f'[methods.device]\nbackend = "pkcs11"\nuri = "{uri}"\n')
    else:
        swtpm = request.getfixturevalue("swtpm")
        home = _home(tmp_path, f'[methods.device]\nbackend = "tpm2"\ntcti = "{swtpm.tcti}"\n')
    _enroll_and_check(home)
    agreement = _make_old(home)
    paths = configmod.Paths(home)

    def otp_accepted() -> None:
        with (
            Verifier.open(home / "verifier") as v,
            Authenticator(paths.authenticator_dir, configmod.load(paths)) as a,
        ):
            session = v.start_session("alice", "Log in to ws-7")
            request_ = a.start_offline_authentication(session.text)
            otp = a.finish_offline_authentication(request_, Method.DEVICE).otp
            assert v.verify(session.session_id, otp).user == "alice"

    otp_accepted()  # the old credential keeps working
    if backend == "pkcs11" and shutil.which("pkcs11-tool"):
        assert any("derive" in u for u in _private_key_usages(token))  # the old hole
    with Authenticator(paths.authenticator_dir, configmod.load(paths)) as a:
        states = {k.uri: k.state for k in a.keys().keys}
        assert states.pop(agreement) is KeyState.ORPHAN
        assert set(states.values()) == {KeyState.ENROLLED}  # sign, otp, atc
        assert [k.uri for k in a.prune_orphans().keys] == [agreement]
        assert a.enrolled[0].agreement_key is None
        assert agreement not in {k.uri for k in a.keys().keys}
    with Authenticator(paths.authenticator_dir, configmod.load(paths)) as a:
        assert a.enrolled[0].agreement_key is None  # saved
    if backend == "pkcs11" and shutil.which("pkcs11-tool"):
        assert not any("derive" in u for u in _private_key_usages(token))
    otp_accepted()
