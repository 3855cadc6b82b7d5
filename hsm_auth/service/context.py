"""What every route of the service works with: :class:`ServiceSettings` (what
``hsm-auth serve`` was told) and :class:`ServiceContext` (the open Verifier, the
clock, the limits, the committer), reached through the :func:`get_context`
dependency.

One :class:`ServiceContext` per worker process: the Verifier is opened when the
worker starts (the application's lifespan, :mod:`hsm_auth.service.app`) and closed
when it stops. Its store serialises calls with a lock, and every call into it, which
blocks (SQLite, PostgreSQL, an HSM), runs in the threadpool (:func:`blocking`),
never on the event loop.

Worker processes get the settings from the environment variable
:data:`SETTINGS_ENV` (JSON, written by ``hsm-auth serve`` for its own children:
a PostgreSQL DSN with a password is never put on a command line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..verifier import Verifier
    from .limits import Limits

__all__ = ["SETTINGS_ENV", "ServiceContext", "ServiceSettings", "blocking", "get_context"]

SETTINGS_ENV = "HSM_AUTH_SERVICE_SETTINGS"
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs. Rates are requests per second refilled into a bucket of
    ``burst`` (0: no limit); see :mod:`hsm_auth.service.limits`."""

    verifier_dir: Path
    database: str | None = field(default=None, repr=False)  # a DSN may hold a password
    hsm: str | None = None
    workers: int = 1
    #: The largest request body read (bytes); a larger one is 413 before it is read.
    max_body: int = 64 * 1024
    address_rate: float = 200.0
    address_burst: int = 400
    user_rate: float = 5.0
    user_burst: int = 20

    def to_env(self) -> str:
        data = asdict(self)
        data["verifier_dir"] = str(self.verifier_dir)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServiceSettings:
        text = (os.environ if environ is None else environ).get(SETTINGS_ENV)
        if not text:
            raise ConfigError(f"{SETTINGS_ENV} is not set: start the service with hsm-auth serve")
        try:
            data = json.loads(text)
            data["verifier_dir"] = Path(data["verifier_dir"])
            return cls(**data)
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{SETTINGS_ENV} is malformed") from None


@dataclass
class ServiceContext:
    """The state one worker's routes share. ``committer`` is the group committer of
    OTP verifications (:mod:`hsm_auth.service.committer`, set when it runs)."""

    settings: ServiceSettings
    verifier: Verifier
    limits: Limits
    clock: Callable[[], float] = time.time
    committer: Any = None
    #: Callables run (in reverse order) when the worker stops, before the Verifier closes.
    on_close: list[Callable[[], Any]] = field(default_factory=list)

    def now(self) -> int:
        return int(self.clock())


def context_of(request: Request) -> ServiceContext:
    """The worker's context, for code that has the request in hand."""
    context: ServiceContext = request.app.state.context
    return context


async def get_context(request: Request) -> ServiceContext:
    """The FastAPI dependency every route takes the context through. ``async``: FastAPI
    runs a plain ``def`` dependency in the threadpool, a hop per request for an
    attribute read."""
    return context_of(request)


async def blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``func`` (store, HSM, anything that blocks) in the threadpool."""
    return await run_in_threadpool(func, *args, **kwargs)
