"""Run ``Verifier.accept_enrollment`` in this process and SIGKILL it (a test tool).

    python _accept_kill.py VERIFIER_DIR RESPONSE_FILE N

``N > 0``: die at the N-th step, a step being a Python call into hsm-auth's
verifier, store or verifier-keys code, or into python-pkcs11, or a native call
made from there, counted from the moment ``accept_enrollment`` starts. ``N = 0``
kills nothing and prints how many steps it counted (stderr, last line). ``N = -1``
dies exactly between the commit and the destruction of the offer's agreement key
(when ``drop_offer_key`` is called).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any


def main() -> int:
    directory, response_file, kill_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    import hsm_auth_backends
    import pkcs11

    import hsm_auth
    from hsm_auth.verifier import Verifier

    watched = tuple(
        str(Path(m.__file__).parent) for m in (hsm_auth, hsm_auth_backends, pkcs11)
    )
    state = {"active": False, "count": 0}

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if not state["active"]:
            return
        if not code.co_filename.startswith(watched):
            return
        if event not in ("call", "c_call", "c_return"):
            return
        state["count"] += 1
        if state["count"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    text = response_file.read_text()
    with Verifier.open(directory) as v:
        if kill_at == -1:
            def die(offer_id: bytes) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            v.keys.drop_offer_key = die  # type: ignore[method-assign]
        state["active"] = True
        sys.setprofile(hook)
        try:
            v.accept_enrollment(text)
        finally:
            sys.setprofile(None)
            state["active"] = False
    print(state["count"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
