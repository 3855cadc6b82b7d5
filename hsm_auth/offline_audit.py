"""The verifier's side of the offline log (docs/PROTOCOL.md §19): take a credential's
log at its next online contact, check it, keep it, reconcile it with the OTPs the
verifier accepted, and raise alerts.

Checks, for every entry submitted (in the order sent):

* it parses strictly and names this verifier, the signing credential, its user and
  method (else ``foreign`` / ``malformed``: not kept);
* its head signature verifies with the credential's signing key (ECDSA methods; a
  FIDO2 credential's entries are signed by the submission's own assertion): else
  ``bad-signature``;
* the chain: seq follows the previous entry's (``missing`` entries when it jumps,
  ``order`` when it goes back), ``prev`` is the previous entry's hash (the one sent
  before it, or the one received earlier with seq - 1: ``broken-chain``), the ATC
  increases (``order``); an entry received earlier with the same seq must be the
  same entry (``changed``).

Reconciliation (:meth:`OfflineAudit.report`, at submission and whenever shown):
each kept entry's ATC is **submitted** if the verifier accepted an OTP at that ATC
for the credential's user and method since the credential was created (the
``accept`` audit records; two for a ``resync``), else **generated, not submitted**.
An accepted ATC up to the log's last one that no entry has is an alert
(``not-logged``: an entry was deleted); an ATC skipped between two entries that
no sync explains is an alert (``gap``: a deleted entry, or a counter that advanced
without an OTP, e.g. a kill between the token's counter and the log's write).

Alerts are audited (``offline-alert``, WARNING on the audit logger) when a
submission finds them; every submission is audited (``offline-log``).

Limit: the audit records name the user and method, not the credential, so where a
user holds several credentials of one method their accepted ATCs are pooled.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import audit, ec
from .audit import AuditRecord, Event
from .errors import DecodeError, InvalidInput, StateError, UntrustedMessage
from .offline_log import GENESIS, LogEntry
from .request_signing import FIDO2_ASSERTION, signature_format
from .store.base import CredentialRecord, VerifierStore
from .store.offline_log import OfflineLogSql, StoredEntry
from .transcript import credential_id as credential_id_of

__all__ = ["MAX_ENTRIES", "Alert", "LogReport", "OfflineAudit", "check_entries", "log_owner"]

#: Entries per submission (the client sends a longer log in several).
MAX_ENTRIES = 100
_SHOWN = 20  # ATCs listed per alert text
_RECOMPUTED = frozenset({"not-logged", "gap"})  # reconciled again whenever shown


@dataclass(frozen=True)
class Alert:
    code: str  # malformed, foreign, bad-signature, missing, order, broken-chain, changed,
    #            not-logged, gap
    text: str
    seq: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "seq": self.seq, "text": self.text}


@dataclass(frozen=True)
class LogReport:
    """A credential's offline log at the verifier: how many uses it records, which
    were submitted (the verifier accepted their OTP) and which not, and the alerts."""

    credential_id: bytes
    user: str
    method: str
    entries: int
    received: int  # new in this submission (0 when only shown)
    submitted: tuple[int, ...]  # ATCs
    not_submitted: tuple[int, ...]  # ATCs: generated, not submitted
    alerts: tuple[Alert, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "credential_id": self.credential_id.hex(),
            "user": self.user,
            "method": self.method,
            "entries": self.entries,
            "received": self.received,
            "submitted": len(self.submitted),
            "not_submitted": list(self.not_submitted),
            "alerts": [a.to_json() for a in self.alerts],
        }


def check_entries(
    cred: CredentialRecord,
    verifier_id: bytes,
    raw: Sequence[object],
    stored: dict[int, StoredEntry],
    *,
    now: int,
) -> tuple[list[StoredEntry], list[Alert]]:
    """Check submitted entries (the module docstring); returns those to keep and the
    alerts."""
    cid = credential_id_of(cred.signing_key)
    ecdsa = signature_format(cred.method) != FIDO2_ASSERTION
    public = ec.decode_point(cred.signing_key) if ecdsa else None
    keep: list[StoredEntry] = []
    alerts: list[Alert] = []
    previous: LogEntry | None = None
    for index, item in enumerate(raw):
        try:
            entry = LogEntry.from_json(item)
        except DecodeError as e:
            alerts.append(Alert("malformed", f"entry #{index} of the submission: {e}"))
            previous = None
            continue
        if (
            entry.verifier_id != verifier_id or not hmac.compare_digest(entry.credential_id, cid)
            or entry.user != cred.user or entry.method is not cred.method
        ):
            alerts.append(Alert("foreign", "an entry of another verifier, credential, user or "
                                "method", entry.seq))
            continue
        digest = entry.entry_hash()
        signed = not ecdsa  # FIDO2: the submission's assertion covers the body
        if public is not None:
            try:
                if entry.signature is None:
                    raise UntrustedMessage("no signature")
                ec.verify(public, entry.signature, entry.head())
                signed = True
            except (UntrustedMessage, InvalidInput, ValueError):
                alerts.append(Alert("bad-signature", "the head signature does not verify "
                                    "with the credential's key (an edited entry?)", entry.seq))
        alerts.extend(_link(entry, previous, stored))
        earlier = stored.get(entry.seq)
        if earlier is not None and not hmac.compare_digest(earlier.entry_hash, digest):
            alerts.append(Alert("changed", "differs from the entry received with this seq "
                                f"before (at {earlier.received})", entry.seq))
        if earlier is None and all(k.seq != entry.seq for k in keep):
            keep.append(StoredEntry(entry.seq, digest, entry.time, entry.atc, entry.user,
                                    entry.tenant, entry.method.value, entry.data, signed, now))
        previous = entry
    return keep, alerts


def _link(
    entry: LogEntry, previous: LogEntry | None, stored: dict[int, StoredEntry]
) -> list[Alert]:
    """The chain between ``entry`` and the one before it (sent, or received earlier)."""
    if previous is not None:
        before_seq, before_hash, before_atc = previous.seq, previous.entry_hash(), previous.atc
    elif entry.seq == 0:
        before_seq, before_hash, before_atc = -1, GENESIS, -1
    elif entry.seq - 1 in stored:
        kept = stored[entry.seq - 1]
        before_seq, before_hash, before_atc = kept.seq, kept.entry_hash, kept.atc
    else:
        last = max((s for s in stored if s < entry.seq), default=-1)
        return [Alert("missing", f"entries {last + 1}..{entry.seq - 1} were never received",
                      entry.seq)]
    out = []
    if entry.seq > before_seq + 1:
        out.append(Alert("missing", f"entries {before_seq + 1}..{entry.seq - 1} are missing "
                         "(deleted?)", entry.seq))
    elif entry.seq <= before_seq:
        out.append(Alert("order", f"comes after entry {before_seq} (reordered?)", entry.seq))
    if entry.seq == before_seq + 1 and not hmac.compare_digest(entry.prev, before_hash):
        out.append(Alert("broken-chain", f"does not chain to entry {before_seq} (an edited, "
                         "deleted or reordered entry)", entry.seq))
    if entry.atc <= before_atc:
        out.append(Alert("order", f"its ATC {entry.atc} does not follow {before_atc} "
                         "(reordered?)", entry.seq))
    return out


def log_owner(
    store: VerifierStore, signer: CredentialRecord, credential_id: bytes | None
) -> CredentialRecord:
    """Whose log a submission signed by ``signer`` carries: the signer's own, or
    (``credential_id``) another credential of the same user whose entries are signed
    by that credential itself (ECDSA: PKCS#11, TPM), so that the agent can submit
    the pin method's log without the PIN. A FIDO2 credential's log is signed only by
    its own submission: refused from another signer (UntrustedMessage)."""
    if credential_id is None or hmac.compare_digest(
        credential_id, credential_id_of(signer.signing_key)
    ):
        return signer
    owner = store.credential_by_id(credential_id)
    if owner is None or owner.user != signer.user:
        raise UntrustedMessage("not a credential of the signer's user")
    if signature_format(owner.method) == FIDO2_ASSERTION:
        raise UntrustedMessage(
            "a FIDO2 credential's offline log is submitted in its own signed request"
        )
    return owner


class OfflineAudit:
    """The offline logs of one verifier's store."""

    def __init__(self, store: VerifierStore, verifier_id: bytes) -> None:
        if not isinstance(store, OfflineLogSql):
            raise StateError(f"the {store.engine} store keeps no offline logs")
        self.store = store
        self.verifier_id = verifier_id

    def submit(self, cred: CredentialRecord, raw: Sequence[object], *, now: int) -> LogReport:
        """Take ``raw`` entries of ``cred``'s log (the request was signed by ``cred``),
        keep the new ones, audit the submission and its alerts; return the report."""
        if len(raw) > MAX_ENTRIES:
            raise InvalidInput(f"at most {MAX_ENTRIES} log entries per submission")
        cid = credential_id_of(cred.signing_key)
        stored = {e.seq: e for e in self.store.offline_entries(cid)}
        keep, alerts = check_entries(cred, self.verifier_id, raw, stored, now=now)
        merged = {**stored, **{e.seq: e for e in keep}}
        recon = self._reconcile(cred, cid, merged)
        report = LogReport(cid, cred.user, cred.method.value, len(merged), len(keep),
                           recon.submitted, recon.not_submitted, (*alerts, *recon.alerts))
        records = [AuditRecord(now, Event.OFFLINE_LOG, cred.user, cred.method.value,
                               detail=f"credential {cid.hex()}: {len(raw)} entries sent, "
                               f"{len(keep)} new; {len(recon.not_submitted)} not submitted")]
        records += [
            AuditRecord(now, Event.OFFLINE_ALERT, cred.user, cred.method.value, atc=None,
                        detail=_detail(cid, a))
            for a in report.alerts
        ]
        self.store.put_offline_entries(cid, keep, records)
        audit.emit(records)
        return report

    def report(self, cred: CredentialRecord) -> LogReport:
        """The credential's log as kept, reconciled now (more OTPs may have been
        submitted since the log was)."""
        cid = credential_id_of(cred.signing_key)
        stored = {e.seq: e for e in self.store.offline_entries(cid)}
        recon = self._reconcile(cred, cid, stored)
        alerts = []
        for r in self.store.audit_events(
            cred.user, cred.method.value, [Event.OFFLINE_ALERT.value], since=cred.created
        ):
            head, _, text = (r.detail or "").partition(": ")
            code = text.partition(" ")[0].partition(":")[0]
            if head == f"credential {cid.hex()}" and code not in _RECOMPUTED:
                alerts.append(Alert(code, text))  # as audited when the log was submitted
        return LogReport(cid, cred.user, cred.method.value, len(stored), 0, recon.submitted,
                         recon.not_submitted, (*alerts, *recon.alerts))

    def _reconcile(
        self, cred: CredentialRecord, cid: bytes, entries: dict[int, StoredEntry]
    ) -> _Reconciled:
        events = self.store.audit_events(
            cred.user, cred.method.value,
            [Event.ACCEPT.value, Event.RESYNC.value, Event.SYNCED.value], since=cred.created,
        )
        accepted: set[int] = set()
        synced: set[int] = set()
        for r in events:
            if r.atc is None:
                continue
            if r.event is Event.SYNCED:
                synced.add(r.atc)
            else:
                accepted.add(r.atc)
                if r.event is Event.RESYNC:
                    accepted.add(r.atc - 1)  # a resync accepts two consecutive OTPs
        ordered = [entries[s] for s in sorted(entries)]
        logged = {e.atc for e in ordered}
        submitted = tuple(e.atc for e in ordered if e.atc in accepted)
        not_submitted = tuple(e.atc for e in ordered if e.atc not in accepted)
        alerts: list[Alert] = []
        if ordered:
            top = ordered[-1].atc
            unlogged = sorted(a for a in accepted if a <= top and a not in logged)
            if unlogged:
                alerts.append(Alert("not-logged", "OTPs accepted at ATC "
                                    f"{_atcs(unlogged)} are not in the log (deleted entries?)"))
            skipped = [
                a
                for before, after in itertools.pairwise(ordered)
                for a in range(before.atc + 1, min(after.atc, before.atc + 1 + 10_000))
                if a not in synced and a not in accepted
            ]
            if skipped:
                alerts.append(Alert("gap", f"ATC {_atcs(skipped)}: the counter moved with no "
                                    "log entry (a deleted entry, or no OTP released)"))
        return _Reconciled(submitted, not_submitted, tuple(alerts))


@dataclass(frozen=True)
class _Reconciled:
    submitted: tuple[int, ...]
    not_submitted: tuple[int, ...]
    alerts: tuple[Alert, ...]


def _atcs(values: Sequence[int]) -> str:
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    return shown + (f" (and {len(values) - _SHOWN} more)" if len(values) > _SHOWN else "")


def _detail(cid: bytes, alert: Alert) -> str:
    where = f" (entry {alert.seq})" if alert.seq is not None else ""
    return f"credential {cid.hex()}: {alert.code}{where}: {alert.text}"[:500]
