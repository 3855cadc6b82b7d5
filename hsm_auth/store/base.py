"""The verifier store interface.

The store holds no usable secret: public keys, counters, sessions, and OTP keys
only as ciphertext for the verifier's own key. Every state change that guards
against replay is atomic: :meth:`VerifierStore.accept` is a compare-and-swap of
the stored ATC together with burning the session.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType

from ..methods import Method


@dataclass(frozen=True)
class OfferRecord:
    offer_id: bytes
    user: str
    methods: tuple[Method, ...]
    replace: bool
    expires: int


@dataclass(frozen=True)
class CredentialRecord:
    user: str
    method: Method
    backend: str
    signing_key: bytes
    agreement_key: bytes | None
    wrapped_otp_key: bytes | None = field(repr=False)
    suite: str
    atc: int
    created: int
    failures: int = 0
    locked: bool = False
    id: int = 0


@dataclass(frozen=True)
class SessionRecord:
    session_id: bytes
    user: str
    challenge: bytes
    context: str
    methods: tuple[Method, ...]
    expires: int
    used: bool = False


class VerifierStore(ABC):
    # --- offers -------------------------------------------------------------
    @abstractmethod
    def put_offer(self, offer: OfferRecord) -> None: ...

    @abstractmethod
    def take_offer(self, offer_id: bytes) -> OfferRecord | None:
        """Atomically consume an offer; ``None`` if unknown or already used."""

    # --- credentials --------------------------------------------------------
    @abstractmethod
    def save_credential(self, record: CredentialRecord, *, replace: bool) -> CredentialRecord:
        """Insert (or, with ``replace``, overwrite) the credential of (user, method).
        Raises AlreadyEnrolled when it exists and ``replace`` is false."""

    @abstractmethod
    def credentials(self, user: str) -> list[CredentialRecord]: ...

    @abstractmethod
    def all_credentials(self) -> list[CredentialRecord]: ...

    # --- sessions -----------------------------------------------------------
    @abstractmethod
    def put_session(self, session: SessionRecord) -> None: ...

    @abstractmethod
    def session(self, session_id: bytes) -> SessionRecord | None: ...

    # --- counters and lockout -----------------------------------------------
    @abstractmethod
    def accept(self, session_id: bytes, credential_id: int, old_atc: int, new_atc: int) -> bool:
        """In one durable transaction: burn the unused session and move the ATC from
        ``old_atc`` to ``new_atc`` (resetting failures). False, changing nothing, if the
        session was used or the ATC was no longer ``old_atc`` (another worker won)."""

    @abstractmethod
    def record_failure(self, credential_ids: list[int], lock_after: int) -> None:
        """Count one consecutive failure against each credential; lock at ``lock_after``."""

    @abstractmethod
    def unlock(self, credential_id: int) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> VerifierStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
