"""The ASGI application: :func:`create_app`.

Layers, outside in: :class:`~hsm_auth.service.problems.CatchAllMiddleware` (500
without detail; answers the limits' errors), the body limit, the address rate
limit, then FastAPI with the problem handlers and the routers. ``/openapi.json``
describes every route; the docs UIs are off (they would load third-party assets).

With a ``context`` the caller owns the Verifier; without one the app opens it from
``settings`` when the worker starts and closes it when it stops (lifespan): one
Verifier per worker process. :func:`create_app_from_env` is the factory uvicorn
calls in each worker (``hsm-auth serve``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from .. import __version__
from .context import ServiceContext, ServiceSettings, blocking, get_context
from .limits import BodyLimitMiddleware, Limits, RateLimitMiddleware
from .problems import CatchAllMiddleware, install

log = logging.getLogger("hsm_auth.service")

__all__ = ["create_app", "create_app_from_env", "open_context"]


def open_context(settings: ServiceSettings) -> ServiceContext:
    """Open the Verifier the settings name, with the limits they give."""
    from ..verifier import Verifier

    verifier = Verifier.open(settings.verifier_dir, database=settings.database, hsm=settings.hsm)
    limits = Limits(
        max_body=settings.max_body,
        address_rate=settings.address_rate,
        address_burst=settings.address_burst,
        user_rate=settings.user_rate,
        user_burst=settings.user_burst,
    )
    return ServiceContext(settings=settings, verifier=verifier, limits=limits)


def close_context(context: ServiceContext) -> None:
    try:
        for hook in reversed(context.on_close):
            hook()
    finally:
        context.verifier.close()


def create_app(
    context: ServiceContext | None = None, *, settings: ServiceSettings | None = None
) -> FastAPI:
    """The service over ``context`` (owned by the caller), or over a context opened
    from ``settings`` at start-up and closed at shutdown."""
    if context is None and settings is None:
        raise TypeError("create_app needs a context or settings")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if context is not None:
            yield
            return
        assert settings is not None
        opened = await blocking(open_context, settings)
        app.state.context = opened
        log.info("service ready: verifier %s", opened.verifier.identity.verifier_id.hex())
        try:
            yield
        finally:
            await blocking(close_context, opened)

    app = FastAPI(
        title="hsm-auth verifier",
        version=__version__,
        description="The online verifier of hsm-auth (docs/PROTOCOL.md, README).",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        openapi_url="/openapi.json",
        # "/v1/challenges/" (an empty id) is a 404 problem, not a 307 to "/v1/challenges"
        redirect_slashes=False,
        lifespan=lifespan,
    )
    if context is not None:
        app.state.context = context
    install(app)

    def limits() -> Limits | None:
        found: ServiceContext | None = getattr(app.state, "context", None)
        return None if found is None else found.limits

    def max_body() -> int:
        found = limits()
        return found.max_body if found is not None else 64 * 1024

    app.add_middleware(RateLimitMiddleware, limits=limits)
    app.add_middleware(BodyLimitMiddleware, max_body=max_body)
    app.add_middleware(CatchAllMiddleware)

    app.add_api_route(
        "/v1/health",
        health,
        methods=["GET"],
        summary="The service is up and its store answers",
        tags=["service"],
    )
    from . import challenge_api, device_api, login_page, provider_api

    app.include_router(provider_api.router)
    app.include_router(login_page.router)
    from . import verify_api

    app.include_router(verify_api.router)
    app.include_router(challenge_api.router)
    app.include_router(device_api.router)
    return app


async def health(ctx: ServiceContext = Depends(get_context)) -> dict[str, Any]:  # noqa: B008
    version = await blocking(ctx.verifier.store.schema_version)
    return {
        "status": "ok",
        "verifier_id": ctx.verifier.identity.verifier_id.hex(),
        "schema_version": version,
    }


def create_app_from_env() -> FastAPI:
    """The factory uvicorn calls in each worker: settings from the environment."""
    return create_app(settings=ServiceSettings.from_env())
