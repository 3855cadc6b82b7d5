"""What a text shown to the user may contain: the one owner of the display-text policy.

The OTP binds the context the verifier signed; the user approves what the
authenticator shows. Both are the same only if the text renders as it is: so a
context, a verifier name, a user name and the other texts of a protocol message
(backend, suite) are NFC-normalised and contain no character of the Unicode
categories Cc (C0 and C1 controls, DEL), Cf (format: bidi overrides and
isolates, zero-width characters), Zl, Zp (line and paragraph separators) or Cs
(lone surrogates, which UTF-8 cannot carry), and their length is bounded.

The verifier refuses other texts before it signs them (:func:`check`, which
raises :class:`~hsm_auth.errors.InvalidInput` naming the first offending code
point), the protocol decoders refuse them again in every message the
authenticator reads, and the CLI writes text through :func:`escape`, so no raw
control character reaches a terminal even from a text that never was checked.
"""

from __future__ import annotations

import unicodedata

from .errors import InvalidInput

#: Characters of context text (it must fit a QR code).
MAX_CONTEXT = 200
#: Characters of a verifier name or a user name.
MAX_NAME = 64

_REFUSED = {
    "Cc": "a control character",
    "Cf": "a format character (bidi or zero-width)",
    "Cs": "a lone surrogate",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
}


def code_point(c: str) -> str:
    """``U+009B``: how a message names a character (never the character itself)."""
    return f"U+{ord(c):04X}"


def problem(text: str, *, max_len: int) -> str | None:
    """Why ``text`` may not be shown (``None`` when it may): empty, too long, a
    refused character (named by its code point), or not NFC."""
    if not text:
        return "is empty"
    if len(text) > max_len:
        return f"is longer than {max_len} characters"
    for c in text:
        kind = _REFUSED.get(unicodedata.category(c))
        if kind is not None:
            return f"contains {code_point(c)} ({kind})"
    if not unicodedata.is_normalized("NFC", text):
        return f"is not in Unicode NFC form (at {code_point(_first_unnormalized(text))})"
    return None


def check(text: str, what: str, *, max_len: int) -> str:
    """Return ``text`` if it may be shown and bound, else raise one-line
    :class:`~hsm_auth.errors.InvalidInput` ("the context contains U+009B ...")."""
    why = problem(text, max_len=max_len)
    if why is not None:
        raise InvalidInput(f"{what} {why}")
    return text


def _first_unnormalized(text: str) -> str:
    for i in range(len(text)):
        prefix = text[: i + 1]
        if unicodedata.normalize("NFC", prefix) != prefix:
            return text[i]
    return text[-1]  # not reached for a text that is not NFC


def escape(text: str, *, keep: str = "\n") -> str:
    """``text`` for a terminal: every refused character (and DEL) written as ``\\uXXXX``
    (``\\UXXXXXXXX`` above the BMP, a form that is valid inside JSON strings too);
    the characters of ``keep`` stay."""
    if all(c in keep or unicodedata.category(c) not in _REFUSED for c in text):
        return text
    return "".join(
        c if c in keep or unicodedata.category(c) not in _REFUSED
        else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        for c in text
    )
