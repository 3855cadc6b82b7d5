"""A small deterministic mutation fuzzer (and an atheris driver) over :mod:`.targets`."""

from __future__ import annotations

import random
import sys
import traceback
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .targets import FuzzTarget, cleanup, expected, targets

#: Bytes that make decoders take unusual paths: CBOR heads for tags (bignums,
#: dates, shared refs, sets), indefinite lengths, floats, huge lengths; UTF-8
#: oddities; TOML/JSON/URI punctuation.
_INTERESTING = [
    b"\xc2\x59\x10\x00", b"\xc1\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd8\x1c\x81\xd8\x1d\x00", b"\xd9\x01\x02\x81\x01", b"\xd9\xd9\xf7", b"\x9f", b"\xbf",
    b"\xff", b"\xfb\x7f\xf0\0\0\0\0\0\0", b"\xf7", b"\xf8\x20",
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x7a\x7f\xff\xff\xff", b"\x81" * 64, b"\xa1" * 32,
    b"\xed\xa0\x80", b"\xc0\xaf", b"\xff\xfe", b"\x00", "\u00b2".encode(), "\u0661".encode(),
    b"1e999", b"-1", b"9" * 5000, b"NaN", b"Infinity", b"[" * 2000, b"{\"a\":" * 1000,
    b"\"\\ud800\"", b"=", b";", b"&", b"?", b"%", b"%ff", b"%00", b"\n", b"\\u0000", b"[[", b"]]",
    b"\"\"\"", b"HA1:", b"pkcs11:", b"slot-id=", b"true", b"null", b"0x", b"OCRA-1:",
]


@dataclass
class Findings:
    total: int = 0
    count: int = 0
    per_target: Counter[str] = field(default_factory=Counter)
    distinct: dict[tuple[str, str, str], tuple[int, bytes, str]] = field(default_factory=dict)

    def record(self, target: str, data: bytes, error: BaseException) -> None:
        self.count += 1
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = (target, type(error).__name__, where)
        seen = self.distinct.get(key)
        self.distinct[key] = (seen[0] + 1 if seen else 1, seen[1] if seen else data,
                              seen[2] if seen else str(error)[:200])

    def report(self) -> list[str]:
        lines = []
        for (target, kind, where), (n, data, message) in sorted(self.distinct.items()):
            lines.append(f"FINDING {target}: {kind} at {where} x{n}: {message}")
            lines.append(f"    input: {data[:200]!r}")
        return lines


def mutate(rng: random.Random, data: bytes, pool: Sequence[bytes]) -> bytes:
    """A few random edits of ``data``: flips, inserts, deletes, splices, interesting bytes."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4, 8))):
        op = rng.randrange(9)
        pos = rng.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and out:
            del out[pos:pos + rng.randrange(1, 17)]
        elif op == 4:
            out[pos:pos] = rng.choice(_INTERESTING)
        elif op == 5:
            other = rng.choice(pool)
            a = rng.randrange(len(other) + 1)
            out[pos:] = other[a:] if rng.random() < 0.5 else other[a:a + rng.randrange(64)]
        elif op == 6:
            out = out[:pos]
        elif op == 7 and out:
            end = min(len(out), pos + rng.randrange(1, 33))
            out[pos:pos] = out[pos:end] * rng.randrange(2, 9)
        else:
            out[pos:pos + 1] = rng.choice(_INTERESTING)
    return bytes(out[:1 << 16])


def run_one(target: FuzzTarget, data: bytes, findings: Findings) -> None:
    findings.total += 1
    findings.per_target[target.name] += 1
    try:
        target.run(data)
    except Exception as e:
        if not expected(e):
            findings.record(target.name, data, e)


def fuzz(inputs: int, *, seed: int = 1, only: Iterable[str] | None = None) -> Findings:
    """``inputs`` mutated inputs, round robin over the targets; deterministic for a seed."""
    chosen = [t for t in targets() if only is None or t.name in set(only)]
    if not chosen:
        raise SystemExit("no such target")
    rng = random.Random(seed)
    pool = [s for t in chosen for s in t.seeds]
    corpus = {t.name: list(t.seeds) for t in chosen}
    findings = Findings()
    for t in chosen:  # the seeds themselves, unmutated
        for s in t.seeds:
            run_one(t, s, findings)
    while findings.total < inputs:
        t = chosen[findings.total % len(chosen)]
        mine = corpus[t.name]
        data = mutate(rng, rng.choice(mine), pool)
        run_one(t, data, findings)
        if len(mine) < 256 and rng.random() < 0.01:
            mine.append(data)  # keep some mutants: deeper edits from them later
    return findings


def fuzz_atheris(inputs: int, only: Iterable[str] | None = None) -> Findings:
    """Coverage-guided (libFuzzer through atheris): the first byte picks the target.

    libFuzzer exits the process after ``-runs``: the report is printed at exit."""
    try:
        import atheris
    except ImportError:
        raise SystemExit("atheris is not installed (pip install atheris)") from None
    import os
    import shutil
    import tempfile

    chosen = [t for t in targets() if only is None or t.name in set(only)]
    findings = Findings()

    def report() -> None:
        for line in findings.report():
            print(line)
        print(f"atheris: {findings.total} inputs over {len(findings.per_target)} targets: "
              f"{findings.count} exceptions other than HsmAuthError "
              f"({len(findings.distinct)} distinct)", flush=True)

    def one(data: bytes) -> None:
        if data:
            run_one(chosen[data[0] % len(chosen)], data[1:], findings)
        if findings.total >= inputs:  # libFuzzer would _exit without our report
            report()
            sys.stdout.flush()
            shutil.rmtree(corpus, ignore_errors=True)
            cleanup()
            os._exit(1 if findings.count else 0)

    corpus = tempfile.mkdtemp(prefix="hsm-auth-corpus-")  # the seeds, behind their target byte
    for i, t in enumerate(chosen):
        for j, seed in enumerate(t.seeds):
            with open(os.path.join(corpus, f"{t.name}-{j}"), "wb") as f:
                f.write(bytes([i]) + seed)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], "-max_len=8192", "-rss_limit_mb=4096", corpus], one)
    atheris.Fuzz()
    return findings  # not reached: libFuzzer exits
