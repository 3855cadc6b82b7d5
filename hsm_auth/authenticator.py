"""The authenticator: the workstation side that holds the tokens.

* :meth:`Authenticator.add_or_update` enrolls one method from a verifier's offer;
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
import functools
import hmac
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ec, ocra, registry
from .config import Config
from .errors import (
    AlreadyEnrolled,
    ConfigError,
    ExpiredMessage,
    HsmAuthError,
    LoginRequired,
    MechanismNotSupported,
    PinRequired,
    StateError,
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
from .keystore import Authorization, Capability, KeyStore, UserInteraction
from .methods import Method
from .protocol import EnrollmentOffer, EnrollmentResponse, SyncMessage, VerificationData

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

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["verifier_id"] = self.verifier_id.hex()
        d["method"] = self.method.value
        d["settings"] = dict(self.settings)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EnrolledMethod:
        where = "credentials.json"  # bounds: values only an edit could give
        return cls(
            **{**d, "verifier_id": bytes.fromhex(d["verifier_id"]), "method": Method(d["method"]),
               "window": state_int(d, "window", None, 1, 1000, where),
               "synced_atc": state_int(d, "synced_atc", None, 0, 2**63 - 1, where)}
        )


@dataclass(frozen=True)
class OfflineRequest:
    """What :meth:`Authenticator.start_offline_authentication` found in verified data."""

    verifier_name: str
    context: str
    methods: tuple[Method, ...]  # allowed by the verifier AND enrolled here
    expires: int
    data: VerificationData = field(repr=False)


@dataclass(frozen=True)
class OfflineOtp:
    otp: str = field(repr=False)
    method: Method
    atc: int


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
        self._verifiers, self._methods = self._load()

    # --- state ----------------------------------------------------------------

    def _load(self) -> tuple[dict[bytes, PinnedVerifier], list[EnrolledMethod]]:
        check_state(self.directory, directory=True, missing_ok=True)
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
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"{self._state_file} is malformed ({e.__class__.__name__})") from None
        return verifiers, methods

    def _save(self, verifiers: dict[bytes, PinnedVerifier], methods: list[EnrolledMethod]) -> None:
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
            },
        )
        self._verifiers, self._methods = verifiers, methods

    @property
    def enrolled(self) -> list[EnrolledMethod]:
        return list(self._methods)

    def _find(self, verifier_id: bytes, method: Method) -> EnrolledMethod | None:
        for m in self._methods:
            if m.verifier_id == verifier_id and m.method is method:
                return m
        return None

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
        self, method: Method, offer_text: str, *, pin: str | None = None, replace: bool = False
    ) -> str:
        """Enroll ``method`` from a verifier's offer; return the enrollment response text."""
        with self._exclusive():
            self._verifiers, self._methods = self._load()  # another process may have written
            return self._add_or_update(method, offer_text, pin=pin, replace=replace)

    def _add_or_update(
        self, method: Method, offer_text: str, *, pin: str | None, replace: bool
    ) -> str:
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
        ocra.OcraSuite.parse(offer.suite)
        existing = self._find(offer.verifier_id, method)
        if existing is not None and not replace:
            raise AlreadyEnrolled(
                f"the {method.value} method is enrolled already for {offer.verifier_name!r}; "
                "replacing it needs --replace"
            )
        if existing is not None and not offer.replace:
            raise AlreadyEnrolled(
                "the verifier's offer does not allow replacing an enrolled method"
            )

        backend, settings = registry.choose_backend(self.config, method)
        with self._store(backend, settings, method) as store:
            store.require_method(method)
            auth = self._authorization(method, store, settings, pin)
            from .webauthn_proof import enrollment_binding  # only enrollment needs it (x509 import)

            label = f"hsm-auth/{offer.user}/{method.value}/{os.urandom(3).hex()}"
            enrollment = store.enroll(
                method,
                label,
                ec.decode_point(offer.verifier_agreement_key),
                auth,
                binding=enrollment_binding(offer.offer_id, offer.user, method),
            )
            try:
                response = EnrollmentResponse(
                    verifier_id=offer.verifier_id,
                    offer_id=offer.offer_id,
                    user=offer.user,
                    method=method,
                    backend=backend,
                    signing_key=ec.encode_point(enrollment.signing_public),
                    agreement_key=(
                        ec.encode_point(enrollment.agreement_public)
                        if enrollment.agreement_public is not None
                        else None
                    ),
                    wrapped_otp_key=enrollment.otp_key_for_verifier,
                    initial_atc=enrollment.initial_atc,
                    attestation=enrollment.attestation,
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
                )
                verifiers = dict(self._verifiers)
                verifiers[offer.verifier_id] = PinnedVerifier(
                    offer.verifier_id, offer.verifier_name, offer.verifier_signing_key
                )
                methods = [m for m in self._methods if m is not existing] + [record]
                self._save(verifiers, methods)
            except BaseException:
                store.unenroll(enrollment, auth)  # nothing half-enrolled stays in the token
                raise
        if existing is not None:
            self._delete_keys(existing, pin)
        return text

    def _delete_keys(self, enrolled: EnrolledMethod, pin: str | None) -> None:
        auth = Authorization(pin=pin)
        uris = (enrolled.signing_key, enrolled.otp_key, enrolled.counter, enrolled.agreement_key)
        with self._store(enrolled.backend, enrolled.settings, enrolled.method) as store:
            for uri in uris:
                if uri:
                    try:
                        store.delete_key(uri, auth)
                    except HsmAuthError as e:
                        self._warn(f"warning: could not delete an old key ({e})")

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
        methods = tuple(m for m in data.methods if self._find(data.verifier_id, m) is not None)
        if not methods:
            allowed = ", ".join(m.value for m in data.methods)
            raise UnknownMethod(
                f"none of the methods the verifier allows ({allowed}) is enrolled here"
            )
        return OfflineRequest(pinned.name, data.context, methods, data.expires, data)

    def finish_offline_authentication(
        self, request: OfflineRequest, method: Method, *, pin: str | None = None
    ) -> OfflineOtp:
        """Authenticate with ``method`` and return the OTP bound to the request's context."""
        if method not in request.methods:
            raise UnknownMethod(f"the {method.value} method is not allowed here or not enrolled")
        if request.expires < self._clock():
            raise ExpiredMessage("the verification data has expired; ask for a new code")
        enrolled = self._find(request.data.verifier_id, method)
        assert enrolled is not None
        suite = _suite(enrolled.suite)
        question = request.data.question.hex()
        with self._store(
            enrolled.backend, enrolled.settings, method, enrolled.backend_ref
        ) as store:
            auth = self._authorization(method, store, enrolled.settings, pin)
            limit = enrolled.synced_atc + enrolled.window
            with self._exclusive():  # one OTP at a time per authenticator, across processes
                try:
                    atc, mac = store.counted_hmac(
                        enrolled.otp_key,
                        enrolled.counter,
                        lambda c: suite.data_input(counter=c, question=question),
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
        return OfflineOtp(ocra.truncate(mac, suite.digits), method, atc)

    def sync(self, text: str) -> EnrolledMethod:
        """Apply a verifier's signed sync message: offline uses count from its ATC again."""
        with self._exclusive():
            self._verifiers, self._methods = self._load()
            return self._sync(text)

    def _sync(self, text: str) -> EnrolledMethod:
        message, signed = SyncMessage.from_text(text)
        pinned = self._verifiers.get(message.verifier_id)
        if pinned is None:
            raise UntrustedMessage("sync message from an unknown verifier")
        ec.verify(ec.decode_point(pinned.signing_key), signed.signature, signed.body)
        if message.expires < self._clock():
            raise ExpiredMessage("the sync message has expired")
        enrolled = self._find(message.verifier_id, message.method)
        if enrolled is None or enrolled.user != message.user:
            raise UnknownMethod(f"the {message.method.value} method is not enrolled here")
        updated = dataclasses.replace(enrolled, synced_atc=max(enrolled.synced_atc, message.atc))
        self._save(self._verifiers, [updated if m is enrolled else m for m in self._methods])
        return updated


@functools.lru_cache(maxsize=8)
def _suite(text: str) -> ocra.OcraSuite:
    return ocra.OcraSuite.parse(text)


__all__ = [
    "Authenticator",
    "EnrolledMethod",
    "MechanismNotSupported",
    "OfflineOtp",
    "OfflineRequest",
    "PinnedVerifier",
]
