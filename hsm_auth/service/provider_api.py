"""The service provider's API: what the provider's backend calls with an API key
(``Authorization: Bearer hsk_…``, :mod:`hsm_auth.service.auth`), each route with
the scope it needs.

=========================================  =========  ===================================
route                                      scope      answer
=========================================  =========  ===================================
POST   /v1/offers                          enroll     201 {offer_id, offer, activation_code,
                                                      user, methods, expires}
POST   /v1/sessions                        verify     201 {session_id, data, user, methods,
                                                      expires}
GET    /v1/sessions/{session_id}/qr.svg    verify     the verification data as a QR code
GET    /v1/sessions/{session_id}/qr.png    verify     (image/svg+xml, image/png)
GET    /v1/users/{user}/credentials        admin      {user, credentials: [...]}
GET    /v1/credentials/{credential_id}     admin      one credential
DELETE /v1/credentials/{credential_id}     admin      {revoked: credential_id}
GET    /v1/audit?user=&limit=              admin      {records: [...]} (oldest first)
=========================================  =========  ===================================

The activation code of an offer is the provider's to deliver to the user over its
own authenticated channel (never with the offer); this API hands it to the
provider's backend only. ``credential_id`` is the protocol's credential id (hex of
:func:`hsm_auth.transcript.credential_id` of the signing key), never a row id.

The QR image of a session carries the verification data the session's POST
returned while this worker still holds it (a bounded cache, per worker); otherwise
(another worker, after a restart) the same data signed again, which the
authenticator accepts the same way: the OTP binds the data's fields, not the
signature. A used, expired or sync session has no QR code (410, 404).

Every route that names a user takes one token of that user's rate bucket
(:meth:`hsm_auth.service.limits.Limits.check_user`); user names follow the
verifier's own rules (the Verifier checks them).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from threading import Lock
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from .. import audit, qr, transcript
from .. import transaction as transaction_data
from ..audit import AuditRecord, Event
from ..errors import ExpiredMessage
from ..methods import Method
from ..protocol import MAX_CONTEXT, VerificationData
from ..store.base import ApiKeyRecord, CredentialRecord
from ..verifier import SYNC_CONTEXT, _check_user
from .auth import require_scope
from .context import ServiceContext, blocking, get_context
from .problems import NotFound

router = APIRouter(tags=["provider"])

MAX_USER = 64
_HEX_ID = r"^[0-9a-f]{32}$"
_SESSION_CACHE = 10_000

Enroll = Annotated[ApiKeyRecord, Depends(require_scope("enroll"))]
Verify = Annotated[ApiKeyRecord, Depends(require_scope("verify"))]
Admin = Annotated[ApiKeyRecord, Depends(require_scope("admin"))]
Context = Annotated[ServiceContext, Depends(get_context)]
SessionId = Annotated[str, Path(pattern=_HEX_ID, description="the session id (32 hex digits)")]
CredentialId = Annotated[
    str, Path(pattern=_HEX_ID, description="the protocol credential id (32 hex digits)")
]


#: A method's name in a request (FastAPI validates the decoded JSON in strict mode,
#: where an enum would take only its members, not their names).
MethodName = Literal["device", "pin", "biometric", "face"]
assert set(get_args(MethodName)) == {m.value for m in Method}


def _methods(names: list[MethodName] | None) -> tuple[Method, ...] | None:
    return tuple(Method(n) for n in names) if names else None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OfferRequest(_Request):
    user: str = Field(min_length=1, max_length=MAX_USER, description="the user name")
    methods: list[MethodName] | None = Field(
        default=None, min_length=1, max_length=len(Method),
        description="methods the offer allows (default: all)",
    )
    replace: bool = Field(
        default=False,
        description="may replace an enrolled method (needs the policy's allow_override)",
    )
    tenant: str | None = Field(default=None, description="the user's tenant (default: none)")
    label: str | None = Field(
        default=None,
        description="names the credential (unique per tenant and user): a new label adds "
        "another token of an enrolled method (default: the method's name)",
    )


class OfferCreated(BaseModel):
    offer_id: str
    offer: str = Field(description="the offer text, for the authenticator")
    activation_code: str = Field(
        description="for the user, over the provider's own authenticated channel only"
    )
    user: str
    methods: list[Method]
    expires: int


class SessionRequest(_Request):
    user: str = Field(min_length=1, max_length=MAX_USER)
    context: str = Field(
        min_length=1, max_length=MAX_CONTEXT, description="what the user approves"
    )
    methods: list[MethodName] | None = Field(default=None, min_length=1, max_length=len(Method))
    tenant: str | None = Field(
        default=None, min_length=1, max_length=transaction_data.MAX_TENANT,
        description="the user's tenant (docs/PROTOCOL.md §17)",
    )
    transaction: list[list[str]] | None = Field(
        default=None, min_length=1, max_length=transaction_data.MAX_ITEMS,
        description="transaction data shown with the context and bound by the OTP: "
        "[label, value] pairs in the order shown (docs/PROTOCOL.md §17)",
    )
    user_data: int = Field(
        default=0, ge=0, le=transaction_data.MAX_USER_DATA,
        description="0: the user enters nothing; N: the user enters 1..N characters on the "
        "authenticator, which POST /v1/verify then needs as data",
    )


class SessionCreated(BaseModel):
    session_id: str
    data: str = Field(description="the verification data text (what the QR code carries)")
    user: str
    methods: list[Method]
    expires: int
    tenant: str | None = None
    transaction: list[list[str]] | None = None
    user_data: int = 0


class Credential(BaseModel):
    credential_id: str
    user: str
    method: Method
    backend: str = Field(description="the backend the client claimed")
    attestation: dict[str, Any] | None = Field(
        description="what the verifier established at enrollment (None: not recorded)"
    )
    atc: int
    failures: int
    locked: bool
    created: int
    last_used: int | None
    protocol: int
    certificate: str | None = Field(description="the issued certificate (PEM)")
    tenant: str | None = Field(default=None, description="the user's tenant (None: none)")
    label: str = Field(default="", description="the credential's label (unique per user)")


class Credentials(BaseModel):
    user: str
    credentials: list[Credential]


class Revoked(BaseModel):
    revoked: str


class AuditEntry(BaseModel):
    time: int
    event: str
    user: str | None = None
    method: str | None = None
    session: str | None = None
    reason: str | None = None
    atc: int | None = None
    detail: str | None = None


class AuditRecords(BaseModel):
    records: list[AuditEntry]


class _SessionTexts:
    """The data texts this worker handed out, so that a QR code repeats them exactly."""

    def __init__(self, size: int = _SESSION_CACHE) -> None:
        self._texts: OrderedDict[bytes, str] = OrderedDict()
        self._size = size
        self._lock = Lock()

    def put(self, session_id: bytes, text: str) -> None:
        with self._lock:
            self._texts[session_id] = text
            while len(self._texts) > self._size:
                self._texts.popitem(last=False)

    def get(self, session_id: bytes) -> str | None:
        with self._lock:
            return self._texts.get(session_id)


_texts = _SessionTexts()


def credential_json(c: CredentialRecord) -> Credential:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pem = None
    if c.certificate is not None:
        pem = x509.load_der_x509_certificate(c.certificate).public_bytes(
            serialization.Encoding.PEM
        ).decode("ascii")
    return Credential(
        credential_id=transcript.credential_id(c.signing_key).hex(),
        user=c.user,
        method=c.method,
        backend=c.backend,
        attestation=None if c.attestation is None else json.loads(c.attestation),
        atc=c.atc,
        failures=c.failures,
        locked=c.locked,
        created=c.created,
        last_used=c.last_used,
        protocol=c.protocol,
        certificate=pem,
        tenant=c.tenant or None,
        label=c.label,
    )


@router.post("/v1/offers", status_code=201, response_model=OfferCreated,
             summary="Create an enrollment offer and its activation code for a user")
async def create_offer(body: OfferRequest, ctx: Context, key: Enroll) -> OfferCreated:
    ctx.limits.check_user(body.user)
    methods = _methods(body.methods) or tuple(Method)
    issued = await blocking(
        ctx.verifier.create_offer, body.user, methods=methods, replace=body.replace,
        tenant=body.tenant, label=body.label,
    )
    return OfferCreated(
        offer_id=issued.offer.offer_id.hex(),
        offer=issued.text,
        activation_code=issued.activation_code,
        user=issued.offer.user,
        methods=list(issued.offer.methods),
        expires=issued.offer.expires,
    )


@router.post("/v1/sessions", status_code=201, response_model=SessionCreated,
             summary="Start an offline session: verification data for the authenticator")
async def create_session(body: SessionRequest, ctx: Context, key: Verify) -> SessionCreated:
    ctx.limits.check_user(body.user)
    session = await blocking(
        ctx.verifier.start_session, body.user, body.context, methods=_methods(body.methods),
        tenant=body.tenant, transaction=body.transaction, user_data=body.user_data,
    )
    _texts.put(session.session_id, session.text)
    items = session.data.transaction
    return SessionCreated(
        session_id=session.session_id.hex(),
        data=session.text,
        user=session.data.user,
        methods=list(session.data.methods),
        expires=session.data.expires,
        tenant=session.data.tenant,
        transaction=None if items is None else [list(p) for p in items],
        user_data=session.data.user_data,
    )


def _session_text(ctx: ServiceContext, session_id: bytes) -> str:
    session = ctx.verifier.store.session(session_id)
    if session is None or session.context == SYNC_CONTEXT:
        raise NotFound("no such session")
    if session.used:
        raise ExpiredMessage("the session is used")
    if session.expires < ctx.now():
        raise ExpiredMessage("the session has expired")
    cached = _texts.get(session_id)
    if cached is not None:
        return cached
    data = VerificationData(
        verifier_id=ctx.verifier.identity.verifier_id,
        user=session.user,
        challenge=session.challenge,
        context=session.context,
        methods=session.methods,
        expires=session.expires,
        tenant=session.tenant,
        transaction=session.transaction,
        user_data=session.user_data,
    )
    return data.to_text(ctx.verifier.keys.sign_raw)


_IMAGES = {"svg": "image/svg+xml", "png": "image/png"}


async def _qr(ctx: ServiceContext, session_id: str, kind: str) -> Response:
    text = await blocking(_session_text, ctx, bytes.fromhex(session_id))
    image = await blocking(qr.image, text, kind)
    return Response(image, media_type=_IMAGES[kind], headers={"Cache-Control": "no-store"})


_QR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/svg+xml": {}, "image/png": {}}, "description": "the QR code"}
}


@router.get("/v1/sessions/{session_id}/qr.svg", response_class=Response,
            responses=_QR_RESPONSES, summary="The session's verification data as an SVG QR code")
async def session_qr_svg(session_id: SessionId, ctx: Context, key: Verify) -> Response:
    return await _qr(ctx, session_id, "svg")


@router.get("/v1/sessions/{session_id}/qr.png", response_class=Response,
            responses=_QR_RESPONSES, summary="The session's verification data as a PNG QR code")
async def session_qr_png(session_id: SessionId, ctx: Context, key: Verify) -> Response:
    return await _qr(ctx, session_id, "png")


def _user_credentials(
    ctx: ServiceContext, user: str, tenant: str | None
) -> list[CredentialRecord]:
    _check_user(user)
    return ctx.verifier.credentials(user, tenant=tenant)


@router.get("/v1/users/{user}/credentials", response_model=Credentials,
            summary="A user's credentials (none: an empty list)")
async def user_credentials(
    user: Annotated[str, Path(min_length=1, max_length=MAX_USER)], ctx: Context, key: Admin,
    tenant: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> Credentials:
    creds = await blocking(_user_credentials, ctx, user, tenant)
    return Credentials(user=user, credentials=[credential_json(c) for c in creds])


def _find(ctx: ServiceContext, credential_id: str) -> CredentialRecord:
    found = ctx.verifier.store.credential_by_id(bytes.fromhex(credential_id))
    if found is None:
        raise NotFound("no such credential")
    return found


@router.get("/v1/credentials/{credential_id}", response_model=Credential,
            summary="One credential, by its protocol credential id")
async def show_credential(credential_id: CredentialId, ctx: Context, key: Admin) -> Credential:
    return credential_json(await blocking(_find, ctx, credential_id))


def _revoke(ctx: ServiceContext, credential_id: str) -> None:
    # By row id: a credential of the same (user, method) enrolled meanwhile is another one.
    cred = _find(ctx, credential_id)
    record = AuditRecord(ctx.now(), Event.REVOKE, cred.user, cred.method.value,
                         detail=f"credential {credential_id}")
    if not ctx.verifier.store.revoke(cred.id, record):
        raise NotFound("no such credential")
    audit.emit([record])


@router.delete("/v1/credentials/{credential_id}", response_model=Revoked,
               summary="Revoke a credential: its sessions and OTPs are refused from now on")
async def revoke_credential(credential_id: CredentialId, ctx: Context, key: Admin) -> Revoked:
    await blocking(_revoke, ctx, credential_id)
    return Revoked(revoked=credential_id)


@router.get("/v1/audit", response_model=AuditRecords, response_model_exclude_none=True,
            summary="The newest audit records (of one user), oldest first")
async def audit_records(
    ctx: Context,
    key: Admin,
    user: Annotated[str | None, Query(min_length=1, max_length=MAX_USER)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditRecords:
    if user is not None:
        await blocking(_check_user, user)
    records = await blocking(ctx.verifier.store.audit_records, user, limit)
    return AuditRecords(records=[AuditEntry.model_validate(r.to_dict()) for r in records])
