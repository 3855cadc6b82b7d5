"""Workstation login: the workstation itself is the verifier.

Enrolling a user for login creates a signing key and a counter in the token
of the chosen method and records their *public* side in the authfile
directory (default ``/etc/hsm-auth/login``). At login a fresh 256-bit random
challenge is signed inside the token (with the PIN or user verification the
method needs), checked against the enrolled public key, and the token's
counter must have moved forward; then the new counter value is stored.

Authfile directory format
    One file per user, named exactly as the user (``[A-Za-z0-9_][A-Za-z0-9_.-]*``,
    an optional trailing ``$``), UTF-8 JSON::

        {"version": 1, "user": "alice",
         "credentials": [
           {"method": "pin", "backend": "pkcs11",
            "settings": {"uri": "pkcs11:token=alice?module-path=/usr/lib/...so"},
            "signing_key": "pkcs11:...;type=private", "counter_uri": "pkcs11:...;type=data",
            "public_key": "04…(65-byte X9.62 point, hex)",
            "format": "ecdsa-p256-sha256", "counter": 7, "created": 1700000000}]}

    ``settings`` are the backend settings of the method (key URIs, module
    paths, a TCTI, ``pin-source`` *paths*), never a secret. The directory and
    every file must be owned by root (or by the user running the check, for
    tests) and not writable by group or others; files are opened with
    ``O_NOFOLLOW`` relative to the directory and refused otherwise. Counter
    updates replace the file atomically (temp file + fsync + rename + fsync of
    the directory, mode 0644) under an exclusive ``flock`` on the directory.

Signed message (``ecdsa-p256-sha256`` format)
    ``b"hsm-auth-login-v1"`` followed by the length-prefixed (2-byte big
    endian) hostname, user and 32-byte challenge, then the new counter value as
    8 bytes big endian. The token signs it with ECDSA P-256 over SHA-256
    (:meth:`KeyStore.sign`); the counter value is the one the token returned
    from :meth:`KeyStore.counter_increment` just before signing.

Per-backend signature formats (how FIDO2 plugs in)
    A FIDO2 authenticator cannot sign arbitrary data: an assertion signs
    ``authenticatorData || clientDataHash`` and carries its own signature
    counter in ``authenticatorData``. A backend like that implements the
    optional method ``login_assertion(uri, client_data_hash, auth) ->
    (authenticator_data, der_signature)`` and records ``format =
    "fido2-assertion"`` at enrollment (see :data:`FIDO2_ASSERTION`, and set
    ``login_format`` on the KeyStore class). The client data hash is
    SHA-256 of the message above *without* the counter field; the verifier
    checks the signature over ``authenticatorData || clientDataHash``, that
    the rpId hash is SHA-256 of ``rp_id`` in the credential's settings
    (default ``"hsm-auth"``), that user presence (and, for biometric/face,
    user verification) flags are set, and that the signature counter in
    ``authenticatorData`` is above the stored one. Everything else — the
    authfile, the counter check, the PAM helper — is shared.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from . import registry
from .config import Config
from .errors import (
    AlreadyEnrolled,
    ConfigError,
    HsmAuthError,
    InvalidInput,
    InvalidToken,
    MechanismNotSupported,
    PinRequired,
    StateError,
    UnknownMethod,
)
from .files import check_parents, check_stat
from .keystore import Authorization, Capability, KeyKind, KeyStore, UserInteraction
from .methods import Method

DEFAULT_AUTHDIR = Path("/etc/hsm-auth/login")
DOMAIN = b"hsm-auth-login-v1"
CHALLENGE_BYTES = 32  # 256 bits
ECDSA_P256_SHA256 = "ecdsa-p256-sha256"
FIDO2_ASSERTION = "fido2-assertion"
FORMATS = (ECDSA_P256_SHA256, FIDO2_ASSERTION)
FILE_MODE = 0o644
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\$?")
_MAX_FILE = 1 << 20
#: Method settings that are secrets: never written to an authfile (others can read
#: it); at login they come from root's config (:func:`with_secrets`).
SECRET_SETTINGS = frozenset({"owner_auth"})
_FLAG_UP, _FLAG_UV = 0x01, 0x04

Warn = Callable[[str], None]


# --- records ------------------------------------------------------------------


def _json_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _json_int(value: Any) -> int:
    """A counter or time: an integer in [0, 2**63), never a float (``1e999`` is infinity)."""
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError("expected an integer in [0, 2**63)")
    return value


@dataclass(frozen=True)
class LoginCredential:
    """One method enrolled for login: public key, key/counter URIs, last counter."""

    method: Method
    backend: str
    settings: Mapping[str, Any]
    signing_key: str
    counter_uri: str | None
    public_key: bytes  # X9.62 uncompressed point
    format: str
    counter: int
    created: int
    #: The backend's entry-point value (``module:Class``), so login skips the entry-point scan.
    backend_ref: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "backend": self.backend,
            "settings": dict(self.settings),
            "signing_key": self.signing_key,
            "counter_uri": self.counter_uri,
            "public_key": self.public_key.hex(),
            "format": self.format,
            "counter": self.counter,
            "created": self.created,
            "backend_ref": self.backend_ref,
        }

    @classmethod
    def from_json(cls, d: Any) -> LoginCredential:
        if not isinstance(d, dict):
            raise StateError("an authfile credential is not an object")
        try:
            settings = d.get("settings") or {}
            if not isinstance(settings, dict):
                raise TypeError("settings")
            cred = cls(
                method=Method.parse(_json_str(d["method"])),
                backend=_json_str(d["backend"]),
                settings=settings,
                signing_key=_json_str(d["signing_key"]),
                counter_uri=None if d.get("counter_uri") is None else _json_str(d["counter_uri"]),
                public_key=bytes.fromhex(_json_str(d["public_key"])),
                format=_json_str(d["format"]),
                counter=_json_int(d["counter"]),
                created=_json_int(d.get("created", 0)),
                backend_ref=_json_str(d.get("backend_ref", "")),
            )
        except (KeyError, TypeError, ValueError, UnknownMethod) as e:
            raise StateError(f"malformed authfile credential ({e.__class__.__name__})") from None
        if cred.format not in FORMATS:
            raise StateError("malformed authfile credential (format or counter)")
        return cred

    @property
    def public(self) -> ec.EllipticCurvePublicKey:
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.public_key)
        except ValueError:
            raise StateError("the authfile holds a public key that is not a P-256 point") from None


@dataclass(frozen=True)
class LoginProof:
    """What the token produced for one challenge."""

    counter: int
    signature: bytes = field(repr=False)  # DER ECDSA
    authenticator_data: bytes = b""  # FIDO2 assertions only


@dataclass(frozen=True)
class LoginResult:
    user: str
    method: Method
    counter: int


# --- message ------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise InvalidInput("a login message field is too long")
    return len(data).to_bytes(2, "big") + data


def login_message(host: str, user: str, challenge: bytes, counter: int | None) -> bytes:
    """The bytes the token signs (``counter=None`` for formats that carry their own)."""
    if len(challenge) < 16:
        raise InvalidInput("a login challenge has at least 128 bits")
    body = DOMAIN + _field(host.encode()) + _field(user.encode()) + _field(challenge)
    if counter is not None:
        body += counter.to_bytes(8, "big")
    return body


def verify_proof(
    cred: LoginCredential, host: str, user: str, challenge: bytes, proof: LoginProof
) -> int:
    """Check ``proof`` against the enrolled key and counter; return the new counter.

    Raises :class:`InvalidToken` for every failure (the reason is in the message
    for the log, never a secret)."""
    public = cred.public
    if cred.format == ECDSA_P256_SHA256:
        signed = login_message(host, user, challenge, proof.counter)
        counter = proof.counter
    elif cred.format == FIDO2_ASSERTION:
        client_hash = hashlib.sha256(login_message(host, user, challenge, None)).digest()
        return check_assertion(
            public, proof.authenticator_data, client_hash, proof.signature,
            rp_id=str(cred.settings.get("rp_id", "hsm-auth")),
            user_verification=cred.method.needs_user_verification, last_counter=cred.counter,
        )
    else:
        raise InvalidToken("unknown signature format")
    try:
        public.verify(proof.signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise InvalidToken("signature does not verify with the enrolled key") from None
    if counter <= cred.counter:
        raise InvalidToken("counter did not move forward (cloned or rolled-back token?)")
    return counter


def check_assertion(
    public: ec.EllipticCurvePublicKey, authenticator_data: bytes, client_data_hash: bytes,
    signature: bytes, *, rp_id: str, user_verification: bool, last_counter: int,
) -> int:
    """Check a FIDO2 assertion (the one owner of this check: workstation login, and
    the online service's signed requests and approvals, :mod:`hsm_auth.request_signing`):
    the rpId hash is SHA-256 of ``rp_id``, user presence (and ``user_verification``)
    flags are set, the DER ``signature`` verifies over ``authenticatorData ||
    clientDataHash`` with ``public``, and the signature counter is above
    ``last_counter``. Returns the new counter; :class:`InvalidToken` for every failure."""
    data = authenticator_data
    if len(data) < 37:
        raise InvalidToken("authenticator data too short")
    if data[:32] != hashlib.sha256(rp_id.encode()).digest():
        raise InvalidToken("assertion for another relying party")
    flags = data[32]
    if not flags & _FLAG_UP:
        raise InvalidToken("assertion without user presence")
    if user_verification and not flags & _FLAG_UV:
        raise InvalidToken("assertion without user verification")
    counter = int.from_bytes(data[33:37], "big")
    try:
        public.verify(signature, data + client_data_hash, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise InvalidToken("signature does not verify with the enrolled key") from None
    if counter <= last_counter:
        raise InvalidToken("counter did not move forward (cloned or rolled-back token?)")
    return counter


def make_proof(
    store: KeyStore, cred: LoginCredential, host: str, user: str, challenge: bytes,
    auth: Authorization,
) -> LoginProof:
    """Have the token sign the login message for ``challenge``."""
    if cred.format == FIDO2_ASSERTION:
        assertion = getattr(store, "login_assertion", None)
        if assertion is None:
            raise MechanismNotSupported("FIDO2 login assertions")
        client_hash = hashlib.sha256(login_message(host, user, challenge, None)).digest()
        auth_data, signature = assertion(cred.signing_key, client_hash, auth)
        return LoginProof(int.from_bytes(bytes(auth_data)[33:37], "big"), signature, auth_data)
    if cred.counter_uri is None:
        raise StateError("the credential has no counter")
    counter = store.counter_increment(cred.counter_uri, auth)  # durable before the signature
    message = login_message(host, user, challenge, counter)
    return LoginProof(counter, store.sign(cred.signing_key, message, auth))


# --- authfile directory ---------------------------------------------------------


def hostname() -> str:
    """This host's name as signed in login messages (``gethostname(2)``, which Linux
    takes from ``uname``; ``socket`` is not imported for it: PAM start-up time)."""
    return os.uname().nodename


def check_user_name(user: str) -> str:
    if not _USER.fullmatch(user) or user in (".", ".."):
        raise InvalidInput("not a valid user name for login")
    return user


class AuthDir:
    """The authfile directory, opened safely once (no symlinks, trusted modes)."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(os.path.abspath(path))
        try:
            if create and not self.path.exists():
                self.path.mkdir(mode=0o755, parents=True)
            check_parents(self.path)
            self._fd = os.open(
                self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise StateError(f"the login authfile directory {self.path} does not exist") from None
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path (from the config)
            reason = getattr(e, "strerror", None) or e
            raise StateError(f"cannot open {str(self.path)[:200]}: {reason}") from None
        try:
            check_stat(os.fstat(self._fd), self.path, directory=True)
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuthDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock for read-check-write of counters (one login at a time)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read(self, user: str) -> list[LoginCredential] | None:
        """The user's credentials, or ``None`` if the user has no authfile."""
        name = check_user_name(user)
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._fd
            )
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot open the authfile for {name}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            check_stat(os.fstat(f.fileno()), self.path / name, directory=False,
                       what="the authfile ")
            raw = f.read(_MAX_FILE + 1)
        if len(raw) > _MAX_FILE:
            raise StateError(f"the authfile for {name} is too large")
        try:
            data = json.loads(raw)
            if data.get("version") != 1 or data.get("user") != name:
                raise ValueError("version or user")
            creds = data["credentials"]
            if not isinstance(creds, list):
                raise ValueError("credentials")
        except (ValueError, AttributeError, KeyError, TypeError, RecursionError) as e:
            reason = e.__class__.__name__ if isinstance(e, RecursionError) else str(e)[:80]
            raise StateError(f"the authfile for {name} is malformed ({reason})") from None
        return [LoginCredential.from_json(c) for c in creds]

    def write(self, user: str, creds: list[LoginCredential]) -> None:
        """Replace the user's authfile atomically."""
        name = check_user_name(user)
        data = json.dumps(
            {"version": 1, "user": name, "credentials": [c.to_json() for c in creds]},
            indent=2, sort_keys=True,
        ).encode() + b"\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(os.path.basename(tmp), name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.fsync(self._fd)


# --- backends -------------------------------------------------------------------


def choose_backend(config: Config, method: Method) -> tuple[str, Mapping[str, Any]]:
    """The configured backend for ``method``, else the best one that probes OK."""
    return registry.choose_backend(config, method)


def authorization(
    method: Method, store: KeyStore, settings: Mapping[str, Any], pin: str | None,
    *, prompt: str | None = None, timeout: float | None = None, warn: Warn | None = None,
    interaction: UserInteraction | None = None,
) -> Authorization:
    """The authorization a method needs; refuses a PIN the token does not protect.
    ``interaction`` shows ``prompt`` while the token waits for the user."""
    if method is Method.PIN:
        if pin is None:
            raise PinRequired("the pin method needs the PIN")
        check_pin_protection(store, settings, warn)
    return Authorization(pin=pin, prompt=prompt, timeout=timeout, interaction=interaction)


def check_pin_protection(store: KeyStore, settings: Mapping[str, Any], warn: Warn | None) -> None:
    """Refuse a token that does not limit PIN retries unless the method allows it."""
    if Capability.PIN_RETRY_LIMIT not in store.capabilities():
        if not settings.get("allow_unenforced_pin", False):
            raise ConfigError(
                "this token does not limit PIN retries, so it cannot protect a login PIN; "
                "set allow_unenforced_pin = true for this method to use it anyway"
            )
        if warn is not None:
            warn("warning: this token does not limit PIN retries (e.g. SoftHSM)")


def _format_for(store: KeyStore) -> str:
    fmt = getattr(type(store), "login_format", ECDSA_P256_SHA256)
    if fmt not in FORMATS:
        raise MechanismNotSupported(f"login signature format {fmt!r}")
    return str(fmt)


# --- enroll / login ---------------------------------------------------------------


def enroll(
    authdir: AuthDir, user: str, method: Method, config: Config, *, pin: str | None = None,
    replace_existing: bool = False, clock: Callable[[], float] = time.time,
    warn: Warn | None = None, interaction: UserInteraction | None = None, add: bool = False,
) -> LoginCredential:
    """Create a signing key and counter in the method's token and record them for ``user``.

    ``add`` keeps the user's other credentials of the method (a second token: login
    tries each in order); else one exists already (:class:`AlreadyEnrolled`) or
    ``replace_existing`` replaces it and deletes its keys.

    A first login is run before the record is written, so a broken setup never
    ends up enrolled; on any failure the new keys are deleted from the token."""
    check_user_name(user)
    backend, settings = choose_backend(config, method)
    with authdir.locked():
        existing = authdir.read(user) or []
        if any(c.method is method for c in existing) and not (replace_existing or add):
            raise AlreadyEnrolled(
                f"{user} is enrolled for login with {method.value} already; use --replace"
            )
        with registry.load_backend(backend).open(settings) as store:
            store.require_method(method)
            auth = authorization(
                method, store, settings, pin, warn=warn, interaction=interaction
            )
            fmt = _format_for(store)
            if fmt == ECDSA_P256_SHA256 and not {Capability.SIGN, Capability.COUNTER} <= (
                store.capabilities()
            ):
                raise MechanismNotSupported("signing and a counter")
            label = f"hsm-auth-login/{user}/{method.value}/{os.urandom(3).hex()}"
            key = store.generate_key(f"{label}/sign", KeyKind.SIGNING, auth)
            counter_uri: str | None = None
            try:
                if fmt == ECDSA_P256_SHA256:
                    counter_uri = store.create_counter(f"{label}/ctr", auth)
                    start = store.counter_value(counter_uri, auth)
                else:
                    start = 0
                from cryptography.hazmat.primitives import serialization

                public = store.public_key(key, auth).public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                public_settings = {k: v for k, v in settings.items()
                                   if k not in SECRET_SETTINGS}
                cred = LoginCredential(
                    method, backend, public_settings, key, counter_uri, public, fmt, start,
                    int(clock()), registry.backend_reference(backend),
                )
                host = hostname()
                challenge = os.urandom(CHALLENGE_BYTES)
                proof = make_proof(store, cred, host, user, challenge, auth)
                cred = replace(cred, counter=verify_proof(cred, host, user, challenge, proof))
                kept = [c for c in existing if add or c.method is not method]
                authdir.write(user, [*kept, cred])
            except BaseException:
                with contextlib.suppress(HsmAuthError):
                    store.delete_key(key, auth)
                    if counter_uri is not None:
                        store.delete_key(counter_uri, auth)
                raise
        for old in [] if add else existing:
            if old.method is method:
                _delete_old(old, pin, warn, config)
    return cred


def with_secrets(cred: LoginCredential, config: Config | None) -> dict[str, Any]:
    """The credential's settings plus the :data:`SECRET_SETTINGS` (e.g. the TPM's
    ``owner_auth``) of root's config for that method, when it names the same backend
    (or none). An authfile that still holds one (written before) keeps it."""
    settings = dict(cred.settings)
    configured = None if config is None else config.methods.get(cred.method)
    if configured is not None and configured.backend in (None, cred.backend):
        for key in SECRET_SETTINGS:
            if key in configured.settings:
                settings[key] = configured.settings[key]
    return settings


def _delete_old(old: LoginCredential, pin: str | None, warn: Warn | None,
                config: Config) -> None:
    try:
        with registry.load_backend(old.backend).open(with_secrets(old, config)) as store:
            auth = Authorization(pin=pin)
            store.delete_key(old.signing_key, auth)
            if old.counter_uri is not None:
                store.delete_key(old.counter_uri, auth)
    except HsmAuthError as e:
        if warn is not None:
            warn(f"warning: could not delete the replaced login key ({e})")


def select(creds: list[LoginCredential], method: Method | None) -> LoginCredential:
    for cred in creds:
        if method is None or cred.method is method:
            return cred
    raise UnknownMethod("the user is not enrolled for login with that method")


def login(
    authdir: AuthDir, user: str, *, pin: str | None = None, method: Method | None = None,
    prompt: str | None = None, timeout: float | None = None, warn: Warn | None = None,
    interaction: UserInteraction | None = None, config: Config | None = None,
) -> LoginResult:
    """Authenticate ``user`` locally: fresh challenge, signed in the token, verified
    with the enrolled key, counter forward, new counter stored. Raises on any failure.

    The PIN is tried only when the method needs one; ``UnknownMethod`` when the
    user has no enrollment."""
    check_user_name(user)
    with authdir.locked():
        creds = authdir.read(user)
        if not creds:
            raise UnknownMethod(f"{user} is not enrolled for login")
        cred = select(creds, method)
        settings = with_secrets(cred, config)
        with registry.load_backend(cred.backend, cred.backend_ref).open(settings) as store:
            auth = authorization(
                cred.method, store, settings, pin if cred.method.needs_pin else None,
                prompt=prompt, timeout=timeout, warn=warn, interaction=interaction,
            )
            host = hostname()
            challenge = os.urandom(CHALLENGE_BYTES)
            proof = make_proof(store, cred, host, user, challenge, auth)
        counter = verify_proof(cred, host, user, challenge, proof)
        authdir.write(
            user, [replace(c, counter=counter) if c is cred else c for c in creds]
        )
    return LoginResult(user, cred.method, counter)



# --- the login API (what a PAM module calls) ------------------------------------------
#
# The native PAM module's Python side (hsm_auth.pam) builds a LoginRequest from the
# PAM items and its module arguments, implements Conversation over its pipe to the
# module, and maps each Outcome to a PAM code. The policy itself (which methods may
# log in, every enrolled token in order, account names, the failure record, remote
# sessions) is hsm_auth.login_policy; authenticate() is its entry point.

DEFAULT_STATE_DIR = Path("/var/lib/hsm-auth/login")
DEFAULT_LOGIN_TIMEOUT = 30.0


class Conversation(Protocol):
    """How the login talks to the person at the PAM application (its conversation)."""

    def secret(self, prompt: str) -> str | None:
        """Ask for a secret without echo (``PAM_PROMPT_ECHO_OFF``); ``None``: no answer."""

    def info(self, text: str) -> None:
        """Show a cue (``PAM_TEXT_INFO``), before the token waits for the user."""

    def error(self, text: str) -> None:
        """Show an error (``PAM_ERROR_MSG``)."""


class Outcome(enum.Enum):
    """The result of one login; the PAM module maps each to the PAM code of its name."""

    SUCCESS = "PAM_SUCCESS"
    AUTH_ERR = "PAM_AUTH_ERR"  # wrong PIN, failed verification, no answer
    USER_UNKNOWN = "PAM_USER_UNKNOWN"  # no such account, or not enrolled (without nouserok)
    IGNORE = "PAM_IGNORE"  # not enrolled and ``nouserok``: the next module decides
    AUTHINFO_UNAVAIL = "PAM_AUTHINFO_UNAVAIL"  # none of the user's tokens is present
    MAXTRIES = "PAM_MAXTRIES"  # the token is locked, or the failure record refuses tries
    PERM_DENIED = "PAM_PERM_DENIED"  # refused by policy (a remote session, device alone)
    SYSTEM_ERR = "PAM_SYSTEM_ERR"  # configuration or state that cannot be trusted


FIRST_PASS = ("try", "use")
REMOTE = ("deny", "allow")


@dataclass(frozen=True)
class LoginOptions:
    """The module's options (pam_u2f-like), after ``[login]`` defaults from root's config.

    ``methods`` ``None`` means the policy's default (:data:`PERSON_METHODS`);
    ``first_pass`` is ``None`` (the default: always ask), ``"try"`` or ``"use"``;
    ``second_factor`` says the module's line is stacked after another auth module
    (see :mod:`hsm_auth.login_policy`)."""

    nouserok: bool = False
    cue: str | None = None
    methods: tuple[Method, ...] | None = None
    timeout: float = DEFAULT_LOGIN_TIMEOUT
    remote: str = "deny"
    debug: bool = False
    first_pass: str | None = None
    second_factor: bool = False

    def __post_init__(self) -> None:
        if self.remote not in REMOTE:
            raise ConfigError(f"remote must be one of {', '.join(REMOTE)}")
        if self.first_pass not in (None, *FIRST_PASS):
            raise ConfigError("first_pass must be try or use")
        if isinstance(self.timeout, bool) or not 0 < self.timeout <= 600:
            raise ConfigError("timeout must be a number of seconds in (0, 600]")

    @classmethod
    def from_args(cls, args: Sequence[str], table: Mapping[str, Any] | None = None
                  ) -> LoginOptions:
        """Parse PAM module arguments (``nouserok``, ``cue``, ``cue_prompt=TEXT``,
        ``methods=pin,face``, ``timeout=S``, ``remote=deny|allow``, ``debug``,
        ``try_first_pass``, ``use_first_pass``, ``second_factor``) over the defaults
        of the ``[login]`` table (``cue``, ``methods``, ``timeout``, ``remote``).
        An unknown argument is a :class:`ConfigError`: fail closed."""
        table = table or {}
        values: dict[str, Any] = {}
        if "cue" in table:
            values["cue"] = str(table["cue"]) or None
        if "methods" in table:
            values["methods"] = _methods(table["methods"])
        if "timeout" in table:
            values["timeout"] = float(table["timeout"])
        if "remote" in table:
            values["remote"] = table["remote"]
        flags = {"nouserok": "nouserok", "debug": "debug", "second_factor": "second_factor"}
        for arg in args:
            name, eq, value = arg.partition("=")
            if name in flags and not eq:
                values[flags[name]] = True
            elif name == "cue" and not eq:
                values["cue"] = values.get("cue") or DEFAULT_CUE
            elif name == "cue_prompt" and eq:
                values["cue"] = value or None
            elif name in ("try_first_pass", "use_first_pass") and not eq:
                values["first_pass"] = name.split("_", 1)[0]
            elif name == "methods" and eq:
                values["methods"] = _methods(value)
            elif name == "timeout" and eq:
                try:
                    values["timeout"] = float(value)
                except ValueError:
                    raise ConfigError("timeout must be a number of seconds") from None
            elif name == "remote" and eq:
                values["remote"] = value
            else:
                raise ConfigError(f"unknown module argument {arg[:40]!r}")
        return cls(**values)


DEFAULT_CUE = "Touch or verify on your authenticator now."


def _methods(value: Any) -> tuple[Method, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ConfigError("methods must name at least one method")
    try:
        return tuple(dict.fromkeys(Method.parse(str(n)) for n in names))
    except UnknownMethod as e:
        raise ConfigError(f"methods: {e}") from None


@dataclass(frozen=True)
class LoginRequest:
    """One PAM authentication as the module sees it.

    ``user`` is ``PAM_USER`` as given (canonicalised by the policy); ``first_pass``
    is ``PAM_AUTHTOK``, passed only with ``try_first_pass`` / ``use_first_pass``;
    ``prior_authtok`` says that an earlier module of the stack set ``PAM_AUTHTOK``
    (a password was asked before this module: the module passes the fact, not the
    value). ``caller_pid`` is the PAM application's process (its logind session is
    looked up from its cgroup; ``None``: this process, which inherited it)."""

    user: str
    service: str
    rhost: str | None
    tty: str | None
    options: LoginOptions = field(default_factory=LoginOptions)
    first_pass: str | None = field(default=None, repr=False)
    prior_authtok: bool = False
    caller_pid: int | None = None


@dataclass(frozen=True)
class LoginOutcome:
    """What :func:`authenticate` decided; ``message`` is one line for syslog, never a
    secret. ``method`` is the method that logged in (``SUCCESS`` only)."""

    outcome: Outcome
    message: str
    method: Method | None = None

    @property
    def success(self) -> bool:
        return self.outcome is Outcome.SUCCESS


def authenticate(
    request: LoginRequest, conversation: Conversation, *, config: Config,
    authdir: Path = DEFAULT_AUTHDIR, state_dir: Path = DEFAULT_STATE_DIR,
) -> LoginOutcome:
    """Run one login under the login policy (:mod:`hsm_auth.login_policy`).

    Never raises for a login failure: every refusal is a :class:`LoginOutcome`
    (unexpected errors are ``SYSTEM_ERR``). ``authdir`` holds the authfiles,
    ``state_dir`` root's failure records."""
    from .login_policy import run

    return run(request, conversation, config=config, authdir=authdir, state_dir=state_dir)
