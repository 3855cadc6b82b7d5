"""Configuration: TOML, found lazily.

Which file: ``HSM_AUTH_CONFIG`` when set (it names the file, whatever the
home), else ``DIR/config.toml`` under ``--home DIR`` / ``HSM_AUTH_HOME``, else
the platform's user config dir (platformdirs), else
``/etc/hsm-auth/config.toml``. The home decides where state lives; the
config file only says how. Environment variables override single values:
``HSM_AUTH_<METHOD>_BACKEND`` (e.g. ``HSM_AUTH_DEVICE_BACKEND=tpm2``).

The file is checked against a schema (:data:`SCHEMA`): an unknown table or
key is an error naming it and the known ones. A method's settings are checked
against its backend's :attr:`~hsm_auth.keystore.KeyStore.setting_names` when
the backend is chosen (:func:`check_settings`).

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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownMethod
from .files import check_state, read_state
from .methods import Method

APP = "hsm-auth"
SYSTEM_CONFIG = Path("/etc/hsm-auth/config.toml")


@dataclass(frozen=True)
class Paths:
    """Where each side keeps its state."""

    home: Path | None = None

    @property
    def config_file(self) -> Path:
        env = os.environ.get("HSM_AUTH_CONFIG")
        if env:
            return Path(env)
        if self.home is not None:
            return self.home / "config.toml"
        import platformdirs  # only when no home is given: it costs start-up time

        user = Path(platformdirs.user_config_dir(APP)) / "config.toml"
        if user.exists() or not SYSTEM_CONFIG.exists():
            return user
        return SYSTEM_CONFIG

    @property
    def writable_config_file(self) -> Path:
        """The config file that commands writing configuration update: the home's,
        else ``HSM_AUTH_CONFIG``, else the user's (never ``/etc``)."""
        if self.home is not None:
            return self.home / "config.toml"
        env = os.environ.get("HSM_AUTH_CONFIG")
        if env:
            return Path(env)
        import platformdirs

        return Path(platformdirs.user_config_dir(APP)) / "config.toml"

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
        if not chosen:
            return cls(None)
        try:
            os.fspath(chosen).encode("utf-8")  # state records and config files hold it as text
        except UnicodeEncodeError:
            raise ConfigError("the home directory's path must be valid UTF-8") from None
        try:
            path = Path(chosen).expanduser().resolve()
            path.exists()  # raises for a name too long, a loop, ...
        except (OSError, ValueError, RuntimeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise ConfigError(f"unusable home directory {str(chosen)[:80]!r}: {reason}") from None
        check_state(Path(chosen).expanduser(), directory=True, missing_ok=True)
        return cls(path)


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
        if override and override != configured.backend:
            # The configured settings belong to the configured backend, if any.
            settings = configured.settings if configured.backend is None else {}
            return MethodConfig(override, settings)
        return configured

    def apply_environment(self) -> None:
        """Export configured variables (e.g. SOFTHSM2_CONF) unless the caller set them."""
        for key, value in self.environment.items():
            os.environ.setdefault(key, value)


#: What a config file may hold: table -> {key: the types its value may have}.
#: ``[methods.<method>]`` tables hold ``backend`` and :data:`CORE_SETTINGS`, the
#: rest is the backend's (:func:`check_settings`); ``[environment]`` maps names
#: to strings.
SCHEMA: Mapping[str, Mapping[str, tuple[type, ...]]] = {
    "verifier": {"database": (str,), "hsm": (str,)},
    # the online service the agent polls (hsm_auth.agent_online)
    "online": {"url": (str,), "verifier": (str,)},
    "login": {
        "authdir": (str,),
        "timeout": (int, float),
        "remote": (str,),
        "unenrolled": (str,),
        "cue": (str,),
        "method": (str,),
        "cancel": (str,),
        # the login policy (hsm_auth.login_policy)
        "methods": (str,),
        "device": (str,),
        "deny": (int,),
        "fail_interval": (int, float),
        "unlock_time": (int, float),
        "state_dir": (str,),
    },
}
TABLES = ("environment", "login", "methods", "online", "verifier")
#: Method settings the core itself reads, whatever the backend.
CORE_SETTINGS: Mapping[str, tuple[type, ...]] = {
    "backend": (str,),
    "allow_unenforced_pin": (bool,),
}
MAX_FILE = 1 << 20
_MAX_DEPTH = 8


def _unknown(key: str, where: str, known: Any) -> ConfigError:
    names = ", ".join(sorted(known)) or "none"
    return ConfigError(f"unknown key {key[:40]!r} in {where} (known: {names})")


def _depth(value: Any, limit: int) -> int:
    if isinstance(value, dict | list):
        if limit <= 0:
            raise ConfigError("the config file nests tables or arrays too deeply")
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((_depth(v, limit - 1) for v in items), default=0)
    return 0


def _check_types(
    table: Mapping[str, Any], schema: Mapping[str, tuple[type, ...]], where: str
) -> None:
    for key, value in table.items():
        if key not in schema:
            raise _unknown(key, where, schema)
        types = schema[key]
        if (type(value) is bool and bool not in types) or not isinstance(value, types):
            wanted = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in types))
            raise ConfigError(f"{where} {key} must be {wanted}")


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a number", float: "a number"}


def _environment_name(name: str) -> bool:
    return bool(name) and "=" not in name and "\0" not in name and name.isprintable()


def parse(data: Mapping[str, Any]) -> Config:
    """Check ``data`` (a parsed TOML document) against :data:`SCHEMA`; raise
    :class:`ConfigError` naming the first problem."""
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a TOML document")
    _depth(data, _MAX_DEPTH)
    for key, value in data.items():
        if key not in TABLES:
            raise _unknown(key, "the config file", TABLES)
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
    for key, schema in SCHEMA.items():
        _check_types(data.get(key, {}), schema, f"[{key}]")
    methods: dict[Method, MethodConfig] = {}
    for name, table in data.get("methods", {}).items():
        try:
            method = Method.parse(name)
        except UnknownMethod:
            raise _unknown(name, "[methods]", [m.value for m in Method]) from None
        if not isinstance(table, dict):
            raise ConfigError(f"[methods.{name}] must be a table")
        backend = table.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ConfigError(f"[methods.{name}] backend must be a string")
        _check_types(
            {k: v for k, v in table.items() if k in CORE_SETTINGS},
            CORE_SETTINGS,
            f"[methods.{name}]",
        )
        settings = {k: v for k, v in table.items() if k != "backend"}
        methods[method] = MethodConfig(backend, settings)
    env = data.get("environment", {})
    for name, value in env.items():
        if not _environment_name(name):
            raise ConfigError(
                f"[environment] name {name[:40]!r} is not a variable name (empty, '=' or NUL)"
            )
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"[environment] {name} must be a string without NUL")
    return Config(methods, dict(env), dict(data))


def check_settings(
    method: Method, backend: str, known: Collection[str] | None, settings: Mapping[str, Any]
) -> None:
    """Refuse a method setting that neither the core nor the backend knows.

    ``known`` is the backend class's ``setting_names``; ``None`` (a backend
    that does not declare them) leaves its settings unchecked."""
    if known is None:
        return
    allowed = set(CORE_SETTINGS) | set(known)
    for key in settings:
        if key not in allowed:
            raise _unknown(key, f"[methods.{method.value}] (backend {backend})", allowed)


def read_document(raw: bytes, where: str) -> dict[str, Any]:
    """``raw`` (at most :data:`MAX_FILE` + 1 bytes of a config file) as a TOML
    document; every way it can be wrong is a :class:`ConfigError` naming ``where``."""
    if len(raw) > MAX_FILE:
        raise ConfigError(f"{where} is larger than {MAX_FILE} bytes")
    import tomllib  # only when there is a file to parse

    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError:  # an integer of more than 4300 digits
        raise ConfigError(f"{where}: a number is too large") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def read_file(path: Path) -> dict[str, Any] | None:
    """The TOML document in the config file ``path`` (``None`` when there is none): a
    regular file that others cannot write, opened without following a symlink and
    checked on the open descriptor (:func:`hsm_auth.files.read_state`), at most
    :data:`MAX_FILE` bytes. A config names libraries to load."""
    raw = read_state(path, limit=MAX_FILE, missing_ok=True)
    return None if raw is None else read_document(raw, str(path))


def load(paths: Paths) -> Config:
    path = paths.config_file
    document = read_file(path)
    if document is None:
        return Config(state_dir=paths.state_dir)
    try:
        return dataclasses.replace(parse(document), state_dir=paths.state_dir)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
