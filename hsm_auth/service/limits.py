"""Safety at the edge: request body size and request rates.

* **Body size**: a request whose ``Content-Length`` exceeds
  :attr:`~hsm_auth.service.context.ServiceSettings.max_body` is answered 413 before
  one byte of its body is read; a body without a length (chunked) is counted while
  it is read and refused with 413 as soon as it passes the limit, so the service
  never holds more than the limit of any request.
* **Rates**: token buckets, one per client address (every request but
  ``/v1/health``) and one per user name (the routes that name a user call
  :meth:`Limits.check_user`). A bucket holds ``burst`` tokens and refills at
  ``rate`` per second; an empty one answers 429 with ``Retry-After``.

The buckets live in memory, **per worker process**: with ``--workers N`` a client
gets up to N times the rate (and the same client may reach different workers).
Limits that must hold across workers belong in the reverse proxy in front. The
client address is the one uvicorn gives the application: behind a reverse proxy,
run with ``--proxy-headers`` and ``--forwarded-allow-ips`` set to the proxy's
address, or every client shares the proxy's bucket (README, "The online service").

The tables are bounded (:data:`MAX_KEYS` entries): when full, buckets that have
refilled (indistinguishable from new ones) are dropped first, then the oldest.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import BodyTooLarge, RateLimited

__all__ = ["MAX_KEYS", "BodyLimitMiddleware", "Limits", "RateLimitMiddleware", "TokenBuckets"]

MAX_KEYS = 100_000
#: Paths no address limit applies to (readiness probes).
EXEMPT = frozenset({"/v1/health"})


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """Token buckets by key (an address, a user name). ``rate`` <= 0: no limit."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()  # routes may call from the threadpool

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if there was one, else the seconds until one
        is there (nothing taken)."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                self._make_room(now)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            else:
                self._buckets.move_to_end(key)
                bucket.tokens = min(
                    float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate
                )
                bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self._max_keys:
            return
        full = [
            k for k, b in self._buckets.items()
            if b.tokens + (now - b.stamp) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class Limits:
    """The limits of one worker: body size, buckets per address and per user."""

    def __init__(
        self,
        *,
        max_body: int,
        address_rate: float,
        address_burst: int,
        user_rate: float,
        user_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_body = max_body
        self.addresses = TokenBuckets(address_rate, address_burst, clock=clock)
        self.users = TokenBuckets(user_rate, user_burst, clock=clock)

    def check_address(self, address: str) -> None:
        wait = self.addresses.take(address)
        if wait:
            raise RateLimited(wait, "requests from this address")

    def check_user(self, user: str) -> None:
        """Called by every route that names a user (offers, sessions, challenges)."""
        wait = self.users.take(user)
        if wait:
            raise RateLimited(wait, "requests for this user")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class RateLimitMiddleware:
    """429 for a client address whose bucket is empty (see the module docstring)."""

    def __init__(self, app: ASGIApp, limits: Callable[[], Limits | None]) -> None:
        self.app = app
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self._limits()
        if scope["type"] == "http" and limits is not None and scope["path"] not in EXEMPT:
            limits.check_address(_client(scope))  # CatchAllMiddleware answers RateLimited
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body longer than the limit, before it is read (``Content-Length``)
    or as soon as it passes the limit (no length given)."""

    def __init__(self, app: ASGIApp, max_body: Callable[[], int]) -> None:
        self.app = app
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._max_body()
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > limit:
                    raise BodyTooLarge(limit)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
