"""The CLI's own surface: --version, help for every option, what the demo uses,
and `--json demo`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from hsm_auth.cli import build_parser


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "HSM_AUTH_HOME")}
    extra = ["--home", str(home)] if home is not None else []
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", *extra, *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("args", [["--version"], ["finish", "--version"]])
def test_version_comes_from_the_package_metadata(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hsm-auth {version('hsm-auth')}\n"
    assert result.stderr == ""


def test_version_reads_metadata_only_when_asked() -> None:
    """Building the parser (every command does) must not touch package metadata."""
    code = (
        "import sys; from hsm_auth.cli import build_parser; build_parser(); "
        "print('importlib.metadata' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    if out == "True":  # something else imported it (site hooks, a dependency): no claim
        pytest.skip("importlib.metadata is imported by the environment already")
    assert out == "False"


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        else:
            yield path, action


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
        for path, action in _options(build_parser())
        if not action.help
    ]
    assert missing == []


def test_finish_method_help_names_the_methods() -> None:
    result = cli("finish", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--method METHOD device, pin, biometric or face" in text


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help_says_what_the_demo_runs_on(args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for part in ("SoftHSM", "swtpm", "software FIDO2 authenticator"):
        assert part in text, part


@pytest.mark.softhsm
def test_json_demo_prints_one_json_document(tmp_path: Path) -> None:
    from hsm_auth.testing.softhsm import softhsm_available

    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    result = cli("--json", "demo", home=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # the whole of stdout: progress went to stderr
    assert doc["passed"] is True and doc["user"] == "demo"
    assert doc["home"] == str(tmp_path / "demo")
    methods = {m["method"]: m for m in doc["methods"]}
    assert set(methods) <= {"device", "pin", "biometric", "face"} and "pin" in methods
    for m in methods.values():
        assert m["accepted"] is True and m["replay_refused"] is True
        assert m["atc"] > m["initial_atc"]
    assert methods["pin"]["backend"] == "pkcs11"
    assert "==> demo passed" in result.stderr and "Traceback" not in result.stderr
