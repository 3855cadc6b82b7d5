"""Shared pytest fixtures. Emulator fixtures live in hsm_auth.testing so that
users can run their own CI on the same emulators."""

import contextlib

from hsm_auth.testing.postgres import postgres_dsn, postgres_server_fixture  # noqa: F401
from hsm_auth.testing.service import service, service_factory, service_verifier  # noqa: F401
from hsm_auth.testing.softhsm import softhsm_env, softhsm_token  # noqa: F401
from hsm_auth.testing.swtpm import (  # noqa: F401
    swtpm,
    swtpm_ek,
    swtpm_ek_factory,
    swtpm_manufactured,
    swtpm_tcti,
)

with contextlib.suppress(ImportError):  # without python-fido2 the fido2 tests skip
    from hsm_auth.testing.fido2 import soft_fido2, soft_fido2_factory  # noqa: F401
