"""Several users, tenants and tokens: naming and choosing among enrollments.

One authenticator may hold enrollments of several users of one verifier (each
with their own tokens, or one token with separate keys), of several tenants, and
several tokens per method for one user (a backup key). An enrollment is keyed by
(verifier, tenant, user, method) plus its credential (its credential id), and has
a token label, the name the user gave the token at enrollment (``hsm-auth enroll
--token NAME``; "" when none was given). The verifier likewise keeps several
credentials per (tenant, user, method), each with a label unique per (tenant,
user) (``hsm-auth verifier offer --label NAME``) and its own ATC and lockout.

The two labels are given on each side (the protocol messages carry neither; the
credential id, which both sides list, links them). Either side names one
credential by its label or by its credential id (hex; a prefix of at least
:data:`MIN_ID_PREFIX` digits).

This module only chooses; the authenticator and the verifier act.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from . import display
from .errors import InvalidInput

if TYPE_CHECKING:
    from .authenticator import EnrolledMethod
    from .enrollment_messages import EnrollmentOffer
    from .methods import Method
    from .protocol import VerificationData
    from .store.base import CredentialRecord

#: Labels of tokens and credentials: 1..32 characters of display text, no whitespace.
MAX_LABEL = 32
#: The shortest credential id prefix (hex digits) that names a credential.
MIN_ID_PREFIX = 8

T = TypeVar("T")


def _check_name(text: str, what: str, max_len: int) -> str:
    display.check(text, what, max_len=max_len)
    space = next((c for c in text if c.isspace()), None)
    if space is not None:
        raise InvalidInput(f"{what} contains {display.code_point(space)} (a space)")
    return text


def check_tenant(tenant: str | None) -> str:
    """The stored form of a tenant: "" for none (None), else the name checked by the
    protocol's rule (:func:`hsm_auth.transaction.check_tenant`)."""
    from . import transaction

    return transaction.check_tenant(tenant) or ""


def check_label(label: str) -> str:
    """A token's or credential's label, checked (display text, no whitespace)."""
    return _check_name(label, "the label", MAX_LABEL)


def _select(
    items: Sequence[T], name: str, labels: Sequence[str], ids: Sequence[str]
) -> list[T]:
    """Those of ``items`` whose label is ``name``; if none, those whose credential id
    (hex) starts with ``name`` (at least :data:`MIN_ID_PREFIX` hex digits)."""
    exact = [item for item, label in zip(items, labels, strict=True) if label == name]
    if exact:
        return exact
    prefix = name.lower()
    if len(prefix) < MIN_ID_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        return []
    return [item for item, cid in zip(items, ids, strict=True) if cid and cid.startswith(prefix)]


def select_credentials(creds: Sequence[CredentialRecord], name: str) -> list[CredentialRecord]:
    """The verifier's credentials named ``name`` (a label, or a credential id prefix)."""
    from .transcript import credential_id

    return _select(
        creds, name, [c.label for c in creds], [credential_id(c.signing_key).hex() for c in creds]
    )


# --- the authenticator's enrollments -------------------------------------------


def matching(
    methods: Iterable[EnrolledMethod],
    verifier_id: bytes,
    *,
    tenant: str | None = None,
    user: str | None = None,
    method: Method | None = None,
) -> list[EnrolledMethod]:
    """The enrollments at ``verifier_id`` of ``tenant`` ("" or None: none) and ``user``
    (None: any user, any tenant) and ``method`` (None: any), in enrollment order."""
    wanted = "" if tenant is None else tenant
    return [
        m
        for m in methods
        if m.verifier_id == verifier_id
        and (user is None or (m.user == user and m.tenant == wanted))
        and (method is None or m.method is method)
    ]


def select_enrollments(methods: Sequence[EnrolledMethod], token: str) -> list[EnrolledMethod]:
    """The enrollments whose token is named ``token``: its label, or a credential id
    prefix."""
    return _select(methods, token, [m.token_label for m in methods],
                   [m.credential_id for m in methods])


def shown(m: EnrolledMethod) -> str:
    """How an enrollment's token is named to the user: its label, else its credential
    id's first digits."""
    return m.token_label or (m.credential_id[:MIN_ID_PREFIX] if m.credential_id else m.backend)


def account(tenant: str, user: str) -> str:
    """``tenant/user``, or ``user`` without a tenant (what ``finish --user`` accepts)."""
    return f"{tenant}/{user}" if tenant else user


def offer_tenant(message: EnrollmentOffer | VerificationData) -> str:
    """The tenant an offer or verification data names ("" for none)."""
    return message.tenant or ""
