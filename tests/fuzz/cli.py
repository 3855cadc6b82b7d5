"""Hostile command lines for every ``hsm-auth`` command, run through ``main()``.

:func:`commands` walks :func:`hsm_auth.cli.build_parser` for every command and
its options; :func:`hostile_argvs` gives each random hostile values (long,
not UTF-8, huge numbers, FIFOs, ``/dev/zero``, directories, bad URIs and
messages). ``python -m tests.fuzz.cli HOME`` runs argv lists (JSON on stdin)
in one process with no terminal, a memory limit and a per-run alarm, and
prints one JSON result per run: the exit code, stderr, and the traceback of
anything ``main()`` let escape.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

RUN_SECONDS = 20
MEMORY_LIMIT = 2 << 30


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:  # type: ignore[type-arg]
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def commands() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command: its words (``("verifier", "session")``) and parser."""
    from hsm_auth.cli import build_parser

    out: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []

    def walk(words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        subs = _subparsers(parser)
        if not subs:
            out.append((words, parser))
        for action in subs:
            for name, child in action.choices.items():
                walk((*words, name), child)

    walk((), build_parser())
    return [c for c in out if c[0]]


def hostile_values(scratch: Path) -> list[str]:
    fifo, directory = scratch / "fifo", scratch / "dir"
    big = scratch / "big"
    return [
        "A" * 300, "B" * 5000, os.fsdecode(b"\xff\xfe"), "a\udcffb", "", " ", "\x01", "-",
        "@/dev/zero", f"@{fifo}", str(fifo), f"@{directory}", str(directory), f"@{big}",
        f"@{scratch / 'missing'}", "@", f"svg:{directory}", f"png:{directory}/", "png:" + "p" * 300,
        "-1", "0", "9" * 5000, "99999999999999999999999", "1e999", "nan",
        "HA1:", "HA1:AAAAAAAAA", "HA1:" + "A" * 5000, "HA1:4GBAC", "ha1:zz!z",
        "pkcs11:slot-id=\u00b2", "pkcs11:token=" + "\udcff", "device,\udcff", "device,device",
        "00" * 100, "zz", "alice", "device", "pin", str(scratch / "authdir"),
        "postgresql://\udcff@localhost/x", "host=\udcff",
    ]


def prepare_scratch(scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / "fifo").exists():
        os.mkfifo(scratch / "fifo")
    (scratch / "dir").mkdir(exist_ok=True)
    (scratch / "big").write_bytes(b"HA1:" + b"A" * (1 << 20))
    authdir = scratch / "authdir"
    authdir.mkdir(mode=0o755, exist_ok=True)
    cred = {"method": "device", "backend": "pkcs11", "settings": {}, "signing_key": "pkcs11:x",
            "counter_uri": None, "public_key": "04" + "00" * 64,
            "format": "ecdsa-p256-sha256", "counter": 1, "created": 0}
    text = json.dumps({"version": 1, "user": "alice", "credentials": [cred]})
    (authdir / "alice").write_text(text.replace('"counter": 1', '"counter": 1e999'))
    (authdir / "alice").chmod(0o644)


def hostile_argvs(seed: int, per_command: int, scratch: Path) -> Iterator[list[str]]:
    """``per_command`` random command lines for each command, most with hostile values."""
    rng = random.Random(seed)
    values = hostile_values(scratch)
    for words, parser in commands():
        options = [a for a in parser._actions if a.option_strings
                   and not {"-h", "--help", "--version", "--home", "--json", "--debug"}
                   & set(a.option_strings)]
        positionals = [a for a in parser._actions if not a.option_strings]
        for _ in range(per_command):
            argv = list(words)
            # the demo and token init make real tokens (and start swtpm), the agent
            # runs until stopped and --install-unit writes into ~/.config: only
            # argparse-level hostility
            if words in (("demo",), ("token", "init"), ("agent",)):
                argv += [rng.choice(["--bogus", "--pin-fd", "extra"]), rng.choice(values)]
                yield argv
                continue
            for action in options:
                if action.required or rng.random() < 0.5:
                    argv.append(rng.choice(action.option_strings))
                    if action.nargs != 0:
                        argv.append(rng.choice(values))
            for _action in positionals:
                if rng.random() < 0.8:
                    argv.append(rng.choice(values))
            if rng.random() < 0.2:
                argv.insert(rng.randrange(len(argv) + 1), "--json")
            yield argv


def _run_one(argv: list[str]) -> dict[str, object]:
    from hsm_auth.cli import main

    out, err = io.StringIO(), io.StringIO()
    result: dict[str, object] = {"argv": argv}
    signal.alarm(RUN_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            result["code"] = main(argv, out=out, err=err)
    except SystemExit as e:
        result["code"] = e.code if isinstance(e.code, int) else 1
    except BaseException:
        result["traceback"] = traceback.format_exc()
    finally:
        signal.alarm(0)
    result["stderr"] = err.getvalue()
    return result


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang(f"no result after {RUN_SECONDS} s")


def child(home: str) -> None:
    """Run the argv lists given on stdin as JSON, one result line each on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    argvs = json.load(sys.stdin)
    sys.stdin.close()
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""))  # no terminal, nothing to read
    real = sys.__stdout__
    assert real is not None
    for argv in argvs:
        line = json.dumps(_run_one(["--home", home, *argv]), ensure_ascii=True)
        real.write(line + "\n")
        real.flush()


if __name__ == "__main__":
    child(sys.argv[1])
