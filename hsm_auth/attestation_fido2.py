"""The verifier's check of a FIDO2 enrollment's attestation, under the method's policy.

Three layers, in this order (docs/PROTOCOL.md §8.4):

1. the proof of possession and its binding (:mod:`hsm_auth.webauthn_proof`,
   the project's own checks, which python-fido2 does not make: the attested
   credential is the enrolled signing key, UV, ``hmac-secret``,
   ``credProtect`` 2 or 3, the assertion by the credential key over the same
   client data hash, which binds the offer, user, method and wrapped OTP key);
2. the AAGUID against the policy's lists; the software test authenticator's
   (:data:`hsm_auth.attestation.SOFT_AUTHENTICATOR_AAGUID`) is refused unless ``aaguid_allow``
   names it;
3. the attestation statement with python-fido2's own verifiers
   (:mod:`fido2.attestation`: the format's signature and certificate
   requirements, then :func:`fido2.attestation.verify_x509_chain` up to a root
   found by :meth:`_PolicyVerifier.ca_lookup`): the method's ``roots`` (PEM
   files) or, with ``mds_blob``/``mds_ca``, a FIDO Metadata Service BLOB
   verified against that CA (:func:`fido2.mds3.parse_blob`), whose entry for
   the AAGUID gives the roots, and the certified user verification methods,
   recorded in the result's details.

A statement that does not verify (a bad signature, a malformed certificate) is
refused under every policy. One that verifies but reaches no configured root,
a self attestation and ``none`` are "unverified": refused under ``required``,
recorded under ``if-available``. Under ``none`` only layers 1 and 2 run.

This module needs python-fido2 (the ``fido2`` extra) on the verifier;
:func:`hsm_auth.attestation.check` refuses a FIDO2 enrollment with one clear
error without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from fido2.attestation.base import AttestationResult as Fido2Result
from fido2.attestation.base import (
    AttestationType,
    AttestationVerifier,
    InvalidAttestation,
    NoneAttestation,
    UnsupportedType,
    UntrustedAttestation,
    verify_x509_chain,
)
from fido2.webauthn import Aaguid, AttestationObject, AuthenticatorData

from .attestation import (
    SOFT_AUTHENTICATOR_AAGUID,
    AttestationMode,
    AttestationRefused,
    AttestationResult,
    EnrollmentContext,
    MethodPolicy,
    load_roots,
)
from .errors import ConfigError
from .files import read_state
from .methods import Method
from .webauthn_proof import EnrollmentProof, enrollment_binding, verify_enrollment_attestation

if TYPE_CHECKING:  # fido2.mds3 is imported only for a policy with mds_blob (7 ms)
    from fido2.mds3 import MdsAttestationVerifier

__all__ = ["check"]

_MAX_MDS_BLOB: Final = 64 * 1024 * 1024


def check(attestation: bytes, ctx: EnrollmentContext, policy: MethodPolicy) -> AttestationResult:
    """The checked attestation of a FIDO2 enrollment, or :class:`AttestationRefused`."""
    proof = verify_enrollment_attestation(
        attestation,
        ctx.signing_key,
        enrollment_binding(ctx.offer_id, ctx.user, ctx.method),
        ctx.wrapped_otp_key,
        initial_atc=ctx.initial_atc,
    )
    aaguid = proof.aaguid.hex()
    details = {"aaguid": aaguid}
    _check_aaguid(aaguid, policy)
    if policy.attestation is AttestationMode.NONE:
        return AttestationResult("not-checked", False, "", details)
    result = _check_statement(proof, ctx, policy, details)
    _check_modality(ctx.method, details)
    return result


#: The FIDO registry's user verification method each method needs (where metadata says).
_MODALITY: Final = {Method.BIOMETRIC: "fingerprint_internal", Method.FACE: "faceprint_internal"}


def _check_modality(method: Method, details: dict[str, str]) -> None:
    """Metadata that lists the authenticator's certified user verification methods
    must list the method's: the backend's own check reads getInfo, the client's word."""
    certified = details.get("uv_modalities")
    wanted = _MODALITY.get(method)
    if certified is None or wanted is None or wanted in certified.split(","):
        return
    raise AttestationRefused(
        f"the {method.value} method needs {wanted}; the authenticator's metadata "
        f"certifies {certified}"
    )


def _check_aaguid(aaguid: str, policy: MethodPolicy) -> None:
    if aaguid in policy.aaguid_deny:
        raise AttestationRefused(f"the authenticator's AAGUID {aaguid} is denied by the policy")
    if policy.aaguid_allow and aaguid not in policy.aaguid_allow:
        raise AttestationRefused(
            f"the authenticator's AAGUID {aaguid} is not in the policy's aaguid_allow"
        )
    if aaguid == SOFT_AUTHENTICATOR_AAGUID.hex() and aaguid not in policy.aaguid_allow:
        raise AttestationRefused(
            "the authenticator is hsm-auth's software test authenticator (AAGUID "
            f"{aaguid}); a policy allows it only by naming it in aaguid_allow"
        )


def _check_statement(
    proof: EnrollmentProof, ctx: EnrollmentContext, policy: MethodPolicy,
    details: dict[str, str],
) -> AttestationResult:
    required = policy.attestation is AttestationMode.REQUIRED
    fmt = proof.fmt
    auth_data = AuthenticatorData(proof.auth_data)
    mds = _mds_verifier(policy)
    if mds is not None:
        _record_metadata(mds, proof.aaguid, details)

    def unverified(why: str) -> AttestationResult:
        if required:
            raise AttestationRefused(
                f"the {ctx.method.value} method requires a verified attestation: {why}"
            )
        return AttestationResult(fmt, False, "", details)

    verifier = _PolicyVerifier(_load_roots(policy.roots), mds)
    try:
        if fmt == "none":
            NoneAttestation().verify(  # type: ignore[no-untyped-call]
                dict(proof.statement), auth_data, proof.client_data_hash
            )
            why = "the authenticator sent 'none' attestation"
        else:
            verifier.verify_attestation(
                AttestationObject.create(fmt, auth_data, dict(proof.statement)),
                proof.client_data_hash,
            )
            why = ""
    except UnsupportedType:
        why = f"python-fido2 cannot verify the {fmt!r} attestation format"
    except UntrustedAttestation:
        why = verifier.why_untrusted()
    except Exception as e:
        # InvalidData / InvalidSignature: a statement that does not verify is forged or
        # broken, whatever the policy says of unverified ones. python-fido2 raises
        # others on some forged input too (AssertionError for an alg that does not fit
        # the certificate's key, cryptography's UnsupportedAlgorithm for a key type it
        # lacks): the same refusal.
        known = isinstance(e, InvalidAttestation | UnsupportedAlgorithm | ValueError)
        what = _printable(str(e) if known and str(e) else type(e).__name__)
        raise AttestationRefused(
            f"the {fmt} attestation statement does not verify ({what[:120]})"
        ) from None
    if why:
        return unverified(why)
    assert verifier.root is not None  # verify_attestation returned: a root was found
    return AttestationResult(fmt, True, verifier.root.subject.rfc4514_string()[:200], details)


class _PolicyVerifier(AttestationVerifier):
    """python-fido2's verifier (the format's statement, then the chain with
    :func:`~fido2.attestation.verify_x509_chain`) with the policy's CA lookup: a PEM
    root whose subject is the chain's issuer (the one whose key signed it, when
    several share a subject), else the Metadata Service entry of the AAGUID
    (:meth:`~fido2.mds3.MdsAttestationVerifier.ca_lookup`: not revoked, its
    attestation key not compromised)."""

    def __init__(
        self, roots: Sequence[x509.Certificate], mds: MdsAttestationVerifier | None
    ) -> None:
        super().__init__()
        self._roots = roots
        self._mds = mds
        self.root: x509.Certificate | None = None
        self._self_attested = False
        self._issuer = ""

    def ca_lookup(self, attestation_result: Fido2Result, auth_data: Any) -> bytes | None:
        path = attestation_result.trust_path
        if attestation_result.attestation_type is AttestationType.SELF or not path:
            self._self_attested = True
            return None
        issuer = x509.load_der_x509_certificate(path[-1]).issuer
        self._issuer = _printable(issuer.rfc4514_string()[:120])  # the sender's text
        candidates = [r.public_bytes(Encoding.DER) for r in self._roots if r.subject == issuer]
        for der in candidates:
            try:
                verify_x509_chain([path[-1], der])
            except InvalidAttestation:
                continue  # another root of that name: try the next
            return self._chose(der)
        if candidates:
            return self._chose(candidates[0])  # the chain check then refuses it
        if self._mds is not None:
            found = self._mds.ca_lookup(  # type: ignore[no-untyped-call]
                attestation_result, auth_data
            )
            if found:
                return self._chose(found)
        return None

    def _chose(self, der: bytes) -> bytes:
        self.root = x509.load_der_x509_certificate(der)
        return der

    def why_untrusted(self) -> str:
        if self._self_attested:
            return "a self attestation has no certificate chain"
        if self.root is not None:
            return "its certificate chain does not verify up to the configured root"
        return f"its certificate chain ends at no configured root (issuer {self._issuer})"


def _printable(text: str) -> str:
    """``text`` fit for one line of a log or a terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


_load_roots = load_roots  # the policy's one reader of root files


@dataclass(frozen=True)
class _BlobKey:
    blob: str
    blob_digest: bytes
    ca_digest: bytes


_mds_cache: dict[_BlobKey, MdsAttestationVerifier] = {}


def _mds_verifier(policy: MethodPolicy) -> MdsAttestationVerifier | None:
    """The policy's Metadata Service BLOB, its signature verified against ``mds_ca``
    (parsed once per content)."""
    if not policy.mds_blob:
        return None
    from fido2.mds3 import MdsAttestationVerifier, parse_blob

    blob = read_state(Path(policy.mds_blob), limit=_MAX_MDS_BLOB)
    cas = _load_roots([policy.mds_ca])
    assert blob is not None and cas
    ca = cas[0].public_bytes(Encoding.DER)
    key = _BlobKey(policy.mds_blob, hashlib.sha256(blob).digest(), hashlib.sha256(ca).digest())
    cached = _mds_cache.get(key)
    if cached is not None:
        return cached
    try:
        verifier = MdsAttestationVerifier(parse_blob(blob.strip(), ca))
    except Exception as e:  # fido2 raises many types on a bad BLOB or signature
        raise ConfigError(
            f"policy mds_blob {policy.mds_blob}: not a Metadata Service BLOB signed under "
            f"mds_ca ({type(e).__name__})"
        ) from None
    _mds_cache.clear()
    _mds_cache[key] = verifier
    return verifier


def _record_metadata(mds: MdsAttestationVerifier, aaguid: bytes, details: dict[str, str]) -> None:
    """The certified status and user verification methods of the AAGUID's entry."""
    entry = mds.find_entry_by_aaguid(Aaguid(aaguid))
    if entry is None:
        return
    if entry.status_reports:
        details["mds_status"] = str(entry.status_reports[-1].status.value)
    statement = entry.metadata_statement
    if statement is None:
        return
    methods = sorted({
        d.user_verification_method
        for combination in statement.user_verification_details
        for d in combination
        if d.user_verification_method
    })
    if methods:
        details["uv_modalities"] = ",".join(methods)
    if statement.description:
        details["mds_description"] = statement.description[:80]
