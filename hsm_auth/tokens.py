"""``hsm-auth token``: software tokens to try hsm-auth on a machine without one.

* :func:`init_softhsm` creates a SoftHSM2 token in the home (its own
  ``softhsm2.conf`` and token directory under ``<data dir>/softhsm``). The SO
  PIN is random and discarded (a forgotten user PIN means a new token). For
  ``device`` the user PIN is random too and kept in a 0600 file that the
  method's ``pin-source`` names; for ``pin`` the user PIN is the offline PIN the
  caller gives. PINs reach ``softhsm2-util`` through a pseudo-terminal, never
  its command line.
* :func:`init_swtpm` starts a swtpm TPM 2.0 on a UNIX socket in a directory
  (state there too) and leaves it running; :func:`stop_swtpm` stops it.

Either then records the method's ``[methods.X]`` table (and, for SoftHSM,
``[environment] SOFTHSM2_CONF``) in the config file: atomically, keeping every
other table, key and comment as it was.

These are the emulators that CI uses (:mod:`hsm_auth.testing.softhsm`,
:mod:`hsm_auth.testing.swtpm`): keys in files on disk, readable by whoever
reads those files, and swtpm started with the test fixture's flags. For trying
hsm-auth out, never for protecting anything.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import subprocess
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Paths
from .errors import ConfigError, HsmAuthError, InvalidInput, StateError
from .files import atomic_write, ensure_private_dir
from .methods import Method

#: What every token init says about itself (the CLI prints it).
SOFTWARE_WARNING = (
    "this is a software token for trying hsm-auth: its keys are files on disk, not hardware"
)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_SWTPM_PID = "swtpm.pid"


@dataclass(frozen=True)
class TokenResult:
    """What a token init did: the method's backend and settings as written to
    ``config_file``, any ``[environment]`` it set, and notes for the user."""

    method: Method
    backend: str
    settings: Mapping[str, Any]
    config_file: Path
    environment: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# --- SoftHSM ----------------------------------------------------------------------


def init_softhsm(
    paths: Paths,
    label: str,
    method: Method,
    *,
    pin: str | None = None,
    replace: bool = False,
) -> TokenResult:
    """Create SoftHSM token ``label`` for ``method`` (``device`` or ``pin``) and
    configure the method to use it. ``pin`` is the user PIN for ``pin`` (required)."""
    from .testing.softhsm import softhsm_available, softhsm_conf_text, softhsm_module
    from .uri import Pkcs11Uri

    if method not in (Method.DEVICE, Method.PIN):
        raise InvalidInput("a SoftHSM token serves the device or the pin method")
    if not _LABEL.fullmatch(label):
        raise InvalidInput(
            "a token label is 1 to 32 letters, digits, '.', '_' or '-' (a letter or digit first)"
        )
    if method is Method.PIN and not pin:
        raise InvalidInput("the pin method's token needs its user PIN (the offline PIN)")
    if method is Method.DEVICE and pin is not None:
        raise InvalidInput("the device method's token PIN is generated: give no PIN")
    reason = softhsm_available()
    if reason:
        raise HsmAuthError(f"SoftHSM cannot run here: {reason}")
    config_file = paths.writable_config_file
    _check_replace(config_file, method, replace)

    directory = ensure_private_dir(paths.data_dir / "softhsm")
    conf = directory / "softhsm2.conf"
    token_dir = ensure_private_dir(directory / "tokens")
    if not conf.exists():
        atomic_write(conf, softhsm_conf_text(token_dir).encode(), mode=0o600)
    if label in _softhsm_labels(conf):
        raise InvalidInput(f"a SoftHSM token labelled {label!r} exists already in {token_dir}")
    user_pin = pin if pin is not None else secrets.token_hex(16)
    _softhsm_init_token(conf, label, so_pin=secrets.token_hex(16), user_pin=user_pin)

    settings: dict[str, Any]
    if method is Method.DEVICE:
        pin_file = directory / f"{label}.pin"
        atomic_write(pin_file, user_pin.encode(), mode=0o600)
        uri = Pkcs11Uri(token=label, module_path=softhsm_module(), pin_source=f"file:{pin_file}")
        settings = {"uri": str(uri)}
    else:
        uri = Pkcs11Uri(token=label, module_path=softhsm_module())
        settings = {"uri": str(uri), "allow_unenforced_pin": True}  # SoftHSM: no retry limit
    environment = {"SOFTHSM2_CONF": str(conf)}
    notes = [SOFTWARE_WARNING]
    if method is Method.PIN:
        notes.append("SoftHSM does not limit PIN retries: the offline PIN can be guessed")
    current = os.environ.get("SOFTHSM2_CONF")
    if current and Path(current) != conf:
        notes.append(
            f"SOFTHSM2_CONF is set to {current} in this environment and overrides the "
            f"config's {conf}: unset it to use this token"
        )
    update_config(
        config_file,
        {f"methods.{method.value}": {"backend": "pkcs11", **settings}},
        environment=environment,
    )
    return TokenResult(method, "pkcs11", settings, config_file, environment, tuple(notes))


def _softhsm_labels(conf: Path) -> set[str]:
    result = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return {
        line.split(":", 1)[1].strip()
        for line in result.stdout.splitlines()
        if line.strip().startswith("Label:")
    }


def _softhsm_init_token(conf: Path, label: str, *, so_pin: str, user_pin: str) -> None:
    """``softhsm2-util --init-token --free``, answering its four PIN prompts (SO PIN
    twice, user PIN twice) on a pseudo-terminal, so no PIN is in any argv."""
    answers = [so_pin, so_pin, user_pin, user_pin]
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(
            ["softhsm2-util", "--init-token", "--free", "--label", label],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            start_new_session=True,
        )
    finally:
        os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if answers and seen.rstrip().endswith(b"PIN:"):
                os.write(controller, answers.pop(0).encode() + b"\n")
                seen = b""  # only prompts after this answer count
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise HsmAuthError("softhsm2-util --init-token did not finish") from None
    finally:
        os.close(controller)
    if code != 0 or answers:
        lines = [x for x in seen.decode(errors="replace").splitlines() if x.strip()]
        raise HsmAuthError(
            f"softhsm2-util --init-token failed: {lines[-1].strip() if lines else code}"
        )


# --- swtpm ------------------------------------------------------------------------


def init_swtpm(
    paths: Paths, directory: Path, method: Method = Method.DEVICE, *, replace: bool = False
) -> TokenResult:
    """Start a swtpm on ``directory/tpm.sock`` (state in ``directory``), unless one
    runs there already, and configure ``method`` to use it."""
    from .testing.swtpm import SwtpmProcess, socket_accepts, swtpm_available

    if method not in (Method.DEVICE, Method.PIN):
        raise InvalidInput("a TPM serves the device or the pin method")
    reason = swtpm_available()
    if reason:
        raise HsmAuthError(f"swtpm cannot run here: {reason}")
    config_file = paths.writable_config_file
    _check_replace(config_file, method, replace)
    directory = ensure_private_dir(_swtpm_dir(directory))
    tpm = SwtpmProcess(directory)
    notes = [SOFTWARE_WARNING]
    if socket_accepts(tpm.socket):
        notes.append(f"a swtpm runs already on {tpm.socket}: using it")
    else:
        try:
            tpm.start()
        except RuntimeError as e:
            raise HsmAuthError(f"swtpm did not start: {e}") from None
        atomic_write(directory / _SWTPM_PID, f"{tpm.pid}\n".encode(), mode=0o600)
        notes.append(
            f"swtpm runs on {tpm.socket}; stop it with: hsm-auth token stop --swtpm {directory}"
        )
    settings = {"tcti": tpm.tcti}
    update_config(config_file, {f"methods.{method.value}": {"backend": "tpm2", **settings}})
    return TokenResult(method, "tpm2", settings, config_file, {}, tuple(notes))


def stop_swtpm(directory: Path, timeout: float = 5.0) -> bool:
    """Stop the swtpm serving ``directory``; False if none was running."""
    from .testing.swtpm import SwtpmProcess, request_shutdown, socket_accepts

    tpm = SwtpmProcess(_swtpm_dir(directory))
    try:
        if not tpm.state_dir.is_dir():
            raise InvalidInput(f"{tpm.state_dir} is not a directory 'token init --swtpm' made")
        if not socket_accepts(tpm.ctrl_socket):
            (tpm.state_dir / _SWTPM_PID).unlink(missing_ok=True)
            return False
        request_shutdown(tpm.ctrl_socket, timeout)
        deadline = time.monotonic() + timeout
        while socket_accepts(tpm.socket):
            if time.monotonic() > deadline:
                raise StateError(f"the swtpm on {tpm.socket} did not stop")
            time.sleep(0.01)
        (tpm.state_dir / _SWTPM_PID).unlink(missing_ok=True)
    except OSError as e:
        raise StateError(f"{tpm.state_dir}: {e.strerror or e}") from None
    return True


#: sun_path of a UNIX socket holds 108 bytes with the terminating NUL.
_MAX_SOCKET_PATH = 107


def _swtpm_dir(directory: Path) -> Path:
    """``directory`` made absolute, refused when its control socket's path cannot
    be a UNIX socket address (or the path is not one at all)."""
    try:
        absolute = directory.expanduser().absolute()
        longest = len(os.fsencode(absolute / "tpm.sock.ctrl"))
    except (OSError, RuntimeError, ValueError) as e:
        raise InvalidInput(f"not a usable directory: {e}") from None
    if longest > _MAX_SOCKET_PATH:
        raise InvalidInput(
            f"{absolute} is too long: the socket paths under it must fit in "
            f"{_MAX_SOCKET_PATH} bytes (a UNIX socket's limit)"
        )
    return absolute


# --- the config file ----------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def _check_replace(config_file: Path, method: Method, replace: bool) -> None:
    data = _read_toml(config_file)
    methods = data.get("methods", {})
    if isinstance(methods, dict) and method.value in methods and not replace:
        raise ConfigError(
            f"{config_file} configures the {method.value} method already "
            "(--replace overwrites that table)"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {getattr(e, 'strerror', None) or e}") from None


def update_config(
    path: Path,
    tables: Mapping[str, Mapping[str, Any]],
    *,
    environment: Mapping[str, str] | None = None,
) -> None:
    """Replace each of ``tables`` (``"methods.device"`` → its keys) in the TOML file
    ``path`` and set the ``environment`` keys in ``[environment]``, keeping
    everything else (other tables, keys, comments) as it was; atomic.

    Refused where the file spells a table in a way this text edit cannot follow
    (inline tables, dotted keys): the check is that the result parses to exactly
    the old data with the new values."""
    old_text = path.read_text(encoding="utf-8") if path.exists() else ""
    old = _read_toml(path)
    text = old_text
    for name, values in tables.items():
        text = _replace_table(text, name, values)
    if environment:
        text = _merge_table(text, "environment", environment)
    expected = _expected(old, tables, environment or {})
    try:
        result = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        result = None
    if result != expected:
        names = ", ".join(f"[{n}]" for n in [*tables, *(["environment"] if environment else [])])
        raise ConfigError(
            f"{path} cannot be updated automatically (is {names} written as an inline "
            "table or with dotted keys?); edit it by hand"
        )
    ensure_private_dir(path.parent)
    atomic_write(path, text.encode("utf-8"), mode=0o600)


def _expected(
    old: dict[str, Any], tables: Mapping[str, Mapping[str, Any]], environment: Mapping[str, str]
) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(old)
    for name, values in tables.items():
        node = data
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = dict(values)
    if environment:
        data.setdefault("environment", {}).update(environment)
    return data


def _sections(lines: list[str], name: str) -> tuple[int, int] | None:
    """The line range [start, end) of table ``name`` (header line included)."""
    start = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if start is None:
            if m and m.group(1) == name:
                start = i
        elif _ANY_HEADER.match(line):
            return start, i
    return (start, len(lines)) if start is not None else None


def _table_text(name: str, values: Mapping[str, Any]) -> list[str]:
    return [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]


def _replace_table(text: str, name: str, values: Mapping[str, Any]) -> str:
    lines = text.splitlines()
    found = _sections(lines, name)
    new = _table_text(name, values)
    if found is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ([""] if lines else []) + new
    else:
        start, end = found
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # keep the blank lines before the next table
        lines[start:end] = new
    return "\n".join(lines) + "\n"


def _merge_table(text: str, name: str, values: Mapping[str, str]) -> str:
    lines = text.splitlines()
    found = _sections(lines, name)
    if found is None:
        return _replace_table(text, name, values)
    start, end = found
    keys = {k: i for i in range(start + 1, end) if (k := _key_of(lines[i])) is not None}
    for key, value in values.items():
        line = f"{key} = {toml_value(value)}"
        if key in keys:
            lines[keys[key]] = line
        else:
            lines.insert(start + 1, line)
            end += 1
            keys = {k: (i + 1 if i > start else i) for k, i in keys.items()}
    return "\n".join(lines) + "\n"


def _key_of(line: str) -> str | None:
    m = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", line)
    return m.group(1) if m else None


def toml_value(value: Any) -> str:
    """A TOML literal for a string, bool or int (basic strings, escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"no TOML literal for {type(value).__name__}")
    out = []
    for c in value:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def udev_rules() -> str:
    """The udev rules shipped with the package (``hsm_auth/data/70-hsm-auth.rules``)."""
    from importlib import resources

    return resources.files("hsm_auth").joinpath("data/70-hsm-auth.rules").read_text()
