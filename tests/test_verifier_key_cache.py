"""The file verifier's cache of opened OTP keys: bounded by bytes, least
recently used out first, and giving the same MACs as opening afresh; the file
keys' per-offer agreement keys and sealed OTP keys."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec
from hsm_auth.errors import DecodeError, InvalidInput, StateError
from hsm_auth.key_transport import wrap_otp_key
from hsm_auth.methods import Method
from hsm_auth.store import CredentialRecord
from hsm_auth.verifier_keys import FileVerifierKeys, OtpKeyCache

ENTRY = OtpKeyCache.cost(b"a" + bytes(33), bytes(32))
#: What one sealed OTP key's cache entry costs (file keys cache by the 60-byte sealed blob).
SEALED_ENTRY = OtpKeyCache.cost(bytes(60), bytes(32))


def held_cost(cache: OtpKeyCache) -> int:
    return sum(OtpKeyCache.cost(k, v) for k, v in cache._entries.items())


def test_the_bound_holds_at_every_step_and_counts_what_is_held():
    cache = OtpKeyCache(10 * ENTRY)
    for i in range(1000):
        cache.put(b"a" + i.to_bytes(33, "big"), os.urandom(32))
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes == held_cost(cache)
    assert len(cache) == 10


def test_least_recently_used_goes_first():
    cache = OtpKeyCache(3 * ENTRY)
    keys = [b"a" + bytes([i]) * 33 for i in range(4)]
    for k in keys[:3]:
        cache.put(k, k[1:33])
    assert cache.get(keys[0]) == keys[0][1:33]  # now the most recent
    cache.put(keys[3], keys[3][1:33])
    assert cache.get(keys[1]) is None  # the least recently used left
    assert [cache.get(k) is not None for k in (keys[0], keys[2], keys[3])] == [True] * 3


def test_replacing_an_entry_is_not_counted_twice():
    cache = OtpKeyCache(4 * ENTRY)
    for _ in range(100):
        cache.put(b"a" + bytes(33), os.urandom(32))
    assert len(cache) == 1 and cache.nbytes == ENTRY


def test_an_entry_larger_than_the_budget_and_a_zero_budget_cache_nothing():
    small = OtpKeyCache(ENTRY - 1)
    small.put(b"a" + bytes(33), bytes(32))
    assert len(small) == 0 and small.nbytes == 0
    off = OtpKeyCache(0)
    off.put(b"a" + bytes(33), bytes(32))
    assert off.get(b"a" + bytes(33)) is None
    with pytest.raises(InvalidInput):
        OtpKeyCache(-1)


def test_bigger_values_take_more_of_the_budget():
    cache = OtpKeyCache(100_000)
    cache.put(b"w" + bytes(1000), bytes(32))
    assert cache.nbytes == OtpKeyCache.cost(b"w" + bytes(1000), bytes(32)) > ENTRY + 900


def test_concurrent_use_keeps_the_bound():
    cache = OtpKeyCache(50 * ENTRY)

    def work(seed: int) -> None:
        for i in range(2000):
            key = b"a" + (seed * 10_000 + i % 120).to_bytes(33, "big")
            if cache.get(key) is None:
                cache.put(key, os.urandom(32))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == held_cost(cache) <= cache.max_bytes
    assert len(cache) == 50


# --- FileVerifierKeys uses it ---------------------------------------------------

OFFER = b"O" * 16


def _keys(cache_bytes: int) -> FileVerifierKeys:
    return FileVerifierKeys(
        cec.generate_private_key(ec.CURVE), cec.generate_private_key(ec.CURVE),
        cache_bytes=cache_bytes,
    )


def _credential(
    agreement: bytes | None, wrapped: bytes | None, *, user: str = "u"
) -> CredentialRecord:
    return CredentialRecord(
        user, Method.DEVICE, "test", b"\x02" + bytes(32), agreement, wrapped,
        "OCRA-1:HOTP-SHA256-8:C-QH64", 0, 0,
    )


def _sealed(
    keys: FileVerifierKeys, cred: CredentialRecord, offer: bytes = OFFER
) -> CredentialRecord:
    return dataclasses.replace(cred, sealed_otp_key=keys.seal(offer, cred))


def test_file_keys_cache_at_most_their_budget_and_give_the_same_macs():
    keys = _keys(20 * SEALED_ENTRY)
    data = b"ocra data input"
    devices = [cec.generate_private_key(ec.CURVE) for _ in range(60)]
    offer_key = keys.offer_key(OFFER, 0)
    creds = [_sealed(keys, _credential(ec.encode_point(d.public_key()), None)) for d in devices]
    expected = [
        hmac.digest(d.exchange(cec.ECDH(), offer_key), data, hashlib.sha256) for d in devices
    ]
    for _ in range(2):  # misses, then (for the last 20) hits
        for cred, want in zip(creds, expected, strict=True):
            assert keys.otp_mac(cred, data) == want
            assert keys.otp_keys.nbytes <= 20 * SEALED_ENTRY
    assert len(keys.otp_keys) == 20
    keys.close()
    assert len(keys.otp_keys) == 0


def test_file_keys_open_wrapped_keys_too_and_cache_never_a_bad_one():
    keys = _keys(10 * SEALED_ENTRY)
    otp_key = os.urandom(32)
    cred = _sealed(keys, _credential(None, wrap_otp_key(otp_key, keys.offer_key(OFFER, 0))))
    data = b"x"
    for _ in range(3):
        assert keys.otp_mac(cred, data) == hmac.digest(otp_key, data, hashlib.sha256)
    assert len(keys.otp_keys) == 1
    bad = bytearray(cred.sealed_otp_key or b"")
    bad[-1] ^= 1
    with pytest.raises(StateError, match="does not open"):
        keys.otp_mac(dataclasses.replace(cred, sealed_otp_key=bytes(bad)), data)
    assert len(keys.otp_keys) == 1
    # A wrapped key made for another offer's key does not open: no seal.
    other = _credential(None, wrap_otp_key(otp_key, keys.offer_key(b"P" * 16, 0)))
    with pytest.raises(DecodeError, match="does not unwrap"):
        keys.seal(OFFER, other)


def test_each_offer_has_its_own_key_derived_again_from_the_root_secret(tmp_path):
    keys = FileVerifierKeys.create(tmp_path / "keys.pem")
    first, second = keys.offer_key(OFFER, 0), keys.offer_key(b"P" * 16, 0)
    assert ec.encode_point(first) != ec.encode_point(second)
    again = FileVerifierKeys.load(tmp_path / "keys.pem")
    assert ec.encode_point(again.offer_key(OFFER, 0)) == ec.encode_point(first)
    assert keys.offer_keys() == [] and keys.drop_offer_key(OFFER) is None  # nothing held
    device = cec.generate_private_key(ec.CURVE)
    cred = _sealed(keys, _credential(ec.encode_point(device.public_key()), None))
    assert again.otp_mac(cred, b"d") == hmac.digest(
        device.exchange(cec.ECDH(), first), b"d", hashlib.sha256
    )


def test_a_sealed_key_opens_only_in_its_own_credential():
    keys = _keys(0)
    device = cec.generate_private_key(ec.CURVE)
    cred = _sealed(keys, _credential(ec.encode_point(device.public_key()), None))
    assert len(cred.sealed_otp_key or b"") == 60
    for moved in (
        dataclasses.replace(cred, user="mallory"),
        dataclasses.replace(cred, method=Method.PIN),
        dataclasses.replace(cred, signing_key=b"\x03" + bytes(32)),
        dataclasses.replace(cred, agreement_key=ec.encode_point(
            cec.generate_private_key(ec.CURVE).public_key())),
    ):
        with pytest.raises(StateError, match="does not open"):
            keys.otp_mac(moved, b"d")
    with pytest.raises(StateError, match="no sealed OTP key"):
        keys.otp_mac(dataclasses.replace(cred, sealed_otp_key=None), b"d")


def test_cache_off_still_verifies():
    keys = _keys(0)
    device = cec.generate_private_key(ec.CURVE)
    cred = _sealed(keys, _credential(ec.encode_point(device.public_key()), None))
    want = hmac.digest(
        device.exchange(cec.ECDH(), keys.offer_key(OFFER, 0)), b"d", hashlib.sha256
    )
    assert keys.otp_mac(cred, b"d") == keys.otp_mac(cred, b"d") == want
    assert len(keys.otp_keys) == 0
