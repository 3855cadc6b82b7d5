"""Shared pytest fixtures. Emulator fixtures live in hsm_auth.testing so that
users can run their own CI on the same emulators."""

from hsm_auth.testing.softhsm import softhsm_env, softhsm_token  # noqa: F401
from hsm_auth.testing.swtpm import swtpm, swtpm_tcti  # noqa: F401
