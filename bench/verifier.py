"""Verifier throughput, in one run:

1. OCRA checks/s of pure computation (key known, no database): the floor;
2. the same with the sealed OTP key opened (file keys: AES-GCM under the file
   KEK) on every check (a cache miss), and with the opened key cached (``OtpKeyCache``);
3. with the verifier's keys in SoftHSM (if installed): checks/s, each unwrapping
   the sealed OTP key into the HSM and HMACing there (a PKCS#11-style and a
   FIDO2-style credential), and enrollments sealed/s (per-offer key, ECDH, wrap);
4. memory: RSS growth of a fresh process that checks N distinct credentials
   once each (file keys), the cache's share of it, and the checks/s of that
   first pass (all misses) and of a second one;
5. durable verifications/s on SQLite, 1 process (WAL, synchronous=FULL), with
   group commit (``Verifier.verify_many``) and, for comparison, one commit each;
6. durable verifications/s on PostgreSQL (a throw-away server started here,
   fsync=on, synchronous_commit=on) with 1 and 2 processes.

Every verification is a real one: a fresh session, a valid OTP, compare-and-swap
of the ATC and the burn of the session committed before the result is counted.

    .venv/bin/python bench/verifier.py [--users 2000] [--rounds 5] [--batch 256]
                                       [--distinct 100000]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec as cec

from hsm_auth import ec, ocra, transcript
from hsm_auth.key_transport import wrap_otp_key
from hsm_auth.methods import Method
from hsm_auth.otp_scheme import OtpScheme
from hsm_auth.store import CredentialRecord, SessionRecord
from hsm_auth.verifier import Verifier
from hsm_auth.verifier_keys import VerifierKeys

SCHEME = OtpScheme.default()
SUITE = SCHEME.suite
NOW = int(time.time())


def ocra_floor(n: int) -> float:
    """ocra.verify with the key in hand: one OCRA computation and a compare per check."""
    key = os.urandom(32)
    question = hashlib.sha256(b"q").hexdigest()
    otps = [ocra.generate(SUITE, key, counter=i, question=question) for i in range(n)]
    start = time.perf_counter()
    for i, otp in enumerate(otps):
        ocra.verify(SUITE, key, otp, counter=i, question=question)
    return n / (time.perf_counter() - start)


def _device_credential(keys: VerifierKeys, user: str = "u") -> tuple[CredentialRecord, bytes]:
    """A PKCS#11-style credential enrolled through ``keys`` (its own offer key, sealed,
    the offer key dropped) and its OTP key."""
    offer_id = os.urandom(16)
    device = cec.generate_private_key(ec.CURVE)
    otp_key = device.exchange(cec.ECDH(), keys.offer_key(offer_id, NOW + 3600))
    point = ec.encode_point(device.public_key())
    cred = CredentialRecord(user, Method.DEVICE, "bench", point, point, None, SUITE.text, 0, NOW)
    cred = dataclasses.replace(cred, sealed_otp_key=keys.seal(offer_id, cred))
    keys.drop_offer_key(offer_id)
    return cred, otp_key


def _fido2_credential(keys: VerifierKeys) -> CredentialRecord:
    offer_id = os.urandom(16)
    wrapped = wrap_otp_key(os.urandom(32), keys.offer_key(offer_id, NOW + 3600))
    point = ec.encode_point(cec.generate_private_key(ec.CURVE).public_key())
    cred = CredentialRecord("u", Method.FACE, "bench", point, None, wrapped, SUITE.text, 0, NOW)
    cred = dataclasses.replace(cred, sealed_otp_key=keys.seal(offer_id, cred))
    keys.drop_offer_key(offer_id)
    return cred


def checks(keys: VerifierKeys, cred: CredentialRecord, n: int) -> float:
    """Checks/s of one credential: one ``otp_macs`` block (open the sealed key) and one MAC."""
    question = hashlib.sha256(b"q").hexdigest()
    start = time.perf_counter()
    for i in range(n):
        with keys.otp_macs(cred) as mac:
            ocra.truncate(mac(SUITE.data_input(counter=i, question=question)), SUITE.digits)
    return n / (time.perf_counter() - start)


def with_file_keys(n: int, cache_bytes: int) -> float:
    """Checks/s with file keys, the sealed key opened each check (``cache_bytes=0``) or cached."""
    from hsm_auth.verifier_keys import FileVerifierKeys

    keys = FileVerifierKeys(
        cec.generate_private_key(ec.CURVE), cec.generate_private_key(ec.CURVE),
        cache_bytes=cache_bytes,
    )
    return checks(keys, _device_credential(keys)[0], n)


def with_hsm(n: int, enrollments: int) -> dict[str, float] | str:
    """Checks/s and seals/s with the verifier's keys in a throw-away SoftHSM token."""
    from hsm_auth.testing.softhsm import init_token, softhsm_available, softhsm_environment
    from hsm_auth.uri import Pkcs11Uri
    from hsm_auth.verifier_keys import create_keys

    reason = softhsm_available()
    if reason:
        return reason
    with (
        tempfile.TemporaryDirectory(prefix="hsm-auth-bench-hsm-") as tmp,
        softhsm_environment(tmp),
    ):
        token = init_token("bench", so_pin="12345678", user_pin="bench-pin")
        pin = Path(tmp) / "pin"
        pin.write_text("bench-pin")
        pin.chmod(0o600)
        uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin}")
        keys = create_keys("pkcs11", str(uri))
        try:
            start = time.perf_counter()
            for _ in range(enrollments):
                _device_credential(keys)
            sealed = enrollments / (time.perf_counter() - start)
            return {
                "device": checks(keys, _device_credential(keys)[0], n),
                "fido2": checks(keys, _fido2_credential(keys), n),
                "sealed": sealed,
            }
        finally:
            keys.close()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("bench: no VmRSS in /proc/self/status")


def distinct_credentials(n: int) -> dict[str, float]:
    """In a fresh process: RSS growth and checks/s over ``n`` distinct credentials."""
    from hsm_auth.verifier_keys import FileVerifierKeys

    keys = FileVerifierKeys(cec.generate_private_key(ec.CURVE), cec.generate_private_key(ec.CURVE))
    creds = [_device_credential(keys)[0] for _ in range(n)]
    data = SUITE.data_input(counter=1, question=hashlib.sha256(b"q").hexdigest())

    def one_pass() -> float:
        start = time.perf_counter()
        for cred in creds:
            with keys.otp_macs(cred) as mac:
                ocra.truncate(mac(data), SUITE.digits)
        return n / (time.perf_counter() - start)

    gc.collect()
    before = _rss_bytes()
    first = one_pass()
    grown = _rss_bytes() - before
    second = one_pass()
    cache = getattr(keys, "otp_keys", None)
    return {
        "before": before,
        "grown": grown,
        "first": first,
        "second": second,
        "cached": len(cache) if cache is not None else -1,
        "cache_bytes": cache.nbytes if cache is not None else -1,
    }


def populate(v: Verifier, users: int, rounds: int, prefix: str) -> list[list[tuple[bytes, str]]]:
    """Enroll ``users`` credentials and make ``rounds`` sessions + valid OTPs for each.
    Returns the requests round by round (each round has every user once)."""
    keys: dict[str, tuple[bytes, bytes]] = {}
    for u in range(users):
        user = f"{prefix}{u}"
        cred, otp_key = _device_credential(v.keys, user)
        keys[user] = (otp_key, transcript.credential_id(cred.signing_key))
        v.store.save_credential(cred, replace=False)
    plan: list[list[tuple[bytes, str]]] = []
    for atc in range(1, rounds + 1):
        sessions, requests = [], []
        for user, (key, cid) in keys.items():
            sid, challenge = os.urandom(16), os.urandom(16)
            sessions.append(
                SessionRecord(sid, user, challenge, "bench", (Method.DEVICE,), NOW + 3600)
            )
            q = SCHEME.question(
                verifier_id=v.identity.verifier_id, user=user, method=Method.DEVICE,
                credential_id=cid, challenge=challenge, context="bench",
            )
            requests.append((sid, ocra.generate(SUITE, key, counter=atc, question=q)))
        v.store.put_sessions(sessions)
        plan.append(requests)
    return plan


def run_plan(v: Verifier, plan: list[list[tuple[bytes, str]]], batch: int) -> tuple[int, float]:
    flat = [r for rnd in plan for r in rnd]
    start = time.perf_counter()
    accepted = 0
    if batch <= 1:
        for sid, otp in flat:
            v.verify(sid, otp)
            accepted += 1
    else:
        for i in range(0, len(flat), batch):
            results = v.verify_many(flat[i : i + batch])
            bad = [r for r in results if not hasattr(r, "atc")]
            if bad:
                raise SystemExit(f"bench: a valid OTP was refused: {bad[0]!r}")
            accepted += len(results)
    return accepted, time.perf_counter() - start


def _worker(directory: Path, dsn: str | None, prefix: str, args, barrier, out) -> None:
    v = Verifier.open(directory, database=dsn)
    try:
        plan = populate(v, args.users // args._procs, args.rounds, prefix)
        barrier.wait()
        out.put(run_plan(v, plan, args.batch))
    finally:
        v.close()


def parallel(directory: Path, dsn: str | None, procs: int, args) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    args._procs = procs
    workers = [
        ctx.Process(target=_worker, args=(directory, dsn, f"p{procs}w{i}u", args, barrier, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    done = [out.get(timeout=600) for _ in workers]
    wall = time.perf_counter() - start
    for w in workers:
        w.join()
    return sum(n for n, _ in done) / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--distinct", type=int, default=100_000, help="credentials for the RSS run")
    parser.add_argument("--hsm-checks", type=int, default=3000, help="checks per HSM figure")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    w = 58
    print(f"{'OCRA checks/s, pure computation (floor)':<{w}}: {ocra_floor(100_000):10,.0f}")
    print(f"{'OCRA checks/s, sealed key opened each check (file keys)':<{w}}: "
          f"{with_file_keys(20_000, 0):10,.0f}")
    print(f"{'OCRA checks/s, opened key cached (file keys)':<{w}}: "
          f"{with_file_keys(100_000, 2**20):10,.0f}")
    hsm = with_hsm(args.hsm_checks, 200)
    if isinstance(hsm, str):
        print(f"HSM: skipped ({hsm})")
    else:
        print(f"{'OCRA checks/s, HSM (SoftHSM) unwrap + HMAC, PKCS#11-style':<{w}}: "
              f"{hsm['device']:10,.0f}")
        print(f"{'OCRA checks/s, HSM (SoftHSM) unwrap + HMAC, FIDO2-style':<{w}}: "
              f"{hsm['fido2']:10,.0f}")
        print(f"{'HSM (SoftHSM) enrollments sealed/s (offer key, seal, drop)':<{w}}: "
              f"{hsm['sealed']:10,.0f}")
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process for RSS
        m = pool.apply(distinct_credentials, (args.distinct,))
    print(
        f"{args.distinct:,} distinct credentials, file keys: RSS {m['before'] / 2**20:.0f} MB -> "
        f"{(m['before'] + m['grown']) / 2**20:.0f} MB (+{m['grown'] / 2**20:.1f} MB; "
        f"cache {m['cached']:,} keys, {m['cache_bytes'] / 2**20:.1f} MB counted)"
    )
    print(
        f"  checks/s over them: first pass (opened each) {m['first']:,.0f}, "
        f"second pass {m['second']:,.0f}"
    )

    with tempfile.TemporaryDirectory(prefix="hsm-auth-bench-") as tmp:
        v = Verifier.init(Path(tmp) / "sqlite", "bench")
        pragma = v.store._db.execute("PRAGMA synchronous").fetchone()[0]  # type: ignore[attr-defined]
        plan = populate(v, args.users, args.rounds, "u")
        n, secs = run_plan(v, plan, args.batch)
        print(
            f"SQLite, 1 process, batches of {args.batch:<4} (synchronous={pragma}): "
            f"{n / secs:10,.0f} durable verifications/s ({n} in {secs:.2f} s)"
        )
        single = populate(v, 500, 2, "single")
        n, secs = run_plan(v, single, 1)
        print(
            f"SQLite, 1 process, one commit per verification  : "
            f"{n / secs:10,.0f} durable verifications/s ({n} in {secs:.2f} s)"
        )
        v.close()

        if args.no_postgres:
            return 0
        from hsm_auth.testing.postgres import postgres_available, postgres_server

        reason = postgres_available()
        if reason:
            print(f"PostgreSQL: skipped ({reason})")
            return 0
        with postgres_server() as server:
            dsn = server.dsn()
            directory = Path(tmp) / "pg"
            Verifier.init(directory, "bench", database=dsn).close()
            for procs in (1, 2):
                rate = parallel(directory, dsn, procs, args)
                print(
                    f"PostgreSQL, {procs} process{'es' if procs > 1 else '  '}, batches of "
                    f"{args.batch:<4}       : {rate:10,.0f} durable verifications/s"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
