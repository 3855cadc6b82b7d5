"""The key-store interface that every hardware backend speaks.

One small abstract class (``KeyStore``): a handful of abstract primitives and
defaults built on them, so the interface can grow without breaking backends.
Keys, counters and credentials are addressed by URI: RFC 7512 ``pkcs11:``,
``tpm2:`` (with a TCTI) and ``fido2:`` (with a credential id).

Backends register through the entry-point group ``hsm_auth.backends``; see
:mod:`hsm_auth.registry`. A backend module must not fail to import when its
native library is missing: it imports the binding inside :meth:`probe` /
:meth:`open` and raises :class:`~hsm_auth.errors.BackendUnavailable` with a
reason.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec

from .errors import LoginRequired, MechanismNotSupported
from .methods import Method

#: Settings for one backend instance, from the config file (``[methods.<m>]``).
Settings = Mapping[str, Any]

#: Builds the key-confirmation message of an enrollment from its new signing key and
#: its key agreement (SEC1 point, or FIDO2 wrapped key), both as sent
#: (:func:`hsm_auth.transcript.confirmation_message`).
ConfirmationMessage = Callable[[bytes, bytes], bytes]


class Capability(enum.Enum):
    SIGN = "sign"  # ECDSA P-256 inside the token
    HMAC = "hmac"  # HMAC-SHA256 inside the token
    ECDH_DERIVE = "ecdh-derive"  # ECDH to a non-extractable secret inside the token
    COUNTER = "counter"  # a durable counter kept by the token
    HARDWARE_COUNTER = "hardware-counter"  # ... that the hardware keeps monotonic
    PIN = "pin"  # a PIN / auth value checked by the token
    PIN_RETRY_LIMIT = "pin-retry-limit"  # ... with a retry counter / lockout
    USER_VERIFICATION = "user-verification"  # built-in UV (fingerprint, face)


class KeyKind(enum.Enum):
    SIGNING = "signing"  # ECDSA P-256 key pair
    AGREEMENT = "agreement"  # ECDH P-256 key pair
    OTP = "otp"  # HMAC-SHA256 secret
    COUNTER = "counter"  # the ATC


class UserInteraction:
    """How a backend reaches the user while a token waits for them.

    The library never writes to a terminal: a front end (the CLI, an agent, a
    GUI) passes one of these in :attr:`Authorization.interaction`, as
    python-fido2's ``UserInteraction`` does for its client. Every hook has a
    default that does nothing, so the interface can grow. Hooks may be called
    from a worker thread; they must not block for long.
    """

    def prompt_up(self, prompt: str) -> None:
        """The token waits for the user (touch it, or verify on it: finger, face).

        ``prompt`` is :attr:`Authorization.prompt`, else the backend's default
        text. Called at most once per operation."""

    def request_uv(self, prompt: str) -> bool:
        """The backend is about to ask the token for built-in user verification.

        Return ``False`` to refuse: the operation raises
        :class:`~hsm_auth.errors.Cancelled` before the token is asked."""
        return True


@dataclass(frozen=True)
class Authorization:
    """What the user gives to unlock the token for one operation.

    ``pin`` is a secret: it is excluded from ``repr`` and never logged.
    ``prompt`` is the text to show while the token waits for the user;
    ``interaction`` shows it (``None``: nothing is shown, nobody is asked).
    """

    pin: str | None = field(default=None, repr=False)
    prompt: str | None = None
    timeout: float | None = None
    interaction: UserInteraction | None = field(default=None, compare=False)

    @property
    def has_pin(self) -> bool:
        return self.pin is not None


NO_AUTH = Authorization()


@dataclass(frozen=True)
class KeyInfo:
    uri: str
    kind: KeyKind
    label: str


@dataclass(frozen=True)
class PinStatus:
    """What the token says about its PIN. ``None`` means the token does not report it."""

    enforced: bool  # the token itself limits retries
    retries_left: int | None = None
    final_try: bool = False
    locked: bool = False
    retry_after: float | None = None  # seconds until a locked PIN may be tried again


@dataclass(frozen=True)
class Enrollment:
    """What a backend created for one method; the authenticator records the URIs.

    Exactly one of ``agreement_public`` (the verifier derives the OTP key by
    ECDH) and ``otp_key_for_verifier`` (a key the backend cannot keep, e.g.
    FIDO2 hmac-secret output, already encrypted to the verifier) is set.
    ``agreement_key`` is ``None``: the agreement key does not outlive
    :meth:`KeyStore.agree_otp_key` (records made before issue 10 may name one).
    """

    signing_key: str
    signing_public: ec.EllipticCurvePublicKey
    otp_key: str
    counter: str
    initial_atc: int
    agreement_key: str | None = None
    agreement_public: ec.EllipticCurvePublicKey | None = None
    otp_key_for_verifier: bytes | None = field(default=None, repr=False)
    attestation: bytes | None = None
    #: HMAC-SHA256 under the new OTP key over the key-confirmation message, made in
    #: the token (``None`` when :meth:`KeyStore.enroll` was given no ``confirm``).
    confirmation: bytes | None = field(default=None, repr=False)


def check_counter_limit(current: int, limit: int | None) -> None:
    """Refuse to advance a counter at ``current`` past ``limit`` (the one owner of the
    offline-use limit test): raises ``LoginRequired(atc=current, limit=limit)``."""
    if limit is not None and current + 1 > limit:
        raise LoginRequired(atc=current, limit=limit)


class KeyStore(ABC):
    """A hardware token that holds keys and a counter for offline authentication."""

    #: Entry-point name, e.g. ``"pkcs11"``.
    name: ClassVar[str]
    #: Higher wins when a method has no configured backend.
    priority: ClassVar[float] = 0.0
    #: Methods this backend can serve, in the order it prefers them.
    methods: ClassVar[tuple[Method, ...]] = ()

    #: True where one PIN login unlocks a whole session (PKCS#11), so that callers
    #: open the store per PIN-authorized operation instead of keeping it logged in.
    pin_unlocks_session: ClassVar[bool] = False
    #: The backend keeps host-side state in the setting ``state_dir``; when it is
    #: not configured, enrollment sets it under the home's state dir (Paths.state_dir).
    uses_state_dir: ClassVar[bool] = False

    #: The ``[methods.<m>]`` settings this backend reads (besides the core's
    #: ``backend`` and ``allow_unenforced_pin``): any other key is a config error
    #: naming the known ones. ``None``: not declared, the settings go unchecked.
    setting_names: ClassVar[frozenset[str] | None] = None

    @classmethod
    def priority_for(cls, method: Method) -> float:
        """Rank among the backends that serve ``method`` (higher wins when unconfigured)."""
        return cls.priority

    # --- lifecycle --------------------------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls, settings: Settings) -> Mapping[str, str]:
        """Cheap check that the backend can run. Returns details to show
        (manufacturer, firmware, ...) or raises ``BackendUnavailable(reason)``."""

    @classmethod
    @abstractmethod
    def open(cls, settings: Settings) -> KeyStore:
        """Connect to the token named by ``settings``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection. Safe to call twice."""

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def capabilities(self) -> frozenset[Capability]: ...

    # --- keys ---------------------------------------------------------------

    @abstractmethod
    def generate_key(self, label: str, kind: KeyKind, auth: Authorization) -> str:
        """Create a non-extractable P-256 key pair (SIGNING or AGREEMENT); return its URI."""

    @abstractmethod
    def list_keys(self, auth: Authorization) -> list[KeyInfo]: ...

    @abstractmethod
    def delete_key(self, uri: str, auth: Authorization) -> None:
        """Delete a key, OTP key or counter. Deleting what is absent is not an error."""

    @abstractmethod
    def public_key(self, uri: str, auth: Authorization) -> ec.EllipticCurvePublicKey: ...

    @abstractmethod
    def sign(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        """ECDSA P-256 over SHA-256(data), inside the token. Returns a DER signature."""

    # --- OTP key ----------------------------------------------------------

    @abstractmethod
    def derive_otp_key(
        self,
        label: str,
        agreement_key: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> str:
        """ECDH between the token's agreement key and ``peer_public``; the shared
        x-coordinate becomes a non-extractable HMAC-SHA256 key in the token."""

    def agree_otp_key(
        self,
        label: str,
        peer_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
    ) -> tuple[str, ec.EllipticCurvePublicKey]:
        """Make the OTP key ``<label>/otp`` with a one-time agreement key, which is
        gone when this returns: ``(OTP key URI, the agreement key's public half)``.

        Nothing left in the token can compute the OTP key's value again (issue 10,
        finding 1). The default makes the agreement key with :meth:`generate_key`,
        derives, then deletes it; a backend that can keep it out of storage
        altogether (a PKCS#11 session object, a TPM object never written) overrides
        this. A failure deletes what this made."""
        agreement = self.generate_key(f"{label}/ecdh", KeyKind.AGREEMENT, auth)
        try:
            public = self.public_key(agreement, auth)
            otp_key = self.derive_otp_key(f"{label}/otp", agreement, peer_public, auth)
            try:
                self.delete_key(agreement, auth)
            except BaseException:
                self.roll_back([otp_key], auth)
                raise
        except BaseException:
            self.roll_back([agreement], auth)
            raise
        return otp_key, public

    @abstractmethod
    def hmac(self, uri: str, data: bytes, auth: Authorization) -> bytes:
        """HMAC-SHA256 of ``data`` with the OTP key, inside the token."""

    # --- counter ----------------------------------------------------------

    @abstractmethod
    def create_counter(self, label: str, auth: Authorization) -> str:
        """Create the ATC for one enrollment; return its URI."""

    @abstractmethod
    def counter_value(self, uri: str, auth: Authorization) -> int: ...

    @abstractmethod
    def counter_increment(self, uri: str, auth: Authorization) -> int:
        """Durably advance the counter and return the new value."""

    def counted_hmac(
        self,
        otp_key: str,
        counter: str,
        message_for: Callable[[int], bytes],
        auth: Authorization,
        *,
        limit: int | None = None,
    ) -> tuple[int, bytes]:
        """Advance the counter, then HMAC the message built for the new value.

        The counter is durable before the MAC exists, so a crash can skip a
        value but never release two OTPs for one value. When the new value
        would exceed ``limit``, raise :class:`~hsm_auth.errors.LoginRequired`
        (see :func:`check_counter_limit`) and leave the counter where it is.
        The default reads the counter first only when there is a limit; a
        backend whose increment can refuse by itself overrides this.
        """
        if limit is not None:
            check_counter_limit(self.counter_value(counter, auth), limit)
        value = self.counter_increment(counter, auth)
        return value, self.hmac(otp_key, message_for(value), auth)

    # --- methods ------------------------------------------------------------

    def require_method(self, method: Method) -> None:
        """Refuse, with a message naming what the token has, a method it cannot serve.

        The default checks the class's ``methods``; a backend with more to say (FIDO2:
        the user-verification modality) overrides it."""
        if method not in self.methods:
            served = ", ".join(m.value for m in self.methods) or "none"
            raise MechanismNotSupported(
                f"the {method.value} method (the {self.name} backend serves: {served})"
            )

    # --- PIN ----------------------------------------------------------------

    @abstractmethod
    def pin_status(self) -> PinStatus: ...

    # --- enrollment (default built on the primitives) ----------------------

    def enroll(
        self,
        method: Method,
        label: str,
        verifier_agreement_public: ec.EllipticCurvePublicKey,
        auth: Authorization,
        *,
        binding: bytes = b"",
        confirm: ConfirmationMessage | None = None,
    ) -> Enrollment:
        """Create the signing key, the OTP key and the ATC for one method.

        ``binding`` names this enrollment (offer, user, method: see
        :func:`hsm_auth.webauthn_proof.enrollment_binding`). A backend that
        cannot sign arbitrary data (FIDO2) binds its ``attestation`` to it;
        the others ignore it (the response is signed with the new key).
        ``confirm`` builds the key-confirmation message, which the token then MACs
        with the new OTP key (:attr:`Enrollment.confirmation`): proof that whoever
        answers the offer holds the agreement key.
        """
        missing = {Capability.SIGN, Capability.HMAC, Capability.ECDH_DERIVE, Capability.COUNTER}
        missing -= self.capabilities()
        if missing:
            raise MechanismNotSupported(", ".join(sorted(c.value for c in missing)))
        created: list[str] = []
        try:
            signing = self.generate_key(f"{label}/sign", KeyKind.SIGNING, auth)
            created.append(signing)
            otp_key, agreement_public = self.agree_otp_key(
                label, verifier_agreement_public, auth
            )
            created.append(otp_key)
            counter = self.create_counter(f"{label}/atc", auth)
            created.append(counter)
            signing_public = self.public_key(signing, auth)
            confirmation = None
            if confirm is not None:
                from . import ec as ecutil

                message = confirm(
                    ecutil.encode_point(signing_public), ecutil.encode_point(agreement_public)
                )
                confirmation = self.hmac(otp_key, message, auth)
            return Enrollment(
                signing_key=signing,
                signing_public=signing_public,
                otp_key=otp_key,
                counter=counter,
                initial_atc=self.counter_value(counter, auth),
                agreement_public=agreement_public,  # the agreement key itself is gone
                confirmation=confirmation,
            )
        except BaseException:  # incl. KeyboardInterrupt: nothing half-enrolled stays
            self.roll_back(created, auth)
            raise

    def unenroll(self, enrollment: Enrollment, auth: Authorization) -> None:
        """Delete everything :meth:`enroll` created (used to roll back a failed enrollment).

        Tries every key even when one fails, then raises the first error."""
        uris = [enrollment.signing_key, enrollment.otp_key, enrollment.counter]
        if enrollment.agreement_key:
            uris.append(enrollment.agreement_key)
        errors = self.roll_back(dict.fromkeys(uris), auth)
        if errors:
            raise errors[0]

    def roll_back(self, uris: Iterable[str], auth: Authorization) -> list[Exception]:
        """Delete ``uris`` (newest first), on the way out of a failed operation: an
        error deleting one does not stop the others and is returned, not raised, so
        that it never hides the error being handled. What this cannot delete (the
        process killed first) stays labelled in the token for
        :meth:`hsm_auth.authenticator.Authenticator.prune_orphans`."""
        errors: list[Exception] = []
        for uri in reversed(list(uris)):
            try:
                self.delete_key(uri, auth)
            except Exception as e:  # collected for the caller
                errors.append(e)
        return errors
