"""The provider's challenge routes (API key, scope ``challenge``):

* ``POST /v1/challenges`` ``{user?, kind, message, context?, ttl?}`` -> 201
  ``{challenge_id, kind, state, expires, claim?}`` (``claim``: the QR text of a
  ``qr`` challenge; a ``qr`` challenge may omit ``user``: its claimer's user is taken);
* ``GET /v1/challenges/{id}?wait=S&seen=STATE`` -> ``{challenge_id, kind, state,
  expires, user, method?, credential_id?, answered?}``. With ``wait`` (<= 30 s) the
  answer waits until the state is final or differs from ``seen`` (default: the state
  when the request arrived). Waiting is woken at once by an answer in this worker,
  and polls the store (every :data:`POLL` s) for answers that other workers took.

See :mod:`hsm_auth.approvals` and docs/PROTOCOL.md §13.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ..approvals import NoSuchChallenge, OnlineVerifier
from ..challenges import (
    MAX_CUSTOM_KEY,
    MAX_CUSTOM_VALUE,
    MAX_IP,
    MAX_LOCATION,
    MAX_MESSAGE,
    MAX_USER_AGENT,
    Challenge,
    ChallengeContext,
    ChallengeKind,
    ChallengeState,
)
from .auth import require_scope
from .context import ServiceContext, blocking, get_context
from .problems import NotFound

__all__ = ["Changes", "router"]

router = APIRouter(tags=["challenges"])

#: Seconds between store reads while a long-poll waits (answers taken by other workers).
POLL = 0.25
MAX_WAIT = 30


class Changes:
    """Wakes this worker's long-polls when a challenge changes here (an asyncio event
    replaced on each change, set from the event loop only)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


def changes(request: Request) -> Changes:
    found: Changes | None = getattr(request.app.state, "challenge_changes", None)
    if found is None:
        found = Changes()
        request.app.state.challenge_changes = found
    return found


def online(ctx: ServiceContext) -> OnlineVerifier:
    return OnlineVerifier(ctx.verifier, clock=ctx.clock)


async def run(func: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking call into :class:`OnlineVerifier`; an unknown challenge is 404."""
    try:
        return await blocking(func, *args, **kwargs)
    except NoSuchChallenge as e:
        raise NotFound(str(e)) from None


class ContextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ip: str | None = Field(default=None, max_length=MAX_IP)
    user_agent: str | None = Field(default=None, max_length=MAX_USER_AGENT)
    location: str | None = Field(default=None, max_length=MAX_LOCATION)
    custom: dict[str, str] | None = Field(default=None, max_length=16)

    def model(self) -> ChallengeContext:
        custom = self.custom or {}
        if any(len(k) > MAX_CUSTOM_KEY or len(v) > MAX_CUSTOM_VALUE for k, v in custom.items()):
            from ..errors import InvalidInput

            raise InvalidInput("a custom key or value is too long")
        return ChallengeContext(
            ip=self.ip or "", user_agent=self.user_agent or "", location=self.location or "",
            custom=custom,
        )


class ChallengeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(default=None, min_length=1, max_length=64)
    kind: Literal["push", "qr", "inapp"]
    message: str = Field(min_length=1, max_length=MAX_MESSAGE)
    context: ContextIn | None = None
    ttl: int | None = Field(default=None, ge=10, le=900)


class ChallengeCreated(BaseModel):
    challenge_id: str
    kind: str
    state: str
    expires: int
    claim: str | None = None


class ChallengeStatus(BaseModel):
    challenge_id: str
    kind: str
    state: str
    expires: int
    user: str | None = None
    method: str | None = None
    credential_id: str | None = None
    answered: int | None = None


def status_json(challenge: Challenge) -> dict[str, Any]:
    out = challenge.to_json(full=False)
    out["user"] = challenge.user
    return out


@router.post(
    "/v1/challenges", status_code=201, response_model=ChallengeCreated,
    response_model_exclude_none=True,
    summary="Start a push, QR or in-app challenge for a user, with the request's context",
)
async def create_challenge(
    body: ChallengeIn,
    request: Request,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    key: Any = Depends(require_scope("challenge")),  # noqa: B008
) -> dict[str, Any]:
    kind = ChallengeKind(body.kind)
    if body.user is not None:
        ctx.limits.check_user(body.user)  # a flood of push notifications is refused
    context = (body.context or ContextIn()).model()
    challenge, claim = await run(
        online(ctx).start, user=body.user, kind=kind, message=body.message, context=context,
        ttl=body.ttl,
    )
    changes(request).notify()
    out: dict[str, Any] = challenge.to_json(full=False)
    if claim is not None:
        out["claim"] = claim
    return out


@router.get(
    "/v1/challenges/{challenge_id}", response_model=ChallengeStatus,
    response_model_exclude_none=True,
    summary="A challenge's state; with wait, long-poll until it changes",
)
async def get_challenge(
    challenge_id: str,
    request: Request,
    wait: int = Query(default=0, ge=0, le=MAX_WAIT),
    seen: Literal["pending", "claimed", "approved", "rejected", "expired"] | None = None,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    key: Any = Depends(require_scope("challenge")),  # noqa: B008
) -> dict[str, Any]:
    start = ChallengeState(seen) if seen is not None else None
    return status_json(await wait_for_change(request, ctx, challenge_id, wait, start))


async def wait_for_change(
    request: Request, ctx: ServiceContext, challenge_id: str, wait: float,
    seen: ChallengeState | None = None,
) -> Challenge:
    """The challenge once its state is final or differs from ``seen`` (default: its
    state now), or after ``wait`` seconds, or when the client went away. Woken at once
    by a change in this worker (:class:`Changes`), the store polled every :data:`POLL`
    s for other workers'. (Also the login page's long-poll.)"""
    verifier = online(ctx)
    current: Challenge = await run(verifier.status, challenge_id)
    start = seen if seen is not None else current.state
    deadline = time.monotonic() + wait
    notifier = changes(request)
    while (
        not current.state.final and current.state is start and time.monotonic() < deadline
        and not await request.is_disconnected()
    ):
        await notifier.wait(min(POLL, max(0.0, deadline - time.monotonic())))
        current = await run(verifier.status, challenge_id)
    return current
