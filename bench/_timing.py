"""What the OTP benches share: per-call timing in alternating rounds, and the floor's
durable write (one line appended and fsync-ed, as the offline log does per OTP)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def medians_per_op(fns: list[Callable[[], object]], n: int, rounds: int = 10) -> list[float]:
    """Seconds per call of each of ``fns``, measured in alternating rounds so that disk
    and machine noise (fsync!) hits all alike; medians over the rounds."""
    for fn in fns:
        fn()  # warm-up
    samples: list[list[float]] = [[] for _ in fns]
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[i].append((time.perf_counter() - start) / per_round)
    return [statistics.median(s) for s in samples]


def fsynced_line_writer(path: Path, size: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The floor's durable write: one line of ``size`` bytes appended to ``path`` and
    fsync-ed; returns (write, close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    line = b"x" * (size - 1) + b"\n"

    def write() -> None:
        os.write(fd, line)
        os.fsync(fd)

    return write, lambda: os.close(fd)
