"""CLI start-up: ``hsm-auth --help`` and ``hsm-auth start DATA`` against a bare
``python -c pass`` from the same environment, in one run.

Every figure is the median wall time of many runs, measured in interleaved
rounds (so that machine noise hits all three alike), with the bytecode cache
warm and ``PYTHONDONTWRITEBYTECODE`` unset, as on a user's machine. ``start``
checks real verification data: a verifier and an authenticator with the
``device`` method enrolled on a SoftHSM token (hsm_auth.testing) in a fresh
home, so the run reads the config file and the credential file and verifies
the signature, as a user's ``start`` does.

Prints the figures, the ratios to bare Python (target <= 4x; ``OVER TARGET``
otherwise) and how many modules each command imports (``-X importtime``).

    .venv/bin/python bench/startup.py [--runs 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 4.0


def cli_command() -> list[str]:
    """The installed ``hsm-auth`` script beside this interpreter, else ``python -m hsm_auth``."""
    script = Path(sys.executable).parent / "hsm-auth"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hsm_auth"]


def user_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's machine keeps a bytecode cache
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def enrolled_home(tmp: Path) -> str:
    """A fresh home with ``device`` enrolled on a new SoftHSM token; returns verification data."""
    from hsm_auth.authenticator import Authenticator
    from hsm_auth.config import Paths
    from hsm_auth.config import load as load_config
    from hsm_auth.methods import Method
    from hsm_auth.testing.softhsm import init_token, softhsm_available, softhsm_environment
    from hsm_auth.uri import Pkcs11Uri
    from hsm_auth.verifier import Verifier

    reason = softhsm_available()
    if reason:
        raise SystemExit(f"bench: SoftHSM is needed for `start` ({reason})")
    home = tmp / "home"
    home.mkdir(mode=0o700)
    with softhsm_environment(tmp / "softhsm") as env:
        token = init_token("startup", so_pin="12345678", user_pin="1234")
        pin_file = tmp / "device.pin"
        pin_file.write_text(token.user_pin)
        pin_file.chmod(0o600)
        uri = Pkcs11Uri(
            token=token.label, module_path=token.module_path, pin_source=f"file:{pin_file}"
        )
        config = home / "config.toml"
        config.write_text(
            f'[methods.device]\nbackend = "pkcs11"\nuri = "{uri}"\n\n'
            f'[environment]\nSOFTHSM2_CONF = "{env.conf}"\n'
        )
        config.chmod(0o600)
        paths = Paths.from_env(home)
        verifier = Verifier.init(paths.verifier_dir, "startup bench")
        try:
            with Authenticator(paths.authenticator_dir, load_config(paths)) as auth:
                offer = verifier.create_offer("alice", methods=[Method.DEVICE])
                response = auth.add_or_update(
                    Method.DEVICE, offer.text, activation_code=offer.activation_code
                )
                verifier.accept_enrollment(response)
                session = verifier.start_session("alice", "Log in to ws-7", methods=[Method.DEVICE])
        finally:
            verifier.close()
    return session.text


def run_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"bench: {' '.join(argv[:3])}… exited {done.returncode}: {done.stderr.decode()[-300:]}"
        )
    return elapsed


def imported_modules(argv: list[str], env: dict[str, str]) -> int:
    """How many modules ``argv`` imports (lines of ``-X importtime``)."""
    if argv[0] != sys.executable:
        argv = [sys.executable, *argv]
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
    )
    return sum(1 for line in done.stderr.decode().splitlines() if line.startswith("import time:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each command (default 40)")
    args = parser.parse_args()
    env = user_environment()
    cli = cli_command()
    with tempfile.TemporaryDirectory(prefix="hsm-auth-startup-") as d:
        data = enrolled_home(Path(d))
        home = str(Path(d) / "home")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "hsm-auth --help": [*cli, "--help"],
            "hsm-auth start DATA": [*cli, "--home", home, "start", data],
        }
        for argv in commands.values():  # warm the bytecode cache and the page cache
            for _ in range(3):
                run_once(argv, env)
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, argv in commands.items():
                samples[name].append(run_once(argv, env))
        modules = {name: imported_modules(argv, env) for name, argv in commands.items()}

    print(f"bench: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"median of {args.runs} runs each, bytecode cache warm")
    bare = statistics.median(samples["python -c pass"])
    for name, times in samples.items():
        median = statistics.median(times)
        line = f"{name:22} {median * 1e3:7.1f} ms  ({modules[name]:3} modules)"
        if name != "python -c pass":
            ratio = median / bare
            verdict = "OK" if ratio <= TARGET else "OVER TARGET"
            line += f"  {ratio:4.2f}x bare Python (target <= {TARGET:.0f}x): {verdict}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
