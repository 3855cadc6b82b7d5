"""How the agent tells the user something: a desktop notification where
``notify-send`` exists and a desktop session is there to show it, else a line
on the agent's terminal (stderr).

Only non-secret text is ever passed (a verifier's name, a challenge's message
and context, a hint to touch the authenticator); it goes into argv, so it is
bounded and made safe first by :func:`hsm_auth.display.escape` (no control,
bidi or zero-width character survives) and, for the body, which notification
servers read as markup, with ``<``, ``>`` and ``&`` as entities.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import threading
from typing import TextIO

from . import display

#: The longest summary and body passed on.
MAX_SUMMARY = 120
MAX_BODY = 600


def clean(text: str, most: int) -> str:
    """``text`` for a notification or a terminal line: escaped, one line per line, bounded."""
    safe = display.escape(text, keep="\n")
    if len(safe) > most:
        safe = safe[: most - 1] + "…"
    return safe


class Notifier:
    """``notify-send`` when it is on PATH and a display is set (``DISPLAY``,
    ``WAYLAND_DISPLAY`` or ``DBUS_SESSION_BUS_ADDRESS``), else a line on ``stream``
    (the agent's stderr, which its front end, ``hsm-auth agent``, passes)."""

    def __init__(self, stream: TextIO, *, use_desktop: bool | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        if use_desktop is None:
            use_desktop = bool(shutil.which("notify-send")) and any(
                os.environ.get(v)
                for v in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")
            )
        self.desktop = use_desktop

    def notify(self, summary: str, body: str) -> None:
        summary = clean(summary, MAX_SUMMARY).replace("\n", " ")
        body = clean(body, MAX_BODY)
        if self.desktop:
            try:
                subprocess.run(
                    ["notify-send", "--app-name=hsm-auth", "--", summary, html.escape(body)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=10,
                    check=False,
                )
                return
            except (OSError, subprocess.TimeoutExpired):
                pass  # the terminal line below, then
        self.line(f"{summary}: {body}".replace("\n", " | "))

    def line(self, text: str) -> None:
        with self._lock:
            self._stream.write(f"hsm-auth agent: {display.escape(text, keep='')}\n")
            self._stream.flush()
