"""The reference login page: what a service provider copies into their site.

The service acts as its own provider here: the page calls the worker's
:class:`~hsm_auth.verifier.Verifier` (through :func:`~hsm_auth.service.context.blocking`)
directly, with no API key. Server-rendered HTML (:mod:`string.Template`, every value
HTML-escaped unless it is :class:`Safe`; no template engine is needed for six small
pages), one small script (``web/static/login.js``) and one style sheet; no build chain,
no third-party assets.

Flows, all under ``/login``:

* ``GET /login``: the user name form (or "logged in as" once logged in).
* ``POST /login/start`` ``flow=offline``: a new offline session; the page shows its
  verification data as a QR code (an inline ``data:`` SVG image) and as text
  (``<pre id="verification-data">``), and an OTP field. ``POST /login/offline``
  verifies the OTP for the session the login cookie names: "Logged in as alice", or
  a refusal (a replayed OTP is refused by the verifier: a session takes one OTP).
* ``POST /login/start`` ``flow=push``: a push challenge for the user
  (:class:`~hsm_auth.approvals.OnlineVerifier`, as ``POST /v1/challenges`` does), with
  this request's context (address, user agent, the browser's time zone, custom data).
  The page says "approve on your device" and ``login.js`` long-polls
  ``GET /login/status`` (same origin), updating the page in place, without a reload:
  approved ("Logged in as alice"; that answer sets the logged-in cookie), rejected or
  expired.
* ``POST /login/qr``: a QR-claim login for whoever claims it (no user name). The page
  shows the claim as a QR code (and as text in ``<pre id="claim-data">``); the
  authenticator that claims it sees this request's context, and its approval logs in
  its user. The page follows it like a push (claimed, then approved / rejected).

An approval logs in the browser that holds that challenge's cookie, until
:data:`APPROVAL_GRACE` after the challenge's expiry; the answer that logs in replaces
that cookie.

Login state lives in one signed cookie (:class:`LoginState`, HMAC-SHA256 under a
32-byte key kept 0600 in the verifier directory, ``login-page.key``, made once under
a lock so every worker shares it): HttpOnly, SameSite=Strict, Path=/login, Secure
when the request came over TLS, a lifetime of :data:`STATE_TTL`. It holds a random
CSRF token; every POST must carry the same token in its form (synchronizer token bound
to the signed cookie, compared in constant time) and, when the browser sends an
``Origin`` or a ``Sec-Fetch-Site``, come from this origin; else 403 (problem+json
``csrf-refused``) before anything is done. The token is rotated at login and logout.

Every page is sent with a strict Content-Security-Policy (:data:`CSP`: no inline
script or style, same-origin script/style/fetch, ``data:`` images for the QR code,
forms only to this origin, no framing), ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: same-origin`` (``no-referrer`` would make browsers send
``Origin: null`` with the forms), ``X-Frame-Options: DENY`` and ``Cache-Control:
no-store``.

Limits: the service's per-address limits apply to every request (middleware); the
per-user limit is taken before a session or challenge is started for a user name and
before an OTP is checked (:meth:`~hsm_auth.service.limits.Limits`).
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import html
import json
import os
import secrets
import string
import urllib.parse
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import display
from ..challenges import ChallengeContext, ChallengeKind, ChallengeState
from ..errors import InvalidInput, InvalidToken, UnknownMethod
from ..files import atomic_write, ensure_private_dir, locked, read_state
from . import challenge_api
from .context import ServiceContext, blocking, context_of
from .problems import problem

if TYPE_CHECKING:
    from ..verifier import Acceptance

__all__ = ["COOKIE", "CSP", "LoginState", "Safe", "StateCodec", "router"]

router = APIRouter(prefix="/login", include_in_schema=False)

COOKIE = "hsm_auth_login"
#: How long a login cookie (a pending flow, or being logged in) lasts, seconds.
STATE_TTL = 3600
KEY_FILE = "login-page.key"
#: Seconds a push or QR login waits for the authenticator.
PUSH_TTL = 120
#: Seconds after its challenge's expiry an approval still logs its browser in.
APPROVAL_GRACE = 60
#: The longest long-poll of ``/login/status`` (seconds).
MAX_WAIT = 25
#: The largest form body read (the forms have at most three short fields).
MAX_FORM = 4096
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_STATIC = {"login.js": "text/javascript; charset=utf-8", "login.css": "text/css; charset=utf-8"}
_DOMAIN = b"hsm-auth login page state v1\0"


# --- the signed login cookie ------------------------------------------------------------


@dataclass(frozen=True)
class LoginState:
    """What the login cookie says. ``flow`` is "", "offline", "push" or "qr";
    ``session`` the offline session id (hex), ``challenge`` the challenge id;
    ``logged_in`` the user once a flow succeeded."""

    csrf: str
    expires: int
    flow: str = ""
    user: str = ""
    session: str = ""
    challenge: str = ""
    logged_in: str = ""

    @classmethod
    def fresh(cls, now: int) -> LoginState:
        return cls(csrf=secrets.token_urlsafe(24), expires=now + STATE_TTL)


class StateCodec:
    """Signs and checks :class:`LoginState` cookies: ``b64u(json).b64u(HMAC-SHA256)``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise InvalidInput("the login page key is 32 bytes")
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + payload, hashlib.sha256).digest()

    def dumps(self, state: LoginState) -> str:
        payload = json.dumps(asdict(state), separators=(",", ":"), sort_keys=True).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def loads(self, text: str | None, now: int) -> LoginState | None:
        """The state, or None for a missing, forged, malformed or expired cookie."""
        if not text or len(text) > 2048 or text.count(".") != 1:
            return None
        body, _, mac = text.partition(".")
        try:
            payload, tag = _unb64(body), _unb64(mac)
        except ValueError:
            return None
        if not hmac.compare_digest(tag, self._mac(payload)):
            return None
        try:
            data = json.loads(payload)
            state = LoginState(**data)
        except (ValueError, TypeError):
            return None
        if not isinstance(state.expires, int) or state.expires <= now:
            return None
        if not all(isinstance(v, str) for k, v in asdict(state).items() if k != "expires"):
            return None
        return state


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=8)
def _codec(directory: str) -> StateCodec:
    """The codec for the verifier in ``directory``; its key is made once (under a lock,
    so concurrent workers agree) and kept 0600 beside the verifier's state."""
    path = Path(directory) / KEY_FILE
    ensure_private_dir(path.parent)
    with locked(path.parent / f".{KEY_FILE}.lock"):
        key = read_state(path, secret=True, missing_ok=True)
        if key is None:
            key = os.urandom(32)
            atomic_write(path, key)
    return StateCodec(key)


# --- templates --------------------------------------------------------------------------


class Safe(str):
    """Markup that is put into a template as it is (every other value is escaped)."""


@functools.cache
def _template(name: str) -> string.Template:
    text = resources.files(__package__).joinpath("web", name).read_text(encoding="utf-8")
    return string.Template(text)


def render(name: str, **values: object) -> Safe:
    """The template ``web/<name>`` with ``values``: ``Safe`` ones as they are, the rest
    as escaped text (a missing name is a KeyError: a bug, never silently blank)."""
    escaped = {
        k: v if isinstance(v, Safe) else html.escape(str(v), quote=True)
        for k, v in values.items()
    }
    return Safe(_template(name).substitute(escaped))


def _page(
    request: Request,
    page: str,
    heading: str,
    body: Safe,
    *,
    status: int = 200,
    state: LoginState | None = None,
    clear: bool = False,
) -> Response:
    context = context_of(request)
    document = render(
        "base.html",
        title=f"{heading} - {context.verifier.identity.name}",
        heading=heading,
        page=page,
        body=body,
        site=context.verifier.identity.name,
    )
    response = Response(document, status_code=status, media_type="text/html; charset=utf-8",
                        headers=HEADERS)
    if state is not None:
        _set_cookie(request, response, state)
    elif clear:
        response.delete_cookie(COOKIE, path="/login")
    return response


def _set_cookie(request: Request, response: Response, state: LoginState) -> None:
    codec = _codec(str(context_of(request).settings.verifier_dir))
    response.set_cookie(
        COOKIE,
        codec.dumps(state),
        max_age=max(0, state.expires - context_of(request).now()),
        path="/login",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def _qr_data_uri(text: str) -> str:
    """The QR code of ``text`` as a ``data:`` SVG image (CSP ``img-src data:``)."""
    from .. import qr

    return "data:image/svg+xml;base64," + base64.b64encode(qr.image(text, "svg")).decode()


# --- requests ---------------------------------------------------------------------------


def _state(request: Request) -> LoginState | None:
    context = context_of(request)
    codec = _codec(str(context.settings.verifier_dir))
    return codec.loads(request.cookies.get(COOKIE), context.now())


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body of at most :data:`MAX_FORM` bytes,
    each field once."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidInput("the login forms are application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise InvalidInput("the form is too large")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
            max_num_fields=8,
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the form is malformed") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise InvalidInput(f"the form has {name!r} twice")
        fields[name] = value
    return fields


class _Checked:
    """A POST that passed the CSRF check: its login state and form."""

    def __init__(self, state: LoginState, form: dict[str, str]) -> None:
        self.state = state
        self.form = form


def _csrf_refused(detail: str) -> Response:
    return problem(403, "csrf-refused", detail, headers=HEADERS)


async def _checked(request: Request) -> _Checked | Response:
    """The login state and form of a POST whose CSRF token matches, else the 403
    problem response to send (nothing else is done)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return _csrf_refused("this form was posted from another site")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if not host or urllib.parse.urlsplit(origin).netloc != host:
            return _csrf_refused("this form was posted from another site")
    state = _state(request)
    if state is None:
        return _csrf_refused("the login page's cookie is missing or expired: reload the page")
    form = await _form(request)
    token = form.get("csrf", "")
    if not token or not hmac.compare_digest(token.encode(), state.csrf.encode()):
        return _csrf_refused("the form's CSRF token does not match: reload the page")
    return _Checked(state, form)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _limit_user(context: ServiceContext, user: str) -> None:
    """The service's per-user limit (raises its 429 error when spent)."""
    check = getattr(context.limits, "check_user", None)
    if check is not None:
        check(user)


def _refused(request: Request, reason: str, message: str, *, status: int,
             state: LoginState | None = None) -> Response:
    return _page(request, "refused", "Not logged in",
                 render("refused.html", reason=reason, message=message),
                 status=status, state=state)


def _done(request: Request, user: str) -> Response:
    context = context_of(request)
    state = replace(LoginState.fresh(context.now()), logged_in=user)  # new CSRF token
    return _page(request, "done", "Logged in",
                 render("done.html", user=user, csrf=state.csrf), state=state)


# --- routes -----------------------------------------------------------------------------


@router.get("")
async def login_form(request: Request) -> Response:
    context = context_of(request)
    state = _state(request)
    if state is not None and state.logged_in:
        return _page(request, "done", "Logged in",
                     render("done.html", user=state.logged_in, csrf=state.csrf))
    state = LoginState.fresh(context.now())
    return _page(request, "start", "Log in", render("start.html", csrf=state.csrf), state=state)


@router.post("/start")
async def start(request: Request) -> Response:
    context = context_of(request)
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    state, form = checked.state, checked.form
    user = form.get("user", "").strip()
    flow = form.get("flow", "")
    if flow not in ("offline", "push"):
        return _refused(request, "flow", "Choose a way to log in.", status=400)
    try:
        display.check(user, "the user name", max_len=display.MAX_NAME)
    except InvalidInput:
        return _refused(request, "user", "That is not a user name.", status=400)
    _limit_user(context, user)
    if flow == "offline":
        return await _start_offline(request, context, state, user)
    return await _start_push(request, context, state, user, form)


async def _start_offline(
    request: Request, context: ServiceContext, state: LoginState, user: str
) -> Response:
    where = _client(request)
    text = f"Web login as {user} from {where}"
    try:
        session = await blocking(context.verifier.start_session, user, text[:display.MAX_CONTEXT])
    except UnknownMethod:
        return _refused(request, "no-method",
                        f"{user} cannot log in with a code here (no method enrolled).",
                        status=404)
    except InvalidInput:
        return _refused(request, "user", "That is not a user name.", status=400)
    state = replace(state, flow="offline", user=user, session=session.session_id.hex(),
                    challenge="", logged_in="")
    qr = _qr_data_uri(session.text)
    expires = datetime.datetime.fromtimestamp(session.data.expires, datetime.UTC)
    body = render(
        "offline.html",
        qr=qr,
        text=session.text,
        session=session.session_id.hex(),
        context=text,
        csrf=state.csrf,
        user=user,
        expires_iso=expires.isoformat(),
        expires_text=expires.strftime("%H:%M:%S UTC"),
    )
    return _page(request, "offline", "Scan the code", body, state=state)


def _shown(text: str, max_len: int) -> str:
    """``text`` cut to ``max_len`` if it may be shown on the authenticator, else ""."""
    text = text.strip()[:max_len]
    return text if display.problem(text, max_len=max_len) is None else ""


def _request_context(request: Request, form: dict[str, str]) -> ChallengeContext:
    """What the authenticator shows about the desktop that asked: its address, user
    agent, the time zone its page reported (not verified: a hint) and custom data."""
    from ..challenges import MAX_CUSTOM_VALUE, MAX_LOCATION, MAX_USER_AGENT

    zone = _shown(form.get("tz", ""), 64)
    custom = {"page": "/login"}
    language = _shown(request.headers.get("accept-language", ""), MAX_CUSTOM_VALUE)
    if language:
        custom["language"] = language
    return ChallengeContext(
        ip=_shown(_client(request), 64),
        user_agent=_shown(request.headers.get("user-agent", ""), MAX_USER_AGENT),
        location=_shown(f"browser time zone {zone}", MAX_LOCATION) if zone else "",
        custom=custom,
    )


def _waiting(request: Request, state: LoginState, intro: Safe) -> Response:
    body = render("wait.html", intro=intro, csrf=state.csrf,
                  waiting="Waiting for your device\u2026")
    return _page(request, state.flow, "Approve on your device", body, state=state)


async def _start_push(
    request: Request, context: ServiceContext, state: LoginState, user: str,
    form: dict[str, str],
) -> Response:
    site = context.verifier.identity.name
    message = f"Log in to {site} as {user}"
    try:
        challenge, _ = await blocking(
            challenge_api.online(context).start, user=user, kind=ChallengeKind.PUSH,
            message=message, context=_request_context(request, form), ttl=PUSH_TTL,
        )
    except UnknownMethod:
        return _refused(request, "no-method",
                        f"{user} cannot approve a login here (no method enrolled).",
                        status=404)
    challenge_api.changes(request).notify()
    state = replace(state, flow="push", user=user, session="",
                    challenge=challenge.challenge_id, logged_in="")
    return _waiting(request, state, render("push_intro.html", user=user, message=message))


@router.post("/qr")
async def start_qr(request: Request) -> Response:
    """A QR-claim login: no user name; whoever's authenticator claims and approves it
    is logged in (the claim shows it where the request came from)."""
    context = context_of(request)
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    message = f"Log in to {context.verifier.identity.name}"
    challenge, claim = await blocking(
        challenge_api.online(context).start, user=None, kind=ChallengeKind.QR,
        message=message, context=_request_context(request, checked.form), ttl=PUSH_TTL,
    )
    assert claim is not None
    state = replace(checked.state, flow="qr", user="", session="",
                    challenge=challenge.challenge_id, logged_in="")
    intro = render("qr_intro.html", qr=_qr_data_uri(claim), claim=claim, message=message)
    return _waiting(request, state, intro)


@router.post("/offline")
async def offline(request: Request) -> Response:
    context = context_of(request)
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    state, form = checked.state, checked.form
    if state.flow != "offline" or not state.session:
        return _refused(request, "no-session", "Start again: there is no code to check.",
                        status=409)
    _limit_user(context, state.user)
    otp = form.get("otp", "").strip()
    session_id = bytes.fromhex(state.session)
    try:
        accepted = await _verify(context, session_id, otp)
    except InvalidToken:
        return _refused(request, "otp-refused",
                        "That code was not accepted (wrong, used before, or expired).",
                        status=403)
    except InvalidInput:
        return _refused(request, "otp-format", "A one-time code is 6 to 10 digits.", status=400)
    if accepted.user != state.user:  # a session is for one user: never happens
        return _refused(request, "otp-refused", "That code was not accepted.", status=403)
    return _done(request, accepted.user)


async def _verify(context: ServiceContext, session_id: bytes, otp: str) -> Acceptance:
    """Through the worker's group committer, like ``POST /v1/verify``: the answer comes
    after the commit that decided it."""
    from .verify_api import committer_of

    return await committer_of(context).verify(session_id, otp)


@router.post("/cancel")
@router.post("/logout")
async def start_over(request: Request) -> Response:
    """Cancel a login under way, or log out: either way a fresh start page and cookie."""
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    fresh = LoginState.fresh(context_of(request).now())
    return _page(request, "start", "Log in", render("start.html", csrf=fresh.csrf), state=fresh)


@router.get("/status")
async def status(request: Request) -> Response:
    """The state of this browser's push or QR login (JSON, for login.js). With
    ``?wait=S`` (at most :data:`MAX_WAIT`) it answers when the state changes. Once the
    challenge is approved the answer logs this browser in: a new cookie (new CSRF
    token, returned for the page's logout form)."""
    context = context_of(request)
    state = _state(request)
    if state is None or state.flow not in ("push", "qr") or not state.challenge:
        return JSONResponse({"state": "none"}, status_code=409, headers=HEADERS)
    try:
        wait = min(MAX_WAIT, max(0, int(request.query_params.get("wait", "0"))))
    except ValueError:
        wait = 0
    challenge = await challenge_api.wait_for_change(request, context, state.challenge, wait)
    current = challenge.state
    kind = ChallengeKind.PUSH if state.flow == "push" else ChallengeKind.QR
    if challenge.kind is not kind or (state.user and challenge.user != state.user):
        return JSONResponse({"state": "none"}, status_code=409, headers=HEADERS)
    if current is ChallengeState.APPROVED and challenge.user:
        if context.now() > challenge.expires + APPROVAL_GRACE:  # an old pending cookie
            return JSONResponse({"state": "expired"}, headers=HEADERS)
        fresh = replace(LoginState.fresh(context.now()), logged_in=challenge.user)
        response = JSONResponse(
            {"state": "approved", "user": challenge.user, "csrf": fresh.csrf}, headers=HEADERS
        )
        _set_cookie(request, response, fresh)
        return response
    return JSONResponse({"state": current.value}, headers=HEADERS)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    kind = _STATIC.get(name)
    if kind is None:
        return Response("not found\n", status_code=404, media_type="text/plain", headers=HEADERS)
    data = resources.files(__package__).joinpath("web", "static", name).read_bytes()
    headers = {**HEADERS, "Cache-Control": "no-cache"}
    return Response(data, media_type=kind, headers=headers)
