"""The authenticator's routes: no bearer secret, requests signed in the token
(``Hsm-Auth-Signature``, :mod:`hsm_auth.request_signing`, docs/PROTOCOL.md §13).

* ``GET /v1/device/nonce`` -> ``{nonce}`` (single use, :data:`NONCE_TTL` s);
* ``POST /v1/device/enrollments`` ``{response}`` -> 201 ``{result, credential_id,
  method, approval: {user_authentication, timeout}}`` (the response authenticates
  itself: signature by the new key, activation MAC); ``approval`` is the verifier's
  approval policy for the method, which the authenticator keeps and enforces;
* ``GET /v1/device/credentials`` (signed) -> ``{credentials: [...]}`` of the
  signer's user;
* ``DELETE /v1/device/credentials/{credential_id}`` (signed by that credential) -> 204;
* ``GET /v1/device/challenges?wait=S&known=ID,ID`` (signed) -> ``{challenges: [...]}``:
  the user's pending push and in-app challenges, held up to ``wait`` (<= 30) s while
  their ids are exactly ``known``;
* ``POST /v1/device/claims`` ``{claim}`` (signed) -> the QR challenge with its context
  (state claimed);
* ``POST /v1/device/challenges/{id}/answer`` ``{decision, credential, approval:
  {signature, authdata?}}`` -> the answered challenge. Authenticated by the approval
  itself (signed over the challenge id, its context hash and the decision): one PIN
  or user verification per answer;
* ``POST /v1/device/offline-log`` ``{entries: [...], credential?}`` (signed) ->
  ``{report}``: offline log entries (docs/PROTOCOL.md §19, :mod:`hsm_auth.offline_audit`)
  of the signer, or of ``credential``, another credential of the signer's user whose
  entries are signed by itself (ECDSA), checked, kept and reconciled with the OTPs
  accepted;
* ``POST /v1/device/sync`` (signed) -> ``{sync, atc}``: a sync message for the
  signer's credential and its sync session (the online login's ATC resync,
  docs/PROTOCOL.md §18);
* ``POST /v1/device/sync/report`` ``{report}`` -> ``{ack, atc, user, method,
  credential_id}``: apply the token's ATC report (authenticated by its MAC under the
  credential's OTP key, for a sync session that a request signed by that credential
  opened); ``ack`` is the verifier's signed acknowledgement that resets the
  authenticator's offline-use count;
* ``POST /v1/device/renewal`` (signed, empty body) -> ``{result, credential_id, method,
  offline_expires}``: the signer's credential renewed (docs/PROTOCOL.md §20): a new
  offline expiry from now and a new device certificate, in a new EnrollmentResult
  (an expired credential may renew: this is how it comes back; a locked one may not).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from ..approvals import LISTED_KINDS, OnlineVerifier, changed
from ..challenges import Decision
from ..request_signing import HEADER, NONCE_TTL, Signature, b64u
from ..store.base import CredentialRecord
from ..verifier import Renewal
from .challenge_api import MAX_WAIT, POLL, changes, online, run
from .context import ServiceContext, get_context

__all__ = ["router"]

router = APIRouter(tags=["authenticator"])

_SIGNED = {
    "parameters": [{
        "name": HEADER, "in": "header", "required": True,
        "description": "credential=<hex>, nonce=<b64u>, signature=<b64u>[, authdata=<b64u>]: "
        "a signature made in the token over the request (docs/PROTOCOL.md §13)",
        "schema": {"type": "string"},
    }]
}


def _target(request: Request) -> str:
    """The path and query exactly as the client sent them (what it signed)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    path = bytes(raw).decode("latin-1")
    query = bytes(request.scope.get("query_string", b"")).decode("latin-1")
    return f"{path}?{query}" if query else path


async def signer(
    request: Request, ctx: ServiceContext = Depends(get_context)  # noqa: B008
) -> CredentialRecord:
    """The dependency of every signed route: the credential that signed the request."""
    body = await request.body()
    cred: CredentialRecord = await run(
        online(ctx).authenticate, request.headers.get(HEADER), request.method,
        _target(request), body,
    )
    return cred


class NonceOut(BaseModel):
    nonce: str
    expires_in: int


class EnrollmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response: str = Field(min_length=1, max_length=32768)


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    claim: str = Field(min_length=1, max_length=128)


class ApprovalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    signature: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_-]+$")
    authdata: str | None = Field(default=None, max_length=1400, pattern=r"^[A-Za-z0-9_-]+$")


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject"]
    credential: str = Field(pattern=r"^[0-9a-f]{32}$")
    approval: ApprovalIn


@router.get("/v1/device/nonce", response_model=NonceOut, summary="A single-use request nonce")
async def nonce(ctx: ServiceContext = Depends(get_context)) -> dict[str, Any]:  # noqa: B008
    value: bytes = await run(online(ctx).issue_nonce)
    return {"nonce": b64u(value), "expires_in": NONCE_TTL}


@router.post(
    "/v1/device/enrollments", status_code=201,
    summary="Submit an enrollment response; get the enrollment result and approval policy",
)
async def enroll(
    body: EnrollmentIn, ctx: ServiceContext = Depends(get_context)  # noqa: B008
) -> dict[str, Any]:
    verifier = online(ctx)
    done = await run(verifier.enroll, body.response)
    described = verifier.describe(done.credential)
    return {
        "result": done.result,
        "credential_id": described["credential_id"],
        "method": described["method"],
        "approval": done.approval.to_json(),
    }


@router.get(
    "/v1/device/credentials", openapi_extra=_SIGNED,
    summary="The signer's user's credentials at this verifier",
)
async def credentials(
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    return {"credentials": await run(online(ctx).credentials, cred)}


@router.delete(
    "/v1/device/credentials/{credential_id}", status_code=204, openapi_extra=_SIGNED,
    summary="Forget a credential (signed by that credential)",
)
async def remove(
    credential_id: str,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> Response:
    await run(online(ctx).remove, cred, credential_id)
    return Response(status_code=204)


@router.get(
    "/v1/device/challenges", openapi_extra=_SIGNED,
    summary="Pending push and in-app challenges; long-poll with wait",
)
async def pending(
    request: Request,
    wait: int = Query(default=0, ge=0, le=MAX_WAIT),
    known: str = Query(default="", max_length=33 * 32, pattern=r"^[0-9a-f,]*$"),
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    verifier: OnlineVerifier = online(ctx)
    seen = [k for k in known.split(",") if k]
    found = await run(verifier.pending, cred)
    deadline = time.monotonic() + wait
    notifier = changes(request)
    while (
        not changed(seen, found) and time.monotonic() < deadline
        and not await request.is_disconnected()
    ):
        await notifier.wait(min(POLL, max(0.0, deadline - time.monotonic())))
        found = await run(verifier.pending, cred)
    return {"challenges": [c.to_json() for c in found if c.kind in LISTED_KINDS]}


@router.post(
    "/v1/device/claims", openapi_extra=_SIGNED,
    summary="Claim a QR challenge: its message and the context of the request that started it",
)
async def claim(
    body: ClaimIn,
    request: Request,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    claimed = await run(online(ctx).claim, cred, body.claim)
    changes(request).notify()
    out: dict[str, Any] = claimed.to_json()
    return out


class SyncReportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    report: str = Field(min_length=1, max_length=1024)


@router.post(
    "/v1/device/sync", openapi_extra=_SIGNED,
    summary="Open a sync session for the signer's credential: its signed sync message",
)
async def sync_start(
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    text: str = await run(online(ctx).verifier.sync_message_for, cred)
    return {"sync": text, "atc": cred.atc}


@router.post(
    "/v1/device/sync/report",
    summary="Apply the token's ATC report; the verifier's signed acknowledgement",
)
async def sync_report(
    body: SyncReportIn, ctx: ServiceContext = Depends(get_context)  # noqa: B008
) -> dict[str, Any]:
    done = await run(online(ctx).verifier.apply_sync, body.report)
    return {
        "ack": done.ack,
        "atc": done.atc,
        "user": done.user,
        "method": done.method.value,
        "credential_id": done.credential_id.hex(),
    }


@router.post(
    "/v1/device/challenges/{challenge_id}/answer",
    summary="Approve or reject a challenge with an approval signed in the token",
)
async def answer(
    challenge_id: str,
    body: AnswerIn,
    request: Request,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
) -> dict[str, Any]:
    signature = Signature.from_json(body.approval.model_dump(exclude_none=True))
    done = await run(
        online(ctx).answer, challenge_id, Decision(body.decision), body.credential, signature
    )
    changes(request).notify()
    out: dict[str, Any] = done.to_json()
    return out


# --- the offline log (docs/PROTOCOL.md §19) ------------------------------------------


class OfflineLogIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Entries as the authenticator's log holds them; each is checked strictly by
    #: hsm_auth.offline_audit (a malformed one is an alert, not a refused request).
    entries: list[Any] = Field(min_length=1, max_length=100)
    #: Whose log (default: the signer's): another credential of the signer's user.
    credential: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")


def _submit_log(
    verifier: OnlineVerifier, signer: CredentialRecord, entries: list[Any], whose: str | None
) -> Any:
    from ..offline_audit import OfflineAudit, log_owner

    owner = log_owner(verifier.store, signer, None if whose is None else bytes.fromhex(whose))
    audit = OfflineAudit(verifier.store, verifier.verifier_id)
    return audit.submit(owner, entries, now=verifier.now()).to_json()


@router.post(
    "/v1/device/offline-log", openapi_extra=_SIGNED,
    summary="Submit the signer's offline log entries; get the reconciliation",
)
async def offline_log(
    body: OfflineLogIn,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    report = await run(_submit_log, online(ctx), cred, body.entries, body.credential)
    return {"report": report}


# --- renewal (docs/PROTOCOL.md §20) ---------------------------------------------------


@router.post(
    "/v1/device/renewal", openapi_extra=_SIGNED,
    summary="Renew the signing credential's offline expiry: a new EnrollmentResult",
)
async def renew(
    ctx: ServiceContext = Depends(get_context),  # noqa: B008
    cred: CredentialRecord = Depends(signer),  # noqa: B008
) -> dict[str, Any]:
    verifier = online(ctx)
    done: Renewal = await run(verifier.verifier.renew, cred)
    return {
        "result": done.result,
        "credential_id": verifier.describe(done.credential)["credential_id"],
        "method": done.credential.method.value,
        "offline_expires": done.credential.expires,
    }
