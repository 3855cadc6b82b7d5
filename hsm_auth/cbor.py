"""Strict CBOR decoding for outside input (protocol messages, FIDO2 proofs).

cbor2 turns many semantic tags into Python objects on its own, without calling
``tag_hook``: dates (0, 1), bignums (2, 3), shared and cyclic references
(28, 29), sets (258), regular expressions, MIME messages, UUIDs... None of
them belongs in our messages. This module is the one place that decodes such
bytes, and refuses them twice:

* at the decoder: every tag number is mapped to a decoder that refuses it
  (``semantic_decoders``), and unknown ones reach ``tag_hook``, which refuses
  too; nesting is bounded (``max_depth``), maps may not repeat a key;
* on the result: only ``None``, ``bool``, ``int`` (within ±2**64, the range of
  a plain CBOR integer), ``bytes``, ``str``, ``list`` and, where the caller
  allows them, ``dict`` pass; anything else (a float, ``undefined``, a simple
  value, an object a tag made) is refused.

Everything raises :class:`~hsm_auth.errors.DecodeError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NoReturn

import cbor2

from .errors import DecodeError

__all__ = ["MAX_DEPTH", "MAX_INT", "decode_from", "loads"]

#: Deepest nesting of arrays and maps accepted (our messages nest at most 4 deep).
MAX_DEPTH = 16
#: Largest magnitude of an integer: what a CBOR integer without a tag can hold.
MAX_INT = 2**64
_MAX_ITEMS = 100_000


def _refuse(*_args: Any) -> NoReturn:
    raise DecodeError("CBOR tags are not allowed")


class _RefuseEveryTag(Mapping[int, Any]):
    """``semantic_decoders`` that replaces every built-in tag decoder with a refusal.

    cbor2 looks each tag up in this mapping before its built-in decoders, so
    no tag number is decoded, whatever the cbor2 version knows."""

    def __getitem__(self, tag: int) -> Any:
        return _refuse

    def __contains__(self, tag: object) -> bool:
        return True

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[int]:
        return iter(())


_NO_TAGS = _RefuseEveryTag()


def _check(value: Any, *, maps: bool) -> None:
    """Refuse any type a tag could make, integers outside ±2**64, and cycles."""
    stack = [value]
    seen: set[int] = set()
    items = 0
    while stack:
        v = stack.pop()
        items += 1
        if items > _MAX_ITEMS:
            raise DecodeError("malformed CBOR (too many items)")
        t = type(v)
        if v is None or t is bool or t is bytes or t is str:
            continue
        if t is int:
            if not -MAX_INT <= v < MAX_INT:
                raise DecodeError("malformed CBOR (integer out of range)")
            continue
        if t is list or (t is dict and maps):
            if id(v) in seen:
                raise DecodeError("malformed CBOR (shared or cyclic item)")
            seen.add(id(v))
            if t is dict:
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                stack.extend(v)
            continue
        raise DecodeError(f"unexpected CBOR item ({t.__name__})")


def _decode(stream: BinaryIO) -> Any:
    decoder = cbor2.CBORDecoder(
        stream,
        tag_hook=_refuse,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_duplicate_keys=False,
        allow_indefinite=False,
        read_size=1,
    )
    try:
        return decoder.decode()
    except DecodeError:
        raise
    except Exception as e:  # cbor2 wraps our refusal, and raises several types on garbage
        if isinstance(e.__cause__, DecodeError):
            raise DecodeError(str(e.__cause__)) from None
        raise DecodeError("malformed CBOR") from None


def decode_from(stream: BinaryIO, *, maps: bool = True) -> Any:
    """One CBOR item from ``stream`` (left just after it), checked as above."""
    value = _decode(stream)
    _check(value, maps=maps)
    return value


def loads(data: bytes, *, maps: bool = False) -> Any:
    """Exactly one CBOR item: trailing bytes are refused. ``maps`` allows maps."""
    if not isinstance(data, bytes):
        raise DecodeError("expected bytes")
    stream = io.BytesIO(data)
    value = decode_from(stream, maps=maps)
    if stream.tell() != len(data):
        raise DecodeError("malformed CBOR (trailing bytes)")
    return value
