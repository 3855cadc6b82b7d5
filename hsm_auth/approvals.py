"""The verifier's side of the online authenticator API: signed requests, challenges,
claims and approvals (docs/PROTOCOL.md §13). The routes of
:mod:`hsm_auth.service.device_api` and :mod:`hsm_auth.service.challenge_api` are
thin wrappers of :class:`OnlineVerifier`; every call here blocks (store, keys) and
runs in the service's threadpool.

Order of checks, so that a bad request changes nothing and tells nothing:

* signed request: header syntax, the credential (by its protocol credential id),
  the signature over the request message, and only then the nonce, consumed with
  the FIDO2 counter in one transaction (:meth:`VerifierStore.consume_nonce`);
* answer: the challenge exists, the credential exists and is not locked, the
  approval signature verifies, the challenge is the credential's user's (else
  :class:`NoSuchChallenge`, as for an unknown id), the policy takes approvals
  from the method (``[approval] require_user_authentication`` refuses
  possession-only ``device`` approvals), the challenge is answerable (pending;
  a QR challenge claimed by this credential), then one compare-and-swap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import audit
from .attestation import ApprovalPolicy
from .audit import AuditRecord, Event
from .challenges import (
    Challenge,
    ChallengeContext,
    ChallengeKind,
    ChallengeState,
    Decision,
    check_ttl,
    claim_text,
    context_hash,
    new_challenge_id,
    parse_claim,
)
from .errors import ExpiredMessage, InvalidInput, UnknownMethod, UntrustedMessage
from .request_signing import (
    NONCE_TTL,
    Signature,
    SignatureRefused,
    approval_message,
    check_signature,
    new_nonce,
    parse_header,
    request_message,
)
from .store.base import Consumed, CredentialRecord
from .transcript import credential_id as credential_id_of
from .verifier import Verifier

__all__ = [
    "ApprovalRefused",
    "ChallengeClosed",
    "NoSuchChallenge",
    "OnlineVerifier",
]

log = logging.getLogger("hsm_auth.approvals")

#: The kinds an agent fetches (a QR challenge is claimed, never listed).
LISTED_KINDS = (ChallengeKind.PUSH, ChallengeKind.INAPP)


class NoSuchChallenge(InvalidInput):
    """No such challenge, or not one the caller may see (someone else's): 404."""

    def __init__(self, message: str = "no such challenge") -> None:
        super().__init__(message)


class ChallengeClosed(ExpiredMessage):
    """The challenge was answered already or has expired: 410."""


class ApprovalRefused(UntrustedMessage):
    """The verifier's policy does not take this credential's approvals: 403."""


@dataclass(frozen=True)
class OnlineEnrollment:
    """What ``POST /v1/device/enrollments`` answers."""

    result: str
    credential: CredentialRecord
    approval: ApprovalPolicy


class OnlineVerifier:
    def __init__(self, verifier: Verifier, *, clock: Callable[[], float] = time.time) -> None:
        self.verifier = verifier
        self.store = verifier.store
        self._clock = clock

    def now(self) -> int:
        return int(self._clock())

    @property
    def verifier_id(self) -> bytes:
        return self.verifier.identity.verifier_id

    # --- signed requests ---------------------------------------------------------

    def issue_nonce(self) -> bytes:
        nonce = new_nonce()
        now = self.now()
        self.store.put_nonce(nonce, now + NONCE_TTL, now)
        return nonce

    def _credential(self, credential_id: bytes) -> CredentialRecord:
        cred = self.store.credential_by_id(credential_id)
        if cred is None:
            log.info("signature refused: unknown credential")
            raise SignatureRefused()
        if cred.locked:
            log.info("signature refused: the credential is locked")
            raise SignatureRefused()
        return cred

    def authenticate(
        self, header: str | None, method: str, target: str, body: bytes
    ) -> CredentialRecord:
        """The credential that signed this request; :class:`SignatureRefused` otherwise.
        The nonce is used up only by a request whose signature verifies."""
        signed = parse_header(header)
        cred = self._credential(signed.credential_id)
        try:
            message = request_message(
                method, target, body, signed.nonce, self.verifier_id, signed.credential_id
            )
        except InvalidInput:
            raise SignatureRefused() from None
        counter = check_signature(
            cred.method, cred.signing_key, message, signed.signature,
            last_counter=cred.sign_count, rp_id=self.verifier.policy.rp_id,
        )
        outcome = self.store.consume_nonce(
            signed.nonce, self.now(), credential=cred.id, sign_count=counter
        )
        if outcome is not Consumed.DONE:
            log.info("signature refused: %s", "nonce used, expired or unknown"
                     if outcome is Consumed.GONE else "the FIDO2 counter did not move forward")
            raise SignatureRefused()
        return cred

    # --- enrollment and credentials ------------------------------------------------

    def enroll(self, response_text: str) -> OnlineEnrollment:
        """Accept an enrollment response; the result text and the method's approval policy."""
        cred = self.verifier.accept_enrollment(response_text)
        result = self.verifier.enrollment_result(cred)
        return OnlineEnrollment(result, cred, self.verifier.policy.approval_for(cred.method))

    def describe(self, cred: CredentialRecord) -> dict[str, Any]:
        """A credential as the device API lists it (no key material but the public key id)."""
        return {
            "credential_id": credential_id_of(cred.signing_key).hex(),
            "user": cred.user,
            "method": cred.method.value,
            "created": cred.created,
            "last_used": cred.last_used,
            "locked": cred.locked,
            "approval": self.verifier.policy.approval_for(cred.method).to_json(),
        }

    def credentials(self, signer: CredentialRecord) -> list[dict[str, Any]]:
        return [self.describe(c) for c in self.store.credentials(signer.user)]

    def remove(self, signer: CredentialRecord, credential_id: str) -> None:
        """Forget the signer's own credential (a credential removes only itself)."""
        mine = credential_id_of(signer.signing_key).hex()
        if credential_id != mine:
            raise UntrustedMessage("a credential can only remove itself")
        record = AuditRecord(self.now(), Event.REVOKE, signer.user, signer.method.value,
                             detail="removed by the authenticator")
        if not self.store.revoke(signer.id, record):
            raise NoSuchChallenge("no such credential")
        audit.emit([record])

    # --- challenges: the provider's side ---------------------------------------------

    def start(
        self, *, user: str | None, kind: ChallengeKind, message: str,
        context: ChallengeContext, ttl: int | None = None,
    ) -> tuple[Challenge, str | None]:
        """Start a challenge; returns it and, for a QR one, the claim text to show."""
        seconds = check_ttl(ttl)
        if user is not None and not self.store.credentials(user):
            raise UnknownMethod(f"{user!r} has no enrolled method")
        now = self.now()
        challenge = Challenge(
            challenge_id=new_challenge_id(), kind=kind, user=user, message=message,
            context=context, state=ChallengeState.PENDING, expires=now + seconds, created=now,
        )
        record = AuditRecord(now, Event.CHALLENGE, user, None, challenge.challenge_id,
                             detail=kind.value)
        self.store.put_challenge(challenge, record)
        audit.emit([record])
        # Old challenges go as sessions and offers do: a purge after 1 in PURGE_EVERY
        # writes (the Verifier owns that policy), expired ones kept PURGE_GRACE first.
        self.verifier._purge_now_and_then()
        claim = claim_text(self.verifier_id, challenge.challenge_id) if (
            kind is ChallengeKind.QR
        ) else None
        return challenge, claim

    def status(self, challenge_id: str) -> Challenge:
        found = self.store.challenge(_checked_id(challenge_id))
        if found is None:
            raise NoSuchChallenge()
        return found.at(self.now())

    # --- challenges: the authenticator's side ----------------------------------------

    def pending(self, signer: CredentialRecord) -> list[Challenge]:
        return self.store.pending_challenges(signer.user, self.now(), LISTED_KINDS)

    def claim(self, signer: CredentialRecord, text: str) -> Challenge:
        verifier_id, challenge_id = parse_claim(text)
        if verifier_id != self.verifier_id:
            raise NoSuchChallenge("the claim code is for another verifier")
        now = self.now()
        cid = credential_id_of(signer.signing_key)
        record = AuditRecord(now, Event.CLAIM, signer.user, signer.method.value, challenge_id)
        claimed = self.store.claim_challenge(
            challenge_id, credential_id=cid, user=signer.user, now=now, audit=record
        )
        if claimed is not None:
            audit.emit([record])
            return claimed
        found = self.store.challenge(challenge_id)
        if found is None or found.kind is not ChallengeKind.QR or (
            found.user is not None and found.user != signer.user
        ):
            raise NoSuchChallenge()
        raise ChallengeClosed(
            "the challenge has expired" if found.effective_state(now) is ChallengeState.EXPIRED
            else "the challenge was claimed or answered already"
        )

    def answer(
        self, challenge_id: str, decision: Decision, credential_hex: str, signature: Signature
    ) -> Challenge:
        """Apply an answer whose approval verifies; returns the answered challenge."""
        found = self.store.challenge(_checked_id(challenge_id))
        if found is None:
            raise NoSuchChallenge()
        try:
            cid = bytes.fromhex(credential_hex)
        except ValueError:
            raise SignatureRefused() from None
        if len(cid) != 16:
            raise SignatureRefused()
        cred = self._credential(cid)
        if found.user is not None and found.user != cred.user:
            log.info("answer refused: someone else's challenge")
            raise NoSuchChallenge()
        message = approval_message(
            found.id_bytes, context_hash(found, cred.user), decision, self.verifier_id, cid
        )
        counter = check_signature(
            cred.method, cred.signing_key, message, signature, last_counter=cred.sign_count,
            rp_id=self.verifier.policy.rp_id,
        )
        policy = self.verifier.policy
        if policy.require_user_authentication and not policy.approval_for(
            cred.method
        ).user_authentication:
            raise ApprovalRefused(
                f"this verifier takes approvals only with user authentication; the "
                f"{cred.method.value} method is possession only"
            )
        now = self.now()
        state = found.effective_state(now)
        if state.final:
            raise ChallengeClosed(f"the challenge is {state.value}")
        expected = ChallengeState.CLAIMED if found.kind is ChallengeKind.QR else (
            ChallengeState.PENDING
        )
        if state is not expected:
            raise InvalidInput("claim the QR challenge before answering it")
        if found.claimed_by is not None and found.claimed_by != cid.hex():
            raise UntrustedMessage("the challenge was claimed by another credential")
        event = Event.APPROVE if decision is Decision.APPROVE else Event.REJECT
        record = AuditRecord(now, event, cred.user, cred.method.value, found.challenge_id)
        outcome = self.store.answer_challenge(
            found.challenge_id, expected=expected, decision=decision.state, user=cred.user,
            method=cred.method, credential_id=cid, credential=cred.id, sign_count=counter,
            approval=json.dumps(signature.to_json(), sort_keys=True), now=now, audit=record,
        )
        if outcome is Consumed.COUNTER:
            log.info("answer refused: the FIDO2 counter did not move forward")
            raise SignatureRefused()
        if outcome is Consumed.GONE:  # another answer won the compare-and-swap
            raise ChallengeClosed("the challenge was answered already")
        audit.emit([record])
        return self.status(found.challenge_id)


def _checked_id(challenge_id: str) -> str:
    try:
        raw = bytes.fromhex(challenge_id)
    except (ValueError, TypeError):
        raise NoSuchChallenge() from None
    if len(raw) != 16 or raw.hex() != challenge_id:
        raise NoSuchChallenge()
    return challenge_id


def changed(before: Sequence[str], after: Sequence[Challenge]) -> bool:
    """Whether the pending set differs from the ids ``before``."""
    return set(before) != {c.challenge_id for c in after}
