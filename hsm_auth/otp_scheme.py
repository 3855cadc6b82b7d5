"""The product's OTP scheme: which OCRA suite, which question, which MAC — one owner.

Both sides go through :class:`OtpScheme`: the authenticator builds the question
and the DataInput its token MACs (:meth:`OtpScheme.message`) and truncates the
result (:meth:`OtpScheme.truncate`); the verifier builds the same question from
its session and checks an OTP with :meth:`OtpScheme.verify`, which is
:func:`hsm_auth.ocra.verify`. The scheme is the **credential's own** (its stored
suite), never a verifier-wide default, so changing the default for new
enrollments leaves enrolled credentials working.

:meth:`OtpScheme.for_suite` refuses every suite the product cannot feed: each
backend MACs with HMAC-SHA256 (PKCS#11 ``CKM_SHA256_HMAC``, TPM keyedhash,
FIDO2 hmac-secret), the counter is the ATC, the question is the lowercase hex of
a 32-byte SHA-256 digest (``QH64``), there is no password, session or time
input, and an OTP is 6..10 decimal digits typed by a person.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from . import ocra
from .errors import InvalidInput, InvalidToken
from .methods import Method
from .transaction import Transaction
from .transaction import digest as _transaction_digest

__all__ = ["MAX_DIGITS", "MIN_DIGITS", "OtpScheme"]

#: The shortest and longest OTP a suite may ask for (a person types it).
MIN_DIGITS: Final = 6
MAX_DIGITS: Final = 10

_OTP_DOMAIN: Final = b"hsm-auth/otp-question/v3"
_SYNC_DOMAIN: Final = b"hsm-auth/sync-question/v2"  # v2: binds the credential id


def _question(domain: bytes, fields: tuple[bytes, ...]) -> str:
    """SHA-256 over ``domain`` and the already length-prefixed ``fields``, as QH64 text."""
    h = hashlib.sha256(domain)
    for f in fields:
        h.update(f)
    return h.hexdigest()


def _short(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class OtpScheme:
    """One credential's OTP scheme. Build it with :meth:`for_suite`."""

    suite: ocra.OcraSuite

    @classmethod
    def for_suite(cls, text: str) -> OtpScheme:
        """The scheme of suite ``text``; :class:`InvalidInput` if the product cannot feed it."""
        return _for_suite(text)

    @classmethod
    def default(cls) -> OtpScheme:
        """The scheme new enrollments get (:data:`hsm_auth.ocra.OTP_SUITE`)."""
        return _for_suite(ocra.OTP_SUITE)

    @property
    def text(self) -> str:
        return self.suite.text

    @property
    def digits(self) -> int:
        return self.suite.digits

    # --- the question: the only place its content is defined ---------------------

    def question(
        self,
        *,
        verifier_id: bytes,
        user: str,
        method: Method,
        credential_id: bytes,
        challenge: bytes,
        context: str,
        tenant: str | None = None,
        transaction: Transaction | None = None,
        data: str = "",
    ) -> str:
        """The OCRA question (QH64 text) of an offline session (docs/PROTOCOL.md,
        "The OTP question"): SHA-256 over a domain tag, the verifier id, the UTF-8
        user and the method code (who and where), the credential id (which token),
        the challenge (``>H`` length prefixes), the UTF-8 context the user saw
        (``>I`` length prefix), then the tenant (empty: none), the transaction's
        digest (:func:`hsm_auth.transaction.digest`, empty: none) and the data the
        user entered (normalized by :func:`hsm_auth.transaction.user_data`, empty:
        none), each ``>H``-prefixed. Length-prefixed, so no two inputs collide.

        This is the one definition both sides use: an OTP answers one session of one
        user's one credential at one verifier, for exactly the data shown and entered,
        and nothing else."""
        return _question(
            _OTP_DOMAIN,
            (
                _short(verifier_id),
                _short(user.encode("utf-8")),
                struct.pack(">B", method.code),
                _short(credential_id),
                _short(challenge),
                _long(context.encode("utf-8")),
                _short((tenant or "").encode("utf-8")),
                _short(_transaction_digest(transaction)),
                _short(data.encode("utf-8")),
            ),
        )

    def sync_question(
        self, *, session_id: bytes, user: str, method: Method, credential_id: bytes
    ) -> str:
        """The question of a sync report's MAC (docs/PROTOCOL.md §10). Its own domain
        tag keeps it apart from every :meth:`question`, so a sync MAC never doubles as
        a session's OTP."""
        return _question(
            _SYNC_DOMAIN,
            (
                _short(session_id),
                _short(user.encode("utf-8")),
                struct.pack(">B", method.code),
                _short(credential_id),
            ),
        )

    # --- the MAC and the OTP ---------------------------------------------------

    def message(self, counter: int, question: str) -> bytes:
        """The OCRA DataInput a token MACs for ATC ``counter`` (RFC 6287 §5.1)."""
        return self.suite.data_input(counter=counter, question=question)

    def truncate(self, mac: bytes) -> str:
        """The OTP of a MAC the token computed over :meth:`message`."""
        return ocra.truncate(mac, self.suite.digits)

    def otp(self, key: bytes | ocra.MacFunction, *, counter: int, question: str) -> str:
        """The OTP for ATC ``counter`` under ``key`` (bytes, or a MAC function)."""
        return ocra.generate(self.suite, key, counter=counter, question=question)

    def verify(
        self, key: bytes | ocra.MacFunction, otp: str, *, counter: int, question: str
    ) -> bool:
        """Whether ``otp`` is the OTP for ``counter`` (constant-time, :func:`ocra.verify`)."""
        try:
            ocra.verify(self.suite, key, otp, counter=counter, question=question)
        except InvalidToken:
            return False
        return True

    def verify_mac(
        self, key: ocra.MacFunction, mac: bytes, *, counter: int, question: str
    ) -> bool:
        """Whether ``mac`` is the full (untruncated) MAC over :meth:`message` (a sync report)."""
        return hmac.compare_digest(key(self.message(counter, question)), mac)


@functools.lru_cache(maxsize=8)
def _for_suite(text: str) -> OtpScheme:
    suite = ocra.OcraSuite.parse(text)
    what = f"OCRA suite {text!r}"
    if suite.hash_name != "sha256":
        raise InvalidInput(f"{what}: the tokens MAC with HMAC-SHA256 only")
    if not MIN_DIGITS <= suite.digits <= MAX_DIGITS:
        raise InvalidInput(f"{what}: an OTP must be {MIN_DIGITS}..{MAX_DIGITS} digits")
    if not suite.counter:
        raise InvalidInput(f"{what}: the product's OTPs need the counter (C)")
    if suite.question_format != "H" or suite.question_length != 64:
        raise InvalidInput(f"{what}: the product's question is QH64 (a SHA-256 digest in hex)")
    if (
        suite.password_hash is not None
        or suite.session_length is not None
        or suite.timestep_seconds is not None
    ):
        raise InvalidInput(f"{what}: the product feeds no password, session or time input")
    return OtpScheme(suite)
