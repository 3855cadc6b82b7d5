"""The floor of any Python PAM helper, for ``bench/login.py``.

Spawned: a module built with ``scripts/build-pam OUT PYTHON hsm_auth.testing.pam_floor``
runs this instead of :mod:`hsm_auth.pam`. It reads the module's request (up to
``end``) and answers ``result SUCCESS``, importing nothing else: what is left of a
login's time is the interpreter start, ``hsm_auth``'s package import and the
protocol round trip.

Resident: ``python -I -m hsm_auth.testing.pam_floor --serve --socket PATH`` is the
login service's own accept loop and fork per connection
(:class:`hsm_auth.login_service.Server`) with a child that answers the same way:
what is left is pamtester, pam_wrapper, the module's connect and checks, the fork
and the protocol, without the token work.
"""

import os
import sys


def main(rfd: int = 0, wfd: int = 1) -> int:
    data = b""
    while not data.endswith(b"\nend\n"):
        chunk = os.read(rfd, 4096)
        if not chunk:
            return 3
        data += chunk
    os.write(wfd, b"result SUCCESS floor\n")
    return 0


def serve(argv: list[str]) -> int:
    from hsm_auth.login_service import main as service_main
    from hsm_auth.pam import Channel, Peer

    def handle(channel: Channel, peer: Peer) -> int:
        return main(channel.rfd, channel.wfd)

    return service_main(argv, handler=handle, name="hsm-auth-floor")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2:]))
    os._exit(main())
