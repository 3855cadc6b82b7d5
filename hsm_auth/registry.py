"""Backend discovery through the entry-point group ``hsm_auth.backends``.

Built-in backends register exactly as a third party would, in pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points

from .errors import BackendUnavailable, ConfigError, HsmAuthError
from .keystore import KeyStore, Settings

GROUP = "hsm_auth.backends"


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)


def backend_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def load_backend(name: str) -> type[KeyStore]:
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        known = ", ".join(backend_names()) or "none"
        raise ConfigError(f"unknown backend {name!r} (installed: {known})")
    try:
        cls = matches[0].load()
    except ImportError as e:  # the backend module itself must import; report, don't crash
        raise BackendUnavailable(f"backend {name!r} failed to import: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, KeyStore)):
        raise ConfigError(f"entry point {name!r} is not a KeyStore")
    return cls


def probe_backend(name: str, settings: Settings) -> BackendStatus:
    try:
        details = load_backend(name).probe(settings)
    except HsmAuthError as e:
        return BackendStatus(name, False, str(e))
    return BackendStatus(name, True, "", dict(details))
