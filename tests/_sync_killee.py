"""The process that test_atc_report.py kills between the ATC report and the verifier's
acknowledgement. argv: the authenticator directory, a JSON file of the methods'
config (``{method: [backend, settings]}``), the service URL, and the stage:

* ``reported``: the token made the report (its counter advanced), not sent yet;
* ``applied``: the service applied the report (its ATC moved) and answered with the
  acknowledgement, which is never given to the authenticator.

At the stage it writes ``STAGE REPORT`` on stdout and waits (stdin) to be killed;
an error is ``error TEXT`` and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hsm_auth.authenticator import Authenticator
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method
from hsm_auth.online_client import OnlineClient


def main() -> None:
    directory, config_file, url, stage = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    raw = json.loads(Path(config_file).read_text())
    config = Config(methods={Method(m): MethodConfig(b, s) for m, (b, s) in raw.items()})
    try:
        with Authenticator(directory, config) as auth:
            client = OnlineClient(auth, url)
            made = auth.sync(client.sync_message(Method.DEVICE))
            if stage == "applied":
                client.submit_sync_report(made.report)  # the acknowledgement: dropped
            os.write(1, f"{stage} {made.report}\n".encode())
            sys.stdin.read()  # killed here
    except BaseException as e:  # report anything to the test, never a traceback
        os.write(1, f"error {type(e).__name__}: {e}\n".encode())
        os._exit(1)


if __name__ == "__main__":
    main()
