"""``python -m tests.fuzz``: fuzz every decoder of outside input.

    .venv/bin/python -m tests.fuzz --inputs 1000000          # built-in mutator
    .venv/bin/python -m tests.fuzz --inputs 1000000 --engine atheris

Each input goes to one target (round robin); any exception that is not an
HsmAuthError is a finding: it is counted by (target, type, line) and printed
with one example input. Exit status 0 only when there is none.
"""

from __future__ import annotations

import argparse
import sys
import time

from .engine import Findings, fuzz, fuzz_atheris


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=int, default=100_000, help="how many inputs in all")
    p.add_argument("--seed", type=int, default=1, help="random seed (built-in mutator)")
    p.add_argument("--target", action="append", help="only this target (repeatable)")
    p.add_argument("--engine", choices=("builtin", "atheris"), default="builtin")
    args = p.parse_args(argv)
    start = time.monotonic()
    if args.engine == "atheris":
        findings: Findings = fuzz_atheris(args.inputs, args.target)
    else:
        findings = fuzz(args.inputs, seed=args.seed, only=args.target)
    elapsed = time.monotonic() - start
    for line in findings.report():
        print(line)
    print(
        f"{findings.total} inputs over {len(findings.per_target)} targets in {elapsed:.0f} s: "
        f"{findings.count} exceptions other than HsmAuthError"
        f" ({len(findings.distinct)} distinct)"
    )
    return 1 if findings.count else 0


if __name__ == "__main__":
    sys.exit(main())
