"""A cheap HTTP/1.1 load generator for bench/http.py: raw asyncio protocols (uvloop
when installed), many keep-alive connections, one request in flight on each (no
pipelining), requests pre-built as bytes so the client does nothing per request
but write them, find the end of the response and note the time.

    run(host, port, requests, connections) -> LoadResult

``requests`` is a list of complete HTTP requests (bytes); they are handed out in
order to whichever connection is free, so the server sees them about in order.
The result has each response's status, per-request latency and this process's
CPU time over the run (what the load generator itself cost the machine).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadResult:
    statuses: Counter[int]
    latencies_ns: list[int]
    wall: float
    cpu: float  # user + system seconds of this process during the run
    bodies: list[bytes]  # the first few non-2xx bodies, to say what went wrong

    @property
    def rate(self) -> float:
        return sum(self.statuses.values()) / self.wall

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds."""
        ordered = sorted(self.latencies_ns)
        if not ordered:
            return float("nan")
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        return ordered[k] / 1e6


class _Conn(asyncio.Protocol):
    def __init__(self, work: _Work) -> None:
        self.work = work
        self.buf = bytearray()
        self.transport: Any = None  # asyncio's or uvloop's (not an asyncio.Transport)
        self.sent = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        request = self.work.take()
        if request is None:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.sent = time.perf_counter_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                    break
            total = end + 4 + length
            if len(self.buf) < total:
                return
            status = int(head[9:12])
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            self.work.record(status, time.perf_counter_ns() - self.sent, body)
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.work.remaining():
                self.done.set_exception(ConnectionError(f"connection lost: {exc!r}"))
            else:
                self.done.set_result(None)


class _Work:
    def __init__(self, requests: Sequence[bytes]) -> None:
        self.requests = requests
        self.next = 0
        self.statuses: Counter[int] = Counter()
        self.latencies: list[int] = []
        self.bodies: list[bytes] = []

    def take(self) -> bytes | None:
        if self.next >= len(self.requests):
            return None
        self.next += 1
        return self.requests[self.next - 1]

    def remaining(self) -> bool:
        return self.next < len(self.requests)

    def record(self, status: int, latency: int, body: bytes) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency)
        if status >= 300 and len(self.bodies) < 5:
            self.bodies.append(body[:300])


async def _run(host: str, port: int, requests: Sequence[bytes], connections: int) -> LoadResult:
    loop = asyncio.get_running_loop()
    work = _Work(requests)
    conns = []
    for _ in range(connections):  # connect everyone first: the timing starts after
        _, proto = await loop.create_connection(lambda: _Conn(work), host, port)
        conns.append(proto)
    t0, c0 = time.perf_counter(), _cpu()
    for c in conns:
        c.start()
    await asyncio.gather(*(c.done for c in conns))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return LoadResult(work.statuses, work.latencies, wall, cpu, work.bodies)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run(host: str, port: int, requests: Sequence[bytes], connections: int = 64) -> LoadResult:
    try:
        import uvloop

        return uvloop.run(_run(host, port, requests, connections))
    except ImportError:
        return asyncio.run(_run(host, port, requests, connections))


def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete keep-alive POST request with a JSON body."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
