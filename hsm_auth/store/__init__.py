"""Verifier storage: one interface (:class:`VerifierStore`), several engines."""

from .base import CredentialRecord, OfferRecord, SessionRecord, VerifierStore

__all__ = ["CredentialRecord", "OfferRecord", "SessionRecord", "VerifierStore"]
