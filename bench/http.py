"""Durable OTP verifications per second over HTTP (``POST /v1/verify`` of a real
``hsm-auth serve``), in one run, side by side with:

* the floor: the library's ``Verifier.verify_many`` (group commit, batches of 256)
  on the same engine, in the same run (bench/verifier.py's code);
* the framework's cost: requests/s of a trivial route on the same stack and the
  same load generator (a 404 problem: routing, middlewares, problem+json, no store)
  and of ``GET /v1/health`` (one store read in the threadpool);

on SQLite (1 worker) and on PostgreSQL (2 workers, a throw-away server started
here, fsync=on, synchronous_commit=on). Every verification is a real one: a fresh
session and a valid OTP, accepted (200) only after its commit; any other answer
fails the bench. Sessions and OTPs are made before the timing
(bench/verifier.py's ``populate``: credentials stored directly, sessions written
in one batch per round) with **file** verifier keys (keys.pem, the OTP-key cache
on); each round has every user once, so one batch rarely holds a credential twice.

The load generator (bench/loadgen.py) is raw asyncio on uvloop: keep-alive
connections, one request in flight on each, requests pre-built as bytes; its own
CPU time is printed (it shares the machine's cores with the server). The
service runs with its rate limits off (``--rate-address 0``): one client address
sends everything.

    .venv/bin/python bench/http.py [--users 2000] [--rounds 5] [--connections 64]
                                   [--no-postgres] [--target 2000]
"""

from __future__ import annotations

import importlib.util
import os
import sys

# This file is named http.py: its directory must not shadow the standard library's
# http package for anything imported below. The sibling modules are loaded by path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _sibling(name: str):
    path = os.path.join(_HERE, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from hsm_auth import api_keys  # noqa: E402
from hsm_auth.testing.service import running_service  # noqa: E402
from hsm_auth.verifier import Verifier  # noqa: E402

bench_verifier = _sibling("verifier")
loadgen = _sibling("loadgen")

W = 50


def _line(what: str, value: float, unit: str, extra: str = "") -> None:
    print(f"{what:<{W}}: {value:10,.0f} {unit}{extra}")


def _requests(plan, key: str) -> list[bytes]:
    auth = {"Authorization": f"Bearer {key}"}
    return [
        loadgen.post("/v1/verify", json.dumps({"session_id": sid.hex(), "otp": otp}).encode(),
                     auth)
        for rnd in plan
        for sid, otp in rnd
    ]


def _service_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the service's processes: ``pid`` and its children."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    total = 0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def _load(url: str, pid: int, requests: list[bytes], connections: int, *, expect: int):
    parts = urlsplit(url)
    before = _service_cpu(pid)
    result = loadgen.run(parts.hostname, parts.port, requests, connections)
    result.server_cpu = _service_cpu(pid) - before
    wrong = {s: n for s, n in result.statuses.items() if s != expect}
    if wrong:
        raise SystemExit(f"bench: {wrong} answers that are not {expect}: {result.bodies[:2]}")
    return result


def _report(what: str, result, unit: str) -> None:
    _line(what, result.rate, unit,
          f"  p50 {result.percentile(50):6.2f} ms  p99 {result.percentile(99):6.2f} ms"
          f"  service CPU {result.server_cpu / len(result.latencies_ns) * 1e6:4.0f} us/request"
          f"  (load generator CPU {result.cpu:.2f} s of {result.wall:.2f} s)")


def _profile(pid: int, directory: str | None, label: str) -> list[subprocess.Popen[bytes]]:
    """py-spy on every worker of the service (``--profile DIR``): raw stacks per worker."""
    if not directory:
        return []
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    workers = []
    for task in os.listdir(f"/proc/{pid}/task"):
        workers += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    out = []
    for worker in [int(w) for w in workers] or [pid]:
        path = os.path.join(directory, f"{label}-{worker}.txt")
        out.append(subprocess.Popen([spy, "record", "-f", "raw", "-r", "250", "-o", path,
                                     "-p", str(worker)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches
    return out


def stack(label: str, directory: Path, database: str | None, workers: int, args) -> float:
    """Populate, start the service, measure the trivial routes and /v1/verify."""
    with Verifier.open(directory, database=database) as v:
        plan = bench_verifier.populate(v, args.users, args.rounds, f"{label}u")
        key = api_keys.create(v.store, "bench", ["verify"], now=int(time.time())).key
    requests = _requests(plan, key)
    flags = ["--rate-address", "0", "--rate-user", "0"]
    with running_service(directory, database=database, workers=workers, args=flags) as svc:
        n = max(5000, len(requests))
        pid, c = svc.process.pid, args.connections
        _load(svc.url, pid, [loadgen.get("/v1/health")] * 2000, c, expect=200)  # warm-up
        trivial = _load(svc.url, pid, [loadgen.get("/v1/no-such-route")] * n, c, expect=404)
        health = _load(svc.url, pid, [loadgen.get("/v1/health")] * n, c, expect=200)
        profilers = _profile(svc.process.pid, args.profile, label)
        verify = _load(svc.url, pid, requests, c, expect=200)
        for p in profilers:
            p.send_signal(signal.SIGINT)
            p.wait(30)
        log = svc.log()
    where = f"{label}, {workers} worker{'s' if workers > 1 else ' '}"
    _report(f"{where}: trivial route (404 problem)", trivial, "requests/s")
    _report(f"{where}: GET /v1/health (store read)", health, "requests/s")
    _report(f"{where}: POST /v1/verify, durable", verify, "verifications/s")
    if "Traceback" in log:
        raise SystemExit("bench: the service logged a traceback")
    return verify.rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="the floor's verify_many batch")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--target", type=float, default=2000.0, help="verifications/s over HTTP")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy each worker during the verify run (raw stacks in DIR)")
    args = parser.parse_args()
    print(f"bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"{args.connections} keep-alive connections, {args.users * args.rounds} "
          f"verifications per run, file verifier keys")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hsm-auth-bench-http-") as tmp:
        floor_v = Verifier.init(Path(tmp) / "floor", "bench")
        plan = bench_verifier.populate(floor_v, args.users, args.rounds, "f")
        n, secs = bench_verifier.run_plan(floor_v, plan, args.batch)
        floor_v.close()
        _line(f"SQLite, library verify_many (batches of {args.batch}) [floor]", n / secs,
              "verifications/s")
        directory = Path(tmp) / "sqlite"
        Verifier.init(directory, "bench").close()
        rates["SQLite, 1 worker"] = stack("SQLite", directory, None, 1, args)

        if not args.no_postgres:
            from hsm_auth.testing.postgres import postgres_available, postgres_server

            reason = postgres_available()
            if reason:
                print(f"PostgreSQL: skipped ({reason})")
            else:
                with postgres_server() as server:
                    dsn = server.create_schema("floor")
                    pg_floor = Path(tmp) / "pg-floor"
                    Verifier.init(pg_floor, "bench", database=dsn).close()
                    rate = bench_verifier.parallel(pg_floor, dsn, 2, args)
                    _line("PostgreSQL, library verify_many, 2 processes [floor]", rate,
                          "verifications/s")
                    dsn = server.create_schema("http")
                    directory = Path(tmp) / "pg"
                    Verifier.init(directory, "bench", database=dsn).close()
                    rates["PostgreSQL, 2 workers"] = stack("PostgreSQL", directory, dsn, 2, args)
    failed = False
    for what, rate in rates.items():
        verdict = "OK" if rate >= args.target else "OVER TARGET"
        failed |= rate < args.target
        print(f"{what}: {rate:,.0f} verifications/s over HTTP, target {args.target:,.0f}: "
              f"{verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
