"""The floor of any Python PAM helper, for ``bench/login.py``: a module built with
``scripts/build-pam OUT PYTHON hsm_auth.testing.pam_floor`` runs this instead of
:mod:`hsm_auth.pam`. It reads the module's request (up to ``end``) and answers
``result SUCCESS``, importing nothing else: what is left of a login's time is the
interpreter start, ``hsm_auth``'s package import and the protocol round trip."""

import os


def main() -> int:
    data = b""
    while not data.endswith(b"\nend\n"):
        chunk = os.read(0, 4096)
        if not chunk:
            return 3
        data += chunk
    os.write(1, b"result SUCCESS floor\n")
    return 0


if __name__ == "__main__":
    os._exit(main())
