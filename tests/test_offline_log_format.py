"""The offline log's format and the verifier's checks, without a token: the vector of
docs/PROTOCOL.md §19.5, the strict entry parser, and check_entries on logs signed with
a software key (the token paths are in test_offline_log.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as pyec

from hsm_auth import ec
from hsm_auth.errors import DecodeError, StateError
from hsm_auth.methods import Method
from hsm_auth.offline_audit import check_entries
from hsm_auth.offline_log import GENESIS, LogEntry, OfflineLog, data_hash
from hsm_auth.store.base import CredentialRecord
from hsm_auth.transcript import credential_id

DOC = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
VID = bytes.fromhex("00112233445566778899aabbccddeeff")


def _doc_hex(after: str, label: str) -> str:
    """A hex value of §19.5, possibly wrapped over several lines."""
    section = DOC[DOC.index("### 19.5 Vector"):]
    section = section[section.index(after):]
    found = re.search(label + r" +([0-9a-f]+(?:\n +[0-9a-f]+)*)", section)
    assert found, label
    return "".join(found.group(1).split())


def test_the_vector_of_the_spec() -> None:
    d = data_hash(
        "Pay 120.00 EUR to DE89 3704 0044 0532 0130 00",
        [["Amount", "120.00 EUR"], ["Payee", "DE89 3704 0044 0532 0130 00"]],
    )
    e0 = LogEntry(0, 1767225600, VID, "acme", "alice", Method.DEVICE, b"\x0f" * 16, 7, d,
                  GENESIS)
    assert d.hex() == _doc_hex("Entry 0", "data_hash")
    assert e0.canonical().hex() == _doc_hex("Entry 0", "CBOR")
    assert e0.entry_hash().hex() == _doc_hex("Entry 0", "entry_hash")
    assert e0.head().hex() == _doc_hex("Entry 0", "head")
    d1 = data_hash("Log in to Example Bank", None, "4711")
    e1 = LogEntry(1, 1767225660, VID, "acme", "alice", Method.DEVICE, b"\x0f" * 16, 8, d1,
                  e0.entry_hash())
    section = DOC[DOC.index("Entry 1: `seq` 1"):]
    assert d1.hex() in section and e1.entry_hash().hex() in section
    # The hash binds the context, each pair of the transaction and the user data.
    pay = [["Amount", "120.00 EUR"], ["Payee", "DE89"]]
    assert len({data_hash("x"), data_hash("y"), data_hash("x", pay), data_hash("x", None, "1"),
                data_hash("x", [["Amount", "120.01 EUR"], ["Payee", "DE89"]])}) == 5


GOOD = LogEntry(3, 1, VID, None, "alice", Method.PIN, b"\x01" * 16, 9, b"\x02" * 32,
                b"\x03" * 32, b"\x04" * 64).to_json()


@pytest.mark.parametrize("change", [
    {"extra": 1}, {"v": 2}, {"v": True}, {"seq": -1}, {"seq": 2**63}, {"seq": 1.0},
    {"atc": "9"}, {"method": "retina"}, {"credential": "01" * 15}, {"data": "AB" * 32},
    {"prev": "0" * 63}, {"sig": "04" * 63}, {"user": ""}, {"user": "a\nb"},
    {"tenant": "x" * 257}, {"verifier": ""},
])
def test_a_malformed_entry_is_refused(change: dict[str, object]) -> None:
    assert LogEntry.from_json(GOOD) == LogEntry.from_json(json.loads(json.dumps(GOOD)))
    with pytest.raises(DecodeError):
        LogEntry.from_json({**GOOD, **change})
    with pytest.raises(DecodeError):
        LogEntry.from_json({k: v for k, v in GOOD.items() if k != "sig"})


class Log:
    """A log written by OfflineLog with a software P-256 key."""

    def __init__(self, directory: Path, method: Method = Method.DEVICE) -> None:
        self.key = pyec.generate_private_key(pyec.SECP256R1())
        self.public = ec.encode_point(self.key.public_key())
        self.cid = credential_id(self.public)
        self.method = method
        self.log = OfflineLog(directory)
        self.cred = CredentialRecord("alice", method, "x", self.public, None, None, "s", 0, 0)

    def sign(self, message: bytes) -> bytes:
        return ec.der_to_raw(self.key.sign(message, pyec.ECDSA(hashes.SHA256())))

    def append(self, atc: int) -> LogEntry:
        signer = None if self.method.needs_user_verification else self.sign
        return self.log.append(time=atc, verifier_id=VID, tenant=None, user="alice",
                               method=self.method, credential_id=self.cid, atc=atc,
                               data=data_hash(f"#{atc}"), sign=signer)

    def check(self, raw: list[object] | None = None, stored=None) -> set[tuple[str, int | None]]:  # type: ignore[no-untyped-def]
        raw = self.log.raw_entries(self.cid) if raw is None else raw
        _, alerts = check_entries(self.cred, VID, raw, stored or {}, now=0)
        return {(a.code, a.seq) for a in alerts}


def test_check_entries_finds_each_kind_of_tampering(tmp_path: Path) -> None:
    log = Log(tmp_path)
    for atc in range(1, 6):
        log.append(atc)
    raw = log.log.raw_entries(log.cid)
    assert log.check() == set()
    assert log.check(raw[:2] + raw[3:]) == {("missing", 3)}
    assert ("order", 1) in log.check([raw[0], raw[2], raw[1], *raw[3:]])
    edited = {**raw[2], "atc": 30}
    assert log.check([*raw[:2], edited, *raw[3:]]) >= {("bad-signature", 2), ("broken-chain", 3)}
    unsigned = {**raw[4], "sig": None}
    assert log.check([*raw[:4], unsigned]) == {("bad-signature", 4)}
    other = Log(tmp_path / "other")
    other.append(1)
    foreign = other.log.raw_entries(other.cid)[0]
    assert ("foreign", 0) in log.check([*raw, foreign])
    assert ("malformed", None) in log.check([*raw, {"seq": 5}])


def test_a_fido2_log_is_checked_by_its_chain(tmp_path: Path) -> None:
    log = Log(tmp_path, Method.BIOMETRIC)
    for atc in range(1, 4):
        log.append(atc)
    raw = log.log.raw_entries(log.cid)
    assert all(e["sig"] is None for e in raw) and log.check() == set()
    assert ("broken-chain", 2) in log.check([raw[0], raw[1], {**raw[2], "prev": "00" * 32}])


def test_a_line_that_is_not_an_entry_is_a_state_error_locally(tmp_path: Path) -> None:
    log = Log(tmp_path)
    log.append(1)
    path = log.log.path(log.cid)
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(StateError, match="line 2 is not a log entry"):
        log.log.entries(log.cid)
    assert log.log.raw_entries(log.cid)[1] is None  # submitted anyway: "malformed"
    with pytest.raises(StateError, match="last line"):
        log.append(2)  # nothing is chained to a line that is not an entry


ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def store(request, tmp_path):  # type: ignore[no-untyped-def]
    from hsm_auth.store import open_store

    spec = str(tmp_path / "v.db") if request.param == "sqlite" else request.getfixturevalue(
        "postgres_dsn")
    s = open_store(spec)
    yield s
    s.close()


def test_the_verifier_keeps_each_entry_once_and_reconciles_on_both_engines(store, tmp_path):  # type: ignore[no-untyped-def]
    from hsm_auth.audit import AuditRecord, Event
    from hsm_auth.offline_audit import OfflineAudit
    from hsm_auth.store.base import Note

    log = Log(tmp_path)
    cred = store.save_credential(log.cred, replace=False)
    for atc in range(1, 7):
        log.append(atc)
    raw = log.log.raw_entries(log.cid)
    store.apply([Note(AuditRecord(cred.created, Event.ACCEPT, "alice", "device", atc=a))
                 for a in (2, 4)])
    audit = OfflineAudit(store, VID)
    first = audit.submit(cred, raw[:4], now=10)
    assert (first.entries, first.received, first.submitted, first.not_submitted) == (
        4, 4, (2, 4), (1, 3))
    assert first.alerts == ()
    again = audit.submit(cred, raw, now=11)  # the first four again, and two new
    assert (again.entries, again.received, again.not_submitted) == (6, 2, (1, 3, 5, 6))
    assert [e.seq for e in store.offline_entries(log.cid)] == list(range(6))
    assert store.offline_entries(log.cid)[0].received == 10
    # A later acceptance of ATC 6 moves it to "submitted" when the log is shown again.
    store.apply([Note(AuditRecord(cred.created, Event.ACCEPT, "alice", "device", atc=6))])
    assert audit.report(cred).not_submitted == (1, 3, 5)
    # An entry sent again changed, and an accepted ATC above that no entry holds.
    store.apply([Note(AuditRecord(cred.created, Event.ACCEPT, "alice", "device", atc=8))])
    log.append(9)
    changed = {**raw[5], "time": 99}
    report = audit.submit(cred, [changed, log.log.raw_entries(log.cid)[6]], now=12)
    codes = {a.code for a in report.alerts}
    assert {"changed", "not-logged", "gap", "bad-signature"} <= codes
    shown = audit.report(cred)
    assert {"changed", "not-logged", "gap"} <= {a.code for a in shown.alerts}
    # A sync (the token's ATC report) that the verifier applied at ATC 7 explains it.
    store.apply([Note(AuditRecord(cred.created, Event.SYNCED, "alice", "device", atc=7))])
    codes = [a.code for a in audit.report(cred).alerts]
    assert "gap" not in codes and "not-logged" in codes
    events = [r.event for r in store.audit_records("alice", 100)]
    assert events.count(Event.OFFLINE_LOG) == 3 and Event.OFFLINE_ALERT in events
