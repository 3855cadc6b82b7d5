"""The PKCS#11 ATC on SoftHSM: two objects written alternately, each (value, check),
read as the highest valid one, so that a torn write (SoftHSM rewrites an object's
file in place; a kill leaves it empty) loses only the value being written.
Older one-object counters still read, advance and delete. The kill loop itself is
in test_pkcs11_kill.py."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hsm_auth_backends.pkcs11 import ATC_APPLICATION, Pkcs11KeyStore

from hsm_auth.errors import CounterError, KeyNotFound, LoginRequired
from hsm_auth.keystore import Authorization, KeyKind
from hsm_auth.testing.softhsm import SoftHsmToken

pytestmark = pytest.mark.softhsm


@pytest.fixture
def auth(softhsm_token: SoftHsmToken) -> Authorization:
    return Authorization(pin=softhsm_token.user_pin)


def _open(token: SoftHsmToken) -> Pkcs11KeyStore:
    return Pkcs11KeyStore.open({"uri": token.uri})


@pytest.fixture
def store(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    opened = _open(softhsm_token)
    yield opened
    opened.close()


def _objects(store: Pkcs11KeyStore) -> list[Any]:
    """Every ATC object on the token, straight from C_FindObjects in the store's session."""
    import pkcs11

    a = pkcs11.Attribute
    template = {a.CLASS: pkcs11.ObjectClass.DATA, a.APPLICATION: ATC_APPLICATION}
    return list(store._session.get_objects(template))


def _slots(store: Pkcs11KeyStore) -> dict[int, str]:
    """slot -> CKA_LABEL of the two-object counters on the token (one counter per test)."""
    import pkcs11

    found: dict[int, str] = {}
    for obj in _objects(store):
        value = bytes(obj[pkcs11.Attribute.VALUE])
        assert value[16] == 0, "a two-object counter's CKA_VALUE: id, 0x00, slot, label"
        assert value[17] not in found
        found[value[17]] = obj[pkcs11.Attribute.LABEL]
    return found


def _slot_object(store: Pkcs11KeyStore, slot: int) -> Any:
    import pkcs11

    (obj,) = [o for o in _objects(store) if bytes(o[pkcs11.Attribute.VALUE])[17] == slot]
    return obj


def _fresh(token: SoftHsmToken, counter: str, auth: Authorization) -> int:
    """The value a store that has never seen the counter reads."""
    with _open(token) as other:
        return other.counter_value(counter, auth)


def test_two_checked_objects_written_alternately(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    counter = store.create_counter("alt/atc", auth)
    labels = _slots(store)
    assert sorted(labels) == [0, 1]
    assert all(text.startswith("0:") and len(text) == 2 + 16 for text in labels.values())
    assert labels[0] != labels[1]  # the check binds the value to its slot
    assert store.counter_increment(counter, auth) == 1
    after_one = _slots(store)
    assert after_one[0] == labels[0] and after_one[1].startswith("1:")
    assert store.counter_increment(counter, auth) == 2
    after_two = _slots(store)
    assert after_two[0].startswith("2:") and after_two[1] == after_one[1]
    assert _fresh(softhsm_token, counter, auth) == 2
    counters = [k for k in store.list_keys(auth) if k.kind is KeyKind.COUNTER]
    assert [(k.uri, k.label) for k in counters] == [(counter, "alt/atc")]
    store.delete_key(counter, auth)
    assert _objects(store) == []
    with pytest.raises(KeyNotFound):
        store.counter_value(counter, auth)


@pytest.mark.parametrize("steps", [3, 4])  # the next write goes to slot 0, then to slot 1
def test_vanished_object_loses_only_the_value_being_written(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken, steps: int
) -> None:
    counter = store.create_counter("torn/atc", auth)
    for _ in range(steps):
        store.counter_increment(counter, auth)
    target = 1 - steps % 2  # the slot that does not hold `steps`
    assert _slots(store)[1 - target].startswith(f"{steps}:")
    # What a kill during the write of steps + 1 leaves on SoftHSM: that object is gone.
    _slot_object(store, target).destroy()
    assert store.counter_value(counter, auth) == steps
    assert _fresh(softhsm_token, counter, auth) == steps
    assert store.counter_increment(counter, auth) == steps + 1  # the object is made again
    assert sorted(_slots(store)) == [0, 1]
    assert _fresh(softhsm_token, counter, auth) == steps + 1
    with _open(softhsm_token) as other:  # a store that never saw it recreates it too
        _slot_object(other, 1 - target).destroy()
        assert other.counter_increment(counter, auth) == steps + 2
    assert store.counter_increment(counter, auth) == steps + 3  # no stale handle here
    assert sorted(_slots(store)) == [0, 1]


def test_damaged_or_misplaced_labels_never_count(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    import pkcs11

    label = pkcs11.Attribute.LABEL
    counter = store.create_counter("damaged/atc", auth)
    other = store.create_counter("other/atc", auth)
    for _ in range(3):
        store.counter_increment(counter, auth)
    store.counter_increment(other, auth)  # other: slot 1 holds "1:<its check>"
    ident = store._ref(counter).id
    mine = [o for o in _objects(store) if bytes(o[pkcs11.Attribute.VALUE])[:16] == ident]
    by_slot = {bytes(o[pkcs11.Attribute.VALUE])[17]: o for o in mine}
    holder = by_slot[1]  # value 3 in slot 1; slot 0 holds 2 and is written next
    forged = [
        "99",  # a bare decimal (the old format) next to checked values
        "99:0000000000000000",  # a wrong check
        f"99{holder[label][1:]}",  # a check for another value
        holder[label],  # slot 1's valid label copied into slot 0
        "",
        "3:",
    ]
    others = [o for o in _objects(store) if o not in mine]
    forged += [o[label] for o in others]  # another counter's labels
    for text in forged:
        by_slot[0][label] = text
        assert _fresh(softhsm_token, counter, auth) == 3, text
    assert store.counter_increment(counter, auth) == 4  # overwrites the damaged object
    assert _fresh(softhsm_token, counter, auth) == 4
    assert len(_objects(store)) == 4  # no third object for this counter
    by_slot[0][label] = "garbage"
    by_slot[1][label] = "garbage"
    with pytest.raises(CounterError):
        _fresh(softhsm_token, counter, auth)
    for obj in mine:
        obj.destroy()
    with pytest.raises(KeyNotFound):
        _fresh(softhsm_token, counter, auth)


def test_two_stores_never_repeat_a_value(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    """Each store keeps what it last saw; a write by the other store must be noticed
    (the slot it would write next changed) before it writes."""
    counter = store.create_counter("shared/atc", auth)
    seen: list[int] = []
    with _open(softhsm_token) as second:
        for turn in range(12):
            first_turn = turn % 3 != 2
            s = store if first_turn else second
            seen.append(s.counter_increment(counter, auth))
            seen.append((second if first_turn else store).counter_value(counter, auth))
    assert seen[0::2] == list(range(1, 13))
    assert seen[1::2] == seen[0::2]


def test_counted_hmac_limit_refuses_without_writing(
    store: Pkcs11KeyStore, auth: Authorization
) -> None:
    peer = store.generate_key("limit-ecdh", KeyKind.AGREEMENT, auth)
    from cryptography.hazmat.primitives.asymmetric import ec

    otp = store.derive_otp_key("limit-otp", peer, ec.generate_private_key(ec.SECP256R1())
                               .public_key(), auth)
    counter = store.create_counter("limit/atc", auth)
    assert store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=1)[0] == 1
    before = _slots(store)
    with pytest.raises(LoginRequired):
        store.counted_hmac(otp, counter, lambda c: b"m", auth, limit=1)
    assert _slots(store) == before


# --- counters made by the one-object scheme of earlier versions -----------------------


def _legacy_counter(
    store: Pkcs11KeyStore, auth: Authorization, label: str, *values: str
) -> str:
    """A counter as earlier versions made it: one CKO_DATA object, CKA_VALUE = id +
    label, the value in decimal in CKA_LABEL (more values: duplicate objects, as a
    "create new, destroy old" tool may leave)."""
    import pkcs11

    a = pkcs11.Attribute
    ident = secrets.token_bytes(16)
    store._ensure_login(auth)
    for value in values:
        store._session.create_object(
            {
                a.CLASS: pkcs11.ObjectClass.DATA,
                a.TOKEN: True,
                a.PRIVATE: True,
                a.MODIFIABLE: True,
                a.APPLICATION: ATC_APPLICATION,
                a.VALUE: ident + label.encode(),
                a.LABEL: value,
            }
        )
    return store._uri("data", ident, None)


def test_older_one_object_counter_reads_advances_and_upgrades(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    import pkcs11

    counter = _legacy_counter(store, auth, "old/atc", "7")
    (legacy,) = _objects(store)
    assert store.counter_value(counter, auth) == 7
    assert store.counter_increment(counter, auth) == 8  # a second, checked object (slot 1)
    assert len(_objects(store)) == 2 and legacy[pkcs11.Attribute.LABEL] == "7"
    assert _fresh(softhsm_token, counter, auth) == 8
    assert store.counter_increment(counter, auth) == 9  # the old object is slot 0 now
    assert legacy[pkcs11.Attribute.LABEL].startswith("9:")
    with _open(softhsm_token) as other:
        assert other.counter_value(counter, auth) == 9
        assert other.counter_increment(counter, auth) == 10
        counters = [k for k in other.list_keys(auth) if k.kind is KeyKind.COUNTER]
        assert [(k.uri, k.label) for k in counters] == [(counter, "old/atc")]
    # Now checked: a bare decimal in the old object no longer counts.
    legacy[pkcs11.Attribute.LABEL] = "500"
    assert _fresh(softhsm_token, counter, auth) == 10
    store.delete_key(counter, auth)
    assert _objects(store) == []


def test_older_counter_upgrade_torn_keeps_the_old_value(
    store: Pkcs11KeyStore, auth: Authorization, softhsm_token: SoftHsmToken
) -> None:
    counter = _legacy_counter(store, auth, "old/atc", "7", "1")  # duplicates: the highest counts
    assert _fresh(softhsm_token, counter, auth) == 7
    assert store.counter_increment(counter, auth) == 8
    import pkcs11

    (new,) = [o for o in _objects(store) if bytes(o[pkcs11.Attribute.VALUE])[16:17] == b"\0"]
    new.destroy()  # the first write of the new scheme was torn: only 8 is lost
    assert _fresh(softhsm_token, counter, auth) == 7
    assert store.counter_increment(counter, auth) == 8
    assert store.counter_increment(counter, auth) == 9
    assert _fresh(softhsm_token, counter, auth) == 9
    store.delete_key(counter, auth)
    assert _objects(store) == []


def test_a_broken_token_does_not_hide_the_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SoftHSM rewrites token.object in place at every C_Login: a kill there leaves it
    empty and that token is lost. In a process that had seen it, C_GetTokenInfo on its
    slot then fails: the other tokens must still be found. (A fresh SoftHSM
    configuration in a child process, so the broken token stays out of the session's.)"""
    script = (
        "import sys, pathlib\n"
        "from hsm_auth.testing.softhsm import softhsm_environment, init_token\n"
        "from hsm_auth_backends.pkcs11 import Pkcs11KeyStore\n"
        "from hsm_auth.keystore import Authorization\n"
        "with softhsm_environment(sys.argv[1]) as env:\n"
        "    good = init_token('good', so_pin='12345678', user_pin='1234')\n"
        "    bad = init_token('bad', so_pin='12345678', user_pin='1234')\n"
        "    for t in (good, bad):\n"
        "        Pkcs11KeyStore.open({'uri': t.uri}).close()\n"
        "    for f in env.token_dir.glob('*/token.object'):\n"
        "        if b'bad' in f.read_bytes():\n"
        "            f.write_bytes(b'')\n"
        "    with Pkcs11KeyStore.open({'uri': good.uri}) as s:\n"
        "        print(s.counter_increment(s.create_counter('c', Authorization(pin='1234')),"
        " Authorization()))\n"
    )
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"]
