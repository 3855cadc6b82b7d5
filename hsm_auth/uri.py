"""Key URIs: RFC 7512 ``pkcs11:`` URIs, and the same shape for ``tpm2:`` and ``fido2:``.

An RFC 7512 URI is ``pkcs11:`` followed by path attributes separated by ``;``
and, after ``?``, query attributes separated by ``&``; every value is
percent-encoded UTF-8 (``id`` is raw bytes, so it is always fully encoded).

:class:`Pkcs11Uri` parses and formats them. ``pin-value`` is a secret: it is
kept out of ``repr()`` and ``str()``; :meth:`Pkcs11Uri.format` writes it only
when asked. :func:`parse_attr_uri` / :func:`format_attr_uri` give the same
grammar to the other schemes (``tpm2:handle=0x81000001?tcti=swtpm:path=...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

from .errors import InvalidInput

__all__ = ["OBJECT_TYPES", "Pkcs11Uri", "format_attr_uri", "parse_attr_uri"]

#: The ``type`` values RFC 7512 defines.
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})

# RFC 7512 section 2.3: characters that may stand unencoded in a value.
_UNRESERVED = "-._~"
_RES_AVAIL = ":[]@!$'()*+,="
_PATH_SAFE = _UNRESERVED + _RES_AVAIL + "&"
_QUERY_SAFE = _UNRESERVED + _RES_AVAIL + "/?|"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*\Z")
_LIBRARY_VERSION = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?\Z")
_SLOT_ID = re.compile(r"[0-9]{1,20}\Z")  # a CK_SLOT_ID (CK_ULONG); ASCII digits only
#: Longest URI accepted (a module path and a PIN file path fit many times over).
MAX_URI = 4096

# Path attribute name -> dataclass field, in the order str() writes them.
_PATH_FIELDS = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "slot-manufacturer": "slot_manufacturer",
    "slot-description": "slot_description",
    "slot-id": "slot_id",
    "object": "object",
    "id": "id",
    "type": "type",
}
_QUERY_FIELDS = {
    "module-name": "module_name",
    "module-path": "module_path",
    "pin-source": "pin_source",
    "pin-value": "pin_value",
}


def _decode_bytes(value: str, what: str) -> bytes:
    if _BAD_PCT.search(value):
        raise InvalidInput(f"malformed percent-encoding in {what}")
    return unquote_to_bytes(value)


def _decode_text(value: str, what: str) -> str:
    try:
        return _decode_bytes(value, what).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} is not UTF-8 after percent-decoding") from None


def _split_attrs(part: str, sep: str, where: str, scheme: str) -> list[tuple[str, str]]:
    if part == "":
        return []
    attrs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in part.split(sep):
        name, eq, value = item.partition("=")
        if not eq or not _NAME.match(name):
            raise InvalidInput(f"malformed {scheme}: URI {where} attribute {name[:40]!r}")
        if name in seen:
            raise InvalidInput(f"{scheme}: URI {where} attribute {name!r} appears twice")
        seen.add(name)
        attrs.append((name, value))
    return attrs


def _split_uri(text: str, scheme: str) -> tuple[str, str]:
    if not isinstance(text, str):
        raise InvalidInput(f"a {scheme}: URI must be text")
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise InvalidInput(f"a {scheme}: URI must be one line")
    if len(text) > MAX_URI:
        raise InvalidInput(f"a {scheme}: URI is longer than {MAX_URI} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from argv that was not UTF-8
        raise InvalidInput(f"a {scheme}: URI must be valid UTF-8 text") from None
    head, colon, rest = text.partition(":")
    if not colon or head.lower() != scheme.lower():
        raise InvalidInput(f"not a {scheme}: URI")
    path, _, query = rest.partition("?")
    return path, query


def parse_attr_uri(text: str, scheme: str) -> tuple[dict[str, str], dict[str, str]]:
    """Parse ``scheme:attr=value;attr=value?attr=value&attr=value`` (RFC 7512 shape).

    Returns (path attributes, query attributes), percent-decoded. Raises
    :class:`InvalidInput` for another scheme, a malformed or repeated attribute.
    """
    path, query = _split_uri(text, scheme)
    return (
        {n: _decode_text(v, f"{scheme}: attribute {n!r}") for n, v in _split_attrs(
            path, ";", "path", scheme)},
        {n: _decode_text(v, f"{scheme}: attribute {n!r}") for n, v in _split_attrs(
            query, "&", "query", scheme)},
    )


def _encode(value: str | bytes, safe: str) -> str:
    return quote(value, safe=safe)


def format_attr_uri(
    scheme: str, path: Mapping[str, str], query: Mapping[str, str] | None = None
) -> str:
    """The inverse of :func:`parse_attr_uri`; values are percent-encoded as RFC 7512 asks."""
    if not _SCHEME.match(scheme):
        raise InvalidInput(f"invalid URI scheme {scheme!r}")
    for name in (*path, *(query or {})):
        if not _NAME.match(name):
            raise InvalidInput(f"invalid URI attribute name {name!r}")
    text = scheme + ":" + ";".join(f"{n}={_encode(v, _PATH_SAFE)}" for n, v in path.items())
    if query:
        text += "?" + "&".join(f"{n}={_encode(v, _QUERY_SAFE)}" for n, v in query.items())
    return text


@dataclass(frozen=True)
class Pkcs11Uri:
    """An RFC 7512 PKCS#11 URI. Unset attributes are ``None``; ``serial=""`` is kept as ``""``.

    ``vendor_path`` / ``vendor_query`` keep attributes this class does not know,
    in their order, so that formatting does not lose them.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)
    vendor_path: tuple[tuple[str, str], ...] = ()
    vendor_query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in OBJECT_TYPES:
            raise InvalidInput(
                f"invalid pkcs11: URI type {self.type[:20]!r} "
                f"(one of {', '.join(sorted(OBJECT_TYPES))})"
            )
        if self.slot_id is not None and not 0 <= self.slot_id < 2**64:
            raise InvalidInput("invalid pkcs11: URI slot-id")
        if self.library_version is not None and not _LIBRARY_VERSION.match(self.library_version):
            raise InvalidInput("invalid pkcs11: URI library-version (expected M or M.N)")
        known = set(_PATH_FIELDS) | set(_QUERY_FIELDS)
        for name, _ in (*self.vendor_path, *self.vendor_query):
            if name in known or not _NAME.match(name):
                raise InvalidInput(f"invalid pkcs11: URI vendor attribute name {name!r}")

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse an RFC 7512 URI; raise :class:`InvalidInput` with a one-line reason."""
        path, query = _split_uri(text, "pkcs11")
        values: dict[str, object] = {}
        vendor_path: list[tuple[str, str]] = []
        vendor_query: list[tuple[str, str]] = []
        for name, raw in _split_attrs(path, ";", "path", "pkcs11"):
            what = f"pkcs11: attribute {name!r}"
            if name in _QUERY_FIELDS:
                raise InvalidInput(f"{name!r} belongs in the pkcs11: URI query, after '?'")
            if name == "id":
                values["id"] = _decode_bytes(raw, what)
            elif name == "slot-id":
                decoded = _decode_text(raw, what)
                if not _SLOT_ID.match(decoded) or int(decoded) >= 2**64:
                    raise InvalidInput(
                        "invalid pkcs11: URI slot-id (expected a decimal number below 2**64)"
                    )
                values["slot_id"] = int(decoded)
            elif name in _PATH_FIELDS:
                values[_PATH_FIELDS[name]] = _decode_text(raw, what)
            else:
                vendor_path.append((name, _decode_text(raw, what)))
        for name, raw in _split_attrs(query, "&", "query", "pkcs11"):
            what = f"pkcs11: attribute {name!r}"
            if name in _PATH_FIELDS:
                raise InvalidInput(f"{name!r} belongs in the pkcs11: URI path, before '?'")
            if name in _QUERY_FIELDS:
                values[_QUERY_FIELDS[name]] = _decode_text(raw, what)
            else:
                vendor_query.append((name, _decode_text(raw, what)))
        return cls(
            **values,  # type: ignore[arg-type]
            vendor_path=tuple(vendor_path),
            vendor_query=tuple(vendor_query),
        )

    def format(self, *, include_pin_value: bool = False) -> str:
        """The URI text. ``pin-value`` is written only with ``include_pin_value=True``."""
        path: list[str] = []
        for name, attr in _PATH_FIELDS.items():
            value = getattr(self, attr)
            if value is None:
                continue
            if isinstance(value, bytes):
                # Every byte of an id is encoded: it is binary, not text.
                path.append(f"{name}={''.join(f'%{b:02X}' for b in value)}")
            else:
                path.append(f"{name}={_encode(str(value), _PATH_SAFE)}")
        path += [f"{n}={_encode(v, _PATH_SAFE)}" for n, v in self.vendor_path]
        query: list[str] = []
        for name, attr in _QUERY_FIELDS.items():
            value = getattr(self, attr)
            if value is None or (name == "pin-value" and not include_pin_value):
                continue
            query.append(f"{name}={_encode(value, _QUERY_SAFE)}")
        query += [f"{n}={_encode(v, _QUERY_SAFE)}" for n, v in self.vendor_query]
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.format()

    def vendor(self, name: str) -> str | None:
        """A vendor attribute from the path, else from the query."""
        for n, v in (*self.vendor_path, *self.vendor_query):
            if n == name:
                return v
        return None
