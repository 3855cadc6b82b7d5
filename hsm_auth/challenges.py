"""Online challenges: push, QR claim and in-app approvals (docs/PROTOCOL.md §13).

A service provider starts a :class:`Challenge` for a user (``POST /v1/challenges``)
with the context of the request that asked for it (IP, user agent, location,
custom data) and a message to show; the user's authenticator answers it with a
:class:`Decision` signed in the token (:mod:`hsm_auth.request_signing`).

State machine (:class:`ChallengeState`)::

    push, inapp:  pending ----------------> approved | rejected
    qr:           pending --> claimed ----> approved | rejected
    any state not final  --(clock past expires)-->  expired

Every transition is one compare-and-swap in the store (``UPDATE ... WHERE
state=<expected> AND expires>=now``), so of two answers racing for one
challenge exactly one wins, and nothing moves a challenge out of a final state.
Expiry is by the clock: a stored pending or claimed challenge past its
``expires`` *is* expired (:meth:`Challenge.effective_state`), whatever the row
says; nothing needs to run to expire it.

A QR challenge may be started without a user (a login where the person is not
known yet): the first credential to claim it gives it that credential's user.
Only the claiming credential may answer a claimed challenge.

:func:`context_hash` is what an approval signs besides the challenge id and the
decision: SHA-256 over a domain tag and the length-prefixed kind, user,
message, IP, user agent, location and custom pairs (sorted by key), so the
authenticator approves exactly what it showed.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from . import display
from .errors import InvalidInput
from .methods import Method

__all__ = [
    "CHALLENGE_ID_BYTES",
    "CLAIM_PREFIX",
    "Challenge",
    "ChallengeContext",
    "ChallengeKind",
    "ChallengeState",
    "Decision",
    "claim_text",
    "context_hash",
    "new_challenge_id",
    "parse_claim",
]

CHALLENGE_ID_BYTES: Final = 16
CONTEXT_DOMAIN: Final = b"hsm-auth/challenge-context/v1\x00"
#: The QR text of a claim: ``hsm-auth:claim:v1:<verifier id hex>:<challenge id hex>``.
CLAIM_PREFIX: Final = "hsm-auth:claim:v1:"

MAX_MESSAGE: Final = display.MAX_CONTEXT
MAX_IP: Final = 64
MAX_USER_AGENT: Final = 512
MAX_LOCATION: Final = 200
MAX_CUSTOM: Final = 16
MAX_CUSTOM_KEY: Final = 64
MAX_CUSTOM_VALUE: Final = 256
DEFAULT_TTL: Final = 120
MIN_TTL: Final = 10
MAX_TTL: Final = 900


class ChallengeKind(enum.Enum):
    PUSH = "push"  # fetched by the user's agent (long-poll) and answered there
    QR = "qr"  # shown as a QR code, claimed by the authenticator that scans it
    INAPP = "inapp"  # an action the app verifies itself (fetched like push, no notification)


class ChallengeState(enum.Enum):
    PENDING = "pending"
    CLAIMED = "claimed"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in (ChallengeState.APPROVED, ChallengeState.REJECTED, ChallengeState.EXPIRED)


class Decision(enum.Enum):
    APPROVE = "approve"
    REJECT = "reject"

    @property
    def code(self) -> int:
        """The byte an approval signs for this decision."""
        return 1 if self is Decision.APPROVE else 2

    @property
    def state(self) -> ChallengeState:
        return ChallengeState.APPROVED if self is Decision.APPROVE else ChallengeState.REJECTED


def _text(value: Any, what: str, max_len: int, *, optional: bool = True) -> str:
    """A text that is shown on the authenticator: displayable (hsm_auth.display)."""
    if value is None or value == "":
        if optional:
            return ""
        raise InvalidInput(f"{what} is empty")
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return display.check(value, what, max_len=max_len)


@dataclass(frozen=True)
class ChallengeContext:
    """Where the request that started the challenge came from, as the provider saw it.

    Shown to the user before they answer and covered by the approval signature.
    Empty strings mean "not given"."""

    ip: str = ""
    user_agent: str = ""
    location: str = ""
    custom: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _text(self.ip, "the context's ip", MAX_IP)
        _text(self.user_agent, "the context's user_agent", MAX_USER_AGENT)
        _text(self.location, "the context's location", MAX_LOCATION)
        if not isinstance(self.custom, Mapping):
            raise InvalidInput("the context's custom data must be an object of strings")
        if len(self.custom) > MAX_CUSTOM:
            raise InvalidInput(f"the context has more than {MAX_CUSTOM} custom entries")
        for key, value in self.custom.items():
            _text(key, "a custom key", MAX_CUSTOM_KEY, optional=False)
            _text(value, f"the custom value of {key!r}", MAX_CUSTOM_VALUE)
        object.__setattr__(self, "custom", dict(sorted(self.custom.items())))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("ip", "user_agent", "location"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.custom:
            out["custom"] = dict(self.custom)
        return out

    @classmethod
    def from_json(cls, data: Any) -> ChallengeContext:
        if data is None:
            return cls()
        if not isinstance(data, Mapping) or set(data) - {"ip", "user_agent", "location", "custom"}:
            raise InvalidInput("a challenge context has ip, user_agent, location and custom")
        custom = data.get("custom") or {}
        if not isinstance(custom, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in custom.items()
        ):
            raise InvalidInput("the context's custom data must be an object of strings")
        return cls(
            ip=data.get("ip") or "",
            user_agent=data.get("user_agent") or "",
            location=data.get("location") or "",
            custom=dict(custom),
        )


@dataclass(frozen=True)
class Challenge:
    """One challenge as the verifier keeps it and as the authenticator receives it.

    ``user`` is ``None`` only for a QR challenge nobody claimed yet. ``state`` is the
    stored one: see :meth:`effective_state`. ``claimed_by`` and ``credential_id``
    are credential ids (hex); ``method``, ``credential_id`` and ``answered`` are
    set once answered."""

    challenge_id: str
    kind: ChallengeKind
    user: str | None
    message: str
    context: ChallengeContext
    state: ChallengeState
    expires: int
    created: int = 0
    claimed_by: str | None = None
    method: Method | None = None
    credential_id: str | None = None
    answered: int | None = None

    def __post_init__(self) -> None:
        try:
            raw = bytes.fromhex(self.challenge_id)
        except (ValueError, TypeError):
            raise InvalidInput("a challenge id is 32 hex digits") from None
        if len(raw) != CHALLENGE_ID_BYTES or self.challenge_id != raw.hex():
            raise InvalidInput("a challenge id is 32 hex digits")
        if self.user is None and self.kind is not ChallengeKind.QR:
            raise InvalidInput(f"a {self.kind.value} challenge needs a user")
        if self.user is not None:
            _text(self.user, "the user name", display.MAX_NAME, optional=False)
        _text(self.message, "the challenge message", MAX_MESSAGE, optional=False)

    @property
    def id_bytes(self) -> bytes:
        return bytes.fromhex(self.challenge_id)

    def effective_state(self, now: float) -> ChallengeState:
        """The state at ``now``: a pending or claimed challenge past ``expires`` is expired."""
        if not self.state.final and self.expires < now:
            return ChallengeState.EXPIRED
        return self.state

    def at(self, now: float) -> Challenge:
        """This challenge with its state as of ``now``."""
        state = self.effective_state(now)
        return self if state is self.state else replace(self, state=state)

    def to_json(self, *, full: bool = True) -> dict[str, Any]:
        """The JSON the service sends (``full``: with message and context, for the
        authenticator; else the provider's status view)."""
        out: dict[str, Any] = {
            "challenge_id": self.challenge_id,
            "kind": self.kind.value,
            "state": self.state.value,
            "expires": self.expires,
        }
        if full:
            out.update(user=self.user, message=self.message, context=self.context.to_json())
        if self.method is not None:
            out["method"] = self.method.value
        if self.credential_id is not None:
            out["credential_id"] = self.credential_id
        if self.answered is not None:
            out["answered"] = self.answered
        return out

    @classmethod
    def from_json(cls, data: Any) -> Challenge:
        """A challenge from the service's JSON (what the authenticator receives)."""
        if not isinstance(data, Mapping):
            raise InvalidInput("a challenge is a JSON object")
        try:
            method = data.get("method")
            answered = data.get("answered")
            expires = data["expires"]
            if type(expires) is not int or (answered is not None and type(answered) is not int):
                raise TypeError("times are integers")
            return cls(
                challenge_id=str(data["challenge_id"]),
                kind=ChallengeKind(data["kind"]),
                user=None if data.get("user") is None else str(data["user"]),
                message=str(data["message"]),
                context=ChallengeContext.from_json(data.get("context")),
                state=ChallengeState(data["state"]),
                expires=expires,
                method=None if method is None else Method.parse(str(method)),
                credential_id=None if data.get("credential_id") is None
                else str(data["credential_id"]),
                answered=answered,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"a malformed challenge ({e.__class__.__name__})") from None


def new_challenge_id() -> str:
    return os.urandom(CHALLENGE_ID_BYTES).hex()


def _lp16(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise InvalidInput("a challenge field is too long")
    return struct.pack(">H", len(data)) + data


def context_hash(challenge: Challenge, user: str | None = None) -> bytes:
    """SHA-256 of the canonical encoding of what the user is shown and approves:
    domain || lp16(kind) || lp16(user) || lp16(message) || lp16(ip) ||
    lp16(user_agent) || lp16(location) || u16(n) || n x (lp16(key) || lp16(value)),
    custom pairs sorted by key, all UTF-8. ``user`` overrides the challenge's (a QR
    challenge without one is approved for the claimer's user)."""
    who = user if user is not None else (challenge.user or "")
    ctx = challenge.context
    h = hashlib.sha256(CONTEXT_DOMAIN)
    for text in (challenge.kind.value, who, challenge.message, ctx.ip, ctx.user_agent,
                 ctx.location):
        h.update(_lp16(text.encode("utf-8")))
    h.update(struct.pack(">H", len(ctx.custom)))
    for key in sorted(ctx.custom):
        h.update(_lp16(key.encode("utf-8")) + _lp16(ctx.custom[key].encode("utf-8")))
    return h.digest()


def context_text(context: ChallengeContext) -> str:
    """The context as stored (canonical JSON)."""
    return json.dumps(context.to_json(), sort_keys=True, ensure_ascii=False)


def context_from_text(text: str) -> ChallengeContext:
    from .errors import StateError

    try:
        return ChallengeContext.from_json(json.loads(text))
    except (ValueError, InvalidInput):
        raise StateError("the verifier database holds a malformed challenge context") from None


def claim_text(verifier_id: bytes, challenge_id: str) -> str:
    """What a QR challenge's code says (the authenticator claims it with this)."""
    return f"{CLAIM_PREFIX}{verifier_id.hex()}:{challenge_id}"


def parse_claim(text: str) -> tuple[bytes, str]:
    """(verifier id, challenge id) of a claim text; :class:`InvalidInput` otherwise."""
    if not isinstance(text, str) or not text.startswith(CLAIM_PREFIX) or len(text) > 128:
        raise InvalidInput("not an hsm-auth claim code")
    verifier, _, challenge = text[len(CLAIM_PREFIX):].strip().partition(":")
    try:
        vid = bytes.fromhex(verifier)
        cid = bytes.fromhex(challenge)
    except ValueError:
        raise InvalidInput("a malformed claim code") from None
    if len(vid) != 8 or len(cid) != CHALLENGE_ID_BYTES:
        raise InvalidInput("a malformed claim code")
    return vid, cid.hex()


def check_ttl(ttl: Any) -> int:
    if ttl is None:
        return DEFAULT_TTL
    if type(ttl) is not int or not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput(f"ttl is a number of seconds in [{MIN_TTL}, {MAX_TTL}]")
    return ttl
