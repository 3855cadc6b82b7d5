"""QR output of verification data: terminal half blocks, PNG, SVG, bad targets."""

from __future__ import annotations

import pytest

from hsm_auth import qr
from hsm_auth.errors import InvalidInput

TEXT = "HA1:" + "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43UOV3HO6DZPI" * 3


def test_terminal_code_is_square_in_half_blocks():
    lines = qr.terminal(TEXT).splitlines()
    modules = 17 + 4 * qr.version_of(TEXT) + 2 * 2  # version size + a 2-module border
    assert {len(line) for line in lines} == {modules}
    assert len(lines) == (modules + 1) // 2
    assert set("".join(lines)) <= {" ", "\u2580", "\u2584", "\u2588"}


def test_png_and_svg_files(tmp_path):
    png = qr.write_image(TEXT, f"png:{tmp_path / 'code.png'}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = qr.write_image(TEXT, f"svg:{tmp_path / 'code.svg'}")
    assert b"<svg" in svg.read_bytes()


@pytest.mark.parametrize("target", ["jpg:/tmp/x.jpg", "png:", "terminal:x", ""])
def test_unknown_targets_are_invalid_input(target):
    with pytest.raises(InvalidInput):
        qr.write_image(TEXT, target)
