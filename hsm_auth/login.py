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
import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
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
        data = proof.authenticator_data
        if len(data) < 37:
            raise InvalidToken("authenticator data too short")
        rp_id = str(cred.settings.get("rp_id", "hsm-auth"))
        if data[:32] != hashlib.sha256(rp_id.encode()).digest():
            raise InvalidToken("assertion for another relying party")
        flags = data[32]
        if not flags & _FLAG_UP:
            raise InvalidToken("assertion without user presence")
        if cred.method.needs_user_verification and not flags & _FLAG_UV:
            raise InvalidToken("assertion without user verification")
        counter = int.from_bytes(data[33:37], "big")
        client_hash = hashlib.sha256(login_message(host, user, challenge, None)).digest()
        signed = data + client_hash
    else:
        raise InvalidToken("unknown signature format")
    try:
        public.verify(proof.signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise InvalidToken("signature does not verify with the enrolled key") from None
    if counter <= cred.counter:
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
        if Capability.PIN_RETRY_LIMIT not in store.capabilities():
            if not settings.get("allow_unenforced_pin", False):
                raise ConfigError(
                    "this token does not limit PIN retries, so it cannot protect a login PIN; "
                    "set allow_unenforced_pin = true for this method to use it anyway"
                )
            if warn is not None:
                warn("warning: this token does not limit PIN retries (e.g. SoftHSM)")
    return Authorization(pin=pin, prompt=prompt, timeout=timeout, interaction=interaction)


def _format_for(store: KeyStore) -> str:
    fmt = getattr(type(store), "login_format", ECDSA_P256_SHA256)
    if fmt not in FORMATS:
        raise MechanismNotSupported(f"login signature format {fmt!r}")
    return str(fmt)


# --- enroll / login ---------------------------------------------------------------


def enroll(
    authdir: AuthDir, user: str, method: Method, config: Config, *, pin: str | None = None,
    replace_existing: bool = False, clock: Callable[[], float] = time.time,
    warn: Warn | None = None, interaction: UserInteraction | None = None,
) -> LoginCredential:
    """Create a signing key and counter in the method's token and record them for ``user``.

    A first login is run before the record is written, so a broken setup never
    ends up enrolled; on any failure the new keys are deleted from the token."""
    check_user_name(user)
    backend, settings = choose_backend(config, method)
    with authdir.locked():
        existing = authdir.read(user) or []
        if any(c.method is method for c in existing) and not replace_existing:
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
            label = f"hsm-auth-login/{user}/{method.value}/{secrets.token_hex(3)}"
            key = store.generate_key(f"{label}/sign", KeyKind.SIGNING, auth)
            counter_uri: str | None = None
            try:
                if fmt == ECDSA_P256_SHA256:
                    counter_uri = store.create_counter(f"{label}/ctr", auth)
                    start = store.counter_value(counter_uri, auth)
                else:
                    start = 0
                public = store.public_key(key, auth).public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                cred = LoginCredential(
                    method, backend, dict(settings), key, counter_uri, public, fmt, start,
                    int(clock()), registry.backend_reference(backend),
                )
                host = socket.gethostname()
                challenge = secrets.token_bytes(CHALLENGE_BYTES)
                proof = make_proof(store, cred, host, user, challenge, auth)
                cred = replace(cred, counter=verify_proof(cred, host, user, challenge, proof))
                kept = [c for c in existing if c.method is not method]
                authdir.write(user, [*kept, cred])
            except BaseException:
                with contextlib.suppress(HsmAuthError):
                    store.delete_key(key, auth)
                    if counter_uri is not None:
                        store.delete_key(counter_uri, auth)
                raise
        for old in existing:
            if old.method is method:
                _delete_old(old, pin, warn)
    return cred


def _delete_old(old: LoginCredential, pin: str | None, warn: Warn | None) -> None:
    try:
        with registry.load_backend(old.backend).open(old.settings) as store:
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
    interaction: UserInteraction | None = None,
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
        with registry.load_backend(cred.backend, cred.backend_ref).open(cred.settings) as store:
            auth = authorization(
                cred.method, store, cred.settings, pin if cred.method.needs_pin else None,
                prompt=prompt, timeout=timeout, warn=warn, interaction=interaction,
            )
            host = socket.gethostname()
            challenge = secrets.token_bytes(CHALLENGE_BYTES)
            proof = make_proof(store, cred, host, user, challenge, auth)
        counter = verify_proof(cred, host, user, challenge, proof)
        authdir.write(
            user, [replace(c, counter=counter) if c is cred else c for c in creds]
        )
    return LoginResult(user, cred.method, counter)

