"""hsm-auth: hardware-backed offline authentication.

OTPs and signatures are computed inside PKCS#11 tokens, TPM 2.0 chips and
FIDO2 authenticators; the verifier stores no usable secret.

The public names below are imported lazily (PEP 562), so that a small entry
point such as the PAM helper pays only for the modules it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Acceptance": "verifier",
    "Authenticator": "authenticator",
    "Authorization": "keystore",
    "Capability": "keystore",
    "HsmAuthError": "errors",
    "InvalidToken": "errors",
    "KeyStore": "keystore",
    "Method": "methods",
    "OfflineOtp": "authenticator",
    "OfflineRequest": "authenticator",
    "Session": "verifier",
    "Verifier": "verifier",
}

__all__ = [
    "Acceptance",
    "Authenticator",
    "Authorization",
    "Capability",
    "HsmAuthError",
    "InvalidToken",
    "KeyStore",
    "Method",
    "OfflineOtp",
    "OfflineRequest",
    "Session",
    "Verifier",
]

if TYPE_CHECKING:
    from .authenticator import Authenticator, OfflineOtp, OfflineRequest
    from .errors import HsmAuthError, InvalidToken
    from .keystore import Authorization, Capability, KeyStore
    from .methods import Method
    from .verifier import Acceptance, Session, Verifier


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hsm_auth' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
