"""Backend discovery through the entry points, and the default method mapping."""

from __future__ import annotations

import pytest

from hsm_auth import registry
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import BackendUnavailable, ConfigError
from hsm_auth.keystore import KeyStore
from hsm_auth.methods import Method


def test_built_in_backends_register_through_the_entry_point_group():
    assert {"pkcs11", "tpm2", "fido2"} <= set(registry.backend_names())
    for name in ("pkcs11", "tpm2", "fido2"):
        cls = registry.load_backend(name)
        assert issubclass(cls, KeyStore) and cls.name == name
        assert registry.backend_reference(name).startswith(registry.BUILTIN_PREFIX)


def test_a_recorded_reference_loads_the_same_class_and_a_bogus_one_falls_back():
    ref = registry.backend_reference("pkcs11")
    assert registry.load_backend("pkcs11", ref) is registry.load_backend("pkcs11")
    wrong = registry.backend_reference("tpm2")  # names another backend's class
    assert registry.load_backend("pkcs11", wrong) is registry.load_backend("pkcs11")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        registry.load_backend("nope")


def test_default_mapping_prefers_tpm_for_device_and_a_token_for_pin():
    pkcs11, tpm2 = registry.load_backend("pkcs11"), registry.load_backend("tpm2")
    assert tpm2.priority_for(Method.DEVICE) > pkcs11.priority_for(Method.DEVICE)
    assert pkcs11.priority_for(Method.PIN) > tpm2.priority_for(Method.PIN)
    fido2 = registry.load_backend("fido2")
    assert set(fido2.methods) == {Method.BIOMETRIC, Method.FACE}


def test_configured_backend_wins_and_unavailable_lists_every_reason(monkeypatch, tmp_path):
    cfg = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": "pkcs11:token=x"})})
    assert registry.choose_backend(cfg, Method.DEVICE) == ("pkcs11", {"uri": "pkcs11:token=x"})
    monkeypatch.setenv("HSM_AUTH_DEVICE_BACKEND", "tpm2")
    assert registry.choose_backend(cfg, Method.DEVICE)[0] == "tpm2"
    monkeypatch.delenv("HSM_AUTH_DEVICE_BACKEND")
    monkeypatch.setenv("HSM_AUTH_TCTI", f"swtpm:path={tmp_path}/none.sock")
    monkeypatch.setenv("HSM_AUTH_PKCS11_MODULE", str(tmp_path / "missing.so"))
    with pytest.raises(BackendUnavailable) as e:
        registry.choose_backend(Config(), Method.DEVICE)
    assert "tpm2:" in str(e.value) and "pkcs11:" in str(e.value)


def test_a_loaded_backend_is_kept_for_the_process(monkeypatch):
    """Every OTP asks for its backend: after the first load, no entry-point scan."""
    import importlib.metadata

    cls = registry.load_backend("pkcs11")

    def scan(**kwargs):
        raise AssertionError("entry points scanned again")

    monkeypatch.setattr(importlib.metadata, "entry_points", scan)
    monkeypatch.setattr(registry, "_ENTRY_POINTS", None)
    assert registry.load_backend("pkcs11") is cls
    assert registry.load_backend("pkcs11", registry.BUILTIN_PREFIX + "x:y") is cls
