"""Helpers of the service's concurrency and bad-input tests: a verifier with users
and sessions made through the library, API keys, a raw HTTP/1.1 client on asyncio
(one keep-alive connection each, so the test decides how many connections there
are), and which worker process of a running service holds each connection (read
from /proc: the worker whose file table has the accepted socket)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from _verifier_device import enroll

from hsm_auth import api_keys
from hsm_auth.verifier import Verifier


@dataclass
class Planned:
    user: str
    session_id: bytes
    otp: str


def populate(directory: Path, database: str | None, users: int, *, prefix: str = "u"):
    """``users`` users enrolled (a Python device each), one session and its valid OTP
    each, and a ``verify`` API key; returns (plan, key text)."""
    plan = []
    with Verifier.open(directory, database=database) as v:
        for i in range(users):
            user = f"{prefix}{i}"
            device = enroll(v, user)
            s = v.start_session(user, "login")
            plan.append(Planned(user, s.session_id, device.otp(s)))
        key = api_keys.create(v.store, "test", ["verify"], now=int(time.time())).key
    return plan, key


def verify_request(session_id: bytes | str, otp, key: str | None) -> bytes:
    sid = session_id.hex() if isinstance(session_id, bytes) else session_id
    return post("/v1/verify", json.dumps({"session_id": sid, "otp": otp}).encode(), key)


def post(path: str, body: bytes, key: str | None, *, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key is not None else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{auth}{extra}\r\n"
    ).encode() + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Connection:
    """One keep-alive HTTP/1.1 connection (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        return cls(*await asyncio.open_connection(parts.hostname, parts.port))

    async def send(self, request: bytes) -> None:
        self.writer.write(request)
        await self.writer.drain()

    async def answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Answer(status, headers, body)

    async def call(self, request: bytes) -> Answer:
        await self.send(request)
        return await self.answer()

    def close(self) -> None:
        self.writer.close()


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def connection_owners(server_port: int, pids: list[int]) -> dict[int, int]:
    """client port -> pid of the process holding the server side of that connection."""
    by_inode = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    owners = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], int(fields[9])
            if int(local.rsplit(":", 1)[1], 16) != server_port:
                continue
            client_port = int(remote.rsplit(":", 1)[1], 16)
            if client_port and inode in by_inode:
                owners[client_port] = by_inode[inode]
    return owners


async def owned(url: str, conns: list[Connection], pids: list[int], timeout: float = 20.0):
    """Wait until a worker has accepted each connection; client port -> worker pid."""
    port = urlsplit(url).port
    deadline = time.monotonic() + timeout
    while True:
        owners = connection_owners(port, pids)
        if all(c.port in owners for c in conns) or time.monotonic() > deadline:
            return owners
        await asyncio.sleep(0.02)
