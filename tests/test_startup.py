"""Import hygiene of the CLI: each command imports only what it uses.

Not a timing test (``bench/startup.py`` measures the time): it runs the real
``hsm-auth`` in a fresh process under ``python -X importtime`` and checks
which modules were imported at all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hsm_auth import cli
from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Paths
from hsm_auth.config import load as load_config
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier import Verifier

#: Never needed to parse the command line or print help.
HEAVY = (
    "qrcode",
    "png",
    "importlib.metadata",  # the entry-point scan
    "hsm_auth.verifier",
    "hsm_auth.authenticator",
    "hsm_auth.registry",
    "cryptography",
    "cbor2",
    "platformdirs",
    "tomllib",
    "json",
    "logging",
)

#: Checking verification data touches no token and no verifier.
NOT_FOR_START = (
    "qrcode",
    "png",
    "importlib.metadata",
    "hsm_auth.verifier",
    "hsm_auth.verifier_keys",
    "hsm_auth.store",
    "hsm_auth.qr",
    "hsm_auth.ocra",  # only making an OTP needs it
    "hsm_auth_backends.pkcs11",
    "pkcs11",
    "asn1crypto",
    "platformdirs",  # --home names every path
    "logging",  # nothing it loads logs: cli._LOAD_NOTHING_THAT_LOGS
)

#: Nor, for ``start`` (it checks one signature, bench/startup.py), the backends
#: machinery, the other messages or cryptography's OpenSSL backend module.
NOT_FOR_CHECKING_DATA = (
    "hsm_auth.registry",
    "hsm_auth.enrollment_messages",
    "hsm_auth.sync_messages",
    "cryptography.hazmat.backends",
)


def imported(*args: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules ``hsm-auth ARGS`` imports in a fresh process (it must succeed)."""
    environment = {**(env or os.environ)}
    environment.pop("PYTHONPROFILEIMPORTTIME", None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hsm_auth", *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The names in ``names`` that ``modules`` holds, as a package or a submodule."""
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_help_imports_nothing_heavy():
    modules = imported("--help")
    assert "hsm_auth.cli" in modules  # the probe sees the CLI's own imports
    assert loaded(modules, HEAVY) == []


def test_subcommand_help_imports_nothing_heavy():
    for args in (("verifier", "session", "--help"), ("finish", "--help"), ("login", "--help")):
        assert loaded(imported(*args), HEAVY) == [], args


@pytest.fixture
def enrolled_home(softhsm_env, tmp_path):
    """A fresh home with ``device`` enrolled on a new SoftHSM token:
    (home, verification data, sync message)."""
    token = init_token(unique_label("startup"), so_pin="12345678", user_pin="1234")
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(token.user_pin)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    config = home / "config.toml"
    config.write_text(
        f'[methods.device]\nbackend = "pkcs11"\nuri = "{uri}"\n\n'
        f'[environment]\nSOFTHSM2_CONF = "{softhsm_env.conf}"\n'
    )
    config.chmod(0o600)
    paths = Paths.from_env(home)
    with Verifier.init(paths.verifier_dir, "startup") as verifier:
        with Authenticator(paths.authenticator_dir, load_config(paths)) as auth:
            offer = verifier.create_offer("alice", methods=[Method.DEVICE])
            verifier.accept_enrollment(
                auth.add_or_update(Method.DEVICE, offer.text, activation_code=offer.activation_code)
            )
        session = verifier.start_session("alice", "Log in to ws-7", methods=[Method.DEVICE])
        sync = verifier.sync_message("alice", Method.DEVICE)
    return home, session.text, sync


@pytest.mark.softhsm
def test_start_checks_the_data_without_token_verifier_or_qr_code(enrolled_home):
    home, data, _ = enrolled_home
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    modules = imported("--home", str(home), "start", data, env=env)
    assert {"hsm_auth.authenticator", "tomllib"} <= modules  # it did read config and state
    assert loaded(modules, NOT_FOR_START) == []
    assert loaded(modules, NOT_FOR_CHECKING_DATA) == []


@pytest.mark.softhsm
def test_methods_and_sync_load_nothing_that_logs(enrolled_home):
    home, _, sync = enrolled_home
    assert loaded(imported("--home", str(home), "methods"), NOT_FOR_START) == []
    # sync uses the token (it MACs a report of its ATC), as finish does; still no
    # verifier and no QR code
    modules = imported("--home", str(home), "sync", sync)
    assert loaded(modules, ("qrcode", "png", "hsm_auth.verifier", "hsm_auth.store")) == []


@pytest.mark.softhsm
def test_debug_still_configures_logging(enrolled_home):
    home, data, _ = enrolled_home
    assert "logging" in imported("--home", str(home), "--debug", "start", data)


def test_verifier_commands_still_configure_logging(tmp_path: Path):
    home = tmp_path / "home"
    modules = imported("--home", str(home), "verifier", "init")
    assert {"hsm_auth.verifier", "logging"} <= modules
    assert loaded(modules, ("qrcode", "importlib.metadata")) == []


# --- the partial parser answers exactly as the whole one ---------------------------


def _command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*path, name))


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """The paths of the parsers that run a command (not those of groups such as ``verifier``)."""
    if parser.get_default("func") is not None:
        yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _outcome(parse, argv: list[str]):  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = sorted(vars(parse(argv)).items())
    except SystemExit as e:
        result = [("exit", e.code)]
    return result, out.getvalue(), err.getvalue()


def test_parsing_a_command_alone_gives_what_the_whole_parser_gives(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    paths = list(_command_paths(cli.build_parser()))
    assert ("verifier", "session") in paths and ("start",) in paths
    tails = (
        [],
        ["--help"],
        ["--bogus"],
        ["--home"],
        ["--home", "/h", "--json"],
        ["--version"],
        ["HA1:X"],
        ["--user", "u", "--method", "device"],
        ["--pin-fd", "x"],
        ["start"],
    )
    compared = 0
    for path in paths:
        for tail in tails:
            for argv in ([*path, *tail], ["--home", "/h", *path, *tail], ["--debug", *path, *tail]):
                full = _outcome(lambda a: cli.build_parser().parse_args(a), argv)
                assert _outcome(cli.parse_command_line, argv) == full, argv
                compared += 1
    assert compared > 500


def test_the_partial_parser_builds_only_the_named_command():
    parser = cli.build_parser(only={"start", "HA1:X"})
    assert list(_commands(parser)) == [("start",)]
    assert len(list(_commands(cli.build_parser()))) > 20
    args = cli.parse_command_line(["--home", "/h", "start", "HA1:X"])
    assert (args.func, args.data, args.home) == (cli.cmd_start, "HA1:X", "/h")
