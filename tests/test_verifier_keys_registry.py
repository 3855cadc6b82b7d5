"""The verifier's key stores other than the key file are found through the
entry-point group ``hsm_auth.verifier_keys`` (the PKCS#11 one lives in the
pkcs11 backend): the core imports no backend and no PKCS#11 library, and an
unknown type or a broken entry point is one error line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint, EntryPoints
from pathlib import Path

import pytest

from hsm_auth import cli, registry
from hsm_auth.errors import BackendUnavailable, ConfigError, InvalidInput, StateError
from hsm_auth.files import atomic_write_json, read_json
from hsm_auth.verifier import Verifier
from hsm_auth.verifier_keys import VerifierKeys, create_keys, load_keys

GROUP = registry.VERIFIER_KEYS_GROUP
HSM_SPEC = {"type": "pkcs11", "token": "pkcs11:token=x", "signing": "s", "agreement": "a"}

_PROBE = """
import sys
{imports}
print(" ".join(sorted(sys.modules)))
"""


def _modules_after(*statements: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(imports="\n".join(statements))],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return set(done.stdout.split())


def _backend_modules(modules: set[str]) -> list[str]:
    return sorted(
        m for m in modules
        if m.split(".")[0] in ("pkcs11", "hsm_auth_backends") or m == "hsm_auth.registry"
    )


def test_the_core_imports_no_backend_and_no_pkcs11(tmp_path: Path) -> None:
    assert _backend_modules(_modules_after("import hsm_auth.verifier_keys")) == []
    assert _backend_modules(_modules_after("import hsm_auth.verifier")) == []
    # nor does a verifier with file keys, opened and used
    Verifier.init(tmp_path / "v", "V").close()
    opened = _modules_after(
        "from pathlib import Path",
        "from hsm_auth.verifier import Verifier",
        f"Verifier.open(Path({str(tmp_path / 'v')!r})).close()",
    )
    assert "hsm_auth.verifier_keys" in opened  # the probe sees the core's imports
    assert _backend_modules(opened) == []


def test_the_pkcs11_keys_are_registered_in_the_group() -> None:
    from hsm_auth_backends.pkcs11_verifier import Pkcs11VerifierKeys

    assert [ep.value for ep in registry._entry_points(GROUP) if ep.name == "pkcs11"] == [
        "hsm_auth_backends.pkcs11_verifier:Pkcs11VerifierKeys"
    ]
    cls = registry.load_entry_point(GROUP, "pkcs11", VerifierKeys, "the HSM keys")
    assert cls is Pkcs11VerifierKeys and cls.kind == "pkcs11"


def _with_spec(tmp_path: Path, spec: object) -> Path:
    directory = tmp_path / "verifier"
    Verifier.init(directory, "V").close()
    identity = read_json(directory / "identity.json")
    atomic_write_json(directory / "identity.json", {**identity, "keys": spec})
    return directory


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "nope"}, "unknown verifier key type 'nope'"),
        ({"type": 7}, "unknown verifier key type 7"),
        ({"token": "pkcs11:token=x"}, None),  # no type: the key file, as before
        (["pkcs11"], "names its keys in an unknown form"),
        ({"type": "pkcs11", "token": "pkcs11:token=x"}, "names HSM keys incompletely"),
    ],
)
def test_an_unknown_key_type_is_one_state_error(tmp_path: Path, spec: object,
                                                 message: str | None) -> None:
    directory = _with_spec(tmp_path, spec)
    if message is None:
        Verifier.open(directory).close()
        return
    with pytest.raises(StateError, match=message):
        Verifier.open(directory)


def test_the_cli_names_an_unknown_key_type_in_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    _with_spec(home, {"type": "nope"})
    assert cli.main(["--home", str(home), "verifier", "credentials", "--user", "a"]) == 10
    captured = capsys.readouterr()
    assert captured.err == (
        "hsm-auth: error: unknown verifier key type 'nope' (installed: file, pkcs11)\n"
    )
    assert captured.out == ""


def test_create_keys_of_an_unknown_type_and_hsm_for_a_key_file(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="unknown verifier key type 'nope'"):
        create_keys("nope", "pkcs11:token=x")
    directory = _with_spec(tmp_path, None)
    with pytest.raises(InvalidInput, match="keeps its keys in a file"):
        load_keys(directory, None, "pkcs11:token=x")


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("hsm_auth_no_such_module:Keys", BackendUnavailable,
         "verifier keys 'pkcs11' failed to import: No module named 'hsm_auth_no_such_module'"),
        ("hsm_auth.verifier_keys:NoSuchClass", ConfigError, "names a missing class"),
        ("hsm_auth.errors:StateError", ConfigError, "is not a VerifierKeys"),
        ("hsm_auth_broken_keys:Keys", BackendUnavailable,
         "verifier keys 'pkcs11' failed to import: broken at import"),
        (None, StateError, r"unknown verifier key type 'pkcs11' \(installed: file\)"),
    ],
)
def test_a_missing_or_broken_entry_point_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,  # type: ignore[no-untyped-def]
    value: str | None, error: type[Exception], message: str,
) -> None:
    home = tmp_path / "home"
    _with_spec(home, HSM_SPEC)
    (tmp_path / "hsm_auth_broken_keys.py").write_text('raise RuntimeError("broken at import")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    installed = [] if value is None else [EntryPoint("pkcs11", value, GROUP)]
    monkeypatch.setattr(registry, "_ENTRY_POINTS", EntryPoints(installed))
    with pytest.raises(error, match=message):
        load_keys(home / "verifier", HSM_SPEC, None)
    code = cli.main(["--home", str(home), "verifier", "credentials", "--user", "a"])
    captured = capsys.readouterr()
    assert code == error.exit_code  # type: ignore[attr-defined]
    assert captured.err.startswith("hsm-auth: error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
