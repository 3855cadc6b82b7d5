"""One exception hierarchy for the whole library, rooted at :class:`HsmAuthError`.

Messages never contain a secret (no PIN, no key, no OTP). Errors carry data as
attributes (every :class:`AuthorizationError` a :class:`RetryStatus`) and a
plain message that does not repeat it: only the CLI's ``describe()`` words the
data ("wrong PIN (1 retry left)").
"""

from __future__ import annotations

from dataclasses import dataclass, replace


class HsmAuthError(Exception):
    """Root of every error raised by hsm-auth."""

    #: CLI exit code for this family (documented in ``hsm-auth --help``).
    exit_code: int = 1


# --- input ----------------------------------------------------------------


class InvalidInput(HsmAuthError):
    """Input that cannot be used: malformed, unknown, out of range."""

    exit_code = 2


class DecodeError(InvalidInput):
    """Bytes or text that do not decode to a protocol message."""

    exit_code = 3


class UnsupportedVersion(DecodeError):
    """A protocol message of a version this library does not speak."""

    exit_code = 4


class ExpiredMessage(InvalidInput):
    """A protocol message (offer, verification data) past its expiry."""

    exit_code = 5


class UntrustedMessage(InvalidInput):
    """A protocol message whose signature does not check or whose signer is unknown."""

    exit_code = 6


class UnknownMethod(InvalidInput):
    """A method name that does not exist, is not enrolled, or is not allowed."""

    exit_code = 7


class ConfigError(InvalidInput):
    """Configuration that is missing or inconsistent."""

    exit_code = 8


class AlreadyEnrolled(InvalidInput):
    """The method is enrolled already; replacing it needs an explicit replace."""

    exit_code = 9


#: The one line both sides say for an expired credential (docs/PROTOCOL.md §20): the
#: authenticator at start / finish / sync, the verifier at session start, verify and
#: sync. ``{method}`` is the method's name, ``{date}`` the expiry in UTC.
CREDENTIAL_EXPIRED = (
    "the {method} credential expired on {date}; re-activate online (hsm-auth renew)"
)


class CredentialExpired(ExpiredMessage):
    """An offline credential past its expiry (``offline_validity`` of the verifier's
    policy): offline use stops until it is renewed online. ``method`` is the method's
    name and ``expires`` the Unix time it expired at; the message is
    :data:`CREDENTIAL_EXPIRED`, the same on both sides."""

    exit_code = 38

    def __init__(self, method: str, expires: int) -> None:
        import time

        date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        super().__init__(CREDENTIAL_EXPIRED.format(method=method, date=date))
        self.method = method
        self.expires = expires


class StateError(HsmAuthError):
    """Local state (credential file, database) missing, unreadable or unsafe."""

    exit_code = 10


# --- backends -------------------------------------------------------------


class BackendError(HsmAuthError):
    """A token or its library failed. ``native_code`` keeps the library's own code."""

    exit_code = 20

    def __init__(self, message: str, *, native_code: int | str | None = None) -> None:
        super().__init__(message)
        self.native_code = native_code


class BackendUnavailable(BackendError):
    """A backend cannot run here; ``reason`` says why (missing library, no device, ...)."""

    exit_code = 21

    def __init__(self, reason: str, *, native_code: int | str | None = None) -> None:
        super().__init__(reason, native_code=native_code)
        self.reason = reason


class TokenNotFound(BackendUnavailable):
    """The configured token, TPM or authenticator is absent."""

    exit_code = 22


class KeyNotFound(BackendError):
    """A key, counter or credential named by a URI is not in the token."""

    exit_code = 23


class MechanismNotSupported(BackendError):
    """The token lacks a mechanism that the method needs; ``mechanism`` names it."""

    exit_code = 24

    def __init__(self, mechanism: str, *, native_code: int | str | None = None) -> None:
        super().__init__(
            f"the token does not support {mechanism}, which this method needs",
            native_code=native_code,
        )
        self.mechanism = mechanism


class CounterError(BackendError):
    """The application transaction counter cannot be read or advanced safely."""

    exit_code = 25


# --- authorization --------------------------------------------------------


@dataclass(frozen=True)
class RetryStatus:
    """What a token said about further tries, carried by every :class:`AuthorizationError`.

    ``retries_left`` is ``None`` where the token does not say; ``retry_after`` is the
    number of seconds until a locked PIN / UV may be tried again, where known;
    ``locked`` is true once the token refuses every try (PIN blocked, lockout).
    The CLI turns these into words; messages do not repeat them.
    """

    retries_left: int | None = None
    retry_after: float | None = None
    locked: bool = False

    @property
    def final_try(self) -> bool:
        """The next wrong try locks the PIN (or the user verification)."""
        return self.retries_left == 1 and not self.locked


#: The status of an error whose token said nothing about retries.
UNKNOWN_RETRIES = RetryStatus()


class AuthorizationError(HsmAuthError):
    """The user could not be authorized by the token (PIN, user verification).

    ``retry`` says what the token reported about further tries (all ``None`` /
    false where it said nothing); ``native_code`` keeps the token's own code.
    """

    exit_code = 30
    default_message = "authorization failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry: RetryStatus = UNKNOWN_RETRIES,
        native_code: int | str | None = None,
    ) -> None:
        super().__init__(message if message is not None else self.default_message)
        self.retry = retry
        self.native_code = native_code


class PinRequired(AuthorizationError):
    """The operation needs a PIN and none was given."""

    exit_code = 31
    default_message = "a PIN is needed"


class PinInvalid(AuthorizationError):
    """Wrong PIN; ``retry.retries_left`` is ``None`` where the token does not say."""

    exit_code = 32
    default_message = "wrong PIN"


class PinLocked(AuthorizationError):
    """The PIN (or the TPM's dictionary-attack protection) is locked.

    ``retry.locked`` is always true; ``retry.retry_after`` is set where the lock ends
    by itself (TPM lockout recovery)."""

    exit_code = 33
    default_message = "PIN locked"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry: RetryStatus = UNKNOWN_RETRIES,
        native_code: int | str | None = None,
    ) -> None:
        super().__init__(message, retry=replace(retry, locked=True), native_code=native_code)


class LockedOut(AuthorizationError):
    """The token refuses every authorization for now, whatever the method: a TPM in
    dictionary-attack lockout, which wrong PINs on any of its keys cause (it is
    TPM-wide), reached through a key that has no PIN of its own.

    ``retry.locked`` is always true; ``retry.retry_after`` is set where the lockout
    ends by itself."""

    exit_code = 37
    default_message = "the token is locked out"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry: RetryStatus = UNKNOWN_RETRIES,
        native_code: int | str | None = None,
    ) -> None:
        super().__init__(message, retry=replace(retry, locked=True), native_code=native_code)


class UserVerificationFailed(AuthorizationError):
    """FIDO2 user verification (fingerprint, face) failed, was refused or is blocked."""

    exit_code = 34
    default_message = "user verification failed"


class Cancelled(AuthorizationError):
    """The user cancelled, or the token timed out waiting for the user."""

    exit_code = 35
    default_message = "cancelled"


class LoginRequired(AuthorizationError):
    """Offline use is exhausted: the user must log in online (sync) first.

    ``atc`` is the counter's value, which stayed where it was, and ``limit`` the
    highest value offline use may reach (``None`` where not known)."""

    exit_code = 36

    def __init__(
        self,
        message: str = "offline use is exhausted; log in online first",
        *,
        atc: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.atc = atc
        self.limit = limit


# --- verification ---------------------------------------------------------


class InvalidToken(HsmAuthError):
    """Every verification failure. The precise reason goes to the log, never to the caller."""

    exit_code = 40

    def __init__(self, message: str = "verification failed") -> None:
        super().__init__(message)
