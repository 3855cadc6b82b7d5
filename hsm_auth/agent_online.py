"""The agent's sources: the online verifiers it polls (filled in once the online
client lands)."""

from __future__ import annotations

from collections.abc import Callable

from .agent import Source
from .config import Config, Paths


def sources(paths: Paths, config: Config, *, report: Callable[[str], None]) -> list[Source]:
    return []
