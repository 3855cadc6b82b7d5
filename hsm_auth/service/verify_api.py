"""``POST /v1/verify``: check an OTP for an offline session (API key, scope ``verify``).

    {"session_id": "<32 lowercase hex digits>", "otp": "<6..10 digits>", "data": "<text>"?}
    -> 200 {"user", "method", "atc"}
    -> 403 otp-refused (one body for every refusal: unknown, used or expired session,
       replay, wrong OTP, locked or revoked credential; the audit trail keeps which)
    -> 400 invalid-input (an OTP of a length none of the session's credentials has)
    -> 422 validation (a body that is not this shape), 400 malformed-json

Every verification goes through the worker's group committer
(:mod:`hsm_auth.service.committer`): the answer is sent only after the commit that
decided it, so a 200 is on disk. A database failure is 503 with nothing accepted.

The API key (``Authorization: Bearer``, the same scheme and answers as
:mod:`hsm_auth.service.auth`: 401 / 403) is checked by the committer thread with the
batch it came in, one store read per distinct key per batch, instead of one
threadpool hop and read per request (bench/http.py: that hop alone cost more than
the whole verification). A key that is malformed or missing is 401 at once, before
the body is looked at; a well-formed one is checked after the body is validated (so
an unknown key with a malformed body is 422, as the public schema says), and a
revoked one is refused from the first batch after the revocation, in every worker.

The hot path. The route is declared as usual (its body model, response model and
security make the OpenAPI description), but runs through :class:`_VerifyRoute`,
whose handler does what FastAPI's would for this one signature, without the
general machinery (dependency solving, a second validation and serialisation of the
response model): the same pydantic model validates the body (unknown fields 422,
malformed JSON 400), errors are raised to the same handlers, so every answer is
what FastAPI would give. bench/http.py measures what it saves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import api_keys
from ..otp_scheme import MAX_DIGITS, MIN_DIGITS
from ..transaction import MAX_USER_DATA
from ..verifier import SESSION_ID_BYTES
from .auth import _bearer  # the API-key scheme of every provider route (OpenAPI)
from .committer import Committer
from .context import ServiceContext, context_of, get_context

__all__ = ["VerifyRequest", "VerifyResponse", "committer_of", "router"]



class _VerifyRoute(APIRoute):
    """An APIRoute whose request handler calls :func:`verify` directly."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            key = _key_of(request.headers.get("authorization"))
            content_type = request.headers.get("content-type")
            raw = await request.body()
            if content_type is not None and not _is_json(content_type):
                raise RequestValidationError(
                    [{"loc": ("body",), "msg": "the body must be application/json",
                      "type": "content_type"}]
                )
            try:
                body = VerifyRequest.model_validate_json(raw)
            except ValidationError as e:
                raise RequestValidationError(
                    [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]
                ) from None
            result: Response = await endpoint(body, context_of(request), key)
            return result

        return handler


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and
                                           media.endswith("+json"))


def _key_of(authorization: str | None) -> str:
    """The API key text of a ``Bearer`` header if it is well formed, else 401 now
    (the committer checks the rest with its batch)."""
    scheme, _, text = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not text:
        raise api_keys.ApiKeyRefused()
    api_keys.parse(text)
    return text


router = APIRouter(tags=["provider"], route_class=_VerifyRoute)

_SESSION_ID = f"^[0-9a-f]{{{2 * SESSION_ID_BYTES}}}$"
_OTP = f"^[0-9]{{{MIN_DIGITS},{MAX_DIGITS}}}$"


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: Annotated[
        str, Field(pattern=_SESSION_ID, description="The session's id (POST /v1/sessions)")
    ]
    otp: Annotated[str, Field(pattern=_OTP, description="The OTP the user typed")]
    data: Annotated[
        str | None,
        Field(
            default=None, min_length=1, max_length=4 * MAX_USER_DATA,
            description="What the user entered on the authenticator, for a session with "
            "user_data > 0 (docs/PROTOCOL.md §17); required there, refused otherwise",
        ),
    ] = None


class VerifyResponse(BaseModel):
    user: str
    method: str
    atc: int = Field(description="The counter value the OTP was made with (now stored)")
    label: str = Field(description="The label of the credential (token) that made it")
    credential_id: str = Field(description="Its protocol credential id (hex)")


def committer_of(ctx: ServiceContext) -> Committer:
    """The worker's committer, started on first use (the context of a worker, or one a
    caller passed to create_app); stopped when the context closes."""
    committer = ctx.committer
    if committer is None:
        committer = ctx.committer = Committer(ctx.verifier).start()
        ctx.on_close.append(committer.close)
    assert isinstance(committer, Committer)
    return committer


@router.post(
    "/v1/verify",
    response_model=VerifyResponse,
    summary="Verify the OTP of an offline session (single use, group-committed)",
    responses={
        403: {"description": "refused (otp-refused; the same for every reason)"},
        400: {"description": "an OTP of a length the session's credentials do not make"},
        401: {"description": "no valid API key"},
        503: {"description": "the database failed: nothing was accepted; retry"},
    },
)
async def verify(
    body: VerifyRequest,
    ctx: ServiceContext = Depends(get_context),  # noqa: B008 - documents; _VerifyRoute passes it
    key: HTTPAuthorizationCredentials | str | None = Security(_bearer),  # noqa: B008
) -> Response:
    assert isinstance(key, str)  # _VerifyRoute hands the key text it checked
    accepted = await committer_of(ctx).verify(
        bytes.fromhex(body.session_id), body.otp, api_key=key, data=body.data
    )
    # VerifyResponse's JSON, written directly (not validated and serialised again).
    return Response(
        json.dumps(
            {"user": accepted.user, "method": accepted.method.value, "atc": accepted.atc,
             "label": accepted.label, "credential_id": accepted.credential_id.hex()},
            separators=(",", ":"),
        ),
        media_type="application/json",
    )
