"""What the wheel ships besides code: the license text that pyproject.toml
names, and the udev rules as package data (one file: udev/ links to it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[1]
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_udev_rules_have_one_source():
    packaged = resources.files("hsm_auth").joinpath("data/70-hsm-auth.rules")
    repo = ROOT / "udev" / "70-hsm-auth.rules"
    assert repo.is_symlink()
    assert repo.resolve() == (ROOT / "hsm_auth" / "data" / "70-hsm-auth.rules").resolve()
    assert packaged.read_text() == repo.read_text()
    assert 'TAG+="uaccess"' in packaged.read_text()


@pytest.mark.slow
def test_the_wheel_carries_the_rules_and_the_license(tmp_path):
    result = subprocess.run(
        # with build isolation: pyproject.toml needs setuptools>=77 (SPDX license)
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("hsm_auth-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hsm_auth/data/70-hsm-auth.rules" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)


def test_without_tpm_and_fido2_libraries_the_core_works_and_backends_explains(tmp_path):
    """``pip install hsm-auth[pkcs11]``: tpm2-pytss and python-fido2 absent (shadowed
    here by modules that fail to import, as a missing package does)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("tpm2_pytss", "fido2"):
        (blocked / f"{name}.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    code = "import hsm_auth, hsm_auth.authenticator, hsm_auth.verifier, hsm_auth.cli"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    result = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "--home", str(tmp_path / "h"), "backends"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "tpm2-pytss is not installed (pip install 'hsm-auth[tpm2]'" in lines["tpm2"]
    assert "python-fido2 is not installed (pip install 'hsm-auth[fido2]')" in lines["fido2"]
    assert "pkcs11" in lines
