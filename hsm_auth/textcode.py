"""Text encoding of protocol messages for QR alphanumeric mode and copy/paste.

RFC 4648 base32 without padding: its alphabet (A-Z, 2-7) lies inside the QR
alphanumeric set, costs 8.0 bits per byte against base45's 7.3 (1.6 vs 1.5
characters per byte) and needs no dependency. A short prefix marks the text
as ours.
"""

from __future__ import annotations

import base64
import binascii

from .errors import DecodeError

PREFIX = "HA1:"


def encode(data: bytes) -> str:
    return PREFIX + base64.b32encode(data).decode("ascii").rstrip("=")


def decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("expected text")
    compact = "".join(text.split()).upper()
    if not compact.startswith(PREFIX):
        raise DecodeError("not hsm-auth data (missing the HA1: prefix)")
    body = compact[len(PREFIX) :]
    if len(body) % 8 in (1, 3, 6):
        raise DecodeError("truncated data (bad length)")
    try:
        return base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise DecodeError("data contains characters outside base32") from None
