"""Group commit for the service: verifications that arrive together share one
durable transaction (:meth:`hsm_auth.verifier.Verifier.verify_many`).

One :class:`Committer` per worker process owns the verifier's verification
path: a dedicated thread that takes everything queued (up to ``max_batch``),
runs one ``verify_many`` (one commit), and only then settles each caller's
future. A caller therefore hears "accepted" only after the acceptance is on
disk; a kill -9 at any moment loses no acknowledged OTP.

There is no timer and no artificial wait: while one commit is in flight the
next requests queue up, so the batch size follows the load by itself (one
request alone is committed at once, a crowd in batches of up to ``max_batch``).

Errors:

* a per-request :class:`~hsm_auth.errors.InvalidToken` (every refusal reason:
  the audit keeps which) or :class:`~hsm_auth.errors.InvalidInput` (an OTP of
  a length no credential of the session has) goes to that request only;
* a :class:`~hsm_auth.errors.StateError` from the database fails the whole
  batch, with nothing committed (``verify_many`` raises before anything is
  reported), so every caller of that batch gets the same StateError;
* anything else (a bug) is logged by class name only (no OTP, no session id) and
  fails the batch as a StateError; the committer thread keeps serving;
* when more than ``max_pending`` requests are queued, a new one is refused at
  once with :class:`CommitterBusy` (a StateError: 503), so an overload sheds
  load instead of growing the queue's latency without bound.

The asynchronous :meth:`Committer.verify` is for the event loop (futures are
settled with one ``call_soon_threadsafe`` per batch); :meth:`Committer.verify_blocking`
is for any other thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import api_keys
from ..errors import HsmAuthError, InvalidInput, StateError
from ..verifier import _unwrap

if TYPE_CHECKING:
    from ..verifier import Acceptance, Result, Verifier

log = logging.getLogger("hsm_auth.service.committer")

#: Requests per verify_many: big enough that the commit's fixed cost (an fsync)
#: is shared widely, small enough that one batch's Python work stays short.
DEFAULT_MAX_BATCH = 256
#: Requests waiting beyond this are refused (CommitterBusy, 503) instead of queued.
DEFAULT_MAX_PENDING = 8192


class CommitterBusy(StateError):
    """Too many verifications are waiting for a commit: try again shortly."""


@dataclass(eq=False)
class _Item:
    session_id: bytes
    otp: str = field(repr=False)
    #: The event loop of an asyncio caller (its future is an asyncio.Future), or
    #: None for a blocking caller (a concurrent.futures.Future).
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Result] | concurrent.futures.Future[Result]
    #: The caller's API key text, authenticated in the batch (None: the caller did).
    api_key: str | None = field(default=None, repr=False)
    #: What the user entered on the authenticator (docs/PROTOCOL.md §17), or None.
    data: str | None = field(default=None, repr=False)


_STOP = object()


@dataclass(frozen=True)
class CommitterStats:
    """Counters since start: batches committed, requests settled, largest batch."""

    batches: int
    requests: int
    largest: int
    failed_batches: int


class Committer:
    """The group-commit thread of one worker process (see the module docstring)."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        scope: str = "verify",
        name: str = "hsm-auth-committer",
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending are at least 1")
        self.verifier = verifier
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.scope = scope  # what an API key handed with a request must allow
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._lock = threading.Lock()
        self._batches = self._requests = self._largest = self._failed = 0

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> Committer:
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, commit what is queued, and stop the thread. The
        verifier is left open (its owner closes it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> Committer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> CommitterStats:
        return CommitterStats(self._batches, self._requests, self._largest, self._failed)

    # --- submitting ---------------------------------------------------------

    def _admit(self, item: _Item) -> None:
        # Checked here, not in the batch: one malformed item must not fail the others'.
        if not isinstance(item.session_id, bytes) or not isinstance(item.otp, str):
            raise InvalidInput("a verification is a session id (bytes) and an OTP (text)")
        if item.api_key is not None and not isinstance(item.api_key, str):
            raise InvalidInput("an API key is text")
        with self._lock:  # nothing is queued after the stop marker
            if self._closed or not self._thread.is_alive():
                raise StateError("the verifier service is shutting down")
            if self._queue.qsize() >= self.max_pending:
                raise CommitterBusy("the verifier is busy; try again shortly")
            self._queue.put(item)

    async def verify(
        self, session_id: bytes, otp: str, *, api_key: str | None = None, data: str | None = None
    ) -> Acceptance:
        """Verify on the running event loop: returns after the commit that decided it.
        Raises InvalidToken, InvalidInput or StateError like :meth:`Verifier.verify`;
        with ``api_key``, first ApiKeyRefused / ScopeRefused if that key may not verify
        (checked in the batch, see :meth:`_authenticate`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._admit(_Item(session_id, otp, loop, future, api_key, data))
        return _unwrap(await future)

    def verify_blocking(
        self, session_id: bytes, otp: str, *, api_key: str | None = None, data: str | None = None
    ) -> Acceptance:
        """Verify from a thread that is not an event loop's (blocks until committed)."""
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self._admit(_Item(session_id, otp, None, future, api_key, data))
        return _unwrap(future.result())

    # --- the committer thread ----------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[_Item] = []
            if first is _STOP:
                stopping = True
            else:
                assert isinstance(first, _Item)
                batch.append(first)
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True  # commit what came before it, then stop
                    continue
                assert isinstance(more, _Item)
                batch.append(more)
            if batch:
                self._commit(batch)
        # Anything that raced in after the stop marker: refuse, never leave it hanging.
        leftovers: list[_Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Item):
                leftovers.append(item)
        if leftovers:
            _settle(leftovers, [StateError("the verifier service is shutting down")
                                for _ in leftovers])

    def _authenticate(self, batch: Sequence[_Item]) -> dict[str, HsmAuthError]:
        """The refused API keys of the batch and why: each distinct key is looked up
        in the store once per batch (so a revocation holds from the next batch on, in
        every worker), in this thread: no threadpool hop per request. StateError
        (the database failed) fails the batch."""
        refused: dict[str, HsmAuthError] = {}
        for key in {i.api_key for i in batch if i.api_key is not None}:
            try:
                api_keys.authenticate(self.verifier.store, key, self.scope)
            except (api_keys.ApiKeyRefused, api_keys.ScopeRefused) as e:
                refused[key] = e
        return refused

    def _commit(self, batch: Sequence[_Item]) -> None:
        results: list[Result]
        try:
            refused = self._authenticate(batch)
            allowed = [i for i in batch if i.api_key not in refused]
            verified = iter(
                self.verifier.verify_many([(i.session_id, i.otp, i.data) for i in allowed])
            )
            results = [
                _copy(refused[i.api_key]) if i.api_key in refused else next(verified)
                for i in batch
            ]
        except StateError as e:
            log.warning("a batch of %d verifications failed: %s", len(batch), e)
            results = [StateError(str(e)) for _ in batch]  # one exception object each
            self._failed += 1
        except Exception as e:  # a bug: fail the batch closed, keep the thread serving
            log.error("a batch of %d verifications failed: %s", len(batch), type(e).__name__)
            results = [StateError("the verification could not be completed") for _ in batch]
            self._failed += 1
        self._batches += 1
        self._requests += len(batch)
        self._largest = max(self._largest, len(batch))
        _settle(batch, results)


def _copy(error: HsmAuthError) -> HsmAuthError:
    """A fresh exception like ``error`` (each caller raises its own object)."""
    if isinstance(error, api_keys.ScopeRefused):
        return api_keys.ScopeRefused(error.scope)
    return api_keys.ApiKeyRefused()


def _settle(batch: Sequence[_Item], results: Sequence[Result]) -> None:
    """Hand each result to its caller: one loop callback per event loop in the batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Item, Result]]] = {}
    for item, result in zip(batch, results, strict=True):
        if item.loop is None:
            fut = item.future
            assert isinstance(fut, concurrent.futures.Future)
            if not fut.done():
                fut.set_result(result)
        else:
            by_loop.setdefault(item.loop, []).append((item, result))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: its callers are gone
            loop.call_soon_threadsafe(_settle_on_loop, pairs)


def _settle_on_loop(pairs: Sequence[tuple[_Item, Result]]) -> None:
    for item, result in pairs:
        fut = item.future
        if not fut.done():  # a caller whose request was cancelled (client gone)
            fut.set_result(result)

