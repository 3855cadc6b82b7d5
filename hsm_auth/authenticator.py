"""The authenticator: the workstation side that holds the tokens.

* :meth:`Authenticator.add_or_update` enrolls one method from a verifier's offer;
* :meth:`Authenticator.store_result` keeps the certificate the verifier issued for it;
* :meth:`Authenticator.start_offline_authentication` checks verification data
  (signature first, then expiry) and returns what to show the user;
* :meth:`Authenticator.finish_offline_authentication` has the token advance
  its counter and compute the OTP bound to that context.

The credential file (``credentials.json``, 0600, atomic writes) holds only
URIs of keys in tokens and the verifiers' public keys: no secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hmac
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import ec, enrollments, expiry, textcode
from .config import Config
from .errors import (
    AlreadyEnrolled,
    ConfigError,
    ExpiredMessage,
    HsmAuthError,
    InvalidInput,
    LoginRequired,
    MechanismNotSupported,
    PinInvalid,
    PinLocked,
    PinRequired,
    StateError,
    TokenNotFound,
    UnknownMethod,
    UntrustedMessage,
)
from .files import (
    atomic_write_json,
    check_state,
    ensure_private_dir,
    locked,
    read_json,
    state_int,
)
from .keystore import (
    NO_AUTH,
    Authorization,
    Capability,
    KeyInfo,
    KeyKind,
    KeyStore,
    UserInteraction,
)
from .methods import Method
from .protocol import VerificationData

# Start-up time is part of the interface (bench/startup.py): ``start`` needs only the
# verification data, so the backends machinery (registry) and the enrollment and sync
# messages are imported where they are used.
if TYPE_CHECKING:
    from cryptography import x509

    from .challenges import Challenge, Decision
    from .otp_scheme import OtpScheme
    from .request_signing import Signature
    from .unlocked import Unlocked

Clock = Callable[[], float]
Warn = Callable[[str], None]

PROMPTS = {
    Method.DEVICE: "",
    Method.PIN: "Enter your offline PIN",
    Method.BIOMETRIC: "Verify with your fingerprint on the authenticator",
    Method.FACE: "Verify with your face on the authenticator",
}


@dataclass(frozen=True)
class PinnedVerifier:
    verifier_id: bytes
    name: str
    signing_key: bytes


@dataclass(frozen=True)
class EnrolledMethod:
    verifier_id: bytes
    user: str
    method: Method
    backend: str
    settings: Mapping[str, Any]
    signing_key: str
    otp_key: str
    counter: str
    agreement_key: str | None
    suite: str
    window: int
    synced_atc: int
    created: int
    #: The backend's entry point (``module:class``) at enrollment: loads it without
    #: an entry-point scan (``None`` in credentials written by earlier versions).
    backend_ref: str | None = None
    label: str = ""  # the keys' label prefix (hsm-auth/<user>/<method>/<random>); "" if older
    #: The credential id (hex) the OTP question binds (protocol 3); "" in a record
    #: enrolled with an older protocol, which must be enrolled again.
    credential_id: str = ""
    #: The verifier's X.509 certificate for the signing key and its CA certificate
    #: (PEM; :meth:`Authenticator.store_result`), "" until the result is stored.
    certificate: str = ""
    ca_certificate: str = ""
    #: The verifier's approval policy for this method, stated when it was enrolled
    #: online (:meth:`Authenticator.set_approval_policy`): seconds a PIN may be reused
    #: for approvals (0: each approval needs it; ``hsm_auth.attestation.ApprovalPolicy``).
    approval_timeout: int = 0
    #: The user's tenant at the verifier, from the offer (docs/PROTOCOL.md §17); "" none.
    tenant: str = ""
    #: From the EnrollmentResult (docs/PROTOCOL.md §5.6): the Unix time after which the
    #: method makes no offline OTP (0: never), and how many seconds the authenticator
    #: may keep it unlocked after a use (0: every use asks).
    offline_expires: int = 0
    pin_cache: int = 0
    #: The name the user gave this token at enrollment (``hsm-auth enroll --token``):
    #: several tokens of one method (a backup key) are told apart by it ("" if none
    #: was given; :mod:`hsm_auth.enrollments`).
    token_label: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verifier_id"] = self.verifier_id.hex()
        d["method"] = self.method.value
        d["settings"] = dict(self.settings)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EnrolledMethod:
        where = "credentials.json"  # bounds: values only an edit could give
        cid = d.get("credential_id", "")
        if not isinstance(cid, str) or (cid and not _is_hex(cid, 16)):
            raise StateError(f"{where}: a malformed credential_id")
        for text in ("certificate", "ca_certificate", "tenant", "token_label"):
            if not isinstance(d.get(text, ""), str):
                raise StateError(f"{where}: a malformed {text}")
        return cls(
            **{**d, "verifier_id": bytes.fromhex(d["verifier_id"]), "method": Method(d["method"]),
               "window": state_int(d, "window", None, 1, 1000, where),
               "synced_atc": state_int(d, "synced_atc", None, 0, 2**63 - 1, where),
               "approval_timeout": state_int(d, "approval_timeout", 0, 0, 3600, where),
               "offline_expires": state_int(d, "offline_expires", 0, 0, 2**63 - 1, where),
               "pin_cache": state_int(d, "pin_cache", 0, 0, 3600, where)}
        )


#: Enrollment keys are labelled ``hsm-auth/<user>/<method>/<random>/<role>`` (FIDO2: no
#: role). Workstation login's keys (:mod:`hsm_auth.login`, recorded in authfiles) are
#: ``hsm-auth-login/…``: outside this namespace, never listed or pruned here.
KEY_NAMESPACE = "hsm-auth/"
_ROLES = frozenset({"sign", "ecdh", "otp", "atc"})


def enrollment_label(key_label: str) -> str:
    """The label prefix that one enrollment gave all its keys."""
    head, _, role = key_label.rpartition("/")
    return head if role in _ROLES and head else key_label


@dataclass(frozen=True)
class PendingKeys:
    """Keys that may be in a token while no enrolled method names them: an enrollment
    under way (recorded **before** its first key is made) or the old keys of a replaced
    method (until they are deleted). A kill leaves this record behind, so that
    :meth:`Authenticator.prune_orphans` knows exactly which keys it left."""

    backend: str
    settings: Mapping[str, Any]
    user: str
    method: Method
    label: str  # the enrollment's label prefix ("" when unknown)
    uris: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "settings": dict(self.settings),
            "user": self.user,
            "method": self.method.value,
            "label": self.label,
            "uris": list(self.uris),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PendingKeys:
        return cls(
            str(d["backend"]),
            dict(d["settings"]),
            str(d["user"]),
            Method(d["method"]),
            str(d["label"]),
            tuple(str(u) for u in d["uris"]),
        )


class KeyState(enum.Enum):
    ENROLLED = "enrolled"  # an enrolled method uses it
    #: left by an enrollment or replacement here that did not finish, or the agreement
    #: key of a method enrolled before issue 10 (not needed after enrollment)
    ORPHAN = "orphan"
    UNCLAIMED = "unclaimed"  # hsm-auth label, but nothing here made it (another home?)


@dataclass(frozen=True)
class TokenKey:
    """A key with an hsm-auth label, found in a token (``hsm-auth keys list``)."""

    backend: str
    uri: str
    kind: KeyKind
    label: str
    state: KeyState


@dataclass(frozen=True)
class KeyReport:
    """What :meth:`Authenticator.keys` found; ``unreachable`` names the tokens it could
    not list (backend, reason): their keys are not in ``keys``."""

    keys: tuple[TokenKey, ...]
    unreachable: tuple[tuple[str, str], ...] = ()

    @property
    def orphans(self) -> tuple[TokenKey, ...]:
        return tuple(k for k in self.keys if k.state is KeyState.ORPHAN)


@dataclass
class _Token:
    backend: str
    settings: Mapping[str, Any]
    method: Method
    auth: Authorization = NO_AUTH
    keys: list[KeyInfo] = field(default_factory=list)
    listed: bool = False


@dataclass(frozen=True)
class OnlineSignature:
    """A signature made in the token for the online service
    (:mod:`hsm_auth.request_signing`): the credential that made it and the signature."""

    credential_id: bytes
    signature: Signature


@dataclass(frozen=True)
class OfflineRequest:
    """What :meth:`Authenticator.start_offline_authentication` found in verified data."""

    verifier_name: str
    user: str  # whose session it is (an enrolled user of that verifier)
    context: str
    methods: tuple[Method, ...]  # allowed by the verifier AND enrolled here
    expires: int
    data: VerificationData = field(repr=False)

    @property
    def tenant(self) -> str | None:
        """The user's tenant the verifier named (docs/PROTOCOL.md §17), or None."""
        return self.data.tenant

    @property
    def transaction(self) -> tuple[tuple[str, str], ...] | None:
        """The signed transaction data to show with the context (label, value), or None."""
        return self.data.transaction

    @property
    def user_data(self) -> int:
        """How many characters the user must enter (0: none; ``finish(data=…)``)."""
        return self.data.user_data


@dataclass(frozen=True)
class OfflineOtp:
    otp: str = field(repr=False)
    method: Method
    atc: int
    #: The token that made it (its label, or its credential id's first digits).
    token: str = ""


class Authenticator:
    def __init__(
        self,
        directory: Path,
        config: Config | None = None,
        *,
        clock: Clock = time.time,
        warn: Warn | None = None,
        interaction: UserInteraction | None = None,
    ) -> None:
        """``interaction`` shows the user what a token waits for (the CLI's prints on
        stderr); without one, nothing is shown."""
        self.directory = directory
        self.config = config or Config()
        self._clock = clock
        self._warn = warn or (lambda message: None)
        self._interaction = interaction
        self._stores: dict[tuple[str, str], KeyStore] = {}
        self._state_file = directory / "credentials.json"
        self._pending: list[PendingKeys] = []  # set by _load
        self._stamp = _stamp(self._state_file)  # what reload() compares (before the read)
        self._verifiers, self._methods = self._load()

    # --- state ----------------------------------------------------------------

    def _load(self) -> tuple[dict[bytes, PinnedVerifier], list[EnrolledMethod]]:
        """The pinned verifiers and enrolled methods (and, into ``_pending``, the keys
        that operations still under way, or killed, may have left)."""
        check_state(self.directory, directory=True, missing_ok=True)
        self._pending = []
        if not self._state_file.exists():
            return {}, []
        data = read_json(self._state_file)
        try:
            verifiers = {
                bytes.fromhex(v["verifier_id"]): PinnedVerifier(
                    bytes.fromhex(v["verifier_id"]), v["name"], bytes.fromhex(v["signing_key"])
                )
                for v in data["verifiers"]
            }
            methods = [EnrolledMethod.from_json(m) for m in data["methods"]]
            self._pending = [PendingKeys.from_json(p) for p in data.get("pending", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{self._state_file} is malformed ({e.__class__.__name__})") from None
        return verifiers, methods

    def _save(
        self,
        verifiers: dict[bytes, PinnedVerifier],
        methods: list[EnrolledMethod],
        pending: list[PendingKeys] | None = None,
    ) -> None:
        pending = self._pending if pending is None else pending
        atomic_write_json(
            self._state_file,
            {
                "version": 1,
                "verifiers": [
                    {
                        "verifier_id": v.verifier_id.hex(),
                        "name": v.name,
                        "signing_key": v.signing_key.hex(),
                    }
                    for v in verifiers.values()
                ],
                "methods": [m.to_json() for m in methods],
                "pending": [p.to_json() for p in pending],
            },
        )
        self._verifiers, self._methods, self._pending = verifiers, methods, pending

    def reload(self) -> None:
        """Read ``credentials.json`` again if it changed since it was read (a long-lived
        holder, the agent, sees the enrollments made since it started). Every write
        is a rename of a new file, so (inode, mtime, size) tells a change."""
        stamp = _stamp(self._state_file)
        if stamp is not None and stamp == self._stamp:
            return
        self._verifiers, self._methods = self._load()
        self._stamp = stamp

    @property
    def enrolled(self) -> list[EnrolledMethod]:
        return list(self._methods)

    def verifier_name(self, verifier_id: bytes) -> str:
        """The name a pinned verifier gave itself (its id in hex if none is pinned)."""
        pinned = self._verifiers.get(verifier_id)
        return pinned.name if pinned is not None else verifier_id.hex()

    def _find(
        self, verifier_id: bytes, method: Method, *, user: str | None = None
    ) -> EnrolledMethod | None:
        """The first enrollment of ``method`` at ``verifier_id`` (of ``user``, any tenant)."""
        for m in enrollments.matching(self._methods, verifier_id, method=method):
            if user is None or m.user == user:
                return m
        return None

    def _by_credential(self, verifier_id: bytes, credential_id: bytes) -> EnrolledMethod | None:
        """The enrollment whose credential id is ``credential_id``."""
        for m in enrollments.matching(self._methods, verifier_id):
            if m.credential_id and hmac.compare_digest(
                bytes.fromhex(m.credential_id), credential_id
            ):
                return m
        return None

    def _candidates(
        self, verifier_id: bytes, tenant: str, user: str, method: Method, token: str | None
    ) -> list[EnrolledMethod]:
        """The enrollments that may answer for (verifier, tenant, user, method): all of
        them in enrollment order, or those of the token named ``token``."""
        found = enrollments.matching(
            self._methods, verifier_id, tenant=tenant, user=user, method=method
        )
        if not found:
            raise UnknownMethod(f"the {method.value} method is not enrolled here")
        if token is None:
            return found
        named = enrollments.select_enrollments(found, token)
        if not named:
            known = ", ".join(enrollments.shown(m) for m in found)
            raise UnknownMethod(
                f"no {method.value} token named {token!r} is enrolled here (enrolled: {known})"
            )
        return named

    def _choose_present(self, candidates: list[EnrolledMethod]) -> EnrolledMethod:
        """The first of ``candidates`` whose token is present (its store opens); the
        error of the first absent one when none is (TokenNotFound). One candidate is
        not probed: its use says whether its token is there."""
        if len(candidates) == 1:
            return candidates[0]
        with self._present(candidates, candidates[0].method) as (enrolled, _):
            return enrolled

    @contextlib.contextmanager
    def _present(
        self, candidates: list[EnrolledMethod], method: Method
    ) -> Iterator[tuple[EnrolledMethod, KeyStore]]:
        """The first of ``candidates`` whose token is present, with its open store; the
        error of the first absent one when none is (TokenNotFound)."""
        absent: TokenNotFound | None = None
        for enrolled in candidates:
            stack = contextlib.ExitStack()
            try:
                store = stack.enter_context(
                    self._store(enrolled.backend, enrolled.settings, method, enrolled.backend_ref)
                )
            except TokenNotFound as e:
                absent = absent or e
                continue
            with stack:
                yield enrolled, store
            return
        assert absent is not None  # candidates is never empty
        raise absent

    # --- backends -------------------------------------------------------------

    @contextlib.contextmanager
    def _store(
        self, backend: str, settings: Mapping[str, Any], method: Method,
        reference: str | None = None,
    ) -> Iterator[KeyStore]:
        """The open store for ``backend``/``settings``, kept for later operations, except
        where a PIN unlocks a whole session (PKCS#11): then the store is opened for this
        operation only and closed (logged out) after it, so that every use of the pin
        method is a fresh login that the token itself checks and counts."""
        from . import registry

        cls = registry.load_backend(backend, reference)  # kept per process by the registry
        if method.needs_pin and cls.pin_unlocks_session:
            with cls.open(settings) as once:
                yield once
            return
        key = (backend, repr(sorted(settings.items())))
        store = self._stores.get(key)
        if store is None:
            store = cls.open(settings)
            self._stores[key] = store
        yield store

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    def __enter__(self) -> Authenticator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _authorization(
        self, method: Method, store: KeyStore, settings: Mapping[str, Any], pin: str | None
    ) -> Authorization:
        if method is Method.PIN:
            if pin is None:
                raise PinRequired("the pin method needs the offline PIN")
            if Capability.PIN_RETRY_LIMIT not in store.capabilities():
                if not settings.get("allow_unenforced_pin", False):
                    raise ConfigError(
                        "this token does not limit PIN retries, so it cannot protect an "
                        "offline PIN; "
                        "set allow_unenforced_pin = true for this method to use it anyway"
                    )
                self._warn(
                    "warning: this token does not limit PIN retries (e.g. SoftHSM): "
                    "the offline PIN can be guessed without lockout"
                )
        return Authorization(
            pin=pin, prompt=PROMPTS[method] or None, interaction=self._interaction
        )

    # --- enrollment -----------------------------------------------------------

    def add_or_update(
        self,
        method: Method,
        offer_text: str,
        *,
        activation_code: str,
        pin: str | None = None,
        replace: bool = False,
        token: str | None = None,
    ) -> str:
        """Enroll ``method`` from a verifier's offer; return the enrollment response text.

        ``token`` names the token (a backup key: "yubikey-backup"): one user may enroll
        several tokens of one method, each under its own name; ``replace`` replaces the
        enrollment of that name (none given: the unnamed one).

        ``activation_code`` is the offer's one-time code, which the user received over
        the verifier's own channel: a typo in it (:class:`~hsm_auth.activation.
        ActivationCodeTypo`) is refused before anything else, a wrong one by the
        verifier. It goes into the response only as a MAC (docs/PROTOCOL.md, "Activation")."""
        from . import activation

        code = activation.normalize(activation_code)  # a typo: told before any key is made
        token_label = "" if token is None else enrollments.check_label(token)
        with self._exclusive():
            self._verifiers, self._methods = self._load()  # another process may have written
            return self._add_or_update(
                method, offer_text, code=code, pin=pin, replace=replace, token=token_label
            )

    def _add_or_update(
        self, method: Method, offer_text: str, *, code: str, pin: str | None, replace: bool,
        token: str,
    ) -> str:
        from . import registry
        from .enrollment_messages import EnrollmentOffer, EnrollmentResponse

        offer, signed = EnrollmentOffer.from_text(offer_text)
        verifier_key = ec.decode_point(offer.verifier_signing_key)
        ec.verify(verifier_key, signed.signature, signed.body)
        pinned = self._verifiers.get(offer.verifier_id)
        if pinned is not None and not hmac.compare_digest(
            pinned.signing_key, offer.verifier_signing_key
        ):
            raise UntrustedMessage(
                f"the offer claims to be from {pinned.name!r} but is signed by another key"
            )
        if offer.expires < self._clock():
            raise ExpiredMessage("the enrollment offer has expired")
        if method not in offer.methods:
            raise UnknownMethod(f"the verifier does not offer the {method.value} method")
        _scheme(offer.suite)  # refuse a suite the product cannot feed, before making keys
        tenant = enrollments.offer_tenant(offer)
        existing = next(
            (
                m
                for m in enrollments.matching(
                    self._methods, offer.verifier_id, tenant=tenant, user=offer.user,
                    method=method,
                )
                if m.token_label == token
            ),
            None,
        )
        if existing is not None and not replace:
            named = f" on the token {token!r}" if token else ""
            raise AlreadyEnrolled(
                f"the {method.value} method is enrolled already{named} for "
                f"{offer.user!r} at {offer.verifier_name!r}; replacing it needs --replace "
                "(another token of the method: --token NAME)"
            )
        if existing is not None and not offer.replace:
            raise AlreadyEnrolled(
                "the verifier's offer does not allow replacing an enrolled method"
            )
        if method in offer.enrolled and not offer.replace:  # refused before any key is made
            raise AlreadyEnrolled(
                f"{offer.user!r} has the {method.value} method enrolled at "
                f"{offer.verifier_name!r} already, and the offer does not allow replacing it"
            )

        backend, settings = registry.choose_backend(self.config, method)
        with self._store(backend, settings, method) as store:
            store.require_method(method)
            auth = self._authorization(method, store, settings, pin)
            from .webauthn_proof import enrollment_binding  # only enrollment needs it (x509 import)

            label = f"{KEY_NAMESPACE}{offer.user}/{method.value}/{os.urandom(3).hex()}"
            intent = PendingKeys(backend, dict(settings), offer.user, method, label)
            self._save(self._verifiers, self._methods, [*self._pending, intent])
            retired: PendingKeys | None = None
            from . import activation, transcript

            offer_hash = transcript.offer_hash(signed.body)

            def enrollment_transcript(signing_key: bytes, key_agreement: bytes) -> bytes:
                return transcript.enrollment_transcript(
                    offer_hash=offer_hash,
                    user=offer.user,
                    method=method,
                    signing_key=signing_key,
                    key_agreement=key_agreement,
                )

            def confirmation_message(signing_key: bytes, key_agreement: bytes) -> bytes:
                return transcript.confirmation_message(
                    enrollment_transcript(signing_key, key_agreement)
                )

            try:
                enrollment = store.enroll(
                    method,
                    label,
                    ec.decode_point(offer.verifier_agreement_key),
                    auth,
                    binding=enrollment_binding(offer.offer_id, offer.user, method),
                    confirm=confirmation_message,
                )
                if enrollment.confirmation is None:  # a backend that ignored confirm
                    store.unenroll(enrollment, auth)
                    raise MechanismNotSupported(f"the {backend} backend made no key confirmation")
            except BaseException:  # store.enroll rolled back what it made
                self._settle(store, intent, auth)
                raise
            try:
                signing_key = ec.encode_point(enrollment.signing_public)
                agreement_key = (
                    ec.encode_point(enrollment.agreement_public)
                    if enrollment.agreement_public is not None
                    else None
                )
                key_agreement = agreement_key or enrollment.otp_key_for_verifier
                assert key_agreement is not None  # every backend gives one of them
                activation_mac = activation.activation_mac(
                    code, offer_hash, enrollment_transcript(signing_key, key_agreement)
                )
                response = EnrollmentResponse(
                    verifier_id=offer.verifier_id,
                    offer_id=offer.offer_id,
                    user=offer.user,
                    method=method,
                    backend=backend,
                    signing_key=signing_key,
                    agreement_key=agreement_key,
                    wrapped_otp_key=enrollment.otp_key_for_verifier,
                    initial_atc=enrollment.initial_atc,
                    attestation=enrollment.attestation,
                    confirmation=enrollment.confirmation,
                    activation_mac=activation_mac,
                )
                if Capability.SIGN in store.capabilities():

                    def sign(body: bytes) -> bytes:
                        return ec.der_to_raw(store.sign(enrollment.signing_key, body, auth))

                    text = response.to_text(sign)
                else:
                    text = response.to_text(None)
                record = EnrolledMethod(
                    verifier_id=offer.verifier_id,
                    user=offer.user,
                    method=method,
                    backend=backend,
                    settings=dict(settings),
                    signing_key=enrollment.signing_key,
                    otp_key=enrollment.otp_key,
                    counter=enrollment.counter,
                    agreement_key=enrollment.agreement_key,
                    suite=offer.suite,
                    window=offer.window,
                    synced_atc=enrollment.initial_atc,
                    created=int(self._clock()),
                    backend_ref=registry.backend_reference(backend),
                    label=label,
                    credential_id=transcript.credential_id(signing_key).hex(),
                    tenant=offer.tenant or "",
                    token_label=token,
                )
                verifiers = dict(self._verifiers)
                verifiers[offer.verifier_id] = PinnedVerifier(
                    offer.verifier_id, offer.verifier_name, offer.verifier_signing_key
                )
                methods = [m for m in self._methods if m is not existing] + [record]
                pending = [p for p in self._pending if p != intent]
                if existing is not None:  # its keys are deleted below; until then, recorded
                    retired = PendingKeys(
                        existing.backend,
                        dict(existing.settings),
                        existing.user,
                        existing.method,
                        existing.label,
                        _uris(existing),
                    )
                    pending.append(retired)
                self._save(verifiers, methods, pending)
            except BaseException:
                with contextlib.suppress(Exception):  # never hide the error being handled
                    store.unenroll(enrollment, auth)  # nothing half-enrolled stays in the token
                self._settle(store, intent, auth)
                raise
        if existing is not None and retired is not None and self._delete_keys(existing, pin):
            self._forget_pending(retired)
        return text

    def store_result(self, text: str) -> EnrolledMethod:
        """Keep the certificate of a verifier's :class:`EnrollmentResult` with the
        method it names (docs/PROTOCOL.md §11.1): the result must be signed by the
        pinned verifier's key, for a method enrolled here for its user, and its
        certificate must be issued by its CA certificate, name the user and method
        and certify this method's signing key (its credential id). Returns the
        updated method."""
        from .enrollment_messages import EnrollmentResult

        with self._exclusive():
            self._verifiers, self._methods = self._load()
            result, signed = EnrollmentResult.from_text(text)
            pinned = self._verifiers.get(result.verifier_id)
            if pinned is None:
                raise UntrustedMessage("enrollment result from a verifier this authenticator "
                                       "is not enrolled with")
            ec.verify(ec.decode_point(pinned.signing_key), signed.signature, signed.body)
            if self._find(result.verifier_id, result.method, user=result.user) is None:
                raise UnknownMethod(
                    f"the {result.method.value} method of {result.user!r} is not enrolled here"
                )
            # Several tokens of the method may be enrolled: the result names its credential.
            enrolled = self._by_credential(result.verifier_id, result.credential_id)
            if (
                enrolled is None
                or enrolled.user != result.user
                or enrolled.method is not result.method
            ):
                raise UntrustedMessage(
                    f"the enrollment result is for another {result.method.value} credential "
                    "than the one enrolled here (replaced since?)"
                )
            from cryptography.hazmat.primitives import serialization

            from . import device_ca

            cert, ca = device_ca.check_device_certificate(
                result.certificate,
                result.ca_certificate,
                user=enrolled.user,
                method=enrolled.method,
                credential_id=result.credential_id,
            )
            _check_renewal(enrolled, result.offline_expires, cert)
            pem = serialization.Encoding.PEM
            updated = dataclasses.replace(
                enrolled,
                certificate=cert.public_bytes(pem).decode("ascii"),
                ca_certificate=ca.public_bytes(pem).decode("ascii"),
                offline_expires=result.offline_expires,
                pin_cache=result.pin_cache,
            )
            self._save(self._verifiers, [updated if m is enrolled else m for m in self._methods])
            return updated

    def _settle(self, store: KeyStore, intent: PendingKeys, auth: Authorization) -> None:
        """After a failed enrollment: forget ``intent`` if the token holds none of its keys
        (else ``hsm-auth keys prune`` finds them). Best effort, never raises."""
        with contextlib.suppress(Exception):
            if not any(enrollment_label(k.label) == intent.label for k in store.list_keys(auth)):
                self._forget_pending(intent)

    def _forget_pending(self, *entries: PendingKeys) -> None:
        self._save(self._verifiers, self._methods, [p for p in self._pending if p not in entries])

    def _delete_keys(self, enrolled: EnrolledMethod, pin: str | None) -> bool:
        """Delete a replaced method's keys; True if all are gone."""
        auth = Authorization(pin=pin)
        done = True
        with self._store(enrolled.backend, enrolled.settings, enrolled.method) as store:
            for uri in _uris(enrolled):
                try:
                    store.delete_key(uri, auth)
                except HsmAuthError as e:
                    done = False
                    self._warn(f"warning: could not delete an old key ({e})")
        return done

    # --- the online service (hsm_auth.online_client, docs/PROTOCOL.md §13) -----------

    def online_method(
        self, verifier_id: bytes, method: Method, *, user: str | None = None,
        credential_id: str | None = None,
    ) -> EnrolledMethod:
        """The method enrolled here for ``verifier_id`` that signs online requests: the
        first of ``user`` (None: of any user), or the one of ``credential_id`` (hex)."""
        if credential_id is not None:
            enrolled = self._by_credential(verifier_id, bytes.fromhex(credential_id))
            if enrolled is not None and enrolled.method is not method:
                enrolled = None
        else:
            enrolled = self._find(verifier_id, method, user=user)
        if enrolled is None:
            raise UnknownMethod(f"the {method.value} method is not enrolled for that verifier")
        if not enrolled.credential_id:
            raise StateError(
                f"the {method.value} method was enrolled with an older protocol; enroll it again"
            )
        return enrolled

    def sign_online(
        self, verifier_id: bytes, method: Method, message: bytes, *,
        auth: Authorization | None = None,
    ) -> OnlineSignature:
        """Sign ``message`` (a request or approval message of
        :mod:`hsm_auth.request_signing`) with the enrolled method's key, in the token:
        ECDSA (:meth:`KeyStore.sign`) or, for FIDO2, an assertion over SHA-256(message)
        (``login_assertion``). ``auth`` is the PIN / the user interaction (the pin
        method needs its PIN; FIDO2 verifies the user in the authenticator)."""
        import hashlib

        from .request_signing import FIDO2_ASSERTION, Signature, signature_format

        enrolled = self.online_method(verifier_id, method)
        with self._store(
            enrolled.backend, enrolled.settings, method, enrolled.backend_ref
        ) as store:
            pin = auth.pin if auth is not None and method.needs_pin else None
            given = self._authorization(method, store, enrolled.settings, pin)
            if auth is not None:
                given = dataclasses.replace(
                    given, prompt=auth.prompt or given.prompt, timeout=auth.timeout,
                    interaction=auth.interaction or given.interaction,
                )
            if signature_format(method) == FIDO2_ASSERTION:
                assertion = getattr(store, "login_assertion", None)
                if assertion is None:
                    raise MechanismNotSupported("FIDO2 assertions")
                authdata, der = assertion(
                    enrolled.signing_key, hashlib.sha256(message).digest(), given
                )
                signature = Signature(ec.der_to_raw(der), bytes(authdata))
            else:
                signature = Signature(ec.der_to_raw(store.sign(enrolled.signing_key, message,
                                                               given)))
        return OnlineSignature(bytes.fromhex(enrolled.credential_id), signature)

    def sign_approval(
        self, verifier_id: bytes, method: Method, challenge: Challenge, decision: Decision,
        *, auth: Authorization | None = None, authorized_at: float | None = None,
    ) -> OnlineSignature:
        """The approval of ``challenge`` (its id, context hash and ``decision``), signed
        in the token by the method's key. The verifier's approval policy is enforced
        here: a PIN given earlier (``authorized_at``, when the agent's cache supplies
        ``auth``) is refused with :class:`PinRequired` once older than the method's
        ``approval_timeout`` (0: every approval needs a PIN typed for it)."""
        from .challenges import context_hash
        from .request_signing import approval_message

        enrolled = self.online_method(verifier_id, method)
        if authorized_at is not None and method.needs_pin and (
            self._clock() - authorized_at > enrolled.approval_timeout
            or self._clock() < authorized_at
        ):
            raise PinRequired(
                "the verifier's policy needs the PIN for this approval"
                + (f" (reused for at most {enrolled.approval_timeout} s)"
                   if enrolled.approval_timeout else " (on each approval)")
            )
        if challenge.user is not None and challenge.user != enrolled.user:
            raise UnknownMethod(f"the challenge is for another user than {enrolled.user!r}")
        message = approval_message(
            challenge.id_bytes, context_hash(challenge, enrolled.user), decision, verifier_id,
            bytes.fromhex(enrolled.credential_id),
        )
        return self.sign_online(verifier_id, method, message, auth=auth)

    def set_approval_policy(
        self, verifier_id: bytes, method: Method, timeout: int, *,
        credential_id: str | None = None,
    ) -> None:
        """Keep what the verifier stated for the method's approvals (seconds a PIN may
        be reused; 0: each approval) with the enrollment of ``credential_id`` (hex;
        None: the method's first)."""
        if type(timeout) is not int or not 0 <= timeout <= 3600:
            raise InvalidInput("an approval timeout is whole seconds in [0, 3600]")
        with self._exclusive():
            self._verifiers, self._methods = self._load()
            enrolled = self.online_method(verifier_id, method, credential_id=credential_id)
            updated = dataclasses.replace(enrolled, approval_timeout=timeout)
            self._save(self._verifiers, [updated if m is enrolled else m for m in self._methods])

    def remove(
        self, verifier_id: bytes, method: Method, *, pin: str | None = None,
        credential_id: str | None = None,
    ) -> None:
        """Forget the enrolled method (the enrollment of ``credential_id``, hex; None: the
        method's first) and delete its keys from the token. The record
        goes first, its keys recorded as pending, so that a kill in between leaves
        them to :meth:`prune_orphans`; a key that fails to delete stays recorded."""
        with self._exclusive():
            self._verifiers, self._methods = self._load()
            enrolled = (
                self._find(verifier_id, method) if credential_id is None
                else self._by_credential(verifier_id, bytes.fromhex(credential_id))
            )
            if enrolled is None:
                raise UnknownMethod(f"the {method.value} method is not enrolled for that verifier")
            doomed = PendingKeys(
                enrolled.backend, dict(enrolled.settings), enrolled.user, enrolled.method,
                enrolled.label, _uris(enrolled),
            )
            self._save(
                self._verifiers,
                [m for m in self._methods if m is not enrolled],
                [*self._pending, doomed],
            )
            if self._delete_keys(enrolled, pin if method.needs_pin else None):
                self._forget_pending(doomed)

    # --- TPM registration (docs/PROTOCOL.md, "TPM 2.0 attestation") ----------------

    def tpm_registration_request(self, method: Method = Method.DEVICE) -> str:
        """The registration request (text form) of the TPM that ``method`` uses: its
        EK certificate and an attestation key, made on first use."""
        with self._tpm_store(method) as store:
            return textcode.encode(store.registration_request())

    def tpm_activate(self, challenge_text: str, method: Method = Method.DEVICE) -> None:
        """Open a verifier's registration challenge in the TPM (credential activation);
        from then on TPM enrollments carry an attestation that verifier verifies."""
        with self._tpm_store(method) as store:
            store.activate_registration(textcode.decode(challenge_text))

    @contextlib.contextmanager
    def _tpm_store(self, method: Method) -> Iterator[Any]:
        from . import registry

        backend, settings = registry.choose_backend(self.config, method)
        if backend != "tpm2":
            raise ConfigError(
                f"the {method.value} method uses the {backend} backend, not tpm2: "
                "only a TPM registers an attestation key"
            )
        with self._store(backend, settings, method) as store:
            yield store

    # --- keys in tokens (orphans) ------------------------------------------------

    def keys(self, *, pin: str | None = None) -> KeyReport:
        """Every key with an hsm-auth label in the tokens this authenticator uses (those
        the config names, the enrolled methods use, or a pending record names), each
        marked enrolled, orphan or unclaimed. ``pin`` opens tokens that need their
        user PIN to list private objects. Holds the lock, so an enrollment under way in
        another process is seen finished or not at all."""
        with self._exclusive():
            self._verifiers, self._methods = self._load()
            found, unreachable, _ = self._survey(pin)
        return KeyReport(tuple(k for _, k in found), tuple(unreachable))

    def prune_orphans(self, *, pin: str | None = None, unclaimed: bool = False) -> KeyReport:
        """Delete the orphans that :meth:`keys` finds (with ``unclaimed``, the unclaimed
        keys too) and return what was deleted; ``unreachable`` names tokens that could
        not be listed, or where a key failed to delete. Keys an enrolled method uses are
        never touched. Holds the lock from listing to the last deletion, so an
        enrollment in another process is never pruned halfway."""
        with self._exclusive():
            self._verifiers, self._methods = self._load()
            found, unreachable, tokens = self._survey(pin)
            doomed = {KeyState.ORPHAN, *([KeyState.UNCLAIMED] if unclaimed else [])}
            deleted: list[TokenKey] = []
            for token_key, token in tokens.items():
                victims = [k for t, k in found if t is token and k.state in doomed]
                if not victims:
                    continue
                if any(k.state is KeyState.UNCLAIMED for k in victims) and not _accounted(
                    token, token_key, self._methods
                ):
                    unreachable.append(
                        (
                            token.backend,
                            "an enrolled method's keys were not found in this token, so "
                            "its unclaimed keys are kept",
                        )
                    )
                    victims = [k for k in victims if k.state is KeyState.ORPHAN]
                try:
                    with self._store(token.backend, token.settings, token.method) as store:
                        for key in victims:
                            store.delete_key(key.uri, token.auth)
                            deleted.append(key)
                except HsmAuthError as e:
                    unreachable.append((token.backend, str(e)))
            gone = {k.uri for k in deleted}
            left = [k for _, k in found if k.uri not in gone]
            listed = {_token_key(t.backend, t.settings) for t in tokens.values() if t.listed}
            settled = [
                p
                for p in self._pending
                if _token_key(p.backend, p.settings) in listed
                and not any(_claims(p, k) for k in left)
            ]
            if settled:
                self._forget_pending(*settled)
            if any(m.agreement_key in gone for m in self._methods):
                methods = [
                    dataclasses.replace(m, agreement_key=None) if m.agreement_key in gone else m
                    for m in self._methods
                ]
                self._save(self._verifiers, methods, self._pending)
        return KeyReport(tuple(deleted), tuple(unreachable))

    def _survey(
        self, pin: str | None
    ) -> tuple[list[tuple[_Token, TokenKey]], list[tuple[str, str]], dict[str, _Token]]:
        from . import registry

        tokens: dict[str, _Token] = {}

        def add(backend: str, settings: Mapping[str, Any], method: Method) -> None:
            key = _token_key(backend, settings)
            if key not in tokens or (method.needs_pin and not tokens[key].method.needs_pin):
                tokens[key] = _Token(backend, dict(settings), method)

        unreachable: list[tuple[str, str]] = []
        for method in Method:
            configured = self.config.method(method)
            if configured.backend is not None:  # configured: no probing, only its settings
                try:
                    add(*registry.choose_backend(self.config, method), method)
                except HsmAuthError as e:
                    unreachable.append((configured.backend, str(e)))
        for m in self._methods:
            add(m.backend, m.settings, m.method)
        for p in self._pending:
            add(p.backend, p.settings, p.method)

        for token in tokens.values():
            try:
                with self._store(token.backend, token.settings, token.method) as store:
                    try:
                        token.keys = store.list_keys(NO_AUTH)
                    except PinRequired:
                        if pin is None:
                            raise
                        token.auth = Authorization(pin=pin)
                        token.keys = store.list_keys(token.auth)
                token.listed = True
            except HsmAuthError as e:
                unreachable.append((token.backend, str(e)))

        used_uris = {u for m in self._methods for u in _uris(m)}
        used_labels = {m.label for m in self._methods if m.label}
        seen: dict[str, tuple[_Token, KeyInfo]] = {}
        for token in tokens.values():
            for info in token.keys:
                if (info.label or "").startswith(KEY_NAMESPACE) or info.uri in used_uris:
                    seen.setdefault(info.uri, (token, info))
        # Methods recorded before labels were: their keys' labels, found by URI.
        used_labels |= {enrollment_label(i.label) for _, i in seen.values() if i.uri in used_uris}
        stale = {m.agreement_key for m in self._methods if m.agreement_key}
        found = []
        for token, info in seen.values():
            if info.uri in stale or (
                info.kind is KeyKind.AGREEMENT and enrollment_label(info.label) in used_labels
            ):
                # An enrolled method's agreement key, kept by versions before issue 10:
                # it could derive the OTP key again, and nothing needs it any more.
                state = KeyState.ORPHAN
            elif info.uri in used_uris or enrollment_label(info.label) in used_labels:
                state = KeyState.ENROLLED
            elif any(_claims(p, info) for p in self._pending):
                state = KeyState.ORPHAN
            else:
                state = KeyState.UNCLAIMED
            found.append((token, TokenKey(token.backend, info.uri, info.kind, info.label, state)))
        return found, unreachable, tokens

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """An exclusive lock on ``<dir>/.lock``: a token counter is read and then
        written, so two processes must not advance it at the same instant."""
        ensure_private_dir(self.directory)
        with locked(self.directory / ".lock"):
            yield

    # --- offline authentication ----------------------------------------------

    def start_offline_authentication(self, text: str) -> OfflineRequest:
        """Decode and verify verification data; nothing is shown before the signature checks."""
        data, signed = VerificationData.from_text(text)
        pinned = self._verifiers.get(data.verifier_id)
        if pinned is None:
            raise UntrustedMessage(
                "verification data from a verifier this authenticator is not enrolled with"
            )
        ec.verify(ec.decode_point(pinned.signing_key), signed.signature, signed.body)
        if data.expires < self._clock():
            raise ExpiredMessage("the verification data has expired; ask for a new code")
        # The data names the tenant and the user: their enrollments only (several users
        # of one verifier, several tokens of a method: hsm_auth.enrollments).
        tenant = enrollments.offer_tenant(data)
        mine = enrollments.matching(
            self._methods, data.verifier_id, tenant=tenant, user=data.user
        )
        if not mine:
            raise UnknownMethod(
                f"this authenticator holds no enrollment of {data.user!r}"
                + (f" (tenant {tenant!r})" if tenant else "")
                + f" at {pinned.name!r}"
            )
        methods = tuple(m for m in data.methods if any(e.method is m for e in mine))
        if not methods:
            allowed = ", ".join(m.value for m in data.methods)
            raise UnknownMethod(
                f"none of the methods the verifier allows ({allowed}) is enrolled here"
            )
        # Expiry (hsm_auth.expiry): all of them expired is the advice to renew; an expired
        # one among live ones is refused (with the same advice) if it is chosen.
        usable = [m for m in mine if m.user == data.user and m.method in methods]
        if usable and all(expiry.expired(m.offline_expires, self._clock()) for m in usable):
            expiry.check(usable[0].method, usable[0].offline_expires, self._clock())
        return OfflineRequest(pinned.name, data.user, data.context, methods, data.expires, data)

    def finish_offline_authentication(
        self,
        request: OfflineRequest,
        method: Method,
        *,
        pin: str | None = None,
        token: str | None = None,
        data: str | None = None,
        prompt: str | None = None,
        unlocked: Unlocked | None = None,
    ) -> OfflineOtp:
        """Authenticate with ``method`` and return the OTP bound to the request's context,
        tenant and transaction, and to ``data``: what the user entered, required when the
        session lets the user enter data (``request.user_data`` > 0), refused otherwise
        (docs/PROTOCOL.md §17). ``prompt`` is the text shown while the token waits for
        the user's verification (else the method's own).

        ``unlocked``: the agent's held state (:mod:`hsm_auth.unlocked`); with it, a
        method whose policy caches (``pin_cache > 0``) uses what is held, else the
        ``pin`` (then holds the unlocked token); a method that caches nothing raises
        :class:`~hsm_auth.unlocked.EveryUse` before the token is touched.

        Several tokens of the method enrolled for the request's user: ``token`` names
        the one to use (its label or credential id, :mod:`hsm_auth.enrollments`);
        without it, the first one whose token is present (plugged in) answers."""
        from . import display, transaction

        entered = transaction.user_data(data, request.data.user_data)
        if prompt is not None:
            display.check(prompt, "the prompt", max_len=display.MAX_CONTEXT)
        if method not in request.methods:
            raise UnknownMethod(f"the {method.value} method is not allowed here or not enrolled")
        if request.expires < self._clock():
            raise ExpiredMessage("the verification data has expired; ask for a new code")
        candidates = self._candidates(
            request.data.verifier_id, enrollments.offer_tenant(request.data),
            request.data.user, method, token,
        )
        if not all(m.credential_id for m in candidates):
            raise StateError(
                f"the {method.value} method was enrolled with an older protocol; enroll it "
                "again (hsm-auth enroll --replace, with a new offer)"
            )
        enrolled = self._choose_present(candidates)
        expiry.check(method, enrolled.offline_expires, self._clock())  # before the token
        scheme = _scheme(enrolled.suite)
        question = scheme.question(
            verifier_id=enrolled.verifier_id,
            user=enrolled.user,
            method=method,
            credential_id=bytes.fromhex(enrolled.credential_id),
            challenge=request.data.challenge,
            context=request.data.context,
            tenant=request.data.tenant,
            transaction=request.data.transaction,
            data=entered,
        )
        with self._otp_store(enrolled, method, pin, unlocked) as (store, auth):
            if prompt is not None:
                auth = dataclasses.replace(auth, prompt=prompt)
            limit = enrolled.synced_atc + enrolled.window
            with self._exclusive():  # one OTP at a time per authenticator, across processes
                try:
                    atc, mac = store.counted_hmac(
                        enrolled.otp_key,
                        enrolled.counter,
                        lambda c: scheme.message(c, question),
                        auth,
                        limit=limit,  # the token refuses before advancing past it
                    )
                except LoginRequired as e:
                    used = (limit if e.atc is None else e.atc) - enrolled.synced_atc
                    raise LoginRequired(
                        f"{used} offline uses since the last sync; "
                        "log in online (hsm-auth sync) first",
                        atc=e.atc,
                        limit=limit,
                    ) from None
                # The offline log (docs/PROTOCOL.md §19): durable, its head signed in
                # this authorization, before the OTP is released.
                from .offline_log import record_use

                record_use(self.directory, store, enrolled, request.data, atc, auth,
                           now=int(self._clock()), user_data=entered)
        return OfflineOtp(scheme.truncate(mac), method, atc, enrollments.shown(enrolled))

    @contextlib.contextmanager
    def _otp_store(
        self, enrolled: EnrolledMethod, method: Method, pin: str | None,
        unlocked: Unlocked | None,
    ) -> Iterator[tuple[KeyStore, Authorization]]:
        """The store and the authorization for one OTP: as given (``unlocked`` is
        ``None``), else through the agent's held state under the method's
        ``pin_cache`` (the rules are in :mod:`hsm_auth.unlocked`)."""
        if unlocked is None:
            with self._store(
                enrolled.backend, enrolled.settings, method, enrolled.backend_ref
            ) as store:
                yield store, self._authorization(method, store, enrolled.settings, pin)
            return
        from . import registry
        from .unlocked import EveryUse

        if not method.needs_pin or enrolled.pin_cache <= 0:
            unlocked.forget(enrolled.credential_id)  # re-enrolled since: nothing stays held
            raise EveryUse(f"the {method.value} method's PIN is asked at every use")
        key = enrolled.credential_id
        cls = registry.load_backend(enrolled.backend, enrolled.backend_ref)
        if pin is not None:
            unlocked.forget(key)
        if cls.pin_unlocks_session:  # PKCS#11: hold the logged-in session itself
            held = unlocked.take_session(key) if pin is None else None
            if held is not None:
                auth = Authorization(prompt=None, interaction=self._interaction)
                try:
                    yield held.store, auth
                except LoginRequired:
                    unlocked.put_back(key, held)
                    raise
                except BaseException:  # the token closed it, was removed: never again
                    unlocked.discard(held)
                    raise
                unlocked.put_back(key, held)
                return
            if pin is None:
                raise PinRequired("the pin method needs the offline PIN")
            # No login of this process left on any token (two settings may name one
            # token): the token itself checks this PIN, and counts a wrong one.
            unlocked.close_sessions()
            store = cls.open(enrolled.settings)
            try:
                auth = self._authorization(method, store, enrolled.settings, pin)
                yield store, auth
            except LoginRequired:  # the PIN was right: hold the session all the same
                unlocked.hold_session(key, store, enrolled.pin_cache)
                raise
            except BaseException:
                store.close()
                raise
            unlocked.hold_session(key, store, enrolled.pin_cache)
            return
        cached = unlocked.pins.get(key) if pin is None else None  # TPM: the auth value
        use = pin if pin is not None else cached
        if use is None:
            raise PinRequired("the pin method needs the offline PIN")
        with self._store(enrolled.backend, enrolled.settings, method, enrolled.backend_ref) as s:
            auth = self._authorization(method, s, enrolled.settings, use)
            try:
                yield s, auth
            except (PinInvalid, PinLocked):
                unlocked.forget(key)
                raise
            except LoginRequired:
                if pin is not None:
                    unlocked.pins.put(key, pin, enrolled.pin_cache)
                raise
        if pin is not None:
            unlocked.pins.put(key, pin, enrolled.pin_cache)

    def sync(self, text: str, *, pin: str | None = None) -> SyncResult:
        """Answer a verifier's signed sync message (sent after an online login): the
        ATC report (docs/PROTOCOL.md §10, §18).

        The token advances its counter and MACs a :class:`SyncReport` for the new
        value with the OTP key (so the pin method needs the PIN, biometric and
        face a verification, as for an OTP). Give the report to the verifier
        (:meth:`Verifier.apply_sync`), which moves its ATC there and answers with a
        signed acknowledgement; :meth:`apply_sync_ack` takes that. Nothing is
        written here: the offline-use count stays until the acknowledgement
        arrives, so a report lost on the way (or a kill -9 before the answer)
        loses nothing."""
        with self._exclusive():  # the counter, read and advanced by the token
            self._verifiers, self._methods = self._load()
            return self._sync(text, pin)

    def _sync(self, text: str, pin: str | None) -> SyncResult:
        from .sync_messages import SyncMessage, SyncReport

        message, signed = SyncMessage.from_text(text)
        pinned = self._verifiers.get(message.verifier_id)
        if pinned is None:
            raise UntrustedMessage("sync message from an unknown verifier")
        ec.verify(ec.decode_point(pinned.signing_key), signed.signature, signed.body)
        if message.expires < self._clock():
            raise ExpiredMessage("the sync message has expired; ask the verifier for a new one")
        enrolled = self._synced_method(
            message.verifier_id, message.user, message.method, message.credential_id
        )
        expiry.check(message.method, enrolled.offline_expires, self._clock())
        scheme = _scheme(enrolled.suite)
        question = scheme.sync_question(
            session_id=message.session_id, user=message.user, method=message.method,
            credential_id=message.credential_id,
        )
        with self._store(
            enrolled.backend, enrolled.settings, message.method, enrolled.backend_ref
        ) as store:
            auth = self._authorization(message.method, store, enrolled.settings, pin)
            atc, mac = store.counted_hmac(  # no limit: this is how offline use resumes
                enrolled.otp_key,
                enrolled.counter,
                lambda c: scheme.message(c, question),
                auth,
            )
        report = SyncReport(
            verifier_id=message.verifier_id,
            session_id=message.session_id,
            user=message.user,
            method=message.method,
            atc=atc,
            credential_id=message.credential_id,
        ).to_text(lambda body: mac)
        return SyncResult(enrolled, report, unsubmitted=max(0, atc - 1 - message.atc), atc=atc)

    def apply_sync_ack(self, text: str) -> EnrolledMethod:
        """Take the verifier's signed acknowledgement of an ATC report
        (:class:`~hsm_auth.sync_messages.AtcAck`): offline uses count from its ATC
        from now on. Only forward: an acknowledgement of an ATC counted from already
        (an old one, replayed) changes nothing. Refused unless signed by the pinned
        verifier and naming a credential enrolled here. Returns the method."""
        from .errors import DecodeError
        from .sync_messages import AtcAck

        with self._exclusive():
            self._verifiers, self._methods = self._load()
            try:
                ack, signed = AtcAck.from_text(text)
            except DecodeError as e:
                raise InvalidInput(f"not the verifier's acknowledgement of a sync report ({e})"
                                   ) from None
            pinned = self._verifiers.get(ack.verifier_id)
            if pinned is None:
                raise UntrustedMessage("acknowledgement from an unknown verifier")
            try:
                ec.verify(ec.decode_point(pinned.signing_key), signed.signature, signed.body)
            except UntrustedMessage:
                raise UntrustedMessage(
                    f"the acknowledgement is not signed by {pinned.name!r}"
                ) from None
            enrolled = self._synced_method(ack.verifier_id, ack.user, ack.method,
                                           ack.credential_id)
            if ack.atc <= enrolled.synced_atc:
                return enrolled
            updated = dataclasses.replace(enrolled, synced_atc=ack.atc)
            self._save(self._verifiers, [updated if m is enrolled else m for m in self._methods])
            return updated

    def _synced_method(
        self, verifier_id: bytes, user: str, method: Method, credential_id: bytes
    ) -> EnrolledMethod:
        """The enrolled method that a sync message or acknowledgement names (by its
        credential id: a user may hold several credentials of one method)."""
        for m in self._methods:
            if (
                m.verifier_id == verifier_id
                and m.user == user
                and m.method is method
                and m.credential_id
                and hmac.compare_digest(bytes.fromhex(m.credential_id), credential_id)
            ):
                return m
        raise UnknownMethod(f"the {method.value} credential it names is not enrolled here")


@dataclass(frozen=True)
class SyncResult:
    """What :meth:`Authenticator.sync` did: the method (unchanged until the
    acknowledgement), the report for the verifier, the ATC it reports, and how many
    OTPs the verifier had not seen (made, never submitted)."""

    method: EnrolledMethod
    report: str
    unsubmitted: int
    atc: int


def _check_renewal(enrolled: EnrolledMethod, expires: int, cert: x509.Certificate) -> None:
    """What a stored result (at enrollment or renewal, docs/PROTOCOL.md §20) must also
    be: its certificate's notAfter is the expiry it states (when it states one), and
    it is not older than the certificate stored already (a replayed old result would
    bring back an earlier expiry)."""
    not_after = int(cert.not_valid_after_utc.timestamp())
    if expires and not_after != expires:
        raise UntrustedMessage(
            "the enrollment result's offline expiry is not its certificate's notAfter"
        )
    if enrolled.certificate:
        from cryptography.x509 import load_pem_x509_certificate

        try:
            stored = load_pem_x509_certificate(enrolled.certificate.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise StateError("credentials.json holds a malformed certificate") from None
        if cert.not_valid_before_utc < stored.not_valid_before_utc:
            raise UntrustedMessage(
                "the enrollment result is older than the one stored for the "
                f"{enrolled.method.value} method (replayed?)"
            )


def _is_hex(text: str, size: int) -> bool:
    try:
        return len(bytes.fromhex(text)) == size and text == text.lower()
    except ValueError:
        return False


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _token_key(backend: str, settings: Mapping[str, Any]) -> str:
    return repr((backend, sorted(settings.items())))


def _claims(pending: PendingKeys, key: KeyInfo | TokenKey) -> bool:
    """Whether ``key`` is one that the operation recorded in ``pending`` made or kept."""
    if key.uri in pending.uris:
        return True
    return bool(pending.label) and enrollment_label(key.label or "") == pending.label


def _accounted(token: _Token, token_key: str, methods: list[EnrolledMethod]) -> bool:
    """Every method enrolled on this token was found in its listing: otherwise its keys
    are listed under other URIs (a changed config?) and "unclaimed" may be wrong."""
    uris = {k.uri for k in token.keys}
    labels = {enrollment_label(k.label or "") for k in token.keys}
    return all(
        set(_uris(m)) & uris or (m.label and m.label in labels)
        for m in methods
        if _token_key(m.backend, m.settings) == token_key
    )


def _uris(m: EnrolledMethod) -> tuple[str, ...]:
    return tuple(u for u in (m.signing_key, m.otp_key, m.counter, m.agreement_key) if u)


# OCRA is imported on first use: `start` (checking verification data) needs
# none of it, and it is 1 ms of that command's start-up (bench/startup.py).
def _scheme(text: str) -> OtpScheme:
    """The enrolled method's own OTP scheme (refuses a suite the product cannot feed)."""
    from .otp_scheme import OtpScheme

    return OtpScheme.for_suite(text)


__all__ = [
    "Authenticator",
    "EnrolledMethod",
    "MechanismNotSupported",
    "OfflineOtp",
    "OfflineRequest",
    "PinnedVerifier",
    "SyncResult",
]
