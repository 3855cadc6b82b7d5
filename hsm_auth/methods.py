"""The offline methods and what each one proves."""

from __future__ import annotations

import enum

from .errors import UnknownMethod


class Method(enum.Enum):
    """An offline authentication method. The value is the CLI name (``--method``)."""

    DEVICE = "device"
    PIN = "pin"
    BIOMETRIC = "biometric"
    FACE = "face"

    @property
    def code(self) -> int:
        """Compact integer used in the QR-carried verification data."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Method:
        for method, value in _CODES.items():
            if value == code:
                return method
        raise UnknownMethod(f"unknown method code {code}")

    @classmethod
    def parse(cls, name: str) -> Method:
        try:
            return cls(name.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise UnknownMethod(f"unknown method {name!r} (choose one of: {names})") from None

    @property
    def needs_pin(self) -> bool:
        return self is Method.PIN

    @property
    def needs_user_verification(self) -> bool:
        return self in (Method.BIOMETRIC, Method.FACE)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_CODES = {Method.DEVICE: 1, Method.PIN: 2, Method.BIOMETRIC: 3, Method.FACE: 4}

_DESCRIPTIONS = {
    Method.DEVICE: "possession of this machine / token",
    Method.PIN: "possession + an offline PIN checked by the token",
    Method.BIOMETRIC: "possession + fingerprint (FIDO2 user verification)",
    Method.FACE: "possession + face (FIDO2 user verification)",
}
