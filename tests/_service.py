"""Helpers shared by the service tests (tests/test_service_*.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import png

from hsm_auth import api_keys
from hsm_auth.methods import Method
from hsm_auth.verifier import Verifier

PROBLEM = "application/problem+json"
ALL_SCOPES = ("enroll", "verify", "challenge", "admin")


def problem(r: httpx.Response, status: int, slug: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["type"] == f"https://hsm-auth.invalid/problems/{slug}"
    assert body["status"] == status
    assert "Traceback" not in r.text and "sqlite" not in r.text.lower()
    return body


def make_key(verifier_dir: Path, *scopes: str, database: str | None = None) -> str:
    with Verifier.open(verifier_dir, database=database) as v:
        return api_keys.create(v.store, "test", scopes or ALL_SCOPES, now=1).key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def enroll_python_device(url: str, key: str, verifier_dir: Path, user: str = "alice",
                         database: str | None = None):
    """An offer over HTTP, answered by a software device, accepted by the library."""
    from _verifier_device import PythonDevice

    r = httpx.post(url + "/v1/offers", json={"user": user, "methods": ["device"]},
                   headers=bearer(key))
    assert r.status_code == 201, r.text
    offer = r.json()
    device = PythonDevice()
    response = device.enroll(offer["offer"], Method.DEVICE,
                             activation_code=offer["activation_code"])
    with Verifier.open(verifier_dir, database=database) as v:
        v.accept_enrollment(response)
    return device


def zbar(png_bytes: bytes, tmp_path: Path) -> str:
    """What zbarimg reads from a PNG (the one QR code in it)."""
    assert shutil.which("zbarimg"), "zbarimg is missing: scripts/setup installs zbar-tools"
    path = tmp_path / "qr.png"
    path.write_bytes(png_bytes)
    done = subprocess.run(["zbarimg", "-q", "--raw", str(path)], capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def svg_to_png(svg: bytes, scale: int = 8) -> bytes:
    """Draw qrcode's path SVG (one 1x1 square per dark module) as a PNG."""
    text = svg.decode()
    box = re.search(r'viewBox="0 0 (\d+) (\d+)"', text)
    assert box, text[:200]
    size = int(box.group(1))
    dark = {(int(x), int(y)) for x, y in re.findall(r"M(\d+),(\d+)H", text)}
    assert dark
    rows = []
    for y in range(size * scale):
        rows.append([0 if (x // scale, y // scale) in dark else 255
                     for x in range(size * scale)])
    import io

    buf = io.BytesIO()
    png.Writer(size * scale, size * scale, greyscale=True).write(buf, rows)
    return buf.getvalue()
