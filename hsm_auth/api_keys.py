"""API keys of the online service: how a service provider's backend authenticates.

A key is ``hsk_<key id>_<secret>``: the key id is 8 random bytes (16 lowercase hex
digits), public, and names the key in the store, the audit trail and ``hsm-auth
verifier api-key list``; the secret is 32 bytes from :mod:`secrets` (64 hex digits),
shown once when the key is made and never stored: the store (table ``api_keys``,
schema version 7) keeps only its SHA-256. The secret has 256 bits of entropy, so
its hash is as strong as the secret itself against someone who reads the database:
a pepper or a slow hash protects guessable secrets only, and this one is not.

:func:`authenticate` looks the key up by its id and compares the hash of the secret
given with the stored one in constant time (:func:`hmac.compare_digest`); an unknown
id is compared against a fixed hash the same way. Every store read is fresh: a
revoked key is refused by every worker from the next request on.

Scopes: ``enroll`` (offers), ``verify`` (sessions, OTP checks), ``challenge``
(push / QR / in-app challenges) and ``admin`` (credentials, audit). A key holds
the scopes it was made with; none implies another.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import audit, display
from .audit import AuditRecord, Event
from .errors import HsmAuthError, InvalidInput
from .store.base import ApiKeyRecord, VerifierStore

__all__ = [
    "PREFIX",
    "SCOPES",
    "ApiKeyRefused",
    "IssuedKey",
    "ScopeRefused",
    "authenticate",
    "create",
    "parse",
    "revoke",
]

PREFIX = "hsk_"
KEY_ID_BYTES = 8
SECRET_BYTES = 32
SCOPES = ("enroll", "verify", "challenge", "admin")
#: Characters of a key's label.
MAX_LABEL = 64
_KEY = re.compile(rf"{PREFIX}([0-9a-f]{{{2 * KEY_ID_BYTES}}})_([0-9a-f]{{{2 * SECRET_BYTES}}})")
_KEY_ID = re.compile(rf"[0-9a-f]{{{2 * KEY_ID_BYTES}}}")
_NO_KEY = hashlib.sha256(b"hsm-auth: no such API key").digest()


class ApiKeyRefused(HsmAuthError):
    """No API key, a malformed, unknown or revoked one (the service answers 401; the
    message never says which, nor repeats the key)."""

    exit_code = 41

    def __init__(self, message: str = "a valid API key is needed") -> None:
        super().__init__(message)


class ScopeRefused(HsmAuthError):
    """A valid API key without the scope the request needs (the service answers 403)."""

    exit_code = 42

    def __init__(self, scope: str) -> None:
        super().__init__(f"this API key does not have the {scope} scope")
        self.scope = scope


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: its record, and the key text, shown once (not in the repr)."""

    record: ApiKeyRecord
    key: str = field(repr=False)


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes in their canonical order; InvalidInput for none or an unknown one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise InvalidInput(
            f"unknown API key scope {unknown[0][:40]!r} (scopes: {', '.join(SCOPES)})"
        )
    if not wanted:
        raise InvalidInput(f"an API key needs at least one scope ({', '.join(SCOPES)})")
    return tuple(s for s in SCOPES if s in wanted)


def check_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidInput(f"an API key id is {2 * KEY_ID_BYTES} lowercase hex digits")
    return key_id


def create(
    store: VerifierStore, label: str, scopes: Iterable[str], *, now: int
) -> IssuedKey:
    """Make a key with ``scopes``, store its hash with an audit record, return it."""
    display.check(label, "the API key label", max_len=MAX_LABEL)
    canonical = check_scopes(scopes)
    key_id = secrets.token_hex(KEY_ID_BYTES)
    secret = secrets.token_hex(SECRET_BYTES)
    record = ApiKeyRecord(key_id, _hash(secret), label, canonical, now)
    entry = AuditRecord(
        now, Event.API_KEY_CREATE, detail=f"{key_id} {','.join(canonical)}"
    )
    store.put_api_key(record, entry)
    audit.emit([entry])
    return IssuedKey(record, f"{PREFIX}{key_id}_{secret}")


def revoke(store: VerifierStore, key_id: str, *, now: int) -> None:
    """Revoke the key ``key_id``: refused from the next request on. InvalidInput when
    it is unknown or revoked already."""
    check_key_id(key_id)
    entry = AuditRecord(now, Event.API_KEY_REVOKE, detail=key_id)
    if not store.revoke_api_key(key_id, now, entry):
        raise InvalidInput(f"no API key {key_id} that is not revoked")
    audit.emit([entry])


def parse(text: str) -> tuple[str, str]:
    """(key id, secret) of a key's text; :class:`ApiKeyRefused` when malformed."""
    match = _KEY.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ApiKeyRefused()
    return match.group(1), match.group(2)


def authenticate(store: VerifierStore, text: str, scope: str) -> ApiKeyRecord:
    """The record of the key ``text`` if it is valid, not revoked and has ``scope``.

    Raises :class:`ApiKeyRefused` (malformed, unknown, wrong secret, revoked) or
    :class:`ScopeRefused`."""
    key_id, secret = parse(text)
    record = store.api_key(key_id)
    expected = record.secret_hash if record is not None else _NO_KEY
    good = hmac.compare_digest(_hash(secret), expected)
    if record is None or not good or record.revoked is not None:
        raise ApiKeyRefused()
    if scope not in record.scopes:
        raise ScopeRefused(scope)
    return record
