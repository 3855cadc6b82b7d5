"""Transaction data and user-entered data (docs/PROTOCOL.md §17): the one owner.

A verifier's session may carry a small **transaction**: 1..8 ``(label, value)``
pairs (``("Amount", "120.00 EUR"), ("Payee", "DE89 3704 …")``), signed in the
verification data, shown to the user with the context, and bound into the OTP
question by its digest (:func:`digest`). A session may also let the user enter
**data** on the authenticator (KOBIL's optional data): ``user_data = N`` allows
1..N characters, normalized by :func:`user_data` on both sides (the authenticator
before it builds the question, the verifier before it checks the OTP), so one
text has one byte string.

Every text here follows the display policy (:mod:`hsm_auth.display`). This
module is light (``hsm-auth start`` imports it through :mod:`hsm_auth.protocol`).
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Final

from . import display
from .errors import InvalidInput

#: Pairs in a transaction, characters of a label and of a value.
MAX_ITEMS: Final = 8
MAX_LABEL: Final = 32
MAX_VALUE: Final = 64
#: The most characters a session may let the user enter (``user_data``).
MAX_USER_DATA: Final = 64
#: Characters of a tenant name.
MAX_TENANT: Final = 64

_DIGEST_DOMAIN: Final = b"hsm-auth/transaction/v1"

#: A transaction: the (label, value) pairs in the order they are shown.
Transaction = tuple[tuple[str, str], ...]


def problem(items: Any) -> str | None:
    """Why ``items`` is not a transaction (``None`` when it is): 1..8 pairs of a label
    (1..32 characters, no ``:``, each label once) and a value (1..64), display text."""
    if not isinstance(items, list | tuple) or not 1 <= len(items) <= MAX_ITEMS:
        return f"must have 1 to {MAX_ITEMS} items"
    seen: set[str] = set()
    for n, item in enumerate(items, 1):
        if not isinstance(item, list | tuple) or len(item) != 2:
            return f"item {n} is not a (label, value) pair"
        label, value = item
        if not isinstance(label, str) or not isinstance(value, str):
            return f"item {n} is not a (label, value) pair of texts"
        why = display.problem(label, max_len=MAX_LABEL)
        if why is not None:
            return f"label {n} {why}"
        if ":" in label:  # shown as "label: value": a colon would fake a second field
            return f"label {n} contains ':'"
        if label in seen:
            return f"label {label!r} appears twice"
        seen.add(label)
        why = display.problem(value, max_len=MAX_VALUE)
        if why is not None:
            return f"the value of {label!r} {why}"
    return None


def check(items: Sequence[Sequence[str]] | Mapping[str, str] | None) -> Transaction | None:
    """``items`` as a :data:`Transaction` (``None`` stays ``None``), or InvalidInput. A
    mapping gives its pairs in its order (label -> value)."""
    if items is None:
        return None
    if isinstance(items, Mapping):
        items = list(items.items())
    why = problem(items)
    if why is not None:
        raise InvalidInput(f"the transaction {why}")
    return tuple((str(label), str(value)) for label, value in items)


def tenant_problem(tenant: Any) -> str | None:
    """Why ``tenant`` is not a tenant name (1..64 characters, display text, no whitespace)."""
    if not isinstance(tenant, str):
        return "is not text"
    why = display.problem(tenant, max_len=MAX_TENANT)
    if why is not None:
        return why
    space = next((c for c in tenant if c.isspace()), None)
    if space is not None:
        return f"contains {display.code_point(space)} (a space)"
    return None


def check_tenant(tenant: str | None) -> str | None:
    if tenant is None:
        return None
    why = tenant_problem(tenant)
    if why is not None:
        raise InvalidInput(f"the tenant {why}")
    return tenant


def _lp16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def digest(items: Transaction | None) -> bytes:
    """``TH``: SHA-256 over a domain tag, the number of pairs and each label and value
    (``lp16(utf8(…))``); the empty string when there is no transaction."""
    if items is None:
        return b""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    h.update(struct.pack(">B", len(items)))
    for label, value in items:
        h.update(_lp16(label.encode("utf-8")))
        h.update(_lp16(value.encode("utf-8")))
    return h.digest()


def lines(items: Transaction | None) -> list[str]:
    """The transaction as shown: one ``label: value`` line per pair."""
    return [f"{label}: {value}" for label, value in items or ()]


def user_data(text: str | None, limit: int) -> str:
    """The user-entered data a session with ``user_data = limit`` binds: ``""`` when the
    session lets the user enter none (``limit`` 0; any data is refused); else ``text``
    with surrounding whitespace removed, in NFC, 1..limit characters of display text.
    Both sides normalize with this one function (InvalidInput otherwise)."""
    if limit == 0:
        if text is not None:
            raise InvalidInput("this session takes no data from the user")
        return ""
    if text is None:
        raise InvalidInput(f"this session needs data from the user (up to {limit} characters)")
    normalized = unicodedata.normalize("NFC", text.strip())
    why = display.problem(normalized, max_len=limit)
    if why is not None:
        raise InvalidInput(f"the data {why}")
    return normalized


def parse_item(text: str) -> tuple[str, str]:
    """``"Amount=120.00 EUR"`` as a (label, value) pair (the CLI's form), InvalidInput
    when there is no ``=``; the pair is checked by :func:`check`."""
    label, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"a transaction item is LABEL=VALUE, not {display.escape(text)!r}")
    return label.strip(), value.strip()
