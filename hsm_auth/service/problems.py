"""Every error the service answers is an RFC 9457 problem document
(``application/problem+json``): ``{type, title, status, detail}`` with ``type``
``https://hsm-auth.invalid/problems/<slug>``.

One table (:data:`STATUS`) maps the library's errors to a status and a slug: the
first class of the error's MRO found there wins. ``detail`` is the library's own
message where that message is meant for the caller (input errors, which never hold
a secret); errors of the service's own state (database, HSM, tokens) answer with a
fixed text and go to the log as their class name only. FastAPI's validation errors
are 422 (400 ``malformed-json`` for a body that is not JSON), with the location and
message of each, never the input; unknown routes 404, wrong methods 405 (with
``Allow``); anything unexpected is 500 with no detail (:class:`CatchAllMiddleware`),
logged as its class name and the route, never its message or traceback, which could
hold what a request carried.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import errors
from ..api_keys import ApiKeyRefused, ScopeRefused

log = logging.getLogger("hsm_auth.service")

__all__ = [
    "STATUS",
    "BodyTooLarge",
    "CatchAllMiddleware",
    "NotFound",
    "RateLimited",
    "install",
    "problem",
]

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://hsm-auth.invalid/problems/"


class NotFound(errors.InvalidInput):
    """A session, offer, credential or challenge that the request names is unknown."""


class RateLimited(errors.HsmAuthError):
    """Too many requests from one client address or for one user: 429 with
    ``Retry-After`` (whole seconds, at least 1)."""

    def __init__(self, retry_after: float, what: str = "requests") -> None:
        super().__init__(f"too many {what}; retry later")
        self.retry_after = retry_after


class BodyTooLarge(errors.InvalidInput):
    """A request body larger than the service reads: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


#: (status, slug, whether the error's message is shown as ``detail``).
STATUS: dict[type[BaseException], tuple[int, str, bool]] = {
    ApiKeyRefused: (401, "unauthorized", True),
    ScopeRefused: (403, "forbidden", True),
    RateLimited: (429, "rate-limited", True),
    BodyTooLarge: (413, "body-too-large", True),
    errors.InvalidToken: (403, "otp-refused", False),
    errors.UntrustedMessage: (403, "signature-refused", True),
    errors.ExpiredMessage: (410, "expired", True),
    errors.UnknownMethod: (404, "not-found", True),
    NotFound: (404, "not-found", True),
    errors.AlreadyEnrolled: (409, "already-enrolled", True),
    errors.LoginRequired: (409, "login-required", True),
    errors.DecodeError: (400, "malformed-message", True),
    errors.InvalidInput: (400, "invalid-input", True),
    errors.StateError: (503, "unavailable", False),
    errors.BackendError: (503, "unavailable", False),
    errors.AuthorizationError: (503, "unavailable", False),
    errors.HsmAuthError: (500, "internal-error", False),
}

_FIXED_DETAIL = {
    403: "refused",
    500: "the service failed; it is logged",
    503: "the service cannot answer this now; retry later",
}


def problem(
    status: int,
    slug: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """A problem response."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug,
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def from_error(error: errors.HsmAuthError) -> JSONResponse:
    """The problem response of a library error (see :data:`STATUS`)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            status, slug, shown = STATUS[cls]
            break
    else:  # pragma: no cover - HsmAuthError is in the table
        status, slug, shown = 500, "internal-error", False
    headers: dict[str, str] | None = None
    if isinstance(error, RateLimited):
        headers = {"Retry-After": str(max(1, int(error.retry_after + 0.999)))}
    elif isinstance(error, ApiKeyRefused):
        headers = {"WWW-Authenticate": 'Bearer realm="hsm-auth"'}
    if status >= 500 or (not shown and status not in _FIXED_DETAIL):
        log.warning("request refused: %s (%d)", type(error).__name__, status)
    detail = str(error) if shown else _FIXED_DETAIL.get(status)
    return problem(status, slug, detail, headers=headers)


def _location(loc: Any) -> str:
    return ".".join(str(p) for p in loc) if isinstance(loc, (list, tuple)) else str(loc)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    found = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in found):
        return problem(400, "malformed-json", "the request body is not valid JSON")
    # Location and message only: an error's "input" and "ctx" may repeat what was sent.
    listed = [{"loc": _location(e.get("loc", ())), "msg": str(e.get("msg", ""))[:200]}
              for e in found[:20]]
    detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in listed[:5])
    return problem(422, "validation", detail[:1000], extra={"errors": listed})


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, errors.HsmAuthError):  # FastAPI wraps errors of receive()
        return from_error(exc.__cause__)
    slug = {
        404: "not-found",
        405: "method-not-allowed",
        401: "unauthorized",
        403: "forbidden",
    }.get(exc.status_code, "http-error")
    headers = dict(exc.headers or {})
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = ""
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    if exc.status_code == 404 and detail in (None, "Not Found"):
        detail = "no such resource"
    return problem(exc.status_code, slug, detail, headers=headers or None)


async def _library(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.HsmAuthError)
    return from_error(exc)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` and wrap it in :class:`CatchAllMiddleware`."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(errors.HsmAuthError, _library)


class CatchAllMiddleware:
    """An exception that nothing handled: 500 with no detail (when no response began),
    logged as the class name and route only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except errors.HsmAuthError as e:  # raised by a middleware inside (limits)
            if started:
                raise
            await from_error(e)(scope, receive, send)
        except Exception as e:
            route = scope.get("route")
            where = getattr(route, "path", None) or "(no route)"
            log.error("unexpected %s in %s %s", type(e).__name__, scope.get("method"), where)
            if not started:
                await problem(500, "internal-error", _FIXED_DETAIL[500])(scope, receive, send)
