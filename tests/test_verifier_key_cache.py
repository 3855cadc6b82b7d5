"""The file verifier's cache of derived OTP keys: bounded by bytes, least
recently used out first, and giving the same MACs as deriving afresh."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec
from hsm_auth.errors import DecodeError, InvalidInput
from hsm_auth.key_transport import wrap_otp_key
from hsm_auth.methods import Method
from hsm_auth.store import CredentialRecord
from hsm_auth.verifier_keys import FileVerifierKeys, OtpKeyCache

ENTRY = OtpKeyCache.cost(b"a" + bytes(33), bytes(32))


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


def _keys(cache_bytes: int) -> FileVerifierKeys:
    return FileVerifierKeys(
        cec.generate_private_key(ec.CURVE), cec.generate_private_key(ec.CURVE),
        cache_bytes=cache_bytes,
    )


def _credential(agreement: bytes | None, wrapped: bytes | None) -> CredentialRecord:
    return CredentialRecord(
        "u", Method.DEVICE, "test", b"", agreement, wrapped, "OCRA-1:HOTP-SHA256-8:C-QH64", 0, 0
    )


def test_file_keys_cache_at_most_their_budget_and_give_the_same_macs():
    keys = _keys(20 * ENTRY)
    data = b"ocra data input"
    devices = [cec.generate_private_key(ec.CURVE) for _ in range(60)]
    creds = [_credential(ec.encode_point(d.public_key()), None) for d in devices]
    expected = [
        hmac.digest(d.exchange(cec.ECDH(), keys.agreement_public), data, hashlib.sha256)
        for d in devices
    ]
    for _ in range(2):  # misses, then (for the last 20) hits
        for cred, want in zip(creds, expected, strict=True):
            assert keys.otp_mac(cred, data) == want
            assert keys.otp_keys.nbytes <= 20 * ENTRY
    assert len(keys.otp_keys) == 20
    keys.close()
    assert len(keys.otp_keys) == 0


def test_file_keys_cache_unwrapped_keys_too_and_never_a_bad_one():
    keys = _keys(10 * ENTRY)
    otp_key = os.urandom(32)
    cred = _credential(None, wrap_otp_key(otp_key, keys.agreement_public))
    data = b"x"
    for _ in range(3):
        assert keys.otp_mac(cred, data) == hmac.digest(otp_key, data, hashlib.sha256)
    assert len(keys.otp_keys) == 1
    bad = bytearray(cred.wrapped_otp_key or b"")
    bad[-1] ^= 1
    with pytest.raises(DecodeError, match="does not unwrap"):
        keys.otp_mac(_credential(None, bytes(bad)), data)
    assert len(keys.otp_keys) == 1


def test_cache_off_still_verifies():
    keys = _keys(0)
    device = cec.generate_private_key(ec.CURVE)
    cred = _credential(ec.encode_point(device.public_key()), None)
    want = hmac.digest(device.exchange(cec.ECDH(), keys.agreement_public), b"d", hashlib.sha256)
    assert keys.otp_mac(cred, b"d") == keys.otp_mac(cred, b"d") == want
    assert len(keys.otp_keys) == 0
