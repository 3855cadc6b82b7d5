"""The verifier: enrollment offers, offline sessions, OTP checks, resync, lockout.

Every verification failure raises the same :class:`InvalidToken`; the precise
reason goes to the audit trail only (a reason code, never a secret or an OTP):
the store's ``audit`` table, written in the same transaction as the state
change, and JSON lines on the ``hsm_auth.audit`` logger.

Storage is any :class:`~hsm_auth.store.VerifierStore`: the embedded SQLite file
in the verifier's directory by default, or PostgreSQL (``database=
"postgresql://…"``) for many worker processes. Keys are a key file in the
directory, or a PKCS#11 HSM (``hsm="pkcs11:…"``), see :mod:`hsm_auth.verifier_keys`:
each offer gets its own agreement key (:meth:`Verifier.create_offer`), which
:meth:`Verifier.accept_enrollment` uses once to seal the new credential's OTP key
before it is destroyed; :meth:`Verifier.purge` destroys those of used or expired
offers that a crash left behind.

Throughput: :meth:`Verifier.verify_many` checks a batch of (session, OTP)
pairs and commits all their counter changes in **one** durable transaction
(group commit). Each result is returned only after that commit, so an
acceptance is on disk before it is reported; :meth:`Verifier.verify` is a
batch of one.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import activation, attestation, audit, display, ec, enrollments, expiry, ocra, transcript
from . import transaction as transaction_data
from .attestation import VerifierPolicy
from .audit import AuditRecord, Event, Reason
from .enrollment_messages import EnrollmentOffer, EnrollmentResponse, EnrollmentResult
from .errors import (
    AlreadyEnrolled,
    ConfigError,
    CredentialExpired,
    DecodeError,
    HsmAuthError,
    InvalidInput,
    InvalidToken,
    StateError,
    UnknownMethod,
    UntrustedMessage,
)
from .files import atomic_write_json, check_state, ensure_private_dir, read_json, state_int
from .methods import Method
from .otp_scheme import MAX_DIGITS, MIN_DIGITS, OtpScheme
from .protocol import MAX_CONTEXT, VerificationData
from .protocol import (
    VERSION as PROTOCOL_VERSION,
)
from .store import open_store
from .store.base import (
    MAX_ATC,
    Accept,
    Change,
    CredentialRecord,
    Failure,
    Note,
    OfferRecord,
    SessionRecord,
    Status,
    VerifierStore,
)
from .sync_messages import AtcAck, SyncMessage, SyncReport
from .verifier_keys import FileVerifierKeys, VerifierKeys, create_keys, load_keys

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger("hsm_auth.verifier")

Clock = Callable[[], float]

DEFAULT_WINDOW = 10
DEFAULT_LOCKOUT = 10
DEFAULT_RESYNC_WINDOW = 100
DEFAULT_SESSION_TTL = 300
DEFAULT_OFFER_TTL = 600
CHALLENGE_BYTES = 16  # 128 bits
SESSION_ID_BYTES = 16
#: How often a check whose compare-and-swap lost to a concurrent counter change is re-run.
MAX_ROUNDS = 4
SQLITE_FILE = "verifier.db"
#: The context of a sync session: a control character, which no session started
#: by :meth:`Verifier.start_session` can have, so it is told apart without a column.
SYNC_CONTEXT = "\x1esync"
#: Expired sessions and offers are kept this long (seconds) before they are purged,
#: so that a late attempt is still audited as "expired", not "unknown".
PURGE_GRACE = 3600
#: One in PURGE_EVERY session or offer writes also purges: an indexed DELETE now
#: and then, with no scheduler to run, keeps the tables at about (write rate) x
#: (lifetime + grace). ``hsm-auth verifier purge`` does it on demand.
PURGE_EVERY = 64


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
    #: Wrong activation codes after which an offer is burned.
    activation_tries: int = activation.DEFAULT_TRIES

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
            "activation_tries": self.activation_tries,
        }

    @classmethod
    def from_json(cls, data: object) -> VerifierIdentity:
        if not isinstance(data, dict):
            raise StateError("verifier identity is not an object")

        def bounded(key: str, default: int, lo: int, hi: int) -> int:  # only an edit is outside
            return state_int(data, key, default, lo, hi, "the verifier identity (identity.json)")

        try:
            return cls(
                verifier_id=bytes.fromhex(data["verifier_id"]),
                name=str(data["name"]),
                suite=str(data.get("suite", ocra.OTP_SUITE)),
                window=bounded("window", DEFAULT_WINDOW, 1, 1000),
                lockout_threshold=bounded("lockout_threshold", DEFAULT_LOCKOUT, 1, 100),
                resync_window=bounded("resync_window", DEFAULT_RESYNC_WINDOW, 1, 10_000),
                session_ttl=bounded("session_ttl", DEFAULT_SESSION_TTL, 10, 86_400),
                offer_ttl=bounded("offer_ttl", DEFAULT_OFFER_TTL, 10, 30 * 86_400),
                activation_tries=bounded("activation_tries", activation.DEFAULT_TRIES, 1, 100),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StateError(f"verifier identity is malformed: {e.__class__.__name__}") from None


@dataclass(frozen=True)
class IssuedOffer:
    """What :meth:`Verifier.create_offer` returns: the offer, its text form (for the
    authenticator), and its one-time activation code, which the user must receive over
    the verifier's own authenticated channel, never with the offer (a secret: not in
    the repr)."""

    offer: EnrollmentOffer
    text: str
    activation_code: str = field(repr=False)


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
    #: The credential that answered: its label and protocol credential id.
    label: str = ""
    credential_id: bytes = b""


@dataclass(frozen=True)
class Renewal:
    """What :meth:`Verifier.renew` did: the renewed credential (its new ``expires`` and
    certificate) and the EnrollmentResult text that states them."""

    credential: CredentialRecord
    result: str


@dataclass(frozen=True)
class SyncAcceptance(Acceptance):
    """An applied ATC report (:meth:`Verifier.apply_sync`): the credential's new ATC
    and the signed acknowledgement (:class:`~hsm_auth.sync_messages.AtcAck`, text
    form) to give the authenticator; ``credential_id`` (and ``label``) name the
    credential (:class:`Acceptance`)."""

    ack: str = field(default="", repr=False)


@dataclass(frozen=True)
class UserState:
    """What ``hsm-auth verifier show`` prints: counters, lockout, recent audit."""

    user: str
    credentials: tuple[CredentialRecord, ...]
    recent: tuple[AuditRecord, ...]


@dataclass(frozen=True)
class _Request:
    index: int
    session_id: bytes
    otps: tuple[str, ...]  # one OTP, or two consecutive ones for a resync
    data: str | None = None  # what the user entered (docs/PROTOCOL.md §17), as submitted


@dataclass(frozen=True)
class _BadData(Note):
    """Data that does not fit the session's ``user_data``: only an audit record, and the
    caller is told InvalidInput (malformed input, not a failed attempt). The message
    names the problem, never the data."""

    message: str = ""

    def error(self) -> InvalidInput:
        return InvalidInput(self.message)


@dataclass(frozen=True)
class _Expired(Note):
    """A refusal of an expired credential: only an audit record, and the caller is told
    :class:`CredentialExpired` (the advice to renew), not InvalidToken."""

    method: Method = Method.DEVICE
    expires: int = 0

    def error(self) -> CredentialExpired:
        return CredentialExpired(self.method.value, self.expires)


def _expired_note(base: AuditRecord, cred: CredentialRecord) -> _Expired:
    record = dataclasses.replace(
        base.refused(Reason.EXPIRED), method=cred.method.value, detail=str(cred.expires)
    )
    return _Expired(record, cred.method, cred.expires)


Result = Acceptance | HsmAuthError


class Verifier:
    def __init__(
        self,
        identity: VerifierIdentity,
        keys: VerifierKeys,
        store: VerifierStore,
        *,
        clock: Clock = time.time,
        policy: VerifierPolicy | None = None,
        directory: Path | None = None,
    ) -> None:
        """``directory`` holds the device CA certificate (``ca.pem``); without one, a
        CA certificate for the keys' CA key is made in memory when first needed."""
        self.identity = identity
        self.keys = keys
        self.store = store
        #: Attestation per method and re-enrollment (``policy.toml``, :mod:`hsm_auth.attestation`).
        self.policy = policy or VerifierPolicy.default()
        self.directory = directory
        self._clock = clock
        self._ca_certificate: x509.Certificate | None = None
        self.purge_every = PURGE_EVERY  # 0: never purge on write

    # --- lifecycle ----------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        name: str,
        *,
        clock: Clock = time.time,
        database: str | None = None,
        hsm: str | None = None,
    ) -> Verifier:
        """Create a new verifier in ``directory``: identity, keys (a 0600 key file, or
        key pairs generated in the PKCS#11 token ``hsm``) and the database schema
        (SQLite in ``directory``, or the PostgreSQL ``database`` DSN)."""
        ensure_private_dir(directory)
        if (directory / "identity.json").exists():
            raise StateError(f"a verifier exists already in {directory}")
        display.check(name, "the verifier name", max_len=display.MAX_NAME)
        store = _open_store(directory, database)
        try:
            keys: VerifierKeys
            spec: dict[str, Any] = {}
            if hsm:
                hsm_keys = create_keys("pkcs11", hsm)
                keys, spec["keys"] = hsm_keys, hsm_keys.to_json()
            else:
                keys = FileVerifierKeys.create(directory / "keys.pem")
        except BaseException:
            store.close()
            raise
        identity = VerifierIdentity(verifier_id=os.urandom(8), name=name)
        spec["store"] = {"engine": store.engine}
        try:
            from . import device_ca

            ca = device_ca.create_ca_certificate(
                directory, keys, identity.name, identity.verifier_id, clock()
            )
        except BaseException:
            store.close()
            keys.close()
            raise
        atomic_write_json(directory / "identity.json", {**identity.to_json(), **spec})
        log.info("verifier created engine=%s keys=%s", store.engine, keys.kind)
        verifier = cls(identity, keys, store, clock=clock, policy=VerifierPolicy.load(directory),
                       directory=directory)
        verifier._ca_certificate = ca
        return verifier

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        clock: Clock = time.time,
        database: str | None = None,
        hsm: str | None = None,
    ) -> Verifier:
        """Open the verifier in ``directory``. ``database`` is required when it was
        created on PostgreSQL (a DSN may carry a password, so it is not stored);
        ``hsm`` overrides the token URI recorded at init (e.g. another PIN file)."""
        check_state(directory, directory=True, missing_ok=True)
        if not (directory / "identity.json").exists():
            raise StateError(f"no verifier in {directory}; run 'hsm-auth verifier init' first")
        raw = read_json(directory / "identity.json")
        identity = VerifierIdentity.from_json(raw)
        engine = (raw.get("store") or {}).get("engine", "sqlite")
        if engine != "sqlite" and not database:
            raise ConfigError(
                f"this verifier's database is {engine}: give its DSN "
                "(--db, [verifier] database, or HSM_AUTH_VERIFIER_DATABASE)"
            )
        keys = load_keys(directory, raw.get("keys"), hsm)
        try:
            store = _open_store(directory, database)
        except BaseException:
            keys.close()
            raise
        if store.engine != engine:
            store.close()
            keys.close()
            raise ConfigError(f"this verifier was created on {engine}, not {store.engine}")
        return cls(identity, keys, store, clock=clock, policy=VerifierPolicy.load(directory),
                   directory=directory)

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self.keys.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _now(self) -> int:
        return int(self._clock())

    # --- enrollment ---------------------------------------------------------

    def create_offer(
        self,
        user: str,
        *,
        methods: Sequence[Method] = tuple(Method),
        replace: bool = False,
        tenant: str | None = None,
        label: str | None = None,
    ) -> IssuedOffer:
        """A signed, short-lived enrollment offer for ``user`` (of ``tenant``): the offer,
        its text form and its one-time activation code (docs/PROTOCOL.md, "Activation").
        An offer that may replace an enrolled method needs the policy's ``allow_override``.

        ``label`` names the credential it makes ("yubikey-backup"), unique per (tenant,
        user): an offer with a new label adds a credential (another token for a method
        enrolled already, each with its own ATC and lockout); with ``replace`` it
        replaces the credential of that label. Without a label the offer is for the
        method's first credential (labelled with the method's name), or replaces its
        only one (:meth:`VerifierStore.save_credential`)."""
        _check_user(user)
        tenant_name = enrollments.check_tenant(tenant)
        if label is not None:
            enrollments.check_label(label)
        if not methods:
            raise InvalidInput("an offer needs at least one method")
        if replace and not self.policy.allow_override:
            raise ConfigError(
                "this verifier does not allow re-enrolling a method (set allow_override = "
                "true in its policy.toml to make offers that replace one)"
            )
        # identity.json may come from a version that did not check the name.
        name = self.identity.name
        display.check(name, "the verifier name (identity.json)", max_len=display.MAX_NAME)
        OtpScheme.for_suite(self.identity.suite)  # identity.json's suite: one tokens can feed
        # What accept_enrollment will refuse without replace: the authenticator
        # refuses it before creating keys that would be left over.
        enrolled = self._enrolled_for_offer(user, tenant_name, label, replace, methods)
        offer_id, expires = os.urandom(16), self._now() + self.identity.offer_ttl
        # A fresh agreement key for this offer only (verifier_keys: one job each).
        agreement = self.keys.offer_key(offer_id, expires)
        try:
            offer = EnrollmentOffer(
                verifier_id=self.identity.verifier_id,
                verifier_name=self.identity.name,
                user=user,
                offer_id=offer_id,
                verifier_signing_key=ec.encode_point(self.keys.signing_public),
                verifier_agreement_key=ec.encode_point(agreement),
                suite=self.identity.suite,
                window=self.identity.window,
                methods=tuple(dict.fromkeys(methods)),
                replace=replace,
                expires=expires,
                enrolled=enrolled,
                tenant=tenant_name or None,
            )
            text = offer.to_text(self.keys.sign_raw)
            code = self.keys.activation_code(offer_id)
            record = AuditRecord(
                self._now(),
                Event.OFFER,
                user,
                ",".join(m.value for m in offer.methods),
                detail="replace" if replace else None,
            )
            self.store.put_offer(
                OfferRecord(
                    offer.offer_id,
                    user,
                    offer.methods,
                    replace,
                    offer.expires,
                    offer.suite,
                    transcript.offer_hash(offer.body()),
                    tenant=tenant_name,
                    label=label,
                ),
                record,
            )
        except BaseException:
            self.keys.drop_offer_key(offer_id)  # no offer will ever name it
            raise
        audit.emit([record])
        self._purge_now_and_then()
        return IssuedOffer(offer, text, code)

    def _enrolled_for_offer(
        self, user: str, tenant: str, label: str | None, replace: bool, methods: Sequence[Method]
    ) -> tuple[Method, ...]:
        """The offer's ``enrolled`` field: the methods whose enrollment the verifier would
        refuse without ``replace`` (the authenticator refuses them before making keys).
        A label in use is refused here already (unless the offer replaces it)."""
        creds = [c for c in self.store.credentials(user) if c.tenant == tenant]
        if label is None:
            return tuple(dict.fromkeys(c.method for c in creds))
        named = next((c for c in creds if c.label == label), None)
        if named is None:
            return ()
        if not replace:
            raise AlreadyEnrolled(f"{user!r} has a credential labelled {label!r} already")
        if named.method not in methods:
            raise InvalidInput(
                f"the label {label!r} names {user!r}'s {named.method.value} credential"
            )
        return ()

    def accept_enrollment(self, text: str) -> CredentialRecord:
        """Check an enrollment response and record the credential."""
        response, signed = EnrollmentResponse.from_text(text)
        if not hmac.compare_digest(response.verifier_id, self.identity.verifier_id):
            raise InvalidInput("this enrollment response is for another verifier")
        # Refuse a suite no token can feed. The store records the suite the offer
        # named (the one the authenticator enrolled with), which the credential keeps.
        suite = OtpScheme.for_suite(self.identity.suite).text
        signing_key = ec.decode_point(response.signing_key)
        if signed.signature:
            ec.verify(signing_key, signed.signature, signed.body)  # proof of possession
        offer = self._check_activation(response)
        # FIDO2 (unsigned): attestation + assertion bound to this offer, user, method and
        # OTP key; every backend: what the method's policy asks of the attestation.
        try:
            verified = attestation.check(
                response.attestation,
                attestation.EnrollmentContext(
                    offer_id=response.offer_id,
                    user=response.user,
                    method=response.method,
                    signing_key=response.signing_key,
                    wrapped_otp_key=response.wrapped_otp_key,
                    initial_atc=response.initial_atc,
                    signed=bool(signed.signature),
                    verifier_signing_key=ec.encode_point(self.keys.signing_public),
                ),
                self.policy.for_method(response.method),
            )
        except attestation.AttestationRefused as e:
            self._refuse_enrollment(response, Reason.ATTESTATION, str(e))
            raise
        if response.agreement_key is None and response.wrapped_otp_key is None:
            raise InvalidInput("enrollment response carries no OTP key agreement")
        if response.agreement_key is not None:
            ec.decode_point(response.agreement_key)
        if not 0 <= response.initial_atc <= MAX_ATC - self.identity.resync_window - 1:
            raise InvalidInput("the initial ATC is out of range")
        assert offer.offer_hash is not None  # _check_activation refuses an old offer
        record = CredentialRecord(
            user=response.user,
            method=response.method,
            backend=response.backend,
            signing_key=response.signing_key,
            agreement_key=response.agreement_key,
            wrapped_otp_key=response.wrapped_otp_key if response.agreement_key is None else None,
            suite=suite,
            atc=response.initial_atc,
            created=self._now(),
            attestation=verified.to_json(),
            expires=self.policy.offline_validity.expires(self._now()),
        )
        # The offer's agreement key makes the OTP key and it is sealed at once; the key
        # confirmation is checked with the sealed key, before anything is recorded.
        record = self._seal(response.offer_id, record)
        self._check_confirmation(response, offer.offer_hash, record)
        # The device certificate, saved with the credential in the redeeming transaction.
        record = dataclasses.replace(record, certificate=self._certify(record, verified))
        entry = AuditRecord(
            self._now(),
            Event.ENROLL,
            record.user,
            record.method.value,
            atc=record.atc,
            detail=record.backend[:40] if offer.label is None else
            f"{offer.label} ({record.backend[:40]})",
        )
        try:
            # One transaction: the offer is burned exactly when the credential is saved.
            saved = self.store.redeem_offer(response.offer_id, record, now=self._now(), audit=entry)
        except AlreadyEnrolled:
            self._refuse_enrollment(response, Reason.ALREADY_ENROLLED)
            raise
        audit.emit([entry])
        # The offer is used: its agreement key goes. A kill before this line leaves
        # it to purge(), which destroys the key of every offer used or expired.
        try:
            self.keys.drop_offer_key(response.offer_id)
        except HsmAuthError as e:  # the enrollment is on disk: do not fail it
            log.warning("destroying the agreement key of a used offer failed: %s", e)
        return saved

    # --- the device CA (hsm_auth.device_ca) ----------------------------------------

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The device CA's self-signed certificate (``ca.pem``; ``verifier ca-cert``)."""
        if self._ca_certificate is None:
            from . import device_ca

            self._ca_certificate = device_ca.load_ca_certificate(
                self.directory, self.keys, self.identity.name, self.identity.verifier_id,
                self._now(),
            )
        return self._ca_certificate

    def _certify(
        self, record: CredentialRecord, verified: attestation.AttestationResult
    ) -> bytes:
        """The DER certificate the device CA issues for ``record``'s signing key."""
        from . import device_ca

        return device_ca.issue(
            self.keys,
            self.ca_certificate,
            user=record.user,
            method=record.method,
            signing_key=record.signing_key,
            attestation=verified,
            now=self._now(),
            expires=record.expires,
        )

    def enrollment_result(self, credential: CredentialRecord) -> str:
        """The signed :class:`EnrollmentResult` text for the authenticator that enrolled
        ``credential`` (what :meth:`accept_enrollment` returned): its certificate, the CA
        certificate, the attestation summary and the policy's ``pin_cache`` for the
        method (how long the authenticator may hold it unlocked, :mod:`hsm_auth.unlocked`)."""
        if credential.certificate is None:
            raise StateError(
                f"{credential.user!r}'s {credential.method.value} method has no certificate "
                "(enrolled before the device CA): enroll it again"
            )
        from cryptography.hazmat.primitives import serialization

        result = (
            attestation.AttestationResult.from_json(credential.attestation)
            if credential.attestation is not None
            else attestation.AttestationResult("unknown", False)
        )
        shown = result.summary
        if display.problem(shown, max_len=MAX_CONTEXT) is not None:  # a client-chosen fmt
            shown = "verified" if result.verified else "not verified"
        return EnrollmentResult(
            verifier_id=self.identity.verifier_id,
            user=credential.user,
            method=credential.method,
            credential_id=transcript.credential_id(credential.signing_key),
            certificate=credential.certificate,
            ca_certificate=self.ca_certificate.public_bytes(serialization.Encoding.DER),
            attestation=shown,
            offline_expires=credential.expires,  # hsm_auth.expiry: 0 = never
            pin_cache=self.policy.pin_cache_for(credential.method),  # [offline.<m>] pin_cache
        ).to_text(self.keys.sign_raw)

    # --- renewal (hsm_auth.expiry, docs/PROTOCOL.md §20) -----------------------------

    def renew(self, credential: CredentialRecord) -> Renewal:
        """Renew ``credential``'s offline use: a new expiry from now (the policy's
        ``[offline] validity_days``), a new device certificate stating it, both saved
        in one transaction with the audit record; returns the renewed credential and
        the signed :class:`EnrollmentResult` text for the authenticator
        (:meth:`Authenticator.store_result` takes it for the same credential).

        The caller has authenticated the credential (a request signed by it, the
        online service's ``POST /v1/device/renewal``); expired or not, it may renew.
        A locked credential, or one enrolled with an older protocol, may not."""
        if credential.locked:
            raise InvalidInput(
                f"the {credential.method.value} credential is locked; it cannot be renewed "
                "before the verifier unlocks it"
            )
        if not _current(credential):
            raise UnknownMethod(
                f"the {credential.method.value} credential was enrolled with an older "
                "protocol; enroll it again"
            )
        now = self._now()
        expires = self.policy.offline_validity.expires(now)
        verified = (
            attestation.AttestationResult.from_json(credential.attestation)
            if credential.attestation is not None
            else attestation.AttestationResult("unknown", False)
        )
        renewed = dataclasses.replace(credential, expires=expires)
        renewed = dataclasses.replace(renewed, certificate=self._certify(renewed, verified))
        assert renewed.certificate is not None
        record = AuditRecord(
            now, Event.RENEW, credential.user, credential.method.value,
            detail=str(expires) if expires else "never",
        )
        if not self.store.renew(
            credential.id, expires=expires, certificate=renewed.certificate, audit=record
        ):
            raise UnknownMethod(
                f"{credential.user!r} has no such {credential.method.value} credential"
            )
        audit.emit([record])
        return Renewal(renewed, self.enrollment_result(renewed))

    def _refuse_enrollment(
        self, response: EnrollmentResponse, reason: Reason, detail: str | None = None
    ) -> None:
        """Audit a refused enrollment response (its claimed user and method)."""
        refused = AuditRecord(
            self._now(), Event.ENROLL_REFUSED, response.user, response.method.value,
            reason=reason, detail=None if detail is None else detail[:200],
        )
        self.store.apply([Note(refused)])
        audit.emit([refused])

    def _check_activation(self, response: EnrollmentResponse) -> OfferRecord:
        """The response's offer, if its activation MAC is right (docs/PROTOCOL.md,
        "Activation"): HMAC over the enrollment transcript keyed from the offer's
        activation code, compared in constant time. A wrong or missing one is counted
        for the offer and audited ("n of limit"); at the limit the offer is burned and
        its agreement key destroyed."""
        offer = self.store.offer(response.offer_id)
        if offer is None:
            raise InvalidInput("unknown or already used enrollment offer")
        if offer.offer_hash is None:
            raise InvalidInput("the offer was made by an older hsm-auth; make a new offer")
        key_agreement = response.agreement_key or response.wrapped_otp_key
        assert key_agreement is not None  # the decoder requires one of them
        t = transcript.enrollment_transcript(
            offer_hash=offer.offer_hash,
            user=response.user,
            method=response.method,
            signing_key=response.signing_key,
            key_agreement=key_agreement,
        )
        code = self.keys.activation_code(offer.offer_id)
        expected = activation.activation_mac(code, offer.offer_hash, t)
        if activation.check_mac(expected, response.activation_mac):
            return offer
        limit = self.identity.activation_tries
        failed = self.store.fail_activation(
            offer.offer_id,
            limit=limit,
            record=AuditRecord(
                self._now(),
                Event.ENROLL_REFUSED,
                offer.user,
                response.method.value,
                reason=Reason.ACTIVATION,
            ),
        )
        if failed is None:  # used meanwhile (redeemed, or burned by another try)
            raise InvalidInput("unknown or already used enrollment offer")
        audit.emit(failed.records)
        what = (
            "the enrollment response has no activation code MAC"
            if response.activation_mac is None
            else "the activation code is wrong"
        )
        if failed.burned:
            try:
                self.keys.drop_offer_key(offer.offer_id)
            except HsmAuthError as e:  # purge() destroys it later
                log.warning("destroying the agreement key of a burned offer failed: %s", e)
            raise activation.ActivationRefused(
                f"{what} ({failed.tries} of {limit} tries): the offer is burned; "
                "make a new offer",
                tries=failed.tries,
                limit=limit,
                burned=True,
            )
        raise activation.ActivationRefused(
            f"{what} ({failed.tries} of {limit} tries; the offer is burned at {limit})",
            tries=failed.tries,
            limit=limit,
            burned=False,
        )

    def _seal(self, offer_id: bytes, record: CredentialRecord) -> CredentialRecord:
        """``record`` with its OTP key sealed by the offer's agreement key
        (:meth:`VerifierKeys.seal`); without one if a FIDO2 wrapped key does not open
        under that key, which the key confirmation then refuses."""
        try:
            return dataclasses.replace(record, sealed_otp_key=self.keys.seal(offer_id, record))
        except DecodeError:
            return record

    def _check_confirmation(
        self, response: EnrollmentResponse, offer_hash: bytes, record: CredentialRecord
    ) -> None:
        """Key confirmation (docs/PROTOCOL.md): the token MACed the enrollment transcript
        with the OTP key the offer's agreement key made of ``record``'s key agreement
        (checked with ``record``'s sealed key). Whoever answers without holding the
        agreement key (someone else's public key, a swapped wrapped key) fails here,
        before anything is recorded."""
        key_agreement = response.agreement_key or response.wrapped_otp_key
        assert key_agreement is not None  # the decoder requires one of them
        message = transcript.confirmation_message(
            transcript.enrollment_transcript(
                offer_hash=offer_hash,
                user=response.user,
                method=response.method,
                signing_key=response.signing_key,
                key_agreement=key_agreement,
            )
        )
        ok = False
        if record.sealed_otp_key is not None:  # else a wrapped key that did not open
            with self.keys.otp_macs(record) as mac:
                ok = transcript.check_confirmation(mac(message), response.confirmation)
        if ok:
            return
        self._refuse_enrollment(response, Reason.KEY_CONFIRMATION)
        raise UntrustedMessage("the enrollment response's key confirmation does not verify")

    # --- TPM registration (docs/PROTOCOL.md, "TPM 2.0 attestation") ----------------

    def tpm_challenge(self, request_text: str) -> str:
        """The credential-activation challenge for an authenticator's TPM registration
        request (text form), or AttestationRefused: its EK certificate must chain to a
        root of the ``device`` or ``pin`` policy. Keeps no state: the AK binding inside
        is this verifier's signature, checked at each TPM enrollment."""
        from . import attestation_tpm2, textcode

        roots = [
            r for m in (Method.DEVICE, Method.PIN) for r in self.policy.for_method(m).roots
        ]
        challenge = attestation_tpm2.registration_challenge(
            textcode.decode(request_text), list(dict.fromkeys(roots)), self.keys.sign_raw
        )
        log.info("TPM registration challenge issued")
        return textcode.encode(challenge)

    # --- sessions -----------------------------------------------------------

    def start_session(
        self,
        user: str,
        context: str,
        *,
        tenant: str | None = None,
        transaction: Sequence[Sequence[str]] | Mapping[str, str] | None = None,
        user_data: int = 0,
        methods: Sequence[Method] | None = None,
    ) -> Session:
        """Start an offline session: random challenge + context, signed, single use.

        ``transaction`` (label, value) pairs (or a mapping, in its order) are shown
        with the context and bound by the OTP; ``user_data`` N > 0 has the user enter
        1..N characters on the authenticator, which :meth:`verify` then needs as
        ``data``; ``tenant`` names the user's tenant (docs/PROTOCOL.md §17): only
        that tenant's credentials of ``user`` answer."""
        _check_user(user)
        tenant_name = enrollments.check_tenant(tenant)
        display.check(context, "the context", max_len=MAX_CONTEXT)
        tenant = transaction_data.check_tenant(tenant)
        items = transaction_data.check(transaction)
        if (
            not isinstance(user_data, int)
            or isinstance(user_data, bool)
            or not 0 <= user_data <= transaction_data.MAX_USER_DATA
        ):
            raise InvalidInput(
                f"the user data length is 0 (none) to {transaction_data.MAX_USER_DATA} characters"
            )
        credentials = [c for c in self.store.credentials(user) if c.tenant == tenant_name]
        current = [c for c in credentials if _current(c)]
        enrolled = {c.method for c in current}
        if not enrolled:
            if credentials:
                raise UnknownMethod(
                    f"{user!r} has only methods enrolled with an older protocol; "
                    "they must be enrolled again"
                )
            raise UnknownMethod(f"{user!r} has no enrolled method")
        wanted = tuple(methods) if methods else tuple(m for m in Method if m in enrolled)
        allowed = tuple(m for m in dict.fromkeys(wanted) if m in enrolled)
        if not allowed:
            raise UnknownMethod(f"{user!r} has none of the requested methods enrolled")
        # Expiry (hsm_auth.expiry): an expired method is left out; none left is the advice.
        now = self._now()
        live = {c.method for c in current if not expiry.expired(c.expires, now)}
        if not any(m in live for m in allowed):
            first = next(c for m in allowed for c in current if c.method is m)
            raise CredentialExpired(first.method.value, first.expires)
        allowed = tuple(m for m in allowed if m in live)
        session_id = os.urandom(SESSION_ID_BYTES)
        data = VerificationData(
            verifier_id=self.identity.verifier_id,
            user=user,
            challenge=os.urandom(CHALLENGE_BYTES),
            context=context,
            methods=allowed,
            expires=self._now() + self.identity.session_ttl,
            tenant=tenant,
            transaction=items,
            user_data=user_data,
        )
        text = data.to_text(self.keys.sign_raw)
        record = AuditRecord(
            self._now(),
            Event.SESSION,
            user,
            ",".join(m.value for m in allowed),
            session_id.hex(),
        )
        self.store.put_session(
            SessionRecord(
                session_id, user, data.challenge, context, allowed, data.expires,
                tenant=tenant, transaction=items, user_data=user_data,
            ),
            record,
        )
        audit.emit([record])
        self._purge_now_and_then()
        return Session(session_id, data, text)

    # --- verification -------------------------------------------------------

    def _check_format(self, otp: str) -> str:
        """Decimal digits of a length some scheme has; the credential's own scheme decides
        the rest (an OTP of another length matches none of its OTPs)."""
        if not isinstance(otp, str):
            raise InvalidInput(f"an OTP is {MIN_DIGITS}..{MAX_DIGITS} digits")
        otp = otp.strip()
        if not MIN_DIGITS <= len(otp) <= MAX_DIGITS or not otp.isascii() or not otp.isdigit():
            raise InvalidInput(f"an OTP is {MIN_DIGITS}..{MAX_DIGITS} digits")
        return otp

    def verify(self, session_id: bytes, otp: str, *, data: str | None = None) -> Acceptance:
        """Accept ``otp`` for the session or raise :class:`InvalidToken` (InvalidInput
        for an OTP that is not ``digits`` decimal digits, or ``data`` that does not fit
        the session, StateError when the database fails: then nothing was changed).

        The OTP is checked against exactly what the session binds: its own tenant,
        context and transaction as stored, and ``data``, what the user entered on the
        authenticator (required iff the session's ``user_data`` > 0; docs/PROTOCOL.md §17)."""
        return _unwrap(self.verify_many([(session_id, otp, data)])[0])

    def verify_many(
        self, requests: Sequence[tuple[bytes, str] | tuple[bytes, str, str | None]]
    ) -> list[Result]:
        """Check many (session id, OTP[, data]) requests with one durable commit
        (group commit).

        Returns, in order, an :class:`Acceptance` or the error (InvalidToken,
        InvalidInput) for each. Raises StateError, with nothing committed,
        if the database fails."""
        return self._run(
            [
                _Request(i, r[0], (r[1],), r[2] if len(r) > 2 else None)
                for i, r in enumerate(requests)
            ]
        )

    def resync(
        self, session_id: bytes, first_otp: str, second_otp: str, *, data: str | None = None
    ) -> Acceptance:
        """Accept two consecutive OTPs for one session beyond the window (RFC 4226 §7.4)."""
        return _unwrap(self._run([_Request(0, session_id, (first_otp, second_otp), data)])[0])

    def _run(self, requests: Sequence[_Request]) -> list[Result]:
        results: dict[int, Result] = {}
        now = self._now()
        notes: list[tuple[_Request, Change]] = []
        pending: list[_Request] = []
        seen: dict[int, CredentialRecord] = {}  # row id -> the credential as read
        for req in requests:
            try:
                pending.append(
                    dataclasses.replace(req, otps=tuple(map(self._check_format, req.otps)))
                )
            except InvalidInput as e:
                results[req.index] = e
                record = AuditRecord(
                    now, Event.REFUSE, session=req.session_id.hex(), reason=Reason.MALFORMED_OTP
                )
                notes.append((req, Note(record)))
        for _ in range(MAX_ROUNDS):
            if not pending and not notes:
                break
            decided = notes + self._decide_all(pending, now, seen)
            notes = []
            applied = self.store.apply([change for _, change in decided])  # the durable commit
            pending = []
            for (req, change), outcome in zip(decided, applied, strict=True):
                audit.emit(outcome.records)
                if outcome.status is Status.STALE:
                    pending.append(req)  # the ATC moved under us: read and check again
                elif req.index in results:
                    continue
                elif isinstance(change, _Expired | _BadData):
                    results[req.index] = change.error()
                elif isinstance(change, Note) and change.record.reason is Reason.MALFORMED_OTP:
                    results[req.index] = InvalidInput(f"an OTP is {change.record.detail} digits")
                elif outcome.status is Status.DONE and isinstance(change, Accept):
                    results[req.index] = _accepted(change, seen[change.credential_id])
                else:
                    results[req.index] = InvalidToken()
        if pending:
            refusals = [
                AuditRecord(
                    now, Event.REFUSE, session=req.session_id.hex(), reason=Reason.CONTENTION
                )
                for req in pending
            ]
            self.store.apply([Note(r) for r in refusals])
            audit.emit(refusals)
            for req in pending:
                results[req.index] = InvalidToken()
        return [results[req.index] for req in requests]

    def _decide_all(
        self, pending: Sequence[_Request], now: int, seen: dict[int, CredentialRecord]
    ) -> list[tuple[_Request, Change]]:
        if not pending:
            return []
        sessions, creds = self.store.snapshot(r.session_id for r in pending)
        seen.update((c.id, c) for found in creds.values() for c in found)
        return [
            (req, self._decide(req, sessions.get(req.session_id), creds, now)) for req in pending
        ]

    def _decide(
        self,
        req: _Request,
        session: SessionRecord | None,
        creds_by_user: dict[str, list[CredentialRecord]],
        now: int,
    ) -> Change:
        sid = req.session_id.hex()
        if session is None:
            return Note(AuditRecord(now, Event.REFUSE, session=sid, reason=Reason.UNKNOWN_SESSION))
        base = AuditRecord(now, Event.REFUSE, session.user, None, sid)
        if session.used:
            return Note(base.refused(Reason.SESSION_USED))
        if session.expires < now:
            return Note(base.refused(Reason.SESSION_EXPIRED))
        if session.context == SYNC_CONTEXT:  # answered by a sync report, never by an OTP
            return Note(base.refused(Reason.NOT_SYNC))
        try:  # what the user entered, normalized as the authenticator did
            entered = transaction_data.user_data(req.data, session.user_data)
        except InvalidInput as e:
            return _BadData(base.refused(Reason.MALFORMED_DATA), str(e))
        creds = [
            c for c in creds_by_user.get(session.user, [])
            if c.method in session.methods and c.tenant == (session.tenant or "")
        ]
        usable = [c for c in creds if not c.locked and _current(c)]
        live = [c for c in usable if not expiry.expired(c.expires, now)]
        if usable and not live:  # every credential that could answer has expired
            return _expired_note(base, usable[0])
        usable = live
        if not usable:
            if not all(map(_current, creds)):
                return Note(base.refused(Reason.OLD_PROTOCOL))
            return Note(base.refused(Reason.LOCKED if creds else Reason.CREDENTIAL_GONE))
        # Each credential's own scheme says how long its OTPs are: an OTP no usable
        # credential could have made is malformed input, not a failed attempt.
        schemes = [OtpScheme.for_suite(c.suite) for c in usable]
        if any(all(len(otp) != s.digits for s in schemes) for otp in req.otps):
            shown = " or ".join(map(str, sorted({s.digits for s in schemes})))
            return Note(dataclasses.replace(base.refused(Reason.MALFORMED_OTP), detail=shown))
        resync = len(req.otps) == 2
        for cred, scheme in zip(usable, schemes, strict=True):
            atc = self._match(cred, scheme, session, req.otps, entered)
            if atc is not None:
                record = AuditRecord(
                    now,
                    Event.RESYNC if resync else Event.ACCEPT,
                    cred.user,
                    cred.method.value,
                    sid,
                    atc=atc,
                )
                return Accept(session.session_id, cred.id, cred.atc, atc, now, record)
        why = Reason.RESYNC_NO_PAIR if resync else Reason.NO_MATCH
        # An OTP does not say which token made it: the failure counts against every
        # credential it was checked against (those whose OTPs have its length), since
        # a guess is a guess at each of them; an acceptance resets them all (the user
        # proved a token of theirs). docs/PROTOCOL.md §11.2.
        tried = [
            c for c, s in zip(usable, schemes, strict=True)
            if all(len(otp) == s.digits for otp in req.otps)
        ]
        methods = {c.method for c in tried}
        method = next(iter(methods)).value if len(methods) == 1 else None
        return Failure(
            tuple(c.id for c in tried),
            self.identity.lockout_threshold,
            AuditRecord(now, Event.REFUSE, session.user, method, sid, why),
        )

    def _match(
        self,
        cred: CredentialRecord,
        scheme: OtpScheme,
        session: SessionRecord,
        otps: tuple[str, ...],
        entered: str,
    ) -> int | None:
        """The ATC the OTP(s) were made with, searched after the stored ATC; or None.
        For a resync (two OTPs) the ATC of the second one. ``scheme`` is the
        credential's own (its enrolled suite): it makes the question and checks each OTP.
        The question binds the session's stored tenant and transaction and ``entered``,
        the user's data normalized (docs/PROTOCOL.md §17)."""
        if any(len(otp) != scheme.digits for otp in otps):
            return None  # another credential of the session's may have this length
        question = scheme.question(
            verifier_id=self.identity.verifier_id,
            user=cred.user,
            method=cred.method,
            credential_id=transcript.credential_id(cred.signing_key),
            challenge=session.challenge,
            context=session.context,
            tenant=session.tenant,
            transaction=session.transaction,
            data=entered,
        )
        window = self.identity.resync_window if len(otps) == 2 else self.identity.window
        last = min(cred.atc + window, MAX_ATC - 1)
        with self.keys.otp_macs(cred) as mac:
            for atc in range(cred.atc + 1, last + 1):
                if scheme.verify(mac, otps[0], counter=atc, question=question):
                    if len(otps) == 1:
                        return atc
                    if scheme.verify(mac, otps[1], counter=atc + 1, question=question):
                        return atc + 1
        return None

    # --- administration -----------------------------------------------------

    def purge(self, *, grace: int = PURGE_GRACE) -> int:
        """Delete sessions and offers that expired more than ``grace`` seconds ago
        (used or not), and destroy the agreement key of every offer that is no
        longer pending (used, or expired: no grace); returns how many of all these."""
        if not 0 <= grace <= 10**9:
            raise InvalidInput("the purge grace period is 0 to 10^9 seconds")
        return self.purge_offer_keys() + self.store.purge(self._now() - grace)

    def purge_offer_keys(self) -> int:
        """Destroy the agreement key of every offer used or expired (an enrollment
        killed between its commit and the key's destruction leaves one); returns how
        many. The key of an offer not stored yet (being made now) is left alone
        until that offer expires."""
        held = self.keys.offer_keys()
        if not held:
            return 0
        now = self._now()
        used = self.store.used_offers(k.offer_id for k in held)
        stale = [k for k in held if k.expires < now or k.offer_id in used]
        for key in stale:
            self.keys.drop_offer_key(key.offer_id)
        return len(stale)

    def _purge_now_and_then(self) -> None:
        if self.purge_every <= 0 or secrets.randbelow(self.purge_every):
            return
        try:
            self.purge()
        except HsmAuthError as e:  # the write it follows succeeded: do not fail it
            log.warning("purging expired sessions and offers failed: %s", e)

    def credentials(self, user: str, *, tenant: str | None = None) -> list[CredentialRecord]:
        """The credentials of ``user`` (of ``tenant``), by method, then in enrollment order."""
        _check_user(user)
        tenant_name = enrollments.check_tenant(tenant)
        return [c for c in self.store.credentials(user) if c.tenant == tenant_name]

    def credential(
        self,
        user: str | bytes,
        method: Method | None = None,
        *,
        tenant: str | None = None,
        credential: str | None = None,
    ) -> CredentialRecord:
        """One credential: by its protocol credential id (``user`` given as 16 bytes), or
        of ``user`` (of ``tenant``) by ``credential`` (its label or its credential id in
        hex, a prefix of at least 8 digits will do) and/or ``method``, which must name
        exactly one. UnknownMethod when none does, InvalidInput when several do."""
        if isinstance(user, bytes):
            found = self.store.credential_by_id(user)
            if found is None:
                raise UnknownMethod("no credential has this credential id")
            return found
        creds = self.credentials(user, tenant=tenant)
        if method is not None:
            creds = [c for c in creds if c.method is method]
        what = f"{user!r}" + (f" of tenant {tenant!r}" if tenant else "")
        if credential is not None:
            creds = enrollments.select_credentials(creds, credential)
            if not creds:
                raise UnknownMethod(f"{what} has no credential {credential!r}")
        if not creds:
            if method is None:
                raise UnknownMethod(f"{what} has no enrolled method")
            raise UnknownMethod(f"{what} has no {method.value} method enrolled")
        if len(creds) > 1:
            labels = ", ".join(c.label for c in creds)
            raise InvalidInput(f"{what} has {len(creds)} such credentials ({labels}): name one")
        return creds[0]

    def unlock(
        self,
        user: str,
        method: Method | None = None,
        *,
        tenant: str | None = None,
        credential: str | None = None,
    ) -> CredentialRecord:
        """Unlock one credential (:meth:`credential` says which)."""
        cred = self.credential(user, method, tenant=tenant, credential=credential)
        record = AuditRecord(self._now(), Event.UNLOCK, cred.user, cred.method.value,
                             detail=_named(cred))
        self.store.unlock(cred.id, record)
        audit.emit([record])
        return cred

    def revoke(
        self,
        user: str,
        method: Method | None = None,
        *,
        tenant: str | None = None,
        credential: str | None = None,
    ) -> CredentialRecord:
        """Delete one credential (:meth:`credential` says which): its OTPs are refused
        from now on; the user's other credentials, of this method too, keep working."""
        cred = self.credential(user, method, tenant=tenant, credential=credential)
        record = AuditRecord(self._now(), Event.REVOKE, cred.user, cred.method.value,
                             detail=_named(cred))
        if not self.store.revoke(cred.id, record):
            raise UnknownMethod(f"{cred.user!r}'s credential {cred.label!r} is gone already")
        audit.emit([record])
        return cred

    def show(self, user: str, *, recent: int = 20) -> UserState:
        """Counters, failures and lockout of each method of ``user``, with recent audit."""
        _check_user(user)
        creds = self.store.credentials(user)
        if not creds:
            raise UnknownMethod(f"{user!r} has no enrolled method")
        return UserState(user, tuple(creds), tuple(self.store.audit_records(user, recent)))

    def sync_message(
        self,
        user: str,
        method: Method,
        *,
        tenant: str | None = None,
        credential: str | None = None,
    ) -> str:
        """After an online login: a signed sync message for the authenticator, and
        the single-use sync session (``offer_ttl`` long) that its report answers
        (:meth:`sync_message_for` the user's credential of ``method``)."""
        return self.sync_message_for(
            self.credential(user, method, tenant=tenant, credential=credential)
        )

    def sync_message_for(self, cred: CredentialRecord) -> str:
        """A signed sync message for the credential ``cred`` and its sync session.

        The authenticator answers with a :class:`SyncReport` (the ATC report,
        docs/PROTOCOL.md §10, §18) in which the token states its current ATC,
        authenticated with the credential's OTP key; :meth:`apply_sync` then moves
        the stored ATC there, so the next OTP is in the window again however many
        OTPs were made and never submitted. The sync session is bound to ``cred``:
        its record keeps the credential id where an OTP session keeps its challenge."""
        expiry.check(cred.method, cred.expires, self._now())
        credential_id = transcript.credential_id(cred.signing_key)
        session_id = os.urandom(SESSION_ID_BYTES)
        expires = self._now() + self.identity.offer_ttl
        message = SyncMessage(
            verifier_id=self.identity.verifier_id,
            user=cred.user,
            method=cred.method,
            atc=cred.atc,
            session_id=session_id,
            expires=expires,
            credential_id=credential_id,
        )
        text = message.to_text(self.keys.sign_raw)
        record = AuditRecord(self._now(), Event.SYNC, cred.user, cred.method.value,
                             session_id.hex())
        self.store.put_session(
            SessionRecord(session_id, cred.user, credential_id, SYNC_CONTEXT, (cred.method,),
                          expires,
                          tenant=cred.tenant or None),
            record,
        )
        audit.emit([record])
        return text

    def apply_sync(self, text: str) -> SyncAcceptance:
        """Apply an authenticator's sync report: the stored ATC moves forward to the
        ATC the token reports, burning the sync session (compare-and-swap, one
        transaction), and the answer carries the signed acknowledgement
        (:class:`AtcAck`) that resets the authenticator's offline-use count.

        Raises :class:`InvalidToken` for a bad MAC (counted toward lockout, as a
        wrong OTP), a used, expired or unknown sync session, one opened for another
        credential, a locked credential or a report that would not move the ATC
        forward (a lower or equal ATC: nothing changes, nothing counts); the reason
        goes to the audit trail."""
        report, signed = SyncReport.from_text(text)
        if not hmac.compare_digest(report.verifier_id, self.identity.verifier_id):
            raise InvalidInput("this sync report is for another verifier")
        now = self._now()
        for _ in range(MAX_ROUNDS):
            sessions, creds = self.store.snapshot([report.session_id])
            change = self._decide_sync(
                report, signed.signature, sessions.get(report.session_id), creds, now
            )
            [outcome] = self.store.apply([change])
            audit.emit(outcome.records)
            if outcome.status is Status.STALE:
                continue  # the ATC moved under us (an OTP was accepted): check again
            if outcome.status is Status.DONE and isinstance(change, Accept):
                label = next(
                    (c.label for c in creds.get(report.user, []) if c.id == change.credential_id),
                    "",
                )
                return self._acknowledge(report, label)
            if isinstance(change, _Expired):
                raise change.error()
            raise InvalidToken()
        refused = AuditRecord(
            now,
            Event.REFUSE,
            report.user,
            report.method.value,
            report.session_id.hex(),
            Reason.CONTENTION,
        )
        self.store.apply([Note(refused)])
        audit.emit([refused])
        raise InvalidToken()

    def _acknowledge(self, report: SyncReport, label: str) -> SyncAcceptance:
        """The signed acknowledgement of an applied report: the credential's ATC is
        now the report's."""
        ack = AtcAck(
            verifier_id=self.identity.verifier_id,
            user=report.user,
            method=report.method,
            credential_id=report.credential_id,
            session_id=report.session_id,
            atc=report.atc,
        )
        return SyncAcceptance(
            report.user, report.method, report.atc, label=label,
            credential_id=report.credential_id, ack=ack.to_text(self.keys.sign_raw),
        )

    def _decide_sync(
        self,
        report: SyncReport,
        mac: bytes,
        session: SessionRecord | None,
        creds_by_user: dict[str, list[CredentialRecord]],
        now: int,
    ) -> Change:
        sid = report.session_id.hex()
        base = AuditRecord(now, Event.REFUSE, report.user, report.method.value, sid)
        if session is None:
            return Note(base.refused(Reason.UNKNOWN_SESSION))
        if (
            session.context != SYNC_CONTEXT
            or session.user != report.user
            or (report.method not in session.methods)
            or not hmac.compare_digest(session.challenge, report.credential_id)
        ):
            return Note(base.refused(Reason.NOT_SYNC))
        if session.used:
            return Note(base.refused(Reason.SESSION_USED))
        if session.expires < now:
            return Note(base.refused(Reason.SESSION_EXPIRED))
        cred = next(
            (
                c
                for c in creds_by_user.get(session.user, [])
                if c.method is report.method
                and c.tenant == (session.tenant or "")
                and hmac.compare_digest(
                    transcript.credential_id(c.signing_key), report.credential_id
                )
            ),
            None,
        )
        if cred is None:
            return Note(base.refused(Reason.CREDENTIAL_GONE))
        if not _current(cred):
            return Note(base.refused(Reason.OLD_PROTOCOL))
        if cred.locked:
            return Note(base.refused(Reason.LOCKED))
        if expiry.expired(cred.expires, now):
            return _expired_note(base, cred)
        if not cred.atc < report.atc <= MAX_ATC - self.identity.resync_window - 1:
            return Note(base.refused(Reason.SYNC_STALE))
        scheme = OtpScheme.for_suite(cred.suite)
        question = scheme.sync_question(
            session_id=report.session_id, user=report.user, method=report.method,
            credential_id=report.credential_id,
        )
        with self.keys.otp_macs(cred) as mac_of:
            good = scheme.verify_mac(mac_of, mac, counter=report.atc, question=question)
        if not good:
            return Failure(
                (cred.id,), self.identity.lockout_threshold, base.refused(Reason.NO_MATCH)
            )
        record = AuditRecord(now, Event.SYNCED, cred.user, cred.method.value, sid, atc=report.atc)
        return Accept(session.session_id, cred.id, cred.atc, report.atc, now, record)


def _accepted(change: Accept, cred: CredentialRecord) -> Acceptance:
    return Acceptance(
        cred.user, cred.method, change.new_atc, cred.label,
        transcript.credential_id(cred.signing_key),
    )


def _named(cred: CredentialRecord) -> str:
    """The audit detail naming one credential: its label and credential id."""
    return f"{cred.label} {transcript.credential_id(cred.signing_key).hex()}"


def _unwrap(result: Result) -> Acceptance:
    if isinstance(result, HsmAuthError):
        raise result
    return result


def _current(cred: CredentialRecord) -> bool:
    """Whether ``cred`` can answer: enrolled with this protocol and its OTP key sealed
    (a credential enrolled before either must enroll again)."""
    return cred.protocol == PROTOCOL_VERSION and cred.sealed_otp_key is not None


def _check_user(user: str) -> None:
    display.check(user, "the user name", max_len=display.MAX_NAME)
    space = next((c for c in user if c.isspace()), None)
    if space is not None:
        raise InvalidInput(f"the user name contains {display.code_point(space)} (a space)")


def _open_store(directory: Path, database: str | None) -> VerifierStore:
    if not database:
        check_state(directory / SQLITE_FILE, missing_ok=True)
    return open_store(database or (directory / SQLITE_FILE))


