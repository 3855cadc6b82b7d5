"""The real ``hsm-auth`` command line in a subprocess, as a user runs it.

One runner for every CLI test: a clean environment (no SoftHSM config, home
or software authenticator leaking in from the test process), ``--home``
first, no terminal on stdin, and a timeout so that a hang fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

#: Variables of the test process that must not reach the CLI under test.
CLEARED = ("SOFTHSM2_CONF", "HSM_AUTH_HOME", "HSM_AUTH_SOFT_FIDO2")
PREFIX = "hsm-auth: error: "


def code_file(home: Path | str) -> list[str]:
    """``--activation-code-file`` with the file where ``verifier offer`` leaves the last
    offer's activation code in ``home`` and ``enroll`` reads it (a test has no terminal)."""
    return ["--activation-code-file", str(Path(home) / "activation-code")]


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLEARED}


def run_cli(
    home: Path | str | None,
    *args: str,
    stdin: str = "",
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``hsm-auth [--home HOME] ARGS`` with ``stdin`` as its input."""
    home_args = ["--home", str(home)] if home is not None else []
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", *home_args, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else cli_env(),
        timeout=timeout,
        check=False,
        pass_fds=pass_fds,
    )


def cli_ok(
    home: Path | str | None,
    *args: str,
    stdin: str = "",
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a command that must succeed; its stdout, stripped."""
    result = run_cli(home, *args, stdin=stdin, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.strip()


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The run failed with exit ``code`` and exactly one error line, the last on stderr
    (before it only what the command shows first, e.g. ``finish``'s verifier and
    context); that line without its ``hsm-auth: error:`` prefix."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("hsm-auth:") or "error" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(PREFIX), result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0].removeprefix(PREFIX)
