"""Verification data as a QR code: terminal (UTF-8 half blocks), PNG, SVG."""

from __future__ import annotations

import io
from pathlib import Path

import qrcode
import qrcode.constants
from qrcode.image.pure import PyPNGImage
from qrcode.image.svg import SvgPathImage

from .errors import InvalidInput
from .files import atomic_write

_HALF = {
    (False, False): " ",
    (True, False): "\u2580",
    (False, True): "\u2584",
    (True, True): "\u2588",
}


def _qr(text: str) -> qrcode.QRCode:
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=2)
    # Our text is upper-case base32 behind a prefix: qrcode picks alphanumeric mode.
    qr.add_data(text)
    qr.make(fit=True)
    return qr


def version_of(text: str) -> int:
    """The QR version (1..40) the text needs at error correction level M."""
    return int(_qr(text).version)


def terminal(text: str) -> str:
    """The QR code drawn with half blocks: two modules per character cell, dark on light."""
    matrix = _qr(text).get_matrix()
    rows = []
    for y in range(0, len(matrix), 2):
        top = matrix[y]
        bottom = matrix[y + 1] if y + 1 < len(matrix) else [False] * len(top)
        # light modules are drawn as ink so the code reads on a dark terminal too
        rows.append("".join(_HALF[(not t, not b)] for t, b in zip(top, bottom, strict=True)))
    return "\n".join(rows)


def image_target(target: str) -> tuple[str, Path]:
    """``png:PATH`` / ``svg:PATH`` as (kind, path); refused before any work is done
    when malformed or when PATH is a directory."""
    kind, _, path_text = target.partition(":")
    if kind not in ("png", "svg") or not path_text:
        raise InvalidInput("--qr takes terminal, png:PATH or svg:PATH")
    path = Path(path_text)
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError) as e:  # a name too long, a NUL
        reason = _reason(e)
        raise InvalidInput(f"cannot write the QR code to {path_text[:80]!r}: {reason}") from None
    if is_dir or path_text.endswith("/"):
        raise InvalidInput(f"--qr {kind}:PATH names a directory ({path_text[:80]}); give a file")
    return kind, path


def _reason(e: BaseException) -> str:
    return str(getattr(e, "strerror", None) or e)


def image(text: str, kind: str) -> bytes:
    """The QR code of ``text`` as a PNG (``kind`` "png") or SVG ("svg") document."""
    if kind not in ("png", "svg"):
        raise InvalidInput("a QR image is png or svg")
    factory = PyPNGImage if kind == "png" else SvgPathImage
    buf = io.BytesIO()
    _qr(text).make_image(image_factory=factory).save(buf)
    return buf.getvalue()


def write_image(text: str, target: str) -> Path:
    """``target`` is ``png:PATH`` or ``svg:PATH``."""
    kind, path = image_target(target)
    data = image(text, kind)
    try:
        atomic_write(path, data, mode=0o644)
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot write the QR code to {str(path)[:80]}: {_reason(e)}") from None
    return path
