"""For tests whose software device (tests/_verifier_device.PythonDevice) stands in for a
FIDO2 one with the biometric or face method: the default policy requires a verified
attestation for those methods (issue 11), which a software device has not."""

from __future__ import annotations

from pathlib import Path

from hsm_auth.attestation import POLICY_FILE
from hsm_auth.files import atomic_write, ensure_private_dir

UNATTESTED_FIDO2_METHODS = (
    '[methods.biometric]\nattestation = "if-available"\n\n'
    '[methods.face]\nattestation = "if-available"\n'
)


def allow_unattested_fido2_methods(verifier_dir: Path) -> None:
    """Write a ``policy.toml`` into ``verifier_dir`` (before ``Verifier.init``/``open``)
    that records unattested biometric and face enrollments instead of refusing them."""
    ensure_private_dir(verifier_dir)
    atomic_write(verifier_dir / POLICY_FILE, UNATTESTED_FIDO2_METHODS.encode())
