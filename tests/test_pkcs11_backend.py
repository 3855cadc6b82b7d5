"""The PKCS#11 backend on SoftHSM2: the shared contract plus PKCS#11 specifics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hsm_auth_backends.pkcs11 import Pkcs11KeyStore

from hsm_auth.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidInput,
    KeyNotFound,
    PinInvalid,
    PinRequired,
    StateError,
    TokenNotFound,
)
from hsm_auth.keystore import Authorization, Capability, KeyKind, KeyStore
from hsm_auth.registry import load_backend
from hsm_auth.testing.contract import KeyStoreContract, Reopen
from hsm_auth.testing.softhsm import SoftHsmToken, init_token, unique_label
from hsm_auth.uri import Pkcs11Uri

pytestmark = pytest.mark.softhsm

NO_PIN = Authorization()


def _settings(token: SoftHsmToken, **extra: Any) -> dict[str, Any]:
    return {"uri": token.uri, "allow_unenforced_pin": True, **extra}


@pytest.fixture
def auth(softhsm_token: SoftHsmToken) -> Authorization:
    return Authorization(pin=softhsm_token.user_pin)


@pytest.fixture
def store(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    opened = Pkcs11KeyStore.open(_settings(softhsm_token))
    yield opened
    opened.close()


@pytest.fixture
def reopen(softhsm_token: SoftHsmToken) -> Iterator[Reopen]:
    opened: list[KeyStore] = []

    def _open() -> KeyStore:
        opened.append(Pkcs11KeyStore.open(_settings(softhsm_token)))
        return opened[-1]

    yield _open
    for s in opened:
        s.close()


class TestPkcs11Contract(KeyStoreContract):
    expected_capabilities = frozenset(
        {
            Capability.SIGN,
            Capability.HMAC,
            Capability.ECDH_DERIVE,
            Capability.COUNTER,
            Capability.PIN,
        }
    )


# --- registration, probe, configuration -------------------------------------


def test_entry_point_loads_the_backend() -> None:
    assert load_backend("pkcs11") is Pkcs11KeyStore


def test_probe_reports_the_token(softhsm_token: SoftHsmToken) -> None:
    details = Pkcs11KeyStore.probe({"uri": softhsm_token.uri})
    assert details["label"] == softhsm_token.label
    assert details["manufacturer"].startswith("SoftHSM")
    assert details["pin_retry_limit"] == "no"
    assert details["firmware"].count(".") == 1


def test_token_created_after_module_load_is_found(softhsm_token: SoftHsmToken) -> None:
    Pkcs11KeyStore.probe({"uri": softhsm_token.uri})  # module loaded now
    later = init_token(unique_label("later"), so_pin="12345678", user_pin="4321")
    with Pkcs11KeyStore.open({"uri": later.uri}) as s:
        s.create_counter("c", Authorization(pin="4321"))


def test_absent_token_is_token_not_found(softhsm_env: Any) -> None:
    uri = str(Pkcs11Uri(token="no-such-token", module_path=softhsm_env.module_path))
    with pytest.raises(TokenNotFound) as info:
        Pkcs11KeyStore.probe({"uri": uri})
    assert "no-such-token" in str(info.value)
    with pytest.raises(TokenNotFound):
        Pkcs11KeyStore.open({"uri": uri})


def test_missing_module_is_backend_unavailable(tmp_path: Path) -> None:
    uri = str(Pkcs11Uri(token="x", module_path=str(tmp_path / "nothing.so")))
    with pytest.raises(BackendUnavailable) as info:
        Pkcs11KeyStore.probe({"uri": uri})
    assert "not found" in info.value.reason


def test_module_env_overrides_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HSM_AUTH_PKCS11_MODULE", str(tmp_path / "env.so"))
    with pytest.raises(BackendUnavailable) as info:
        Pkcs11KeyStore.probe({"uri": "pkcs11:token=x"})
    assert "env.so" in info.value.reason


def test_pin_value_in_config_is_refused(softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(ConfigError):
        Pkcs11KeyStore.open({"uri": softhsm_token.uri + "&pin-value=1234"})


# --- PINs -------------------------------------------------------------------


def test_missing_pin_is_pin_required(softhsm_token: SoftHsmToken) -> None:
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as s:
        with pytest.raises(PinRequired):
            s.generate_key("k", KeyKind.SIGNING, NO_PIN)
        with pytest.raises(PinRequired):
            s.list_keys(NO_PIN)


def test_wrong_pin_then_right_pin_works(softhsm_token: SoftHsmToken) -> None:
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as s:
        for _ in range(3):
            with pytest.raises(PinInvalid) as info:
                s.create_counter("c", Authorization(pin="0000"))
            assert info.value.native_code == 0xA0  # CKR_PIN_INCORRECT, from the token
            assert info.value.retry.retries_left is None  # SoftHSM does not say
            assert "0000" not in str(info.value)
        counter = s.create_counter("c", Authorization(pin=softhsm_token.user_pin))
        # Logged in now: a wrong PIN given later is still refused.
        with pytest.raises(PinInvalid):
            s.counter_value(counter, Authorization(pin="0000"))
        assert s.counter_value(counter, NO_PIN) == 0
    # No session leaked by the failures: a new store logs in, and so does SO
    # (which SoftHSM refuses while any read-only session is open).
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as s:
        assert s.counter_value(counter, Authorization(pin=softhsm_token.user_pin)) == 0
    _so_login_works(softhsm_token)


def _so_login_works(token: SoftHsmToken) -> None:
    import pkcs11

    lib = pkcs11.lib(token.module_path)
    session = lib.get_token(token_label=token.label).open(rw=True, so_pin=token.so_pin)
    session.close()


def test_second_store_on_same_token_checks_the_pin(softhsm_token: SoftHsmToken) -> None:
    good = Authorization(pin=softhsm_token.user_pin)
    with Pkcs11KeyStore.open(_settings(softhsm_token)) as first:
        counter = first.create_counter("shared", good)
        with Pkcs11KeyStore.open(_settings(softhsm_token)) as second:
            with pytest.raises(PinRequired):
                second.counter_value(counter, NO_PIN)
            with pytest.raises(PinInvalid):
                second.counter_value(counter, Authorization(pin="9999"))
            assert second.counter_increment(counter, good) == 1
        # Closing the second store did not log the first one out.
        assert first.counter_increment(counter, good) == 2


def _pin_file(tmp_path: Path, pin: str, mode: int) -> Path:
    path = tmp_path / "pin"
    path.write_text(pin + "\n", encoding="utf-8")
    path.chmod(mode)
    return path


def test_pin_source_file(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    path = _pin_file(tmp_path, softhsm_token.user_pin, 0o600)
    uri = f"{softhsm_token.uri}&pin-source=file:{path}"
    with Pkcs11KeyStore.open({"uri": uri}) as s:
        counter = s.create_counter("from-file", NO_PIN)
        assert s.counter_increment(counter, NO_PIN) == 1


def test_pin_source_readable_by_others_is_state_error(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    path = _pin_file(tmp_path, softhsm_token.user_pin, 0o644)
    with pytest.raises(StateError) as info:
        Pkcs11KeyStore.open({"uri": f"{softhsm_token.uri}&pin-source=file:{path}"})
    assert "0644" in str(info.value)
    assert softhsm_token.user_pin not in str(info.value)


def test_pin_source_with_wrong_pin_is_pin_invalid(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    path = _pin_file(tmp_path, "0000", 0o600)
    with pytest.raises(PinInvalid):
        Pkcs11KeyStore.open({"uri": f"{softhsm_token.uri}&pin-source=file:{path}"})


def test_pin_status_on_softhsm(store: Pkcs11KeyStore) -> None:
    status = store.pin_status()
    assert status.enforced is False
    assert not status.locked
    assert Capability.PIN_RETRY_LIMIT not in store.capabilities()


def test_unenforced_pin_needs_opt_in(softhsm_token: SoftHsmToken) -> None:
    with Pkcs11KeyStore.open({"uri": softhsm_token.uri}) as s:
        assert Capability.PIN not in s.capabilities()
        assert Capability.HMAC in s.capabilities()


# --- key attributes, read back twice ----------------------------------------


def _attrs(store: Pkcs11KeyStore, uri: str, auth: Authorization) -> tuple[bool, bool, bool]:
    import pkcs11

    parsed = Pkcs11Uri.parse(uri)
    cls = {"private": pkcs11.ObjectClass.PRIVATE_KEY, "secret-key": pkcs11.ObjectClass.SECRET_KEY}[
        parsed.type or ""
    ]
    lib = pkcs11.lib(parsed.module_path or "")
    token = lib.get_token(token_label=parsed.token)
    with token.open() as session:  # the store's login covers this session too
        (obj,) = session.get_objects({pkcs11.Attribute.CLASS: cls, pkcs11.Attribute.ID: parsed.id})
        a = pkcs11.Attribute
        got = obj.get_attributes([a.SENSITIVE, a.EXTRACTABLE, a.TOKEN])
        return got[a.SENSITIVE], got[a.EXTRACTABLE], got[a.TOKEN]


def _pkcs11_tool_objects(token: SoftHsmToken) -> dict[str, list[str]]:
    """label -> Access flags of every key object, as OpenSC's pkcs11-tool prints them."""
    out = subprocess.run(
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
        timeout=60,
        check=True,
    ).stdout
    objects: dict[str, list[str]] = {}
    kind = label = ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            kind, label = line, ""
        elif line.strip().startswith("label:"):
            label = line.split(":", 1)[1].strip().strip("'")
        elif line.strip().startswith("Access:") and "Key Object" in kind:
            flags = [f.strip() for f in line.split(":", 1)[1].split(",")]
            objects[f"{kind.split(';')[0]}/{label}"] = flags
    return objects


def test_secret_keys_are_sensitive_and_not_extractable(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    signing = store.generate_key("attr-sign", KeyKind.SIGNING, auth)
    agreement = store.generate_key("attr-ecdh", KeyKind.AGREEMENT, auth)
    peer = ec.generate_private_key(ec.SECP256R1())
    otp = store.derive_otp_key("attr-otp", agreement, peer.public_key(), auth)
    for uri in (signing, agreement, otp):
        assert _attrs(store, uri, auth) == (True, False, True), uri
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool (OpenSC) not installed: python-pkcs11 check done")
    seen = _pkcs11_tool_objects(softhsm_token)
    for name in (
        "Private Key Object/attr-sign",
        "Private Key Object/attr-ecdh",
        "Secret Key Object/attr-otp",
    ):
        assert "sensitive" in seen[name], (name, seen)
        assert "never extractable" in seen[name], (name, seen)
        assert "extractable" not in seen[name], (name, seen)


def test_uris_are_full_rfc7512_and_carry_no_pin(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    uri = store.generate_key("uri-key", KeyKind.SIGNING, auth)
    parsed = Pkcs11Uri.parse(uri)
    assert parsed.token == softhsm_token.label
    assert parsed.object == "uri-key"
    assert parsed.type == "private"
    assert parsed.id is not None and len(parsed.id) == 16
    assert parsed.module_path == softhsm_token.module_path
    assert softhsm_token.user_pin not in uri
    assert parsed.pin_value is None and parsed.pin_source is None


def test_uri_of_another_token_is_key_not_found(store: Pkcs11KeyStore, auth: Authorization) -> None:
    uri = store.generate_key("elsewhere", KeyKind.SIGNING, auth)
    other = uri.replace("token=", "token=x", 1)
    with pytest.raises(KeyNotFound):
        store.sign(other, b"x", auth)
    with pytest.raises(InvalidInput):
        store.sign("pkcs11:object=elsewhere;type=private", b"x", auth)


def test_counter_survives_a_fresh_process(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    counter = store.create_counter("cross-process", auth)
    for _ in range(4):
        store.counter_increment(counter, auth)
    script = (
        "import os, sys\n"
        "from hsm_auth.keystore import Authorization\n"
        "from hsm_auth_backends.pkcs11 import Pkcs11KeyStore\n"
        "s = Pkcs11KeyStore.open({'uri': sys.argv[1]})\n"
        "auth = Authorization(pin=os.environ['TEST_PIN'])\n"
        "print(s.counter_value(sys.argv[2], auth), s.counter_increment(sys.argv[2], auth))\n"
        "s.close()\n"
    )
    env = {**os.environ, "TEST_PIN": softhsm_token.user_pin}
    result = subprocess.run(
        [sys.executable, "-c", script, softhsm_token.uri, counter],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "5"]
    assert store.counter_value(counter, auth) == 5  # no stale cache in this process
    assert store.counter_increment(counter, auth) == 6


def test_mechanism_list_drives_capabilities(store: Pkcs11KeyStore) -> None:
    caps = store.capabilities()
    assert {Capability.SIGN, Capability.ECDH_DERIVE, Capability.HMAC, Capability.COUNTER} <= caps
    assert Capability.HARDWARE_COUNTER not in caps


def test_missing_mechanism_is_named(store: Pkcs11KeyStore, auth: Authorization) -> None:
    """A token whose mechanism list lacks CKM_SHA256_HMAC (simulated by trimming the
    list read from SoftHSM) refuses HMAC by name and does not claim it."""
    from hsm_auth.errors import MechanismNotSupported

    agreement = store.generate_key("mech-ecdh", KeyKind.AGREEMENT, auth)
    peer = ec.generate_private_key(ec.SECP256R1())
    otp = store.derive_otp_key("mech-otp", agreement, peer.public_key(), auth)
    store._mechanisms = store._mechanisms - {0x251}
    assert Capability.HMAC not in store.capabilities()
    with pytest.raises(MechanismNotSupported) as info:
        store.hmac(otp, b"x", auth)
    assert info.value.mechanism == "CKM_SHA256_HMAC"
