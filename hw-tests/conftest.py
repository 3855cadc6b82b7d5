"""Opt-in end-to-end scenarios on real tokens, and the same code on the emulators.

    pytest hw-tests --emulators                    # SoftHSM, swtpm, soft FIDO2 (what CI runs)
    pytest hw-tests --hw-tpm                       # the machine's TPM at /dev/tpmrm0
    pytest hw-tests --hw-pkcs11 /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so
    pytest hw-tests --hw-fido2                     # a FIDO2 key with built-in UV (HID)

Without a flag every scenario skips, each with the flag that would run it.
Hardware runs are destructive in a limited way: they create a signing key, an
agreement key, an OTP key and a counter on the token (a TPM NV counter on a
TPM) and delete them afterwards. A PKCS#11 token is used only if its label
starts with ``hsm-auth-test`` (relabel a spare card), and its user PIN comes
from ``HSM_AUTH_HW_PIN``; wrong-PIN scenarios run on emulators only, so no
real retry counter is spent. The TPM's new objects get the auth value
``HSM_AUTH_HW_TPM_PIN`` (default ``hw-test-pin``); the TPM itself is not
cleared or reconfigured.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hsm_auth.testing.softhsm import softhsm_env  # noqa: F401 - fixture
from hsm_auth.testing.swtpm import swtpm  # noqa: F401 - fixture

TEST_LABEL_PREFIX = "hsm-auth-test"
TARGETS = ("softhsm", "swtpm", "soft-fido2", "tpm", "pkcs11", "fido2")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hsm-auth hardware")
    group.addoption("--hw-tpm", action="store_true", help="run on the TPM at /dev/tpmrm0")
    group.addoption("--hw-pkcs11", metavar="MODULE", help="run on a token of this PKCS#11 module")
    group.addoption("--hw-fido2", action="store_true", help="run on an attached FIDO2 key")
    group.addoption(
        "--emulators", action="store_true", help="run on SoftHSM, swtpm and the soft FIDO2"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    chosen = [f for f in ("hw_tpm", "hw_pkcs11", "hw_fido2") if config.getoption(f)]
    if not chosen:
        return []
    return [
        "WARNING: hw-tests create keys and a counter on the selected hardware and delete "
        "them afterwards; PKCS#11 tokens must be labelled hsm-auth-test*",
    ]


@dataclass
class Target:
    """Where a scenario runs: one method on one backend, with its settings."""

    name: str
    method: str
    backend: str
    settings: dict[str, Any]
    pin: str | None = field(repr=False)
    emulated: bool
    helper_environment: dict[str, str] = field(default_factory=dict)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" in metafunc.fixturenames:
        marks = {
            "softhsm": [pytest.mark.softhsm],
            "swtpm": [pytest.mark.swtpm],
            "soft-fido2": [pytest.mark.fido2],
        }
        metafunc.parametrize(
            "target",
            [pytest.param(t, marks=marks.get(t, []), id=t) for t in TARGETS],
            indirect=True,
        )


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    kind = request.param
    opt = request.config.getoption
    if kind in ("softhsm", "swtpm", "soft-fido2") and not opt("emulators"):
        pytest.skip(f"{kind} emulator not requested (pass --emulators)")
    if kind == "softhsm":
        from hsm_auth.testing.softhsm import init_token, unique_label

        env = request.getfixturevalue("softhsm_env")
        token = init_token(unique_label(TEST_LABEL_PREFIX), so_pin="12345678", user_pin="1234")
        settings = {"uri": token.uri, "allow_unenforced_pin": True}
        yield Target(kind, "pin", "pkcs11", settings, "1234", True,
                     {"SOFTHSM2_CONF": str(env.conf)})
    elif kind == "swtpm":
        tpm = request.getfixturevalue("swtpm")
        settings = {"tcti": tpm.tcti, "state_dir": str(tmp_path / "tpm2-state")}
        yield Target(kind, "pin", "tpm2", settings, "swtpm-pin", True)
    elif kind == "soft-fido2":
        soft = pytest.importorskip("hsm_auth.testing.soft_fido2", reason="python-fido2 missing")
        device = soft.SoftAuthenticator.create(
            tmp_path / "authenticator.json", uv_modality=soft.UvModality.FINGERPRINT
        )
        settings = {"device": f"soft:{device.path}", "state_dir": str(tmp_path / "fido2-state"),
                    "prompts": False, "allow_software_authenticator": True}
        yield Target(kind, "biometric", "fido2", settings, None, True)
    elif kind == "tpm":
        if not opt("hw_tpm"):
            pytest.skip("hardware TPM not requested (pass --hw-tpm)")
        if not os.path.exists("/dev/tpmrm0"):
            pytest.skip("--hw-tpm given but /dev/tpmrm0 does not exist (no TPM 2.0 here)")
        if not os.access("/dev/tpmrm0", os.R_OK | os.W_OK):
            pytest.skip("/dev/tpmrm0 is not accessible to this user (see udev/README.md)")
        warnings.warn("hw-tests: creating keys and an NV counter on /dev/tpmrm0", stacklevel=1)
        settings = {"tcti": "device:/dev/tpmrm0", "state_dir": str(tmp_path / "tpm2-state")}
        yield Target(kind, "pin", "tpm2", settings,
                     os.environ.get("HSM_AUTH_HW_TPM_PIN", "hw-test-pin"), False)
    elif kind == "pkcs11":
        module = opt("hw_pkcs11")
        if not module:
            pytest.skip("hardware PKCS#11 token not requested (pass --hw-pkcs11 MODULE)")
        yield _pkcs11_target(module)
    else:
        if not opt("hw_fido2"):
            pytest.skip("FIDO2 key not requested (pass --hw-fido2)")
        from hsm_auth.registry import backend_names

        if "fido2" not in backend_names():
            pytest.skip("--hw-fido2 given but no 'fido2' backend is registered "
                        "(entry point group hsm_auth.backends)")
        method = os.environ.get("HSM_AUTH_HW_FIDO2_METHOD", "biometric")
        if method not in ("biometric", "face"):
            pytest.skip("HSM_AUTH_HW_FIDO2_METHOD must be biometric or face")
        warnings.warn("hw-tests: creating FIDO2 credentials (touch / verify when asked)",
                      stacklevel=1)
        settings = {"device": os.environ.get("HSM_AUTH_HW_FIDO2_DEVICE", ""),
                    "state_dir": str(tmp_path / "fido2-state")}
        if not settings["device"]:
            del settings["device"]  # HID discovery
        try:
            from hsm_auth.registry import load_backend

            load_backend("fido2").probe(settings)
        except Exception as e:  # no key attached, no HID access: a reason, not an error
            pytest.skip(f"--hw-fido2: no usable FIDO2 authenticator: {e}")
        yield Target("fido2", method, "fido2", settings, None, False)


def _pkcs11_target(module: str) -> Target:
    if not os.path.isfile(module):
        pytest.skip(f"--hw-pkcs11: module {module} does not exist")
    from hsm_auth.errors import HsmAuthError
    from hsm_auth.uri import Pkcs11Uri

    try:
        import pkcs11

        lib = pkcs11.lib(module)
        labels = [s.get_token().label.strip() for s in lib.get_slots(token_present=True)]
    except (ImportError, HsmAuthError, Exception) as e:  # any loader failure: skip with it
        pytest.skip(f"--hw-pkcs11: cannot list tokens of {module}: {type(e).__name__}: {e}")
    if not labels:
        pytest.skip(f"--hw-pkcs11: no token present in {module} (insert the card)")
    testing = [label for label in labels if label.startswith(TEST_LABEL_PREFIX)]
    if not testing:
        pytest.skip(f"--hw-pkcs11: refusing tokens not labelled {TEST_LABEL_PREFIX}* "
                    f"(found: {', '.join(labels)})")
    if len(testing) > 1:
        pytest.skip(f"--hw-pkcs11: several test tokens present ({', '.join(testing)})")
    pin = os.environ.get("HSM_AUTH_HW_PIN")
    if not pin:
        pytest.skip("--hw-pkcs11: set HSM_AUTH_HW_PIN to the test token's user PIN")
    warnings.warn(f"hw-tests: creating keys and a counter on token {testing[0]!r}", stacklevel=1)
    uri = Pkcs11Uri(token=testing[0], module_path=module)
    return Target("pkcs11", "pin", "pkcs11", {"uri": str(uri)}, pin, False)
