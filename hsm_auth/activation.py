"""Activation codes (docs/PROTOCOL.md, "Activation").

An enrollment offer comes with a one-time **activation code** that the user gets
over the verifier's own authenticated channel (a web page after an online login,
an administrator, a letter), never inside the offer. The authenticator's
enrollment response carries ``activation_mac``, an HMAC over the enrollment
transcript keyed from the code, so that whoever sees an offer (or a response) in
transit cannot enroll keys of their own: they lack the code, and the transcript
binds the response's keys.

The code: 12 characters of Crockford's base32 (``0-9 A-Z`` without I, L, O, U;
read case-insensitively, with I and L read as 1 and O as 0, hyphens and spaces
ignored), shown as ``XXXX-XXXX-XXXX``. The first 10 characters carry 50 bits
from an HMAC the verifier makes of the offer id with a key that has only this
job (:meth:`hsm_auth.verifier_keys.VerifierKeys.activation_code`), so the
database holds no code. The last 2 are a Reed-Solomon check over GF(32): every
change of one or two characters, so every swap of two, is caught as a typo
(:class:`ActivationCodeTypo`) before any key is made; other mistakes pass the
check with probability 1/1024 and the verifier then refuses the MAC.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .enrollment_messages import ACTIVATION_MAC_BYTES
from .errors import InvalidInput, UntrustedMessage

__all__ = [
    "ACTIVATION_MAC_BYTES",
    "ActivationCodeTypo",
    "ActivationRefused",
    "activation_key",
    "activation_mac",
    "check_mac",
    "code_from_mac",
    "code_input",
    "normalize",
]

#: Crockford's base32 alphabet: the value of a symbol is its index.
ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: What a typed character may also be (Crockford: I and L are 1, O is 0).
_ALIASES: Final = {"I": "1", "L": "1", "O": "0"}
DATA_CHARS: Final = 10  # 50 bits
CHECK_CHARS: Final = 2
CODE_CHARS: Final = DATA_CHARS + CHECK_CHARS
GROUP: Final = 4  # shown as XXXX-XXXX-XXXX
#: The verifier's code bits: HMAC-SHA256(its activation key, CODE_DOMAIN || offer_id).
CODE_DOMAIN: Final = b"hsm-auth/activation-code/v3\x00"
#: K_act = HKDF-SHA256(the code's 12 normalized characters, salt = offer_hash, info = KEY_INFO).
KEY_INFO: Final = b"hsm-auth/activation-key/v3"
#: activation_mac = HMAC-SHA256(K_act, MAC_DOMAIN || T).
MAC_DOMAIN: Final = b"hsm-auth/activation/v3\x00"
#: Wrong activation MACs after which the verifier burns the offer.
DEFAULT_TRIES: Final = 5

#: GF(32) = GF(2)[x] / (x^5 + x^2 + 1); alpha = x (the integer 2) generates it.
_GF_POLY: Final = 0b100101


class ActivationCodeTypo(InvalidInput):
    """The typed activation code is not a well-formed code (wrong length, a character
    outside the alphabet, or a failed check): a typo, told before any key is made.
    The message never holds the code or any of its characters."""


class ActivationRefused(UntrustedMessage):
    """An enrollment response whose activation MAC is wrong or missing. ``tries`` is the
    number of wrong ones counted for the offer so far, ``limit`` the number that burns
    it; ``burned``: this one did."""

    def __init__(self, message: str, *, tries: int, limit: int, burned: bool) -> None:
        super().__init__(message)
        self.tries = tries
        self.limit = limit
        self.burned = burned


def _mul(a: int, b: int) -> int:
    """Product in GF(32)."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a & 0b100000:
            a ^= _GF_POLY
    return out


def _power(j: int) -> int:
    out = 1
    for _ in range(j):
        out = _mul(out, 2)
    return out


_ALPHA1: Final = _power(1)
_ALPHA2: Final = _power(2)
#: The generator (x - alpha)(x - alpha^2) = x^2 + G1 x + G0 (characteristic 2).
_G1: Final = _ALPHA1 ^ _ALPHA2
_G0: Final = _mul(_ALPHA1, _ALPHA2)


def _check_symbols(data: list[int]) -> list[int]:
    """The two check symbols of ``data``: the remainder of data(x)·x² mod g(x), so
    that the whole word, as a polynomial (first symbol highest), has roots alpha, alpha²."""
    r1 = r0 = 0
    for symbol in data:
        feedback = symbol ^ r1
        r1 = r0 ^ _mul(feedback, _G1)
        r0 = _mul(feedback, _G0)
    return [r1, r0]


def _syndromes(word: list[int]) -> tuple[int, int]:
    """The word's polynomial at alpha and alpha² (Horner): both 0 for a code."""
    s1 = s2 = 0
    for symbol in word:
        s1 = _mul(s1, _ALPHA1) ^ symbol
        s2 = _mul(s2, _ALPHA2) ^ symbol
    return s1, s2


def code_input(offer_id: bytes) -> bytes:
    """What the verifier's activation key MACs to make the code of ``offer_id``."""
    return CODE_DOMAIN + offer_id


def code_from_mac(mac: bytes) -> str:
    """The code of the verifier's HMAC ``mac``: its first 50 bits as 10 symbols (5 bits
    each, most significant first), the 2 check symbols, grouped ``XXXX-XXXX-XXXX``."""
    if len(mac) < 7:
        raise ValueError("an activation code needs 50 bits")
    bits = int.from_bytes(mac[:7], "big") >> (56 - 5 * DATA_CHARS)
    data = [(bits >> (5 * (DATA_CHARS - 1 - i))) & 31 for i in range(DATA_CHARS)]
    chars = "".join(ALPHABET[s] for s in data + _check_symbols(data))
    return "-".join(chars[i : i + GROUP] for i in range(0, CODE_CHARS, GROUP))


def normalize(text: str) -> str:
    """The 12 canonical characters of a typed code (upper case, aliases resolved,
    hyphens and spaces dropped); raises :class:`ActivationCodeTypo`."""
    if not isinstance(text, str):
        raise ActivationCodeTypo("the activation code is not text")
    chars = "".join(c for c in text.upper() if c not in "- \t")
    chars = "".join(_ALIASES.get(c, c) for c in chars)
    if len(chars) != CODE_CHARS:
        raise ActivationCodeTypo(
            f"the activation code has a typo: it is {CODE_CHARS} letters and digits "
            f"(hyphens and spaces do not count), not {len(chars)}"
        )
    if any(c not in ALPHABET for c in chars):
        raise ActivationCodeTypo(
            "the activation code has a typo: it has a character that no code has "
            "(codes are digits and letters other than U)"
        )
    if _syndromes([ALPHABET.index(c) for c in chars]) != (0, 0):
        raise ActivationCodeTypo(
            "the activation code has a typo (its check characters do not match)"
        )
    return chars


def activation_key(code: str, offer_hash: bytes) -> bytes:
    """K_act: HKDF-SHA256 of the code's normalized characters (ASCII), salted with the
    offer hash (so a code works for its offer only)."""
    return HKDF(hashes.SHA256(), 32, salt=offer_hash, info=KEY_INFO).derive(
        normalize(code).encode("ascii")
    )


def activation_mac(code: str, offer_hash: bytes, transcript: bytes) -> bytes:
    """``HMAC-SHA256(K_act, "hsm-auth/activation/v3" || 0x00 || T)``."""
    return hmac.digest(activation_key(code, offer_hash), MAC_DOMAIN + transcript, hashlib.sha256)


def check_mac(expected: bytes, received: bytes | None) -> bool:
    """Constant-time comparison; a missing MAC is a wrong one."""
    return (
        received is not None
        and len(received) == ACTIVATION_MAC_BYTES
        and hmac.compare_digest(expected, received)
    )
