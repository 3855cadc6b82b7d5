"""The test vectors of docs/PROTOCOL.md, read from the document itself.

The format (docs/PROTOCOL.md, "Test vectors"): fenced blocks whose info string is
``vectors``; in them, one ``name = value`` per line, ``#`` starts a comment line.
A value is bytes in CBOR diagnostic notation, ``h'00ff…'`` (whitespace inside is
ignored, so it may go on over several lines until the closing quote), or one line
of JSON: a string (UTF-8 text), an integer, a list, ``true``/``false``/``null``.
Names are unique in the whole document.

Standard library only: the independent test reads the vectors with it in an
interpreter that never imports hsm_auth.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

_FENCE = re.compile(r"^```vectors[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_LINE = re.compile(r"([a-z][a-z0-9_]*)\s*=\s*(.*)")


def parse(text: str) -> dict[str, Any]:
    """Every vector of the document ``text``: name -> bytes, str, int, list, bool or None."""
    out: dict[str, Any] = {}
    for block in _FENCE.findall(text):
        lines = iter(block.splitlines())
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.fullmatch(line)
            if m is None:
                raise ValueError(f"not a vector line: {line!r}")
            name, value = m.groups()
            if name in out:
                raise ValueError(f"vector {name} is defined twice")
            if value.startswith("h'"):
                hex_text = value[2:]
                while not hex_text.endswith("'"):
                    hex_text += next(lines).strip()
                hex_text = "".join(hex_text[:-1].split())
                if not re.fullmatch(r"([0-9a-f]{2})*", hex_text):
                    raise ValueError(f"vector {name}: not lowercase hex bytes")
                out[name] = bytes.fromhex(hex_text)
            else:
                out[name] = json.loads(value)
    return out


def load(path: Path = DOCUMENT) -> dict[str, Any]:
    return parse(path.read_text(encoding="utf-8"))
