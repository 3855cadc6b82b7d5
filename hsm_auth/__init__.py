"""hsm-auth: hardware-backed offline authentication.

OTPs and signatures are computed inside PKCS#11 tokens, TPM 2.0 chips and
FIDO2 authenticators; the verifier stores no usable secret.
"""

from .authenticator import Authenticator, OfflineOtp, OfflineRequest
from .errors import HsmAuthError, InvalidToken
from .keystore import Authorization, Capability, KeyStore
from .methods import Method
from .verifier import Acceptance, Session, Verifier

__version__ = "0.1.0"

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
