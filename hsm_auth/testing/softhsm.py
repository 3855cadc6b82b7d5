"""SoftHSM2 for tests: a token directory in a temp dir, fresh tokens on demand.

Reusable by anyone who wants to run their own CI on SoftHSM::

    from hsm_auth.testing.softhsm import init_token, softhsm_environment

    with softhsm_environment(tmpdir):        # sets SOFTHSM2_CONF
        token = init_token("ci", so_pin="12345678", user_pin="1234")
        ...  # token.uri names it: pkcs11:token=ci?module-path=...

or, with pytest, the fixtures ``softhsm_env`` (session-scoped: one config per
test session) and ``softhsm_token`` (a fresh token per test); import them
into a ``conftest.py``::

    from hsm_auth.testing.softhsm import softhsm_env, softhsm_token  # noqa: F401

SoftHSM reads ``SOFTHSM2_CONF`` once, when the module is first initialised in
the process (python-pkcs11 caches ``pkcs11.lib(path)``), so the environment is
set once per session and tests create new tokens in it. Tokens created after
the module was loaded are found after ``lib.reinitialize()``, which the
PKCS#11 backend does by itself when a token is missing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..uri import Pkcs11Uri

#: Where Debian/Ubuntu install the SoftHSM2 module.
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_CONF = "softhsm2.conf"
_counter = itertools.count(1)


def softhsm_module() -> str:
    """The SoftHSM module path: ``HSM_AUTH_SOFTHSM_MODULE`` if set, else the Debian path."""
    return os.environ.get("HSM_AUTH_SOFTHSM_MODULE", SOFTHSM_MODULE)


def softhsm_available() -> str | None:
    """``None`` when SoftHSM2 and python-pkcs11 can run here, else the reason why not."""
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util not found on PATH (install softhsm2)"
    if not os.path.isfile(softhsm_module()):
        return f"SoftHSM module {softhsm_module()} not found (install softhsm2)"
    try:
        import pkcs11  # noqa: F401
    except ImportError as e:
        return f"python-pkcs11 is not importable: {e}"
    return None


@dataclass(frozen=True)
class SoftHsmEnv:
    """A SoftHSM configuration in ``directory``: ``conf`` is what ``SOFTHSM2_CONF`` names."""

    directory: Path
    conf: Path
    token_dir: Path
    module_path: str


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM token. ``uri`` names it (token label + module path)."""

    module_path: str
    label: str
    user_pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    @property
    def uri(self) -> str:
        return str(Pkcs11Uri(token=self.label, module_path=self.module_path))


def softhsm_conf_text(token_dir: Path) -> str:
    """A ``softhsm2.conf``: file backend, tokens in ``token_dir``, log level ERROR
    (also used by ``hsm-auth token init --softhsm``)."""
    return (
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


@contextlib.contextmanager
def softhsm_environment(tmpdir: str | os.PathLike[str]) -> Iterator[SoftHsmEnv]:
    """Write a ``softhsm2.conf`` (file backend, log level ERROR) with its token
    directory under ``tmpdir`` and point ``SOFTHSM2_CONF`` at it; restore on exit."""
    directory = Path(tmpdir)
    token_dir = directory / "tokens"
    token_dir.mkdir(parents=True, exist_ok=True)
    conf = directory / _CONF
    conf.write_text(softhsm_conf_text(token_dir), encoding="utf-8")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield SoftHsmEnv(directory, conf, token_dir, softhsm_module())
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def init_token(label: str, so_pin: str, user_pin: str) -> SoftHsmToken:
    """Initialise a token in the first free slot (``softhsm2-util --init-token --free``).

    Uses the ``SOFTHSM2_CONF`` of the environment. PINs go to softhsm2-util on
    its command line: this is for throw-away test tokens only.
    """
    if "SOFTHSM2_CONF" not in os.environ:
        raise RuntimeError("SOFTHSM2_CONF is not set: use softhsm_environment() first")
    result = subprocess.run(
        [
            "softhsm2-util", "--init-token", "--free", "--label", label,
            "--so-pin", so_pin, "--pin", user_pin,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"softhsm2-util --init-token failed: {message[-1] if message else ''}")
    return SoftHsmToken(softhsm_module(), label, user_pin, so_pin)


def unique_label(prefix: str = "hsm-auth-test") -> str:
    """A token label unique in this process (at most 32 bytes, as PKCS#11 allows)."""
    return f"{prefix[:20]}-{os.getpid() % 10000}-{next(_counter)}"


# --- pytest fixtures ----------------------------------------------------------
# pytest is only a test dependency: import it lazily so this module imports without it.


def _fixtures() -> tuple[Any, Any]:
    import pytest

    @pytest.fixture(scope="session")
    def softhsm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmEnv]:
        """One SoftHSM configuration for the whole test session (``SOFTHSM2_CONF`` set)."""
        reason = softhsm_available()
        if reason is not None:
            pytest.skip(reason)
        with softhsm_environment(tmp_path_factory.mktemp("softhsm")) as env:
            yield env

    @pytest.fixture
    def softhsm_token(softhsm_env: SoftHsmEnv) -> SoftHsmToken:
        """A fresh token per test, user PIN ``1234``, SO PIN ``12345678``."""
        return init_token(unique_label(), so_pin="12345678", user_pin="1234")

    return softhsm_env, softhsm_token


with contextlib.suppress(ImportError):  # pytest absent: the helpers still work
    softhsm_env, softhsm_token = _fixtures()
