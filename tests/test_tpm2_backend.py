"""The TPM2 backend on a real software TPM (swtpm), started per test in a temp dir."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from hsm_auth_backends.tpm2 import Tpm2EcPrivateKey, Tpm2KeyStore

from hsm_auth.cli import describe
from hsm_auth.errors import (
    BackendError,
    BackendUnavailable,
    InvalidInput,
    KeyNotFound,
    LoginRequired,
    PinInvalid,
    PinLocked,
    PinRequired,
    TokenNotFound,
)
from hsm_auth.keystore import Authorization, Capability, KeyKind
from hsm_auth.methods import Method
from hsm_auth.registry import load_backend, probe_backend
from hsm_auth.testing.contract import KeyStoreContract, verify_signature
from hsm_auth.testing.swtpm import (  # noqa: F401 - pytest fixtures
    SwtpmProcess,
    running_swtpm,
    set_da_parameters,
    swtpm,
    swtpm_available,
    swtpm_tcti,
)

pytestmark = pytest.mark.swtpm

_REASON = swtpm_available()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

PIN = Authorization(pin="tpm-pin-4711")
WRONG = Authorization(pin="0000")
NONE = Authorization()


def _tools_env(tcti: str) -> dict[str, str]:
    return {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"}


def _tool(tcti: str, *argv: str) -> str:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} not installed (tpm2-tools)")
    done = subprocess.run(
        argv, env=_tools_env(tcti), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def open_store(swtpm: SwtpmProcess, state_dir: Path) -> Iterator[Any]:
    """A factory for stores on the test's swtpm; closes them all at the end."""
    opened: list[Tpm2KeyStore] = []

    def factory(**settings: Any) -> Tpm2KeyStore:
        store = Tpm2KeyStore.open({"tcti": swtpm.tcti, "state_dir": str(state_dir), **settings})
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Any) -> Tpm2KeyStore:
    store: Tpm2KeyStore = open_store()
    return store


def _enroll_otp(store: Tpm2KeyStore, auth: Authorization) -> tuple[str, bytes]:
    """An OTP key derived with a Python peer; returns its URI and the key the verifier has."""
    agreement = store.generate_key("t/ecdh", KeyKind.AGREEMENT, auth)
    verifier = ec.generate_private_key(ec.SECP256R1())
    otp = store.derive_otp_key("t/otp", agreement, verifier.public_key(), auth)
    return otp, verifier.exchange(ec.ECDH(), store.public_key(agreement, auth))


# --- the shared contract ---------------------------------------------------------


class _Tpm2Contract(KeyStoreContract):
    expected_capabilities = frozenset(
        {
            Capability.SIGN,
            Capability.HMAC,
            Capability.ECDH_DERIVE,
            Capability.COUNTER,
            Capability.HARDWARE_COUNTER,
            Capability.PIN,
            Capability.PIN_RETRY_LIMIT,
        }
    )

    @pytest.fixture
    def reopen(self, open_store: Any) -> Any:
        return open_store

    # A TPM_NT_COUNTER starts at the highest value any counter on this TPM ever
    # had (TPM 2.0 Part 1, 37.2.4), never at 0, and the backend reports the
    # real value (the verifier is sent the initial ATC). The three contract
    # tests that expect 0 are restated with "starts at its initial value".

    def test_counter_starts_at_zero_and_increments_strictly(
        self, store: Tpm2KeyStore, auth: Authorization
    ) -> None:
        counter = store.create_counter("contract-atc", auth)
        start = store.counter_value(counter, auth)
        assert start >= 0
        seen = [store.counter_increment(counter, auth) for _ in range(5)]
        assert seen == list(range(start + 1, start + 6))  # strictly, and by one on a TPM
        assert store.counter_value(counter, auth) == seen[-1]

    def test_counters_are_independent(self, store: Tpm2KeyStore, auth: Authorization) -> None:
        first = store.create_counter("contract-atc-a", auth)
        second = store.create_counter("contract-atc-b", auth)
        assert first != second
        initial = store.counter_value(second, auth)
        value = store.counter_increment(first, auth)
        assert store.counter_value(first, auth) == value
        assert store.counter_value(second, auth) == initial

    def test_enroll_otp_matches_verifier_ecdh(
        self, store: Tpm2KeyStore, auth: Authorization
    ) -> None:
        verifier = ec.generate_private_key(ec.SECP256R1())
        enrollment = store.enroll(
            self.enroll_method, "contract-enroll", verifier.public_key(), auth
        )
        assert enrollment.agreement_public is not None
        shared = verifier.exchange(ec.ECDH(), enrollment.agreement_public)
        data = b"ocra data input"
        expected = hmac.new(shared, data, hashlib.sha256).digest()
        assert store.hmac(enrollment.otp_key, data, auth) == expected
        assert enrollment.initial_atc == store.counter_value(enrollment.counter, auth)
        signature = store.sign(enrollment.signing_key, data, auth)
        verify_signature(enrollment.signing_public, signature, data)
        store.unenroll(enrollment, auth)
        with pytest.raises(KeyNotFound):
            store.hmac(enrollment.otp_key, data, auth)


class TestTpm2ContractPin(_Tpm2Contract):
    """The ``pin`` method: every object's auth value is the offline PIN."""

    enroll_method = Method.PIN

    @pytest.fixture
    def auth(self) -> Authorization:
        return PIN


class TestTpm2ContractDevice(_Tpm2Contract):
    """The ``device`` method: empty auth values (still DA-protected)."""

    enroll_method = Method.DEVICE

    @pytest.fixture
    def auth(self) -> Authorization:
        return NONE


# --- registry, probe, bad input -------------------------------------------------


def test_registered_under_entry_point() -> None:
    assert load_backend("tpm2") is Tpm2KeyStore


def test_probe_reports_tpm_details(swtpm_tcti: str) -> None:
    status = probe_backend("tpm2", {"tcti": swtpm_tcti})
    assert status.available, status.reason
    assert status.details["manufacturer"] == "IBM"  # swtpm reports IBM's vendor id
    assert status.details["max_auth_fail"] == "3"  # set by the fixture
    assert status.details["lockout_interval"] == "2 s"
    assert status.details["firmware"].count(".") == 3
    assert status.details["resource_manager"].startswith("no (one client at a time")


@pytest.mark.parametrize(
    ("tcti", "error"),
    [
        ("swtpm:path=/nonexistent/tpm.sock", TokenNotFound),
        ("device:/dev/nonexistent-tpm", TokenNotFound),
        ("no-such-tcti:x", BackendUnavailable),
    ],
)
def test_wrong_tcti_is_one_line_unavailable(
    tcti: str, error: type[Exception], tmp_path: Path
) -> None:
    with pytest.raises(error) as probe_err:
        Tpm2KeyStore.probe({"tcti": tcti})
    with pytest.raises(error) as open_err:
        Tpm2KeyStore.open({"tcti": tcti, "state_dir": str(tmp_path)})
    for err in (probe_err.value, open_err.value):
        assert "\n" not in str(err) and tcti in str(err)
        assert isinstance(err, BackendUnavailable) and err.native_code is not None


def test_tcti_from_environment(
    swtpm_tcti: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:path=/nonexistent/tpm.sock")
    monkeypatch.setenv("HSM_AUTH_TCTI", swtpm_tcti)  # wins over TPM2TOOLS_TCTI
    assert Tpm2KeyStore.probe({})["tcti"] == swtpm_tcti
    monkeypatch.delenv("HSM_AUTH_TCTI")
    with pytest.raises(TokenNotFound):
        Tpm2KeyStore.probe({})


def test_capabilities(store: Tpm2KeyStore) -> None:
    assert store.capabilities() >= {
        Capability.SIGN,
        Capability.HMAC,
        Capability.ECDH_DERIVE,
        Capability.COUNTER,
        Capability.HARDWARE_COUNTER,
        Capability.PIN,
        Capability.PIN_RETRY_LIMIT,
    }


# --- keys -------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [PIN, NONE], ids=["pin", "device"])
def test_sign_verifies_with_public_key(store: Tpm2KeyStore, auth: Authorization) -> None:
    uri = store.generate_key("t/sign", KeyKind.SIGNING, auth)
    assert uri.startswith("tpm2:") and "type=private" in uri and "tcti=swtpm" in uri
    public = store.public_key(uri, auth)
    for message in (b"", b"hello", os.urandom(5000)):
        public.verify(store.sign(uri, message, auth), message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(store.sign(uri, b"a", auth), b"b", ec.ECDSA(hashes.SHA256()))


def test_private_key_signs_a_csr_in_the_tpm(store: Tpm2KeyStore) -> None:
    uri = store.generate_key("t/sign", KeyKind.SIGNING, PIN)
    key = store.private_key(uri, PIN)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key, Tpm2EcPrivateKey)
    assert key.curve.name == "secp256r1" and key.key_size == 256
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tpm2 test")]))
        .sign(key, hashes.SHA256())
    )
    assert csr.is_signature_valid
    assert csr.public_key() == store.public_key(uri, PIN)
    digest = hashlib.sha256(b"prehashed").digest()
    signature = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    key.public_key().verify(signature, b"prehashed", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(BackendError):
        key.sign(b"x", ec.ECDSA(hashes.SHA384()))
    with pytest.raises(BackendError):
        key.private_numbers()


@pytest.mark.parametrize("auth", [PIN, NONE], ids=["pin", "device"])
@pytest.mark.parametrize("size", [0, 1, 64, 1024, 1025, 2048, 3000])
def test_hmac_equals_python_hmac(store: Tpm2KeyStore, auth: Authorization, size: int) -> None:
    otp, key = _enroll_otp(store, auth)
    data = os.urandom(size)
    assert store.hmac(otp, data, auth) == hmac.new(key, data, hashlib.sha256).digest()


def test_private_key_exchange_matches_python(store: Tpm2KeyStore) -> None:
    uri = store.generate_key("t/ecdh", KeyKind.AGREEMENT, PIN)
    peer = ec.generate_private_key(ec.SECP256R1())
    shared = store.private_key(uri, PIN).exchange(ec.ECDH(), peer.public_key())
    assert shared == peer.exchange(ec.ECDH(), store.public_key(uri, PIN))


def test_state_files_are_private_and_hold_no_plain_secret(
    store: Tpm2KeyStore, state_dir: Path
) -> None:
    _, key = _enroll_otp(store, PIN)
    files = sorted(state_dir.glob("*.json"))
    assert len(files) == 2
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        text = path.read_text()
        assert key.hex() not in text and "pin-4711" not in text and b"pin-4711".hex() not in text
    assert state_dir.stat().st_mode & 0o777 == 0o700
    left = [p for p in state_dir.iterdir() if p.suffix != ".json"]
    assert [p.name.startswith(".clients-") and p.suffix == ".lock" for p in left] == [True]
    assert left[0].stat().st_mode & 0o777 == 0o600  # the lock file; no temp files left


def test_list_and_delete(store: Tpm2KeyStore) -> None:
    sign = store.generate_key("t/sign", KeyKind.SIGNING, PIN)
    otp, _ = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    listed = {k.uri: (k.kind, k.label) for k in store.list_keys(PIN)}
    assert listed[sign] == (KeyKind.SIGNING, "t/sign")
    assert listed[otp] == (KeyKind.OTP, "t/otp")
    assert listed[counter] == (KeyKind.COUNTER, "t/atc")
    for uri in (sign, otp, counter):
        store.delete_key(uri, PIN)
        store.delete_key(uri, PIN)  # absent: not an error
    assert {k.label for k in store.list_keys(PIN)} == {"t/ecdh"}
    with pytest.raises(BackendError):
        store.sign(sign, b"x", PIN)


def test_bad_uris(store: Tpm2KeyStore) -> None:
    sign = store.generate_key("t/sign", KeyKind.SIGNING, PIN)
    with pytest.raises(InvalidInput):
        store.hmac(sign, b"x", PIN)  # a signing key is not an OTP key
    with pytest.raises(InvalidInput):
        store.sign("pkcs11:object=x", b"x", PIN)
    with pytest.raises(InvalidInput):
        store.sign("tpm2:id=../../etc/passwd", b"x", PIN)
    with pytest.raises(InvalidInput):
        store.generate_key("t/otp", KeyKind.OTP, PIN)


# --- the SRK ------------------------------------------------------------------------


def test_storage_key_reused_from_persistent_handle(swtpm: SwtpmProcess, open_store: Any) -> None:
    from hsm_auth_backends.tpm2 import SRK_PERSISTENT_HANDLE, _srk_template
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC

    first = open_store()
    uri = first.generate_key("t/sign", KeyKind.SIGNING, PIN)
    first.close()
    with ESAPI(swtpm.tcti) as ectx:
        primary, *_ = ectx.create_primary(
            None, TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER
        )
        ectx.evict_control(ESYS_TR.OWNER, primary, SRK_PERSISTENT_HANDLE)
        ectx.flush_context(primary)
    second = open_store()
    second.sign(uri, b"x", PIN)  # the blob loads under the persistent SRK: same key
    assert second._srk_persistent


# --- a previous client's leftovers (no resource manager) -----------------------------


def _handles_in_tpm(tcti: str) -> dict[str, list[int]]:
    """Transient objects, loaded and saved sessions, read directly with tpm2-pytss."""
    from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HR, TPM2_HT

    kinds = {
        "transient": TPM2_HT.TRANSIENT,
        "loaded-session": TPM2_HT.LOADED_SESSION,
        "saved-session": TPM2_HT.SAVED_SESSION,
    }
    with ESAPI(tcti) as ectx:
        out = {}
        for name, kind in kinds.items():
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, kind << TPM2_HR.SHIFT, 64)
            out[name] = [int(h) for h in data.data.handles]
    return out


def _leave_the_tpm_full(tcti: str) -> None:
    """What a killed client leaves: every object slot taken (one by an HMAC sequence,
    which has no public area to read), and sessions both loaded and saved."""
    from hsm_auth_backends.tpm2 import _srk_template
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_AUTH, TPM2B_PUBLIC

    ectx = ESAPI(tcti)
    for _ in range(2):
        ectx.create_primary(None, TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER)
    ectx.hash_sequence_start(TPM2B_AUTH(b""), TPM2_ALG.SHA256)
    saved = ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, "aes128cfb", TPM2_ALG.SHA256
    )
    ectx.context_save(saved)  # a saved session holds no session slot, only a context
    for _ in range(3):  # every session slot (swtpm has three)
        ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, "aes128cfb", TPM2_ALG.SHA256
        )
    ectx.close()  # the connection ends; without a resource manager nothing is flushed


def test_open_flushes_what_a_previous_client_left(swtpm: SwtpmProcess, open_store: Any) -> None:
    _leave_the_tpm_full(swtpm.tcti)
    left = _handles_in_tpm(swtpm.tcti)
    assert len(left["transient"]) == 3 and left["loaded-session"] and left["saved-session"]
    store = open_store()
    otp, key = _enroll_otp(store, PIN)  # PIN: a salted HMAC session as well as objects
    assert store.hmac(otp, b"m", PIN) == hmac.new(key, b"m", hashlib.sha256).digest()
    store.close()
    assert _handles_in_tpm(swtpm.tcti) == {
        "transient": [],
        "loaded-session": [],
        "saved-session": [],
    }


def test_open_never_flushes_a_live_store(swtpm: SwtpmProcess, open_store: Any) -> None:
    first = open_store()
    otp, key = _enroll_otp(first, PIN)
    assert first.hmac(otp, b"m", PIN) == hmac.new(key, b"m", hashlib.sha256).digest()
    held = _handles_in_tpm(swtpm.tcti)
    assert held["transient"] and held["loaded-session"]  # the SRK, the OTP key, a session
    second = open_store()  # the first is live: nothing of it is flushed
    assert _handles_in_tpm(swtpm.tcti) == held
    assert first.hmac(otp, b"m", PIN) == hmac.new(key, b"m", hashlib.sha256).digest()
    second.close()
    first.close()
    _leave_the_tpm_full(swtpm.tcti)
    third = open_store()  # no live store any more: the leftovers go
    assert third.hmac(otp, b"m", PIN) == hmac.new(key, b"m", hashlib.sha256).digest()


def test_the_client_lock_file_is_never_followed_through_a_symlink(
    swtpm: SwtpmProcess, state_dir: Path, tmp_path: Path
) -> None:
    from hsm_auth.errors import StateError

    first = Tpm2KeyStore.open({"tcti": swtpm.tcti, "state_dir": str(state_dir)})
    first.close()
    (lock,) = state_dir.glob(".clients-*.lock")
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="symbolic link"):
        Tpm2KeyStore.open({"tcti": swtpm.tcti, "state_dir": str(state_dir)})
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("tcti", "manager"),
    [
        ("device:/dev/tpmrm0", True),
        ("device:/dev/tpmrm1", True),
        ("tabrmd", True),
        ("tabrmd:bus_name=com.intel.tss2.Tabrmd", True),
        ("libtss2-tcti-tabrmd.so.0:", True),
        ("device:/dev/tpm0", False),
        ("device", False),
        ("swtpm:path=/tmp/x/tpm.sock", False),
        ("swtpm:port=2321", False),
        ("mssim:host=localhost,port=2321", False),
        ("libtss2-tcti-mssim.so.0:port=2321", False),
    ],
)
def test_which_tctis_have_a_resource_manager(tcti: str, manager: bool) -> None:
    from hsm_auth_backends.tpm2 import has_resource_manager

    assert has_resource_manager(tcti) is manager


# --- the counter -------------------------------------------------------------------


def test_counter_increments_by_one(store: Tpm2KeyStore) -> None:
    counter = store.create_counter("t/atc", PIN)
    assert "nv-index=0x01" in counter and "type=data" in counter
    start = store.counter_value(counter, PIN)
    assert start >= 1  # a TPM counter starts at the highest value it ever had
    assert [store.counter_increment(counter, PIN) for _ in range(3)] == [
        start + 1,
        start + 2,
        start + 3,
    ]
    assert store.counter_value(counter, PIN) == start + 3


def test_counter_survives_restart_and_never_repeats(swtpm: SwtpmProcess, open_store: Any) -> None:
    store = open_store()
    otp, key = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    seen = [store.counter_increment(counter, PIN) for _ in range(3)]
    store.close()
    swtpm.restart()
    store = open_store()  # a new SRK handle, same seed: the blobs still load
    assert store.counter_value(counter, PIN) == seen[-1]
    value, mac = store.counted_hmac(otp, counter, lambda c: c.to_bytes(8, "big"), PIN)
    assert value > seen[-1]
    assert mac == hmac.new(key, value.to_bytes(8, "big"), hashlib.sha256).digest()


def test_crash_after_increment_skips_but_never_repeats(
    swtpm: SwtpmProcess, open_store: Any
) -> None:
    store = open_store()
    otp, _ = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    released = store.counter_increment(counter, PIN)
    swtpm.kill()  # power cut after the increment, before the HMAC
    store.close()
    swtpm.start()
    store = open_store()
    after = store.counter_increment(counter, PIN)
    assert after > released
    store.hmac(otp, b"m", PIN)


def test_counter_on_another_tpm_is_not_found(swtpm: SwtpmProcess, open_store: Any) -> None:
    store = open_store()
    counter = store.create_counter("t/atc", PIN)
    store.close()
    with running_swtpm() as other:
        moved = Tpm2KeyStore.open({"tcti": other.tcti, "state_dir": str(store.state_dir)})
        try:
            with pytest.raises(BackendError, match="not in this TPM"):
                moved.counter_increment(counter, PIN)
        finally:
            moved.close()


def test_counted_hmac_finds_both_objects_before_the_counter_moves(
    store: Tpm2KeyStore, state_dir: Path
) -> None:
    otp, _ = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    value = store.counter_value(counter, PIN)
    state_dir.joinpath(otp.split("id=")[1][:16] + ".json").unlink()
    fresh = Tpm2KeyStore.open({"tcti": store.tcti, "state_dir": str(state_dir)})
    try:
        with pytest.raises(KeyNotFound):
            fresh.counted_hmac(otp, counter, lambda c: b"m", PIN, limit=value + 5)
        assert fresh.counter_value(counter, PIN) == value  # no value spent
    finally:
        fresh.close()


_OPENED: list[str] | None = None


def _count_opens(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


def test_an_otp_reads_each_state_file_once_per_open_store(
    store: Tpm2KeyStore, state_dir: Path
) -> None:
    """Seen through the interpreter's audit events: the first OTP of an open store
    reads the OTP key's and the counter's state files once each, later ones none."""
    global _OPENED
    import sys

    sys.addaudithook(_count_opens)  # audit hooks stay for the process: gated by _OPENED
    otp, key = _enroll_otp(store, NONE)
    counter = store.create_counter("t/atc", NONE)
    store.close()
    reopened = Tpm2KeyStore.open({"tcti": store.tcti, "state_dir": str(state_dir)})
    try:
        reads = []
        for _ in range(3):
            _OPENED = []
            value, mac = reopened.counted_hmac(
                otp, counter, lambda c: c.to_bytes(8, "big"), NONE, limit=2**40
            )
            reads.append(sorted(p for p in _OPENED if p.endswith(".json")))
            _OPENED = None
            assert mac == hmac.new(key, value.to_bytes(8, "big"), hashlib.sha256).digest()
        ids = sorted(str(state_dir / (u.split("id=")[1][:16] + ".json")) for u in (otp, counter))
        assert reads == [ids, [], []]
    finally:
        _OPENED = None
        reopened.close()


def test_limit_check_falls_back_when_the_owner_has_a_password(
    swtpm: SwtpmProcess, open_store: Any
) -> None:
    """The limit check reads the counter as the owner with an empty password; on a TPM
    whose owner has one (not configured here) that is refused with no DA failure
    counted, and the store reads with the index's own auth (the PIN) instead."""
    from hsm_auth_backends.tpm2 import SRK_PERSISTENT_HANDLE, _srk_template
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_AUTH, TPM2B_PUBLIC

    store = open_store()
    otp, key = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    store.close()
    with ESAPI(swtpm.tcti) as ectx:  # the SRK at its persistent handle needs no owner auth
        primary, *_ = ectx.create_primary(
            None, TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER
        )
        ectx.evict_control(ESYS_TR.OWNER, primary, SRK_PERSISTENT_HANDLE)
        ectx.flush_context(primary)
        ectx.hierarchy_change_auth(ESYS_TR.OWNER, TPM2B_AUTH(b"owner-password"))
    store = open_store()
    for _ in range(3):
        start = store.counter_value(counter, PIN)
        value, mac = store.counted_hmac(
            otp, counter, lambda c: c.to_bytes(8, "big"), PIN, limit=start + 1
        )
        assert value == start + 1
        assert mac == hmac.new(key, value.to_bytes(8, "big"), hashlib.sha256).digest()
        with pytest.raises(LoginRequired):
            store.counted_hmac(otp, counter, lambda c: b"m", PIN, limit=value)
    assert store.pin_status().retries_left == 3  # no failure counted
    assert not store._owner_reads  # it fell back, once


# --- PIN and dictionary-attack lockout ------------------------------------------------


def test_wrong_pins_then_lockout_then_recovery(store: Tpm2KeyStore) -> None:
    otp, key = _enroll_otp(store, PIN)
    device_key = store.generate_key("t/device", KeyKind.SIGNING, NONE)
    assert store.pin_status().retries_left == 3
    with pytest.raises(PinInvalid) as first:
        store.hmac(otp, b"m", WRONG)
    with pytest.raises(PinInvalid) as second:
        store.hmac(otp, b"m", WRONG)
    assert (first.value.retry.retries_left, second.value.retry.retries_left) == (2, 1)
    assert second.value.retry.final_try and "4711" not in str(second.value)
    assert describe(second.value) == "wrong PIN (1 retry left)"
    with pytest.raises(PinLocked):
        store.hmac(otp, b"m", WRONG)
    with pytest.raises(PinLocked) as locked:
        store.hmac(otp, b"m", PIN)  # even the right PIN
    wait = locked.value.retry.retry_after
    assert locked.value.retry.locked and wait is not None and 0 < wait <= 3
    assert describe(locked.value).endswith(f"(retry in {math.ceil(wait)} s)")
    assert "retry in" not in str(locked.value)
    assert str(locked.value) == "the TPM is in dictionary-attack lockout, caused by wrong PINs"
    status = store.pin_status()
    assert status.enforced and status.locked and status.retries_left == 0
    # The lockout is TPM-wide, but the empty-auth device key is noDA: it still works.
    verify_signature(store.public_key(device_key, NONE), store.sign(device_key, b"x", NONE), b"x")
    time.sleep(wait + 0.3)
    assert not store.pin_status().locked
    assert store.hmac(otp, b"m", PIN) == hmac.new(key, b"m", hashlib.sha256).digest()


def test_missing_pin_costs_no_attempt(store: Tpm2KeyStore) -> None:
    otp, _ = _enroll_otp(store, PIN)
    counter = store.create_counter("t/atc", PIN)
    with pytest.raises(PinRequired):
        store.hmac(otp, b"m", NONE)
    with pytest.raises(PinRequired):
        store.counter_increment(counter, NONE)
    assert store.pin_status().retries_left == 3


def test_wrong_pin_on_counter(store: Tpm2KeyStore) -> None:
    counter = store.create_counter("t/atc", PIN)
    value = store.counter_value(counter, PIN)
    with pytest.raises(PinInvalid):
        store.counter_increment(counter, WRONG)
    assert store.counter_value(counter, PIN) == value


def test_auth_setting(open_store: Any) -> None:
    with pytest.raises(PinRequired):
        open_store(auth="pin").generate_key("t/sign", KeyKind.SIGNING, NONE)
    device = open_store(auth="none")
    uri = device.generate_key("t/sign", KeyKind.SIGNING, PIN)  # PIN ignored: empty auth
    device.sign(uri, b"x", NONE)
    with pytest.raises(Exception, match="auth"):
        open_store(auth="bogus")


def _public_attributes(tcti: str, state_dir: Path) -> dict[str, Any]:
    """Every object's attributes as the TPM reports them (ReadPublic / NV_ReadPublic)."""
    from hsm_auth_backends.tpm2 import _srk_template
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PRIVATE, TPM2B_PUBLIC

    out: dict[str, Any] = {}
    with ESAPI(tcti) as ectx:
        srk, *_ = ectx.create_primary(None, TPM2B_PUBLIC(publicArea=_srk_template()), ESYS_TR.OWNER)
        for path in sorted(state_dir.glob("*.json")):
            record = json.loads(path.read_text())
            if record["kind"] == "counter":
                nv = ectx.tr_from_tpmpublic(int(record["nv_index"], 16))
                public, _ = ectx.nv_read_public(nv)
                out[record["label"]] = public.nvPublic.attributes
                continue
            handle = ectx.load(
                srk,
                TPM2B_PRIVATE.unmarshal(bytes.fromhex(record["private"]))[0],
                TPM2B_PUBLIC.unmarshal(bytes.fromhex(record["public"]))[0],
            )
            public, _, _ = ectx.read_public(handle)
            out[record["label"]] = public.publicArea.objectAttributes
            ectx.flush_context(handle)
        ectx.flush_context(srk)
    return out


def test_only_objects_without_an_auth_value_are_noda(
    swtpm: SwtpmProcess, open_store: Any, state_dir: Path
) -> None:
    """The public areas as the TPM reports them: every object and NV index made with
    the PIN is DA-protected, every one made with an empty auth value is noDA."""
    from tpm2_pytss import TPMA_NV, TPMA_OBJECT

    store = open_store()  # auth = "auto": the PIN, where one is given, is the auth value
    for name, auth in (("pin", PIN), ("device", NONE)):
        store.generate_key(f"{name}/sign", KeyKind.SIGNING, auth)
        agreement = store.generate_key(f"{name}/ecdh", KeyKind.AGREEMENT, auth)
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        store.derive_otp_key(f"{name}/otp", agreement, peer, auth)
        store.create_counter(f"{name}/atc", auth)
    store.close()
    attributes = _public_attributes(swtpm.tcti, state_dir)
    assert len(attributes) == 8
    for label, attrs in attributes.items():
        with_pin = label.startswith("pin/")
        if label.endswith("/atc"):
            assert bool(attrs & TPMA_NV.NO_DA) is not with_pin, label
            assert not attrs & TPMA_NV.ORDERLY, label
        else:
            assert bool(attrs & TPMA_OBJECT.NODA) is not with_pin, label
            assert attrs & TPMA_OBJECT.FIXEDTPM and attrs & TPMA_OBJECT.FIXEDPARENT, label


def test_the_dictionary_attack_rule_refuses_noda_with_an_auth_value() -> None:
    from hsm_auth_backends.tpm2 import _dictionary_attack_rule, _srk_template
    from tpm2_pytss import TPMA_NV, TPMA_OBJECT

    for no_da in (TPMA_OBJECT.NODA, TPMA_NV.NO_DA):
        with pytest.raises(BackendError, match="noDA"):
            _dictionary_attack_rule(no_da, no_da, b"1234")
        assert not _dictionary_attack_rule(0, no_da, b"1234") & no_da
        assert _dictionary_attack_rule(0, no_da, b"") & no_da
    assert _srk_template().objectAttributes & TPMA_OBJECT.NODA  # empty auth, as TCG's SRK


def test_old_da_protected_device_keys_name_the_lockout_and_its_end(
    open_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Device keys enrolled before the noDA rule are DA-protected: in a lockout that
    wrong PINs caused they fail with LockedOut, not "PIN locked", and say why and when."""
    from hsm_auth_backends import tpm2

    from hsm_auth.errors import LockedOut

    store = open_store()
    store._storage_key()  # the SRK as always (noDA), before the old rule applies
    monkeypatch.setattr(tpm2, "_dictionary_attack_rule", lambda attrs, no_da, value: attrs)
    old = store.enroll(Method.DEVICE, "old", ec.generate_private_key(ec.SECP256R1()).public_key(),
                       NONE)  # fmt: skip
    monkeypatch.undo()
    otp, _ = _enroll_otp(store, PIN)
    for _ in range(3):
        with pytest.raises((PinInvalid, PinLocked)):
            store.hmac(otp, b"m", WRONG)
    for use in (
        lambda: store.sign(old.signing_key, b"x", NONE),
        lambda: store.hmac(old.otp_key, b"m", NONE),
        lambda: store.counter_increment(old.counter, NONE),
    ):
        with pytest.raises(LockedOut) as err:
            use()
        assert not isinstance(err.value, PinLocked) and "PIN locked" not in describe(err.value)
        assert str(err.value) == "the TPM is in dictionary-attack lockout, caused by wrong PINs"
        wait = err.value.retry.retry_after
        assert err.value.retry.locked and wait is not None and 0 < wait <= 3
        assert describe(err.value) == (
            f"the TPM is in dictionary-attack lockout, caused by wrong PINs "
            f"(retry in {math.ceil(wait)} s)"
        )
        assert err.value.exit_code == 37


# --- another TPM, interop with tpm2-tools ----------------------------------------------


def test_blob_from_another_tpm_is_a_clear_backend_error(
    swtpm: SwtpmProcess, open_store: Any
) -> None:
    store = open_store()
    uri = store.generate_key("t/sign", KeyKind.SIGNING, PIN)
    store.close()
    with running_swtpm() as other:
        moved = Tpm2KeyStore.open({"tcti": other.tcti, "state_dir": str(store.state_dir)})
        try:
            with pytest.raises(BackendError, match="another TPM") as err:
                moved.sign(uri, b"x", PIN)
            assert not isinstance(err.value, BackendUnavailable)
            assert other.tcti not in uri  # the URI records the TPM it was made on
        finally:
            moved.close()


def test_tpm2_tools_read_the_key_and_the_counter(
    swtpm: SwtpmProcess, open_store: Any, state_dir: Path, tmp_path: Path
) -> None:
    store = open_store()
    sign = store.generate_key("t/sign", KeyKind.SIGNING, PIN)
    counter = store.create_counter("t/atc", PIN)
    value = store.counter_increment(counter, PIN)
    public = store.public_key(sign, PIN)
    store.close()  # swtpm serves one connection at a time
    tcti = swtpm.tcti
    assert "0x80" not in _tool(tcti, "tpm2_getcap", "handles-transient")  # close() flushed all
    record = json.loads(state_dir.joinpath(sign.split("id=")[1][:16] + ".json").read_text())
    (tmp_path / "key.pub").write_bytes(bytes.fromhex(record["public"]))
    (tmp_path / "key.priv").write_bytes(bytes.fromhex(record["private"]))
    _tool(tcti, "tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
          "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
          "-c", str(tmp_path / "srk.ctx"))  # fmt: skip
    _tool(tcti, "tpm2_flushcontext", "-t")  # no resource manager on swtpm: 3 object slots
    _tool(tcti, "tpm2_load", "-C", str(tmp_path / "srk.ctx"), "-u", str(tmp_path / "key.pub"),
          "-r", str(tmp_path / "key.priv"), "-c", str(tmp_path / "key.ctx"))  # fmt: skip
    _tool(tcti, "tpm2_flushcontext", "-t")
    pem = tmp_path / "key.pem"
    _tool(tcti, "tpm2_readpublic", "-c", str(tmp_path / "key.ctx"), "-f", "pem", "-o", str(pem))
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    assert load_pem_public_key(pem.read_bytes()) == public
    index = counter.split("nv-index=")[1][:10]
    described = _tool(tcti, "tpm2_nvreadpublic", index)
    assert "nt=0x1" in described or "counter" in described
    assert "no_da" not in described.lower()
    pin = str(PIN.pin)
    raw = _tool(tcti, "tpm2_nvread", "-P", pin, "-s", "8", "-o", str(tmp_path / "c"), index)
    assert raw == "" and int.from_bytes((tmp_path / "c").read_bytes(), "big") == value
