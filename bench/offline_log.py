"""The offline log's cost per OTP (docs/PROTOCOL.md §19), against its floor, in one run.

* ``append``  — OfflineLog.append (read the tail, chain, sign with a software key,
  one write + fsync) vs the floor: the same software signature and one ``write`` +
  ``fsync`` of a line of the same length on an O_APPEND file;
* per backend (SoftHSM, swtpm; ``device``): ``finish`` with the log vs its floor:
  ``finish`` with the log step taken out (bench only), then what the log must add
  to an OTP, called directly: the head signature in the token (the backend's
  ``sign``, after the OTP's HMAC as in ``finish``) and the same ``write`` + ``fsync``.
  The difference of ``finish`` with and without the log is printed too.

Targets: append <= 2x its floor (Python around one fsync), finish <= 1.5x: prints OK
or OVER TARGET.
Run: ``.venv/bin/python bench/offline_log.py [--n 300] [append pkcs11 tpm2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _timing import fsynced_line_writer, medians_per_op
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec as pyec

from hsm_auth import ec, offline_log
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.keystore import NO_AUTH
from hsm_auth.methods import Method
from hsm_auth.offline_log import OfflineLog, data_hash
from hsm_auth.verifier import Verifier

APPEND_TARGET = 2.0
FINISH_TARGET = 1.5


def verdict(name: str, cost: float, floor: float, what: str, floor_is: str,
            target: float) -> None:
    ratio = cost / floor
    print(f"[{name}] {what:<8} {cost * 1e6:9.1f} us/OTP")
    print(f"[{name}] floor    {floor * 1e6:9.1f} us/OTP ({floor_is})")
    print(f"[{name}] {what}/floor = {ratio:.2f}x (target <= {target:.1f}x): "
          f"{'OK' if ratio <= target else 'OVER TARGET'}")


def bench_append(n: int) -> None:
    key = pyec.generate_private_key(pyec.SECP256R1())

    def sign(message: bytes) -> bytes:
        return ec.der_to_raw(key.sign(message, pyec.ECDSA(hashes.SHA256())))

    with tempfile.TemporaryDirectory() as d:
        log = OfflineLog(Path(d))
        cid = os.urandom(16)
        atc = iter(range(1, 10**9))

        def append() -> None:
            log.append(time=int(time.time()), verifier_id=b"v" * 16, tenant=None,
                       user="alice", method=Method.DEVICE, credential_id=cid,
                       atc=next(atc), data=data_hash("benchmark context"), sign=sign)

        append()
        write, close = fsynced_line_writer(Path(d) / "floor.log", len(log.path(cid).read_bytes()))
        try:
            library, floor = medians_per_op(
                [append, lambda: (sign(b"h" * 77), write())], n
            )
        finally:
            close()
    verdict("append", library, floor, "append", "software signature + write + fsync",
            APPEND_TARGET)


@contextmanager
def enrolled(config: Config, tmp: Path) -> Iterator[tuple[Authenticator, Any]]:
    verifier = Verifier.init(tmp / "verifier", "bench")
    auth = Authenticator(tmp / "auth", config)
    offer = verifier.create_offer("bench", methods=[Method.DEVICE])
    verifier.accept_enrollment(
        auth.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
    )
    session = verifier.start_session("bench", "benchmark context", methods=[Method.DEVICE])
    request = auth.start_offline_authentication(session.text)
    verifier.close()
    auth._methods = [  # bench only: lift the offline-use limit
        type(m)(**{**m.__dict__, "window": 10**9}) for m in auth._methods
    ]
    try:
        yield auth, request
    finally:
        auth.close()


def bench_finish(name: str, config: Config, tmp: Path, n: int) -> None:
    with enrolled(config, tmp) as (auth, request):
        method = auth.enrolled[0]
        real = offline_log.record_use

        def without_log() -> None:
            offline_log.record_use = lambda *a, **k: None  # type: ignore[assignment]
            try:
                auth.finish_offline_authentication(request, Method.DEVICE)
            finally:
                offline_log.record_use = real

        with auth._store(method.backend, method.settings, Method.DEVICE) as store:
            def signature() -> None:
                store.sign(method.signing_key, b"h" * 77, NO_AUTH)

            log = OfflineLog(tmp / "auth")
            auth.finish_offline_authentication(request, Method.DEVICE)
            size = len(log.path(bytes.fromhex(method.credential_id)).read_bytes())
            write, close = fsynced_line_writer(tmp / "floor.log", size)
            try:
                with_log, bare, floor = medians_per_op([
                    lambda: auth.finish_offline_authentication(request, Method.DEVICE),
                    without_log,
                    lambda: (without_log(), signature(), write()),
                ], n)
            finally:
                close()
    print(f"[{name}] without  {bare * 1e6:9.1f} us/OTP (finish, the log step taken out): "
          f"the log adds {(with_log - bare) * 1e6:.1f} us")
    verdict(name, with_log, floor, "finish",
            "finish without the log + token signature + write + fsync", FINISH_TARGET)


def bench_pkcs11(n: int) -> None:
    from hsm_auth.testing.softhsm import init_token, softhsm_available, softhsm_environment
    from hsm_auth.uri import Pkcs11Uri

    reason = softhsm_available()
    if reason:
        print(f"[log/pkcs11] skipped: {reason}")
        return
    with tempfile.TemporaryDirectory() as d, softhsm_environment(Path(d) / "softhsm"):
        tmp = Path(d)
        token = init_token("bench", so_pin="12345678", user_pin="1234")
        pin_file = tmp / "pin"
        pin_file.write_text(token.user_pin)
        pin_file.chmod(0o600)
        uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                        pin_source=f"file:{pin_file}")
        config = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
        bench_finish("log/pkcs11 SoftHSM", config, tmp, n)


def bench_tpm2(n: int) -> None:
    from hsm_auth.testing.swtpm import running_swtpm, swtpm_available

    reason = swtpm_available()
    if reason:
        print(f"[log/tpm2] skipped: {reason}")
        return
    with tempfile.TemporaryDirectory() as d, running_swtpm(d) as tpm:
        tmp = Path(d)
        settings = {"tcti": tpm.tcti, "state_dir": str(tmp / "objects"), "auth": "auto"}
        config = Config(methods={Method.DEVICE: MethodConfig("tpm2", settings)})
        bench_finish("log/tpm2 swtpm", config, tmp, max(20, n // 10))


BACKENDS = {"append": bench_append, "pkcs11": bench_pkcs11, "tpm2": bench_tpm2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="OTPs per measurement")
    parser.add_argument("what", nargs="*", default=list(BACKENDS), help="which")
    args = parser.parse_args()
    for name in args.what:
        BACKENDS[name](args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
