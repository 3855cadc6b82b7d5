"""What the verifier establishes about a token at enrollment, and its policy for it.

The client's ``backend`` string is a claim; what the verifier stores with a
credential (and ``verifier show`` prints) is an :class:`AttestationResult`
made by a checker here from the response's ``attestation`` field:

* FIDO2 (``fmt`` packed, none, …): :mod:`hsm_auth.attestation_fido2` (the
  enrollment proof of :mod:`hsm_auth.webauthn_proof`, then the statement with
  python-fido2's verifiers, its chain and AAGUID against the method's policy);
* TPM 2.0 (``fmt`` ``hsm-auth-tpm2``): the enrolled keys certified by the TPM;
* no attestation (PKCS#11 has no standard one): ``unattested``.

The policy is per method (:class:`MethodPolicy`), from ``policy.toml`` in the
verifier's directory (:meth:`VerifierPolicy.load`), a file others cannot write::

    allow_override = false          # re-enrolling an existing method (default false)

    [methods.biometric]
    attestation = "required"        # "required" | "if-available" | "none"
    roots = ["/etc/hsm-auth/fido-roots.pem"]   # PEM files (relative: to the directory)
    mds_blob = "mds.jwt"            # FIDO2: a Metadata Service BLOB (optional) ...
    mds_ca = "mds-root.pem"         # ... whose signature chains to this CA
    aaguid_allow = []               # empty: any AAGUID the roots vouch for
    aaguid_deny = []

    [approval]                      # online approvals (hsm_auth.challenges)
    require_user_authentication = false   # true: refuse approvals from `device`
    rp_id = "hsm-auth"              # the rpId of FIDO2 credentials' assertions

    [approval.pin]                  # per method (device, pin, biometric, face)
    user_authentication = true      # what the method is (see ApprovalPolicy)
    timeout = 0                     # seconds a PIN / UV may be reused; 0: each approval

    [offline]                       # offline use (hsm_auth.expiry)
    validity_days = 90              # expiry after enrollment / renewal; 0: never (default)

    [offline.pin]                   # offline OTPs of the pin method
    pin_cache = 0                   # seconds the authenticator's agent may hold the
                                    # token unlocked after the PIN was typed; 0: the
                                    # PIN is asked at every use (see offline_pin_cache)

An absent file, or an absent table, gives the defaults: ``required`` for the
FIDO2 methods (biometric, face), ``if-available`` for the others. The software
test authenticator's AAGUID (:data:`SOFT_AUTHENTICATOR_AAGUID`) is refused
unless ``aaguid_allow`` names it.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .enrollment_messages import MAX_PIN_CACHE  # the EnrollmentResult's bound (§5.6)
from .errors import ConfigError, HsmAuthError, UntrustedMessage
from .expiry import OfflineValidity, parse_validity
from .methods import Method

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "POLICY_FILE",
    "SOFT_AUTHENTICATOR_AAGUID",
    "ApprovalPolicy",
    "AttestationMode",
    "AttestationRefused",
    "AttestationResult",
    "MethodPolicy",
    "VerifierPolicy",
    "attestation_format",
    "check",
]

POLICY_FILE: Final = "policy.toml"
#: The ``fmt`` of an hsm-auth TPM 2.0 attestation (a CBOR map, like FIDO2's).
TPM2_FORMAT: Final = "hsm-auth-tpm2"
#: The AAGUID of hsm-auth's software FIDO2 test authenticator
#: (:mod:`hsm_auth.testing.soft_fido2`): refused unless a policy's aaguid_allow names it.
SOFT_AUTHENTICATOR_AAGUID: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:hsm-auth:soft-fido2").bytes


class AttestationRefused(UntrustedMessage):
    """The enrollment's attestation is missing, does not verify, or the policy refuses it."""


class AttestationMode(enum.Enum):
    REQUIRED = "required"  # a verified attestation, or the enrollment is refused
    IF_AVAILABLE = "if-available"  # verified if present; none is recorded "unattested"
    NONE = "none"  # not checked at all (recorded "not-checked")


@dataclass(frozen=True)
class MethodPolicy:
    attestation: AttestationMode = AttestationMode.IF_AVAILABLE
    #: PEM files of the roots an attestation chain must end at.
    roots: tuple[str, ...] = ()
    #: AAGUIDs (lowercase hex, 32 digits) allowed (empty: any) and denied.
    aaguid_allow: tuple[str, ...] = ()
    aaguid_deny: tuple[str, ...] = ()
    #: FIDO2: a Metadata Service BLOB file and the PEM CA its signature must chain to.
    mds_blob: str = ""
    mds_ca: str = ""

    @classmethod
    def default(cls, method: Method) -> MethodPolicy:
        """``required`` for the FIDO2 methods (biometric, face), else ``if-available``."""
        return cls(_default_mode(method))


def _default_mode(method: Method) -> AttestationMode:
    if method.needs_user_verification:  # biometric, face: FIDO2 only
        return AttestationMode.REQUIRED
    return AttestationMode.IF_AVAILABLE


#: The longest time a PIN or user verification may be reused for approvals.
MAX_APPROVAL_TIMEOUT: Final = 3600


@dataclass(frozen=True)
class ApprovalPolicy:
    """User authentication for one method's approvals (Authsignal's
    ``userAuthenticationRequired`` / ``timeout``).

    ``user_authentication`` is what the method is: ``device`` is possession only
    (false: nothing asks the user), ``pin``, ``biometric`` and ``face`` need the PIN
    or a user verification in the token (true); a policy that says otherwise is a
    configuration error, so the file always states what an approval proves.
    ``timeout`` is how long (seconds) the authenticator's agent may reuse a PIN it
    was given for further approvals: 0 asks for it on each approval. The FIDO2
    methods verify the user in the authenticator on every assertion whatever the
    timeout. The verifier states the policy to the authenticator in the online
    enrollment's answer and in its credential list; the authenticator enforces it
    (:meth:`hsm_auth.authenticator.Authenticator.sign_approval`)."""

    user_authentication: bool
    timeout: int = 0

    @classmethod
    def default(cls, method: Method) -> ApprovalPolicy:
        return cls(method is not Method.DEVICE, 0)

    def to_json(self) -> dict[str, Any]:
        return {"user_authentication": self.user_authentication, "timeout": self.timeout}


@dataclass(frozen=True)
class VerifierPolicy:
    methods: Mapping[Method, MethodPolicy] = field(default_factory=dict)
    #: Whether an offer may allow re-enrolling a method the user has (issue 11).
    allow_override: bool = False
    #: Online approvals: per method, whether only user-authenticated ones are taken,
    #: and the FIDO2 rpId (``[approval]``).
    approval: Mapping[Method, ApprovalPolicy] = field(default_factory=dict)
    require_user_authentication: bool = False
    rp_id: str = "hsm-auth"
    #: How long a credential may be used offline after enrollment or renewal
    #: (``[offline] validity_days``, :mod:`hsm_auth.expiry`).
    offline_validity: OfflineValidity = field(default_factory=OfflineValidity)
    #: Offline OTPs: seconds the authenticator may keep a method unlocked after its
    #: PIN was typed (``[offline.<method>] pin_cache``; absent: 0, every use).
    pin_cache: Mapping[Method, int] = field(default_factory=dict)

    def pin_cache_for(self, method: Method) -> int:
        return self.pin_cache.get(method, 0)

    def for_method(self, method: Method) -> MethodPolicy:
        return self.methods.get(method) or MethodPolicy.default(method)

    def approval_for(self, method: Method) -> ApprovalPolicy:
        return self.approval.get(method) or ApprovalPolicy.default(method)

    @classmethod
    def default(cls) -> VerifierPolicy:
        return cls()

    @classmethod
    def load(cls, directory: Path) -> VerifierPolicy:
        """``directory/policy.toml`` (checked like a config file), or the default."""
        from .config import read_file

        path = directory / POLICY_FILE
        document = read_file(path)
        if document is None:
            return cls.default()
        try:
            return cls.parse(document, directory)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def parse(cls, document: Mapping[str, Any], directory: Path | None = None) -> VerifierPolicy:
        """The policy in ``document``; relative file names are in ``directory``."""
        unknown = set(document) - {"allow_override", "methods", "approval", "offline"}
        if unknown:
            raise ConfigError(f"unknown policy key {sorted(unknown)[0]!r}")
        override = document.get("allow_override", False)
        if not isinstance(override, bool):
            raise ConfigError("allow_override must be true or false")
        tables = document.get("methods", {})
        if not isinstance(tables, dict):
            raise ConfigError("[methods] must be a table")
        methods = {}
        for name, table in tables.items():
            methods[Method.parse(name)] = _method_policy(name, table, directory)
        return cls(
            methods, override, *_approval_policy(document.get("approval", {})),
            offline_validity=parse_validity(document.get("offline", {})),
            pin_cache=offline_pin_cache(document.get("offline", {})),
        )


def _approval_policy(table: Any) -> tuple[dict[Method, ApprovalPolicy], bool, str]:
    if not isinstance(table, dict):
        raise ConfigError("[approval] must be a table")
    require = table.get("require_user_authentication", False)
    if not isinstance(require, bool):
        raise ConfigError("[approval] require_user_authentication must be true or false")
    rp_id = table.get("rp_id", "hsm-auth")
    if not isinstance(rp_id, str) or not 0 < len(rp_id) <= 128 or not rp_id.isprintable():
        raise ConfigError("[approval] rp_id must be 1 to 128 printable characters")
    policies: dict[Method, ApprovalPolicy] = {}
    for name, sub in table.items():
        if name in ("require_user_authentication", "rp_id"):
            continue
        where = f"[approval.{name}]"
        try:
            method = Method.parse(name)
        except HsmAuthError:
            raise ConfigError(f"[approval]: unknown key {name!r}") from None
        if not isinstance(sub, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(sub) - {"user_authentication", "timeout"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        nature = ApprovalPolicy.default(method).user_authentication
        said = sub.get("user_authentication", nature)
        if not isinstance(said, bool):
            raise ConfigError(f"{where}: user_authentication must be true or false")
        if said != nature:
            raise ConfigError(
                f"{where}: user_authentication = {str(said).lower()}, but "
                + ("the device method is possession only: nothing asks the user"
                   if method is Method.DEVICE else
                   f"the {method.value} method always asks the user in the token")
            )
        timeout = sub.get("timeout", 0)
        if type(timeout) is not int or not 0 <= timeout <= MAX_APPROVAL_TIMEOUT:
            raise ConfigError(f"{where}: timeout is whole seconds in [0, {MAX_APPROVAL_TIMEOUT}]")
        if method is Method.DEVICE and timeout:
            raise ConfigError(f"{where}: the device method has no user authentication to reuse")
        policies[method] = ApprovalPolicy(nature, timeout)
    return policies, require, rp_id


def offline_pin_cache(table: Any) -> dict[Method, int]:
    """``[offline.<method>] pin_cache`` (KOBIL's ``allowOfflinePinVerification``): how
    long, in whole seconds 0..3600, the authenticator's agent may hold the method's
    token unlocked after the user typed its PIN (:mod:`hsm_auth.unlocked`). Only the
    ``pin`` method has a PIN to cache: ``device`` asks nothing, and the FIDO2 methods
    verify the user in the authenticator at every use, so a ``pin_cache`` above 0 for
    them is a configuration error. Keys of ``[offline]`` that are not tables belong to
    other offline settings and are left to their parser."""
    if not isinstance(table, dict):
        raise ConfigError("[offline] must be a table")
    if "pin_cache" in table:
        raise ConfigError("[offline] pin_cache is per method: [offline.pin] pin_cache = N")
    found: dict[Method, int] = {}
    for name, sub in table.items():
        if not isinstance(sub, dict):
            continue  # [offline] scalars (validity_days, ...): not this parser's
        where = f"[offline.{name}]"
        try:
            method = Method.parse(name)
        except HsmAuthError:
            raise ConfigError(f"[offline]: unknown table {name!r}") from None
        unknown = set(sub) - {"pin_cache"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        if "pin_cache" not in sub:
            continue
        value = sub["pin_cache"]
        if type(value) is not int or not 0 <= value <= MAX_PIN_CACHE:
            raise ConfigError(f"{where}: pin_cache is whole seconds in [0, {MAX_PIN_CACHE}]")
        if value and not method.needs_pin:
            raise ConfigError(
                f"{where}: pin_cache is for the pin method; the {method.value} method "
                + ("asks for nothing" if method is Method.DEVICE else
                   "verifies the user in the authenticator at every use (never cached)")
            )
        found[method] = value
    return found


def _method_policy(name: str, table: Any, directory: Path | None) -> MethodPolicy:
    where = f"[methods.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    known = {"attestation", "roots", "aaguid_allow", "aaguid_deny", "mds_blob", "mds_ca"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    try:
        mode = AttestationMode(table.get("attestation", _default_mode(Method.parse(name)).value))
    except ValueError:
        raise ConfigError(f"{where}: attestation is required, if-available or none") from None

    def strings(key: str, *, aaguid: bool = False) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings")
        if aaguid:
            value = [v.replace("-", "").lower() for v in value]
            if not all(len(v) == 32 and all(c in "0123456789abcdef" for c in v) for v in value):
                raise ConfigError(f"{where}: {key} holds AAGUIDs (32 hex digits)")
        return tuple(value)

    def file(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a file name")
        path = Path(value)
        return str(path if directory is None or path.is_absolute() else directory / path)

    mds_blob, mds_ca = table.get("mds_blob"), table.get("mds_ca")
    if (mds_blob is None) != (mds_ca is None):
        raise ConfigError(f"{where}: mds_blob and mds_ca go together")
    return MethodPolicy(
        mode, tuple(file(v, "roots") for v in strings("roots")),
        strings("aaguid_allow", aaguid=True), strings("aaguid_deny", aaguid=True),
        "" if mds_blob is None else file(mds_blob, "mds_blob"),
        "" if mds_ca is None else file(mds_ca, "mds_ca"),
    )


@dataclass(frozen=True)
class AttestationResult:
    """What was established, stored with the credential as JSON.

    ``format``: the attestation's format (``packed``, ``none``, ``hsm-auth-tpm2``),
    ``unattested`` (the response had none) or ``not-checked`` (policy ``none``).
    ``verified``: its signature checked and its chain ends at a configured root.
    ``trust``: the root's subject (or "" when unverified); ``details``: short
    non-secret facts (AAGUID, UV modalities, TPM attributes, …)."""

    format: str
    verified: bool
    trust: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"format": self.format, "verified": self.verified, "trust": self.trust,
             "details": dict(self.details)},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> AttestationResult:
        try:
            data = json.loads(text)
            return cls(
                str(data["format"]), bool(data["verified"]), str(data.get("trust", "")),
                {str(k): str(v) for k, v in dict(data.get("details", {})).items()},
            )
        except (ValueError, KeyError, TypeError):
            raise HsmAuthError("a credential's stored attestation is malformed") from None

    @property
    def summary(self) -> str:
        """One line for ``verifier show``."""
        aaguid = f", aaguid {self.details['aaguid']}" if "aaguid" in self.details else ""
        if not self.verified:
            return self.format + aaguid
        trust = f" ({self.trust})" if self.trust else ""
        return f"{self.format}, verified{trust}{aaguid}"


#: Checks one attestation format: (attestation bytes, the response's fields the
#: checker needs, the method's policy) -> the result, or AttestationRefused.
Checker = Callable[[bytes, "EnrollmentContext", MethodPolicy], AttestationResult]


@dataclass(frozen=True)
class EnrollmentContext:
    """The response fields a checker binds the attestation to."""

    offer_id: bytes
    user: str
    method: Method
    signing_key: bytes
    wrapped_otp_key: bytes | None
    initial_atc: int
    signed: bool  # the response carries a signature by signing_key (checked already)
    #: The verifier's own signing key (SEC1): a TPM attestation key's binding is its signature.
    verifier_signing_key: bytes = b""


#: The largest PEM file of roots a policy may name.
MAX_ROOTS_FILE: Final = 1024 * 1024


def load_roots(paths: Sequence[str]) -> list[x509.Certificate]:
    """The certificates in a policy's ``roots`` files (PEM; read like state files,
    at most :data:`MAX_ROOTS_FILE` each): the one reader for FIDO2 and TPM roots."""
    from cryptography import x509

    from .files import read_state

    roots: list[x509.Certificate] = []
    for path in paths:
        raw = read_state(Path(path), limit=MAX_ROOTS_FILE)
        assert raw is not None
        try:
            roots += x509.load_pem_x509_certificates(raw)
        except ValueError:
            raise ConfigError(f"policy root file {path}: no PEM certificate") from None
    return roots


def attestation_format(attestation: bytes) -> str:
    """The ``fmt`` of an attestation map; UntrustedMessage if it is not one."""
    from . import cbor

    try:
        top = cbor.loads(attestation, maps=True)
    except Exception:
        raise AttestationRefused("malformed attestation") from None
    if not isinstance(top, dict) or not isinstance(top.get("fmt"), str):
        raise AttestationRefused("malformed attestation (no fmt)")
    return str(top["fmt"])


def _fido2(attestation: bytes, ctx: EnrollmentContext, policy: MethodPolicy) -> AttestationResult:
    try:
        from .attestation_fido2 import check as check_fido2
    except ImportError as e:
        if not (e.name or "").startswith("fido2"):
            raise
        raise HsmAuthError(
            "checking a FIDO2 enrollment's attestation needs python-fido2 on the verifier "
            "(pip install 'hsm-auth[fido2]')"
        ) from None
    return check_fido2(attestation, ctx, policy)


def _checker(fmt: str) -> Checker:
    """The checker of attestation format ``fmt``: TPM 2.0's, else FIDO2's (whose
    statement formats are open-ended: packed, none, fido-u2f, …)."""
    if fmt == TPM2_FORMAT:
        from .attestation_tpm2 import check as tpm2

        return tpm2
    return _fido2


def check(
    attestation: bytes | None, ctx: EnrollmentContext, policy: MethodPolicy
) -> AttestationResult:
    """The verified attestation of an enrollment under ``policy``, or AttestationRefused.

    A response without a signature must carry an attestation that proves
    possession (FIDO2), whatever the policy."""
    if attestation is None:
        if not ctx.signed:
            raise AttestationRefused(
                "enrollment response carries neither signature nor attestation"
            )
        if policy.attestation is AttestationMode.REQUIRED:
            raise AttestationRefused(
                f"the {ctx.method.value} method requires an attestation and the response has none"
            )
        return AttestationResult("unattested", False)
    if policy.attestation is AttestationMode.NONE and ctx.signed:
        return AttestationResult("not-checked", False)
    result = _checker(attestation_format(attestation))(attestation, ctx, policy)
    if policy.attestation is AttestationMode.REQUIRED and not result.verified:
        raise AttestationRefused(
            f"the {ctx.method.value} method requires a verified attestation "
            f"({result.format} does not chain to a configured root)"
        )
    return result
