"""The verifier: enrollment offers, offline sessions, OTP checks, resync, lockout.

Every verification failure raises the same :class:`InvalidToken`; the precise
reason goes to the ``hsm_auth.verifier`` log only (never a secret or an OTP).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import ec, ocra
from .errors import (
    AlreadyEnrolled,
    ExpiredMessage,
    InvalidInput,
    InvalidToken,
    StateError,
    UnknownMethod,
)
from .files import atomic_write_json, ensure_private_dir, read_json
from .methods import Method
from .protocol import (
    MAX_CONTEXT,
    EnrollmentOffer,
    EnrollmentResponse,
    SyncMessage,
    VerificationData,
    otp_question,
)
from .store.base import CredentialRecord, OfferRecord, SessionRecord, VerifierStore
from .verifier_keys import FileVerifierKeys, VerifierKeys

log = logging.getLogger("hsm_auth.verifier")

Clock = Callable[[], float]

DEFAULT_WINDOW = 10
DEFAULT_LOCKOUT = 10
DEFAULT_RESYNC_WINDOW = 100
DEFAULT_SESSION_TTL = 300
DEFAULT_OFFER_TTL = 600
CHALLENGE_BYTES = 16  # 128 bits
SESSION_ID_BYTES = 16


@dataclass(frozen=True)
class VerifierIdentity:
    verifier_id: bytes
    name: str
    suite: str = ocra.OTP_SUITE
    window: int = DEFAULT_WINDOW
    lockout_threshold: int = DEFAULT_LOCKOUT
    resync_window: int = DEFAULT_RESYNC_WINDOW
    session_ttl: int = DEFAULT_SESSION_TTL
    offer_ttl: int = DEFAULT_OFFER_TTL

    def to_json(self) -> dict[str, object]:
        return {
            "verifier_id": self.verifier_id.hex(),
            "name": self.name,
            "suite": self.suite,
            "window": self.window,
            "lockout_threshold": self.lockout_threshold,
            "resync_window": self.resync_window,
            "session_ttl": self.session_ttl,
            "offer_ttl": self.offer_ttl,
        }

    @classmethod
    def from_json(cls, data: object) -> VerifierIdentity:
        if not isinstance(data, dict):
            raise StateError("verifier identity is not an object")
        try:
            return cls(
                verifier_id=bytes.fromhex(data["verifier_id"]),
                name=str(data["name"]),
                suite=str(data.get("suite", ocra.OTP_SUITE)),
                window=int(data.get("window", DEFAULT_WINDOW)),
                lockout_threshold=int(data.get("lockout_threshold", DEFAULT_LOCKOUT)),
                resync_window=int(data.get("resync_window", DEFAULT_RESYNC_WINDOW)),
                session_ttl=int(data.get("session_ttl", DEFAULT_SESSION_TTL)),
                offer_ttl=int(data.get("offer_ttl", DEFAULT_OFFER_TTL)),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StateError(f"verifier identity is malformed: {e.__class__.__name__}") from None


@dataclass(frozen=True)
class Session:
    """A started offline session: show ``text`` (as a QR code) to the user."""

    session_id: bytes
    data: VerificationData
    text: str


@dataclass(frozen=True)
class Acceptance:
    user: str
    method: Method
    atc: int


class Verifier:
    def __init__(
        self,
        identity: VerifierIdentity,
        keys: VerifierKeys,
        store: VerifierStore,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.identity = identity
        self.keys = keys
        self.store = store
        self._clock = clock
        self._suite = ocra.OcraSuite.parse(identity.suite)

    # --- lifecycle ----------------------------------------------------------

    @classmethod
    def init(cls, directory: Path, name: str, *, clock: Clock = time.time) -> Verifier:
        """Create a new verifier (identity, keys, database) in ``directory``."""
        ensure_private_dir(directory)
        if (directory / "identity.json").exists():
            raise StateError(f"a verifier exists already in {directory}")
        if not name or len(name) > 64:
            raise InvalidInput("verifier name must be 1 to 64 characters")
        keys = FileVerifierKeys.create(directory / "keys.pem")
        identity = VerifierIdentity(verifier_id=os.urandom(8), name=name)
        atomic_write_json(directory / "identity.json", identity.to_json())
        return cls(identity, keys, _open_store(directory), clock=clock)

    @classmethod
    def open(cls, directory: Path, *, clock: Clock = time.time) -> Verifier:
        if not (directory / "identity.json").exists():
            raise StateError(f"no verifier in {directory}; run 'hsm-auth verifier init' first")
        identity = VerifierIdentity.from_json(read_json(directory / "identity.json"))
        keys = FileVerifierKeys.load(directory / "keys.pem")
        return cls(identity, keys, _open_store(directory), clock=clock)

    def close(self) -> None:
        self.store.close()

    def _now(self) -> int:
        return int(self._clock())

    # --- enrollment ---------------------------------------------------------

    def create_offer(
        self,
        user: str,
        *,
        methods: Sequence[Method] = tuple(Method),
        replace: bool = False,
    ) -> tuple[EnrollmentOffer, str]:
        """A signed, short-lived enrollment offer for ``user``; returns it and its text form."""
        _check_user(user)
        if not methods:
            raise InvalidInput("an offer needs at least one method")
        offer = EnrollmentOffer(
            verifier_id=self.identity.verifier_id,
            verifier_name=self.identity.name,
            user=user,
            offer_id=os.urandom(16),
            verifier_signing_key=ec.encode_point(self.keys.signing_public),
            verifier_agreement_key=ec.encode_point(self.keys.agreement_public),
            suite=self.identity.suite,
            window=self.identity.window,
            methods=tuple(dict.fromkeys(methods)),
            replace=replace,
            expires=self._now() + self.identity.offer_ttl,
        )
        self.store.put_offer(
            OfferRecord(offer.offer_id, user, offer.methods, replace, offer.expires)
        )
        log.info("offer created user=%s methods=%s", user, [m.value for m in offer.methods])
        return offer, offer.to_text(self.keys.sign_raw)

    def accept_enrollment(self, text: str) -> CredentialRecord:
        """Check an enrollment response and record the credential."""
        response, signed = EnrollmentResponse.from_text(text)
        if not hmac.compare_digest(response.verifier_id, self.identity.verifier_id):
            raise InvalidInput("this enrollment response is for another verifier")
        signing_key = ec.decode_point(response.signing_key)
        if signed.signature:
            ec.verify(signing_key, signed.signature, signed.body)  # proof of possession
        elif response.attestation is None:
            raise InvalidInput("enrollment response carries neither signature nor attestation")
        offer = self.store.take_offer(response.offer_id)
        if offer is None:
            raise InvalidInput("unknown or already used enrollment offer")
        if offer.expires < self._now():
            raise ExpiredMessage("the enrollment offer has expired")
        if offer.user != response.user:
            raise InvalidInput("enrollment response is for another user")
        if response.method not in offer.methods:
            raise UnknownMethod(f"the offer does not allow the {response.method.value} method")
        if response.wrapped_otp_key is not None:
            self.keys.unwrap_otp_key(response.wrapped_otp_key)  # must decrypt now, not at login
        record = CredentialRecord(
            user=response.user,
            method=response.method,
            backend=response.backend,
            signing_key=response.signing_key,
            agreement_key=response.agreement_key,
            wrapped_otp_key=response.wrapped_otp_key,
            suite=self.identity.suite,
            atc=response.initial_atc,
            created=self._now(),
        )
        try:
            saved = self.store.save_credential(record, replace=offer.replace)
        except AlreadyEnrolled:
            log.info(
                "enrollment refused user=%s method=%s: exists", record.user, record.method.value
            )
            raise
        log.info(
            "enrolled user=%s method=%s backend=%s", saved.user, saved.method.value, saved.backend
        )
        return saved

    # --- sessions -----------------------------------------------------------

    def start_session(
        self, user: str, context: str, *, methods: Sequence[Method] | None = None
    ) -> Session:
        """Start an offline session: random challenge + context, signed, single use."""
        _check_user(user)
        if not context or len(context) > MAX_CONTEXT or any(ord(c) < 32 for c in context):
            raise InvalidInput(f"context must be 1 to {MAX_CONTEXT} printable characters")
        enrolled = {c.method for c in self.store.credentials(user)}
        if not enrolled:
            raise UnknownMethod(f"{user!r} has no enrolled method")
        wanted = tuple(methods) if methods else tuple(m for m in Method if m in enrolled)
        allowed = tuple(m for m in dict.fromkeys(wanted) if m in enrolled)
        if not allowed:
            raise UnknownMethod(f"{user!r} has none of the requested methods enrolled")
        data = VerificationData(
            verifier_id=self.identity.verifier_id,
            session_id=os.urandom(SESSION_ID_BYTES),
            challenge=os.urandom(CHALLENGE_BYTES),
            context=context,
            methods=allowed,
            expires=self._now() + self.identity.session_ttl,
        )
        self.store.put_session(
            SessionRecord(data.session_id, user, data.challenge, context, allowed, data.expires)
        )
        log.info("session started user=%s session=%s", user, data.session_id.hex())
        return Session(data.session_id, data, data.to_text(self.keys.sign_raw))

    # --- verification -------------------------------------------------------

    def _otp_key(self, cred: CredentialRecord) -> bytes:
        if cred.agreement_key is not None:
            return self.keys.shared_secret(ec.decode_point(cred.agreement_key))
        assert cred.wrapped_otp_key is not None
        return self.keys.unwrap_otp_key(cred.wrapped_otp_key)

    def _otp(self, key: bytes, atc: int, question: bytes) -> str:
        return ocra.generate(self._suite, key, counter=atc, question=question.hex())

    def _check_format(self, otp: str) -> str:
        otp = otp.strip()
        if len(otp) != self._suite.digits or not otp.isascii() or not otp.isdigit():
            raise InvalidInput(f"an OTP is {self._suite.digits} digits")
        return otp

    def _open_session(self, session_id: bytes) -> tuple[SessionRecord, list[CredentialRecord]]:
        session = self.store.session(session_id)
        if session is None:
            log.warning("refused session=%s: unknown session", session_id.hex())
            raise InvalidToken()
        if session.used:
            log.warning("refused session=%s: session already used", session_id.hex())
            raise InvalidToken()
        if session.expires < self._now():
            log.warning("refused session=%s: session expired", session_id.hex())
            raise InvalidToken()
        creds = [c for c in self.store.credentials(session.user) if c.method in session.methods]
        usable = [c for c in creds if not c.locked]
        if not usable:
            log.warning("refused session=%s user=%s: locked", session_id.hex(), session.user)
            raise InvalidToken()
        return session, usable

    def verify(self, session_id: bytes, otp: str) -> Acceptance:
        """Accept ``otp`` for the session or raise :class:`InvalidToken`."""
        otp = self._check_format(otp)
        session, creds = self._open_session(session_id)
        question = otp_question(session.challenge, session.context)
        for cred in creds:
            key = self._otp_key(cred)
            for atc in range(cred.atc + 1, cred.atc + self.identity.window + 1):
                if hmac.compare_digest(self._otp(key, atc, question), otp):
                    return self._accept(session, cred, atc)
        return self._refuse(session, creds, "no match in window")

    def resync(self, session_id: bytes, first_otp: str, second_otp: str) -> Acceptance:
        """Accept two consecutive OTPs for one session beyond the window (RFC 4226 §7.4)."""
        first, second = self._check_format(first_otp), self._check_format(second_otp)
        session, creds = self._open_session(session_id)
        question = otp_question(session.challenge, session.context)
        for cred in creds:
            key = self._otp_key(cred)
            for atc in range(cred.atc + 1, cred.atc + self.identity.resync_window + 1):
                if hmac.compare_digest(self._otp(key, atc, question), first) and (
                    hmac.compare_digest(self._otp(key, atc + 1, question), second)
                ):
                    log.info("resync user=%s method=%s", cred.user, cred.method.value)
                    return self._accept(session, cred, atc + 1)
        return self._refuse(session, creds, "resync found no consecutive pair")

    def _accept(self, session: SessionRecord, cred: CredentialRecord, atc: int) -> Acceptance:
        if not self.store.accept(session.session_id, cred.id, cred.atc, atc):
            log.warning(
                "refused session=%s: lost compare-and-swap (replay)", session.session_id.hex()
            )
            raise InvalidToken()
        log.info("accepted user=%s method=%s atc=%d", cred.user, cred.method.value, atc)
        return Acceptance(cred.user, cred.method, atc)

    def _refuse(
        self, session: SessionRecord, creds: Iterable[CredentialRecord], why: str
    ) -> Acceptance:
        ids = [c.id for c in creds]
        self.store.record_failure(ids, self.identity.lockout_threshold)
        log.warning("refused session=%s user=%s: %s", session.session_id.hex(), session.user, why)
        raise InvalidToken()

    # --- administration -----------------------------------------------------

    def credential(self, user: str, method: Method) -> CredentialRecord:
        for cred in self.store.credentials(user):
            if cred.method is method:
                return cred
        raise UnknownMethod(f"{user!r} has no {method.value} method enrolled")

    def unlock(self, user: str, method: Method) -> None:
        self.store.unlock(self.credential(user, method).id)
        log.info("unlocked user=%s method=%s", user, method.value)

    def sync_message(self, user: str, method: Method) -> str:
        """Signed message telling the authenticator which ATC the verifier has accepted."""
        cred = self.credential(user, method)
        message = SyncMessage(
            verifier_id=self.identity.verifier_id,
            user=user,
            method=method,
            atc=cred.atc,
            expires=self._now() + self.identity.offer_ttl,
        )
        return message.to_text(self.keys.sign_raw)


def _check_user(user: str) -> None:
    if not user or len(user) > 64 or any(ord(c) < 33 for c in user):
        raise InvalidInput("user name must be 1 to 64 printable characters without spaces")


def _open_store(directory: Path) -> VerifierStore:
    from .store.sqlite import SqliteStore

    return SqliteStore(directory / "verifier.db")
