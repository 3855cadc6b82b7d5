"""Backend discovery through the entry-point group ``hsm_auth.backends``, and
the one loader of entry points (also for the verifier's key stores, group
``hsm_auth.verifier_keys``, see :mod:`hsm_auth.verifier_keys`).

Built-in backends register exactly as a third party would, in pyproject.toml.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .config import Config, check_settings
from .errors import BackendUnavailable, ConfigError, HsmAuthError
from .keystore import KeyStore, Settings
from .methods import Method

GROUP = "hsm_auth.backends"
#: Where the verifier's key stores other than the key file register (by their ``type``).
VERIFIER_KEYS_GROUP = "hsm_auth.verifier_keys"
#: Built-in backends live here; their entry-point values may be imported directly.
BUILTIN_PREFIX = "hsm_auth_backends."


#: Every entry point of the environment, once scanned.
_ENTRY_POINTS: Any = None
#: name -> class, once loaded: a process asks for the same backend for every OTP.
_CLASSES: dict[str, type[KeyStore]] = {}


def _entry_points(group: str = GROUP) -> Any:
    # importlib.metadata scans every installed distribution (about 1 ms, more on a
    # big environment): only on demand, and once per process.
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        from importlib.metadata import entry_points

        _ENTRY_POINTS = entry_points()
    return _ENTRY_POINTS.select(group=group)


def load_entry_point(group: str, name: str, base: type, label: str) -> type[Any] | None:
    """The subclass of ``base`` registered as ``name`` in ``group``; ``None`` if no
    entry point has that name. A module that does not import is BackendUnavailable,
    an entry point naming no such class a ConfigError (``label`` names it in both)."""
    for ep in _entry_points(group):
        if ep.name == name:
            return _import_class(str(ep.value), base, label)
    return None


def _import_class(value: str, base: type, label: str) -> type[Any]:
    module_name, _, attr = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the module itself must import; report, don't crash
        raise BackendUnavailable(f"{label} failed to import: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"the entry point of {label} names a missing class")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"the entry point of {label} is not a {base.__name__}")
    return cls


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)


def backend_names() -> list[str]:
    return entry_point_names(GROUP)


def entry_point_names(group: str) -> list[str]:
    return sorted({ep.name for ep in _entry_points(group)})


def backend_reference(name: str) -> str:
    """The entry point's ``module:attribute`` for ``name`` (to record beside an enrollment)."""
    for ep in _entry_points():
        if ep.name == name:
            return str(ep.value)
    known = ", ".join(backend_names()) or "none"
    raise ConfigError(f"unknown backend {name!r} (installed: {known})")


def load_backend(name: str, reference: str | None = None) -> type[KeyStore]:
    """The backend class registered as ``name``.

    ``reference`` (from :func:`backend_reference`, recorded at enrollment) lets a
    built-in backend load without scanning the installed distributions: the PAM
    helper starts faster. Anything else goes through the entry points. The class is
    kept for the process: later calls cost a dictionary lookup.
    """
    cached = _CLASSES.get(name)
    if cached is not None:
        return cached
    cls = _load_backend(name, reference)
    _CLASSES[name] = cls
    return cls


def _load_backend(name: str, reference: str | None) -> type[KeyStore]:
    if reference and reference.startswith(BUILTIN_PREFIX):
        module, _, attr = reference.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, KeyStore) and cls.name == name:
            return cls
    return _import_class(backend_reference(name), KeyStore, f"backend {name!r}")


def checked_settings(cls: type[KeyStore], method: Method, settings: Settings) -> Settings:
    """``settings`` for ``method`` on ``cls``, refused if they hold a key it does not know."""
    check_settings(method, cls.name, cls.setting_names, settings)
    return settings


def probe_backend(name: str, settings: Settings, method: Method | None = None) -> BackendStatus:
    try:
        cls = load_backend(name)
        if method is not None:
            checked_settings(cls, method, settings)
        details = cls.probe(settings)
    except HsmAuthError as e:
        return BackendStatus(name, False, str(e))
    return BackendStatus(name, True, "", dict(details))


def choose_backend(config: Config, method: Method) -> tuple[str, Settings]:
    """The configured backend for ``method``, else the highest-priority installed
    backend that serves it and probes OK (a TPM before a PKCS#11 token)."""
    chosen = config.method(method)
    if chosen.backend is not None:
        cls = load_backend(chosen.backend)
        return chosen.backend, _with_state_dir(
            config, cls, checked_settings(cls, method, chosen.settings)
        )
    candidates = []
    for name in backend_names():
        try:
            cls = load_backend(name)
        except HsmAuthError:
            continue
        if method in cls.methods:
            candidates.append(cls)
    reasons = []
    for cls in sorted(candidates, key=lambda c: -c.priority_for(method)):
        try:
            cls.probe(chosen.settings)
        except HsmAuthError as e:
            reasons.append(f"{cls.name}: {e}")
            continue
        settings = checked_settings(cls, method, chosen.settings)
        return cls.name, _with_state_dir(config, cls, settings)
    detail = "; ".join(reasons) or "no installed backend serves it"
    raise BackendUnavailable(f"no backend available for the {method.value} method ({detail})")


def _with_state_dir(config: Config, cls: type[KeyStore], settings: Settings) -> Settings:
    """``settings`` with ``state_dir`` under the config's state dir (e.g. ``--home``)
    where the backend keeps state and none is configured. Enrollment records the
    result, so the method keeps finding its state wherever the defaults move."""
    if not cls.uses_state_dir or config.state_dir is None or settings.get("state_dir"):
        return settings
    return {**settings, "state_dir": str(config.state_dir / cls.name)}
