"""A misbehaving helper for the module's tests: a module built with
``scripts/build-pam OUT PYTHON hsm_auth.testing.pam_hostile`` runs this, which
breaks the line protocol in the way its ``hostile=MODE`` module argument says
(``longline``, ``control``, ``flood``, ``unknown``, ``silent-exit``, ``hang``,
``vanish``, ``ignore-crash``), so the tests see what the module makes of it."""

import os
import time


def _request() -> dict[str, str]:
    data = b""
    while not data.endswith(b"\nend\n"):
        chunk = os.read(0, 4096)
        if not chunk:
            os._exit(3)
        data += chunk
    options = {}
    for line in data.decode().splitlines():
        if line.startswith("option hostile="):
            options["mode"] = line.split("=", 1)[1]
    return options


def main() -> int:
    mode = _request().get("mode", "")
    out = {
        "longline": b"info " + b"x" * 3000 + b"\n",
        "control": b"info a\x1b[2Jb\n",
        "flood": b"log x\n" * 100 + b"result SUCCESS flood\n",
        "unknown": b"result BYPASS please\n",
        "ignore-crash": b"result IGNORE",  # no newline, then gone
        "vanish": b"secret PIN for nothing: \n",
    }.get(mode, b"")
    if out:
        os.write(1, out)
    if mode == "hang":
        time.sleep(3600)
    return 0


if __name__ == "__main__":
    os._exit(main())
