"""The service provider's authentication: ``Authorization: Bearer hsk_…`` API keys
with scopes (:mod:`hsm_auth.api_keys`), as a FastAPI dependency.

    @router.post("/v1/offers")
    async def offer(..., key: ApiKeyRecord = Depends(require_scope("enroll"))): ...

No header, a scheme other than Bearer, a malformed, unknown or revoked key: 401
(``WWW-Authenticate: Bearer``); a key without the scope: 403. The key is looked up
in the store on every request (in the threadpool), so a revocation holds at once in
every worker. The key never reaches a log: only its public id may.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import api_keys
from ..store.base import ApiKeyRecord
from .context import ServiceContext, blocking, get_context

__all__ = ["require_scope"]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `hsm-auth verifier api-key create` "
    "(hsk_<key id>_<secret>), with the scope the route names.",
)


def require_scope(scope: str) -> Callable[..., Awaitable[ApiKeyRecord]]:
    """A dependency that yields the caller's key record if it has ``scope``."""
    if scope not in api_keys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def api_key(
        credentials: HTTPAuthorizationCredentials | None = Security(_bearer),  # noqa: B008
        ctx: ServiceContext = Depends(get_context),  # noqa: B008
    ) -> ApiKeyRecord:
        if credentials is None:
            raise api_keys.ApiKeyRefused()
        return await blocking(
            api_keys.authenticate, ctx.verifier.store, credentials.credentials, scope
        )

    api_key.__name__ = f"api_key_{scope}"
    return api_key
