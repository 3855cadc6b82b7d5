"""Expiry of offline credentials (docs/PROTOCOL.md §20): the verifier's policy and
the one check both sides make.

The verifier's ``policy.toml`` says how long an enrollment (or a renewal) lets a
credential be used offline::

    [offline]
    validity_days = 90      # 1..3650; absent or 0: credentials never expire

At enrollment and at each renewal the verifier sets the credential's expiry to
*now + validity* (stored with the credential, ``expires``), makes it the device
certificate's ``notAfter`` and states it in the EnrollmentResult
(``offline_expires``, Unix time; 0 = never), which the authenticator keeps
(``EnrolledMethod.offline_expires``). From then on both sides refuse offline use
after that instant with the same :class:`~hsm_auth.errors.CredentialExpired`
("... re-activate online (hsm-auth renew)"): the verifier at session start,
verify and sync; the authenticator at start, finish and sync. Renewal is the
online step (a request signed by the credential, ``POST /v1/device/renewal``),
which sets a new expiry from the moment of renewal.

An expiry is inclusive, like a certificate's ``notAfter``: the credential is
usable at ``expires`` and refused from the second after.

Other tables under ``[offline]`` (``[offline.<method>]``) belong to other
settings (the PIN cache); this module reads only ``validity_days``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import ConfigError, CredentialExpired
from .methods import Method

__all__ = ["NEVER", "OfflineValidity", "check", "expired", "parse_validity"]

#: The expiry of a credential that never expires (the wire's 0).
NEVER: Final = 0
DAY: Final = 86_400
MAX_VALIDITY_DAYS: Final = 3650
#: Scalar keys of ``[offline]`` that other settings own (left to their parsers).
_OTHER_KEYS: Final = frozenset({"pin_cache"})


@dataclass(frozen=True)
class OfflineValidity:
    """``[offline] validity_days``: how long a credential may be used offline after
    its enrollment or renewal (0: for ever)."""

    days: int = 0

    def expires(self, now: int) -> int:
        """The expiry of a credential enrolled or renewed at ``now`` (:data:`NEVER`: none)."""
        return NEVER if not self.days else int(now) + self.days * DAY


def parse_validity(table: Any) -> OfflineValidity:
    """The ``[offline]`` table's validity (ConfigError for a bad value or an unknown key)."""
    if not isinstance(table, Mapping):
        raise ConfigError("[offline] must be a table")
    for key, value in table.items():
        if key != "validity_days" and key not in _OTHER_KEYS and not isinstance(value, Mapping):
            raise ConfigError(f"[offline]: unknown key {key!r}")
    days = table.get("validity_days", 0)
    if type(days) is not int or not 0 <= days <= MAX_VALIDITY_DAYS:
        raise ConfigError(
            f"[offline] validity_days is whole days in [0, {MAX_VALIDITY_DAYS}] (0: never expire)"
        )
    return OfflineValidity(days)


def expired(expires: int, now: float) -> bool:
    """Whether a credential with this expiry is past it at ``now``."""
    return expires != NEVER and now > expires


def check(method: Method, expires: int, now: float) -> None:
    """Raise :class:`CredentialExpired` (the one advice of both sides) when expired."""
    if expired(expires, now):
        raise CredentialExpired(method.value, expires)
