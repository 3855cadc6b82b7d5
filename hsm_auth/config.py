"""Configuration: TOML, found lazily.

Lookup order: ``--home DIR`` / ``HSM_AUTH_HOME`` (everything under one
directory: ``DIR/config.toml``), else ``HSM_AUTH_CONFIG``, else the platform's
user config dir (platformdirs), else ``/etc/hsm-auth/config.toml``.
Environment variables override single values:
``HSM_AUTH_<METHOD>_BACKEND`` (e.g. ``HSM_AUTH_DEVICE_BACKEND=tpm2``).

Example::

    [methods.device]
    backend = "pkcs11"
    uri = "pkcs11:token=hsm-auth-device?pin-source=file:/home/me/device.pin"

    [methods.pin]
    backend = "pkcs11"
    uri = "pkcs11:token=hsm-auth-pin?module-path=/usr/lib/softhsm/libsofthsm2.so"
    allow_unenforced_pin = true   # SoftHSM has no PIN retry limit

    [environment]                 # set before any backend loads, unless already set
    SOFTHSM2_CONF = "/…/softhsm2.conf"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import check_state
from .methods import Method

APP = "hsm-auth"
SYSTEM_CONFIG = Path("/etc/hsm-auth/config.toml")


@dataclass(frozen=True)
class Paths:
    """Where each side keeps its state."""

    home: Path | None = None

    @property
    def config_file(self) -> Path:
        if self.home is not None:
            return self.home / "config.toml"
        env = os.environ.get("HSM_AUTH_CONFIG")
        if env:
            return Path(env)
        import platformdirs  # only when no home is given: it costs start-up time

        user = Path(platformdirs.user_config_dir(APP)) / "config.toml"
        if user.exists() or not SYSTEM_CONFIG.exists():
            return user
        return SYSTEM_CONFIG

    @property
    def data_dir(self) -> Path:
        if self.home is not None:
            return self.home
        import platformdirs

        return Path(platformdirs.user_data_dir(APP))

    @property
    def state_dir(self) -> Path:
        """Where backends keep host-side state by default (TPM2 key blobs, FIDO2
        credential records), one subdirectory per backend: ``DIR/state`` under a
        home, else the platform's user state dir (``~/.local/state/hsm-auth``)."""
        if self.home is not None:
            return self.home / "state"
        import platformdirs

        return Path(platformdirs.user_state_dir(APP))

    @property
    def authenticator_dir(self) -> Path:
        return self.data_dir / "authenticator"

    @property
    def verifier_dir(self) -> Path:
        return self.data_dir / "verifier"

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> Paths:
        chosen = home if home is not None else os.environ.get("HSM_AUTH_HOME")
        if chosen:
            check_state(Path(chosen).expanduser(), directory=True, missing_ok=True)
        return cls(Path(chosen).expanduser().resolve() if chosen else None)


@dataclass(frozen=True)
class MethodConfig:
    backend: str | None  # None: choose the best available backend
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    methods: Mapping[Method, MethodConfig] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    #: Default parent of a backend's ``state_dir`` (see :attr:`Paths.state_dir`);
    #: ``None``: each backend's own default.
    state_dir: Path | None = None

    def method(self, method: Method) -> MethodConfig:
        configured = self.methods.get(method, MethodConfig(None))
        override = os.environ.get(f"HSM_AUTH_{method.name}_BACKEND")
        if override:
            return MethodConfig(override, configured.settings)
        return configured

    def apply_environment(self) -> None:
        """Export configured variables (e.g. SOFTHSM2_CONF) unless the caller set them."""
        for key, value in self.environment.items():
            os.environ.setdefault(key, value)


def parse(data: Mapping[str, Any]) -> Config:
    methods: dict[Method, MethodConfig] = {}
    section = data.get("methods", {})
    if not isinstance(section, dict):
        raise ConfigError("[methods] must be a table")
    for name, table in section.items():
        method = Method.parse(name)
        if not isinstance(table, dict):
            raise ConfigError(f"[methods.{name}] must be a table")
        backend = table.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ConfigError(f"[methods.{name}] backend must be a string")
        settings = {k: v for k, v in table.items() if k != "backend"}
        methods[method] = MethodConfig(backend, settings)
    env = data.get("environment", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ConfigError("[environment] must map names to strings")
    return Config(methods, dict(env), dict(data))


def load(paths: Paths) -> Config:
    path = paths.config_file
    check_state(path, missing_ok=True)  # a config names libraries to load: others can't write it
    if not path.exists():
        return Config(state_dir=paths.state_dir)
    import tomllib  # only when there is a file to parse

    try:
        with path.open("rb") as f:
            return dataclasses.replace(parse(tomllib.load(f)), state_dir=paths.state_dir)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
