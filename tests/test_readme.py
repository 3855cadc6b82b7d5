"""README.md's "The offline flow" runs as written: its first ``sh`` block, on a
fresh home (HOME and XDG_* on an empty directory, no SOFTHSM2_CONF, no
HSM_AUTH_* variables), with ``hsm-auth`` on PATH, under ``set -eu``. The block
needs no substitution: every output goes to a file the next command reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hsm_auth.testing.softhsm import softhsm_available

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.softhsm


def sh_blocks() -> list[str]:
    """The ``sh`` blocks of "The offline flow" (up to its first subsection)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## The offline flow\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "no sh block in 'The offline flow'"
    return blocks


def offline_flow_block() -> str:
    return sh_blocks()[0]


def sync_block() -> str:
    [block] = [b for b in sh_blocks() if "hsm-auth sync" in b]
    return block


def fresh_env(root: Path) -> dict[str, str]:
    home = root / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HSM_AUTH_", "XDG_")) and k not in ("SOFTHSM2_CONF", "TPM2TOOLS_TCTI")
    }
    env["HOME"] = str(home)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_block_has_no_placeholders():
    block = offline_flow_block()
    assert "…" not in block and "HA1:" not in block
    assert block.splitlines()[0].startswith("hsm-auth token init")


def test_the_offline_flow_runs_as_written(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    env = fresh_env(tmp_path)
    result = subprocess.run(
        ["bash", "-euc", offline_flow_block()],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Context:  Log in to ws-7" in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("accepted: alice with device")
    otp = (work / "otp.txt").read_text().strip()
    assert len(otp) == 8 and otp.isdigit()
    # everything it made is in the user's home (the platform dirs) or the work dir
    assert (Path(env["HOME"]) / ".config" / "hsm-auth" / "config.toml").is_file()

    # then the sync block, as written, and one more OTP through the same flow
    then = (
        sync_block()
        + "\n"
        + "\n".join(
            line
            for line in offline_flow_block().splitlines()
            if line.startswith(
                (
                    "hsm-auth verifier session",
                    "    --id-file",
                    "hsm-auth finish",
                    "hsm-auth verifier verify",
                )
            )
        )
    )
    result = subprocess.run(
        ["bash", "-euc", then],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "synced device: offline use counts from ATC 2", result.stdout
    assert "synced: alice with device (ATC 2)" in result.stderr
    assert lines[-1] == "accepted: alice with device (ATC 3)", result.stdout
