"""Several credentials per (tenant, user, method) in the store, on both engines
(schema 13, issue 14): the migration keeps every row and column, labels them with
their method and drops the one-credential-per-method rule; labels are unique per
(tenant, user) in the database itself; what save_credential adds or replaces; an
acceptance resets the failures of the user's other credentials (the PostgreSQL
batch statement too), never a locked one's."""

from __future__ import annotations

import dataclasses

import pytest

from hsm_auth import transcript
from hsm_auth.audit import AuditRecord, Event
from hsm_auth.errors import AlreadyEnrolled, InvalidInput, StateError
from hsm_auth.methods import Method
from hsm_auth.store import Accept, CredentialRecord, Failure, SessionRecord, Status, open_store

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
NOW = 1_800_000_000
SUITE = "OCRA-1:HOTP-SHA256-8:C-QH64"


@pytest.fixture(params=ENGINES)
def spec(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "v.db")
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def store(spec):
    s = open_store(spec)
    yield s
    s.close()


def _record(user="alice", method=Method.DEVICE, *, key=b"s", label="", tenant=""):
    return CredentialRecord(
        user=user,
        method=method,
        backend="python",
        signing_key=b"\x02" + key * 32,
        agreement_key=b"\x02" + b"a" * 32,
        wrapped_otp_key=None,
        suite=SUITE,
        atc=0,
        created=NOW,
        sealed_otp_key=b"sealed:" + key,
        label=label,
        tenant=tenant,
    )


#: The schema version before labels: the credentials table of versions 10 to 12.
BEFORE = 12
_V10_INSERT = (
    "INSERT INTO credentials (user_name, method, backend, signing_key, agreement_key, "
    "wrapped_otp_key, suite, atc, failures, locked, created, last_used, protocol, "
    "sealed_otp_key, attestation, certificate, credential_id, sign_count, expires) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def test_the_migration_keeps_every_row_and_column_and_labels_them_with_their_method(spec):
    rows = [
        ("alice", "device", "pkcs11", b"\x02" + b"d" * 32, b"\x02" + b"a" * 32, None, SUITE,
         7, 2, 0, NOW, NOW + 5, 3, b"sealed-d", '{"fmt": "none"}', b"cert-d", None, 0, NOW + 9),
        ("alice", "pin", "tpm2", b"\x02" + b"p" * 32, None, b"w" * 73, SUITE,
         9, 10, 1, NOW, None, 3, b"sealed-p", None, None, None, 4, 0),
        ("bob", "device", "fido2", b"\x02" + b"b" * 32, None, None, SUITE,
         0, 0, 0, NOW, None, 2, None, None, None, None, 12, NOW),
    ]
    with open_store(spec, migrate=False) as old:
        assert old.latest_version == BEFORE + 1  # this test is about the next migration
        assert old.migrate(upto=BEFORE) == BEFORE
        with old._tx() as db:
            for row in rows:
                cid = transcript.credential_id(row[3]) if row[0] == "alice" else None
                db.count(_V10_INSERT, (*row[:16], cid, *row[17:]))
            db.count(
                "INSERT INTO sessions (session_id, user_name, challenge, context, methods, "
                "expires) VALUES (?,?,?,?,?,?)",
                (b"S" * 16, "alice", b"c" * 16, "ctx", "device,pin", NOW),
            )
            db.count(
                "INSERT INTO offers (offer_id, user_name, methods, allow_replace, expires) "
                "VALUES (?,?,?,?,?)",
                (b"O" * 16, "bob", "pin", 0, NOW),
            )
            ids = [r[0] for r in db.rows("SELECT id FROM credentials ORDER BY id")]
    with open_store(spec) as new:
        assert new.schema_version() == new.latest_version
        got = new.all_credentials()
        assert [c.id for c in got] == ids
        for c, row in zip(got, rows, strict=True):
            assert (c.user, c.method.value, c.backend, c.signing_key, c.agreement_key,
                    c.wrapped_otp_key, c.suite, c.atc, c.failures, int(c.locked), c.created,
                    c.last_used, c.protocol, c.sealed_otp_key, c.attestation, c.certificate,
                    c.sign_count, c.expires) == (*row[:16], *row[17:])
            assert (c.tenant, c.label) == ("", c.method.value)
        # The credential id index survived the rebuild; a row without one is named.
        for c in got:
            assert new.credential_by_id(transcript.credential_id(c.signing_key)) == c
        session = new.session(b"S" * 16)
        assert (session.user, session.tenant, session.methods) == (
            "alice", None, (Method.DEVICE, Method.PIN)
        )
        offer = new.offer(b"O" * 16)
        assert (offer.user, offer.tenant, offer.label) == ("bob", "", None)
        # One credential per (user, method) is no longer the rule: a labelled second.
        backup = new.save_credential(_record(key=b"k", label="backup"), replace=False)
        assert [(c.label, c.method) for c in new.credentials("alice")] == [
            ("device", Method.DEVICE), ("backup", Method.DEVICE), ("pin", Method.PIN)
        ]
        assert backup.id not in ids


def test_a_label_is_unique_per_tenant_and_user_in_the_database_itself(store):
    store.save_credential(_record(label="backup"), replace=False)
    with pytest.raises(StateError), store._tx() as db:  # around save_credential's checks
        db.count(
            "INSERT INTO credentials (user_name, method, backend, signing_key, suite, atc, "
            "created, tenant, label) VALUES (?,?,?,?,?,?,?,?,?)",
            ("alice", "pin", "python", b"k", SUITE, 0, NOW, "", "backup"),
        )
    # The same label for another user, or for alice of another tenant, is another one.
    store.save_credential(_record(user="bob", key=b"b", label="backup"), replace=False)
    store.save_credential(_record(key=b"t", label="backup", tenant="acme"), replace=False)
    assert [(c.tenant, c.user, c.label) for c in store.all_credentials()] == [
        ("", "alice", "backup"), ("", "bob", "backup"), ("acme", "alice", "backup")
    ]


def test_what_save_credential_adds_and_replaces(store):
    first = store.save_credential(_record(key=b"1"), replace=False)
    assert first.label == "device"
    with pytest.raises(AlreadyEnrolled, match="enrolled already"):  # no label: as before
        store.save_credential(_record(key=b"2"), replace=False)
    backup = store.save_credential(_record(key=b"2", label="backup"), replace=False)
    with pytest.raises(AlreadyEnrolled, match="labelled 'backup'"):
        store.save_credential(_record(key=b"3", label="backup"), replace=False)
    with pytest.raises(InvalidInput, match="2 device credentials"):  # which one?
        store.save_credential(_record(key=b"3"), replace=True)
    with pytest.raises(InvalidInput, match="not a pin one"):
        store.save_credential(_record(method=Method.PIN, key=b"3", label="backup"), replace=True)
    renewed = store.save_credential(_record(key=b"3", label="backup"), replace=True)
    assert renewed.id > backup.id and renewed.label == "backup"  # row ids are never reused
    assert [c.signing_key[1:2] for c in store.credentials("alice")] == [b"1", b"3"]
    # A label taken by another method's credential: the default goes on to -2.
    store.save_credential(_record(method=Method.PIN, key=b"4", label="pin"), replace=False)
    store.save_credential(_record(method=Method.FACE, key=b"5", label="face"), replace=False)
    store.save_credential(_record(user="carol", method=Method.PIN, key=b"6", label="face"),
                          replace=False)
    carol_face = store.save_credential(_record(user="carol", method=Method.FACE, key=b"7"),
                                       replace=False)
    assert carol_face.label == "face-2"
    # Replacing the only credential of a method keeps its label.
    only = store.save_credential(_record(method=Method.PIN, key=b"8"), replace=True)
    assert only.label == "pin"
    assert [c.label for c in store.credentials("alice")] == ["device", "backup", "face", "pin"]


def _fail(store, *ids):
    record = AuditRecord(NOW, Event.REFUSE, "alice")
    [done] = store.apply([Failure(ids, 3, record)])
    return done


def test_an_acceptance_resets_the_failures_of_the_users_other_credentials_never_a_locked_one(
    store,
):
    a = store.save_credential(_record(key=b"1"), replace=False)
    b = store.save_credential(_record(key=b"2", label="backup"), replace=False)
    c = store.save_credential(_record(key=b"3", label="spare"), replace=False)
    other = store.save_credential(_record(key=b"4", tenant="acme"), replace=False)
    bob = store.save_credential(_record(user="bob", key=b"5"), replace=False)
    _fail(store, a.id, b.id, c.id, other.id, bob.id)
    _fail(store, a.id, b.id, other.id, bob.id)
    _fail(store, c.id)
    _fail(store, c.id)  # the third: c is locked
    failures = {x.id: (x.failures, x.locked) for x in store.all_credentials()}
    assert failures == {a.id: (2, False), b.id: (2, False), c.id: (3, True),
                        other.id: (2, False), bob.id: (2, False)}
    store.put_session(SessionRecord(b"S" * 16, "alice", b"c" * 16, "ctx", (Method.DEVICE,),
                                    NOW + 60))
    record = AuditRecord(NOW, Event.ACCEPT, "alice", "device", (b"S" * 16).hex(), atc=1)
    [done] = store.apply([Accept(b"S" * 16, b.id, 0, 1, NOW, record)])
    assert done.status is Status.DONE
    failures = {x.id: (x.atc, x.failures, x.locked) for x in store.all_credentials()}
    assert failures == {
        a.id: (0, 0, False),  # reset with b: one user, one count of consecutive failures
        b.id: (1, 0, False),
        c.id: (0, 3, True),  # locked stays locked, its count kept
        other.id: (0, 2, False),  # alice of another tenant is another account
        bob.id: (0, 2, False),
    }
    # A lost compare-and-swap resets nothing.
    _fail(store, a.id)
    store.put_session(SessionRecord(b"T" * 16, "alice", b"c" * 16, "ctx", (Method.DEVICE,),
                                    NOW + 60))
    [lost] = store.apply([Accept(b"T" * 16, b.id, 0, 2, NOW, dataclasses.replace(record))])
    assert lost.status is Status.STALE
    assert {x.id: x.failures for x in store.credentials("alice")}[a.id] == 1
