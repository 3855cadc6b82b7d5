"""Run ``hsm-auth enroll`` in this process and SIGKILL it at the N-th step (a test tool).

    python _enroll_kill.py HOME OFFER_FILE METHOD N

A step is a Python call into the backend module or its binding (python-pkcs11,
tpm2-pytss), or a native call made from the backend module (before it runs and
after it returns), counted from the moment ``KeyStore.enroll`` starts until the
authenticator saves the enrolled method. ``N = 0`` kills nothing: the process
prints how many steps it counted on stderr (last line) and exits with the CLI's
code. ``N < 0`` pauses at step ``-N`` instead of dying: it creates
``OFFER_FILE.paused`` and goes on once ``OFFER_FILE.go`` exists.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


def main() -> int:
    home, offer_file, method, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import hsm_auth_backends

    from hsm_auth import cli

    backend_dir = str(Path(hsm_auth_backends.__file__).parent)
    bindings = []
    for name in ("pkcs11", "tpm2_pytss"):
        try:
            module = __import__(name)
            bindings.append(str(Path(module.__file__).parent))
        except ImportError:
            pass
    watched = (backend_dir, *bindings)
    state = {"active": False, "count": 0}

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call":
            if code.co_name == "enroll" and code.co_filename.endswith(
                ("keystore.py", "fido2.py")
            ):
                state["active"] = True
            elif code.co_name == "_save" and code.co_filename.endswith("authenticator.py"):
                if state["active"] and "final" not in state:
                    # The journal entry is written before enroll; this is the record.
                    state["active"] = False
                    state["final"] = True
                return
        if not state["active"]:
            return
        into_backend = event == "call" and code.co_filename.startswith(watched)
        native = event in ("c_call", "c_return") and code.co_filename.startswith(backend_dir)
        if not (into_backend or native):
            return
        state["count"] += 1
        if state["count"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        elif state["count"] == -kill_at:
            Path(f"{offer_file}.paused").touch()
            deadline = time.monotonic() + 60
            while not Path(f"{offer_file}.go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    sys.setprofile(hook)
    try:
        rc = cli.main(["--home", home, "--json", "enroll", "--method", method, "--offer",
                       f"@{offer_file}", "--activation-code-file", f"{offer_file}.code"])
    finally:
        sys.setprofile(None)
    print(state["count"], file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
