"""OCRA, the OATH Challenge-Response Algorithm (RFC 6287), in pure Python.

This module is the reference the hardware backends are checked against: a
token computes ``HMAC(key, suite.data_input(...))`` inside itself and the host
applies :func:`truncate`; :func:`generate` does the whole computation in
software (used by the verifier and by the tests).

The suite grammar accepted by :meth:`OcraSuite.parse` (RFC 6287 §6)::

    OCRA-1:HOTP-<SHA1|SHA256|SHA512>-<0|4..10>:[C-]Q<A|N|H><04..64>[-P<hash>][-Snnn][-T<n><S|M|H>]

Choices made where the RFC leaves room (all stricter than the reference code):

* the suite text is case-sensitive, exactly as the RFC writes it, because it
  is itself hashed into the DataInput;
* the session length ``Snnn`` is three digits, 001..512; the session
  information must be given with exactly that many bytes (no silent padding);
* the time step is 1..59 seconds, 1..59 minutes or 1..48 hours (the RFC's
  ``0H`` would be a zero time step);
* an ``A`` question is ASCII letters and digits, an ``N`` question ASCII
  decimal digits, an ``H`` question ASCII hex digits (either case), each
  1..``question_length`` characters, or up to twice that in mutual mode
  (RFC 6287 §7.3, where Q is the client's and the server's challenge
  concatenated).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from hsm_auth.errors import InvalidInput, InvalidToken

__all__ = [
    "OTP_SUITE",
    "MacFunction",
    "OcraSuite",
    "generate",
    "truncate",
    "verify",
]

#: The product's suite: C = the ATC, Q = the hex of a 32-byte SHA-256 digest.
OTP_SUITE: Final = "OCRA-1:HOTP-SHA256-8:C-QH64"

#: A MAC computed elsewhere (in a token or an HSM) with the suite's hash: DataInput -> MAC.
MacFunction: TypeAlias = Callable[[bytes], bytes]

#: Size of the question field of the DataInput, in bytes (RFC 6287 §5.1).
QUESTION_FIELD_SIZE: Final = 128

_HASHES: Final = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
_DIGEST_SIZES: Final = {"sha1": 20, "sha256": 32, "sha512": 64}
_STEP_UNITS: Final = {"S": (1, 59), "M": (60, 59), "H": (3600, 48)}
_UINT64_LIMIT: Final = 1 << 64

_CRYPTO_RE: Final = re.compile(r"HOTP-(SHA1|SHA256|SHA512)-([0-9]{1,2})")
_QUESTION_RE: Final = re.compile(r"Q([ANH])([0-9]{2})")
_PASSWORD_RE: Final = re.compile(r"P(SHA1|SHA256|SHA512)")
_SESSION_RE: Final = re.compile(r"S([0-9]{3})")
_TIMESTEP_RE: Final = re.compile(r"T([0-9]{1,2})([SMH])")
_QUESTION_CHARS: Final = {
    "A": re.compile(r"[A-Za-z0-9]+"),
    "N": re.compile(r"[0-9]+"),
    "H": re.compile(r"[0-9A-Fa-f]+"),
}


def _shown(text: str) -> str:
    """A short, printable rendering of (non-secret) suite text for a message."""
    return repr(text if len(text) <= 48 else text[:45] + "...")


_Fields = tuple[str, int, bool, str, int, str | None, int | None, int | None]


def _parse_fields(text: str) -> _Fields:
    """Parse suite text into the fields of :class:`OcraSuite` (after ``text``)."""
    if not isinstance(text, str):
        raise InvalidInput("an OCRA suite must be text")
    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidInput(
            f"OCRA suite {_shown(text)} is not of the form OCRA-1:<crypto function>:<data input>"
        )
    algorithm, crypto, data = parts
    if algorithm != "OCRA-1":
        raise InvalidInput(f"unsupported OCRA algorithm {_shown(algorithm)}: expected 'OCRA-1'")

    m = _CRYPTO_RE.fullmatch(crypto)
    if m is None:
        raise InvalidInput(
            f"bad OCRA crypto function {_shown(crypto)}: "
            "expected HOTP-<SHA1|SHA256|SHA512>-<digits>"
        )
    hash_name = _HASHES[m.group(1)]
    digit_text = m.group(2)
    digits = int(digit_text)
    if digit_text != str(digits) or not (digits == 0 or 4 <= digits <= 10):
        raise InvalidInput(f"bad OCRA response length {digit_text!r}: expected 0 or 4..10")

    tokens = data.split("-")
    pos = 0
    counter = tokens[0] == "C"
    if counter:
        pos += 1
    if pos >= len(tokens):
        raise InvalidInput(f"OCRA data input {_shown(data)} has no question (Q<A|N|H>nn)")
    m = _QUESTION_RE.fullmatch(tokens[pos])
    if m is None:
        raise InvalidInput(
            f"bad OCRA question {_shown(tokens[pos])}: expected Q<A|N|H> and two digits, e.g. QN08"
        )
    question_format = m.group(1)
    question_length = int(m.group(2))
    if not 4 <= question_length <= 64:
        raise InvalidInput(f"OCRA question length {question_length} is out of range 04..64")
    pos += 1

    password_hash: str | None = None
    if pos < len(tokens) and (m := _PASSWORD_RE.fullmatch(tokens[pos])) is not None:
        password_hash = _HASHES[m.group(1)]
        pos += 1

    session_length: int | None = None
    if pos < len(tokens) and (m := _SESSION_RE.fullmatch(tokens[pos])) is not None:
        session_length = int(m.group(1))
        if not 1 <= session_length <= 512:
            raise InvalidInput(f"OCRA session length {session_length} is out of range 001..512")
        pos += 1

    timestep_seconds: int | None = None
    if pos < len(tokens) and (m := _TIMESTEP_RE.fullmatch(tokens[pos])) is not None:
        count, unit = int(m.group(1)), m.group(2)
        scale, maximum = _STEP_UNITS[unit]
        if m.group(1) != str(count) or not 1 <= count <= maximum:
            raise InvalidInput(
                f"bad OCRA time step {_shown(tokens[pos])}: expected 1..59 S, 1..59 M or 1..48 H"
            )
        timestep_seconds = count * scale
        pos += 1

    if pos < len(tokens):
        raise InvalidInput(
            f"unexpected OCRA data input element {_shown(tokens[pos])}: "
            "expected [C-]Q..[-P..][-S..][-T..] in that order"
        )
    return (
        hash_name,
        digits,
        counter,
        question_format,
        question_length,
        password_hash,
        session_length,
        timestep_seconds,
    )


def _uint64(value: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"the OCRA {what} must be an integer")
    if not 0 <= value < _UINT64_LIMIT:
        raise InvalidInput(f"the OCRA {what} is out of range 0..2**64-1")
    return value.to_bytes(8, "big")


@dataclass(frozen=True)
class OcraSuite:
    """A parsed OCRASuite. Build it with :meth:`parse`; the fields must agree with ``text``."""

    text: str
    hash_name: str
    digits: int
    counter: bool
    question_format: str
    question_length: int
    password_hash: str | None
    session_length: int | None
    timestep_seconds: int | None

    def __post_init__(self) -> None:
        fields = (
            self.hash_name,
            self.digits,
            self.counter,
            self.question_format,
            self.question_length,
            self.password_hash,
            self.session_length,
            self.timestep_seconds,
        )
        if _parse_fields(self.text) != fields:
            raise InvalidInput(f"OcraSuite fields do not match the suite text {_shown(self.text)}")

    @classmethod
    def parse(cls, text: str) -> OcraSuite:
        """Parse an OCRASuite string; raises :class:`InvalidInput` if it is malformed."""
        return cls(text, *_parse_fields(text))

    def timestamp_at(self, unix_seconds: int) -> int:
        """The value T for a Unix time: whole time steps since the epoch (RFC 6287 §6.3)."""
        if self.timestep_seconds is None:
            raise InvalidInput(f"OCRA suite {_shown(self.text)} takes no timestamp")
        if unix_seconds < 0:
            raise InvalidInput("the Unix time for an OCRA timestamp must not be negative")
        return int(unix_seconds) // self.timestep_seconds

    def _question_bytes(self, question: str, mutual: bool) -> bytes:
        if not isinstance(question, str):
            raise InvalidInput("the OCRA question must be text")
        limit = self.question_length * (2 if mutual else 1)
        if not 1 <= len(question) <= limit:
            raise InvalidInput(
                f"the OCRA question has {len(question)} characters; this suite takes 1..{limit}"
            )
        fmt = self.question_format
        if _QUESTION_CHARS[fmt].fullmatch(question) is None:
            kind = {"A": "ASCII letters and digits", "N": "decimal digits", "H": "hex digits"}
            raise InvalidInput(f"the OCRA question must be {kind[fmt]} for Q{fmt}")
        if fmt == "A":
            return question.encode("ascii").ljust(QUESTION_FIELD_SIZE, b"\x00")
        # N: the number in hex (RFC 6287 §5.1); H: the hex as given. Either way
        # the hex digits are left-aligned and right-padded with zero nibbles,
        # as in the RFC's reference implementation.
        nibbles = f"{int(question, 10):X}" if fmt == "N" else question
        if len(nibbles) > 2 * QUESTION_FIELD_SIZE:  # cannot happen with limit <= 128
            raise InvalidInput("the OCRA question does not fit in 128 bytes")
        return bytes.fromhex(nibbles.ljust(2 * QUESTION_FIELD_SIZE, "0"))

    def data_input(
        self,
        *,
        counter: int | None = None,
        question: str,
        password: bytes | None = None,
        session: bytes | None = None,
        timestamp: int | None = None,
        mutual: bool = False,
    ) -> bytes:
        """The DataInput of RFC 6287 §5.1: suite || 0x00 || C || Q || P || S || T.

        ``question`` is text in the suite's format (A, N or H). ``password`` is
        the password *hash* (P), ``session`` exactly ``session_length`` bytes,
        ``timestamp`` the number of time steps T (see :meth:`timestamp_at`).
        ``mutual`` allows a question of up to twice the suite's length, for the
        concatenated challenges of mutual challenge-response (§7.3).
        Each input must be given if and only if the suite has it.
        """
        out = bytearray(self.text.encode("ascii"))
        out.append(0)
        if self.counter:
            if counter is None:
                raise InvalidInput(f"OCRA suite {_shown(self.text)} needs a counter (C)")
            out += _uint64(counter, "counter")
        elif counter is not None:
            raise InvalidInput(f"OCRA suite {_shown(self.text)} takes no counter (C)")

        out += self._question_bytes(question, mutual)

        if self.password_hash is not None:
            if password is None:
                raise InvalidInput(f"OCRA suite {_shown(self.text)} needs a password hash (P)")
            size = _DIGEST_SIZES[self.password_hash]
            if not isinstance(password, bytes) or len(password) != size:
                raise InvalidInput(
                    f"the OCRA password hash must be {size} bytes ({self.password_hash})"
                )
            out += password
        elif password is not None:
            raise InvalidInput(f"OCRA suite {_shown(self.text)} takes no password (P)")

        if self.session_length is not None:
            if session is None:
                raise InvalidInput(f"OCRA suite {_shown(self.text)} needs session information (S)")
            if not isinstance(session, bytes) or len(session) != self.session_length:
                raise InvalidInput(
                    f"the OCRA session information must be {self.session_length} bytes"
                )
            out += session
        elif session is not None:
            raise InvalidInput(f"OCRA suite {_shown(self.text)} takes no session information (S)")

        if self.timestep_seconds is not None:
            if timestamp is None:
                raise InvalidInput(f"OCRA suite {_shown(self.text)} needs a timestamp (T)")
            out += _uint64(timestamp, "timestamp")
        elif timestamp is not None:
            raise InvalidInput(f"OCRA suite {_shown(self.text)} takes no timestamp (T)")

        return bytes(out)


def truncate(mac: bytes, digits: int) -> str:
    """RFC 4226 §5.3 dynamic truncation of an HMAC to ``digits`` decimal digits, zero-padded.

    ``digits`` is 0 or 4..10; 0 means no truncation (RFC 6287 §5.2) and gives
    the whole MAC in lower-case hex.
    """
    if isinstance(digits, bool) or not isinstance(digits, int):
        raise InvalidInput("the number of OTP digits must be an integer")
    if not (digits == 0 or 4 <= digits <= 10):
        raise InvalidInput(f"bad OTP length {digits}: expected 0 or 4..10")
    if not isinstance(mac, bytes) or len(mac) < 20:
        raise InvalidInput("dynamic truncation needs a MAC of at least 20 bytes")
    if digits == 0:
        return mac.hex()
    offset = mac[-1] & 0x0F
    code = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


def generate(
    suite: OcraSuite,
    key: bytes | MacFunction,
    *,
    counter: int | None = None,
    question: str,
    password: bytes | None = None,
    session: bytes | None = None,
    timestamp: int | None = None,
    mutual: bool = False,
) -> str:
    """The OCRA response for ``suite`` under ``key`` (RFC 6287 §5.2).

    ``key`` is the key itself (the HMAC is then computed here) or a
    :data:`MacFunction` that computes it with the suite's hash where the key
    lives (a token, an HSM)."""
    if not callable(key) and (not isinstance(key, bytes) or not key):
        raise InvalidInput("the OCRA key must be non-empty bytes")
    message = suite.data_input(
        counter=counter,
        question=question,
        password=password,
        session=session,
        timestamp=timestamp,
        mutual=mutual,
    )
    mac = key(message) if callable(key) else hmac.new(key, message, suite.hash_name).digest()
    return truncate(mac, suite.digits)


def verify(
    suite: OcraSuite,
    key: bytes | MacFunction,
    response: str,
    *,
    counter: int | None = None,
    question: str,
    password: bytes | None = None,
    session: bytes | None = None,
    timestamp: int | None = None,
    mutual: bool = False,
) -> None:
    """Check ``response`` in constant time; raises :class:`InvalidToken` if it is wrong.

    Inputs that do not fit the suite raise :class:`InvalidInput`, as for
    :func:`generate`: they are the caller's error, not the user's.
    """
    expected = generate(
        suite,
        key,
        counter=counter,
        question=question,
        password=password,
        session=session,
        timestamp=timestamp,
        mutual=mutual,
    )
    if not isinstance(response, str):
        raise InvalidToken()
    given = response.lower() if suite.digits == 0 else response
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("ascii")):
        raise InvalidToken()
