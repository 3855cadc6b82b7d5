"""The fuzz harness (tests/fuzz) inside the normal suite, on a bounded budget.

The long run is ``python -m tests.fuzz --inputs 1000000`` (README "Bad input")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.cli import commands, hostile_argvs, prepare_scratch
from fuzz.engine import Findings, fuzz, run_one
from fuzz.targets import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent


def test_every_decoder_survives_mutated_inputs():
    findings = fuzz(12_000, seed=20261201)
    assert set(findings.per_target) == {t.name for t in targets()}
    assert findings.count == 0, "\n".join(findings.report())


def test_a_finding_is_reported_with_its_input():
    from fuzz.targets import FuzzTarget

    findings = Findings()
    run_one(FuzzTarget("broken", lambda d: d.decode("ascii"), ()), b"\xff", findings)
    assert findings.count == 1 and "UnicodeDecodeError" in findings.report()[0]


#: Inputs the fuzzer found before they were fixed (each escaped as something else).
REGRESSIONS = [
    ("tpm2-record", b"\xef\xbb"),  # UnicodeDecodeError
    ("tpm2-record", b"0"),  # AttributeError: not an object
    ("tpm2-record", b"[" * 5000),  # RecursionError
    ("verifier-identity", b"[" * 5000),
    ("authenticator-state", b'{"a":' * 5000),
    ("fido2-state", b'{"version": 1, "credentials": [{"sign_count": 1e999}]}'),  # OverflowError
    ("config", b"[login]\ntimeout = " + b"9" * 5000 + b"\n"),  # ValueError: int digits
    ("pam-config", b"[login]\ncue = \"\xff\"\n"),  # UnicodeDecodeError (tomllib.load)
    ("pam-config", b"a = " + b"[" * 5000),  # RecursionError
    ("pam-config", b"[login]\nauthdir = 5\n"),  # TypeError: Path(5) (found by atheris)
]


@pytest.mark.parametrize(("name", "data"), REGRESSIONS)
def test_inputs_the_fuzzer_found(name, data):
    (target,) = [t for t in targets() if t.name == name]
    findings = Findings()
    run_one(target, data, findings)
    assert findings.count == 0, "\n".join(findings.report())


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.name)
def test_decoders_with_hypothesis(target):
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(
        st.binary(max_size=600),
        st.tuples(st.sampled_from(target.seeds), st.integers(0, 4096), st.binary(max_size=16))
        .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):]),
    ))
    def check(data: bytes) -> None:
        findings = Findings()
        run_one(target, data, findings)
        assert findings.count == 0, "\n".join(findings.report())

    check()


def test_commands_are_enumerated_from_the_parser():
    names = {" ".join(words) for words, _ in commands()}
    assert {"start", "finish", "sync", "enroll", "verifier enroll", "verifier audit",
            "verifier show", "verifier session", "login check"} <= names


def test_every_cli_command_survives_hostile_arguments(tmp_path):
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    prepare_scratch(scratch)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HSM_AUTH_", "SOFTHSM2_CONF", "TPM2TOOLS"))}
    env |= {"HSM_AUTH_PKCS11_MODULE": str(scratch / "none.so"),
            "HSM_AUTH_TCTI": f"swtpm:path={scratch}/none.sock", "PYTHONPATH": str(ROOT / "tests")}
    init = subprocess.run([sys.executable, "-m", "hsm_auth", "--home", str(home), "verifier",
                           "init"], env=env, capture_output=True, timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    argvs = list(hostile_argvs(seed=9, per_command=15, scratch=scratch))
    child = subprocess.run(
        [sys.executable, "-m", "fuzz.cli", str(home)],
        input=json.dumps(argvs).encode(), capture_output=True, env=env, timeout=600,
        start_new_session=True, check=False, cwd=scratch,  # relative paths land there
    )
    results = [json.loads(line) for line in child.stdout.decode().splitlines()]
    assert len(results) == len(argvs), child.stderr.decode()[-2000:]
    bad = []
    for r in results:
        lines = r["stderr"].strip().splitlines()
        if "traceback" in r or "Traceback" in r["stderr"]:
            bad.append(f"{r['argv']}: {r.get('traceback') or r['stderr']}")
        elif r["code"] != 0 and not (len(lines) == 1 and lines[0].startswith("hsm-auth: error: ")):
            bad.append(f"{r['argv']}: exit {r['code']} with {lines!r}")
    failed = sum(1 for r in results if r.get("code"))
    assert not bad, "\n".join(bad[:20])
    assert failed >= 0.5 * len(results)  # most hostile command lines are refused
