"""State that checks itself: every directory and file hsm-auth keeps state or
configuration in is refused, with one error line that says how to fix it, when
another user could write it (as OpenSSH's StrictModes does for ``~/.ssh``),
and ``--pin-file`` / ``--pin-fd`` refuse unsafe, binary or oversized input.

Everything runs through the CLI (``hsm-auth --home DIR``, separate processes)
on a home the library created (SoftHSM, swtpm and the software FIDO2
authenticator). These tests run as root here, and root ignores file modes: so
"another user" is made real with ``os.chown`` to ``nobody``, and for root only
root-owned state is trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import PREFIX, cli_ok, code_file, error_line, run_cli

from hsm_auth.demo import prepare
from hsm_auth.testing.softhsm import softhsm_available

pytestmark = pytest.mark.softhsm

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The run failed with ``code`` and one error line holding ``words``; that line."""
    line = PREFIX + error_line(result, code)
    for word in words:
        assert word in line, (word, line)
    return line


def state_refused(home: Path | str, args: tuple[str, ...], *words: str) -> str:
    """A state refusal: exit 10 and stderr exactly the one line."""
    result = run_cli(home, *args)
    line = refused(result, 10, *words)
    assert result.stderr.strip() == line
    return line


@contextlib.contextmanager
def chmod(path: Path, mode: int) -> Iterator[None]:
    old = stat.S_IMODE(os.lstat(path).st_mode)
    os.chmod(path, mode)
    try:
        yield
    finally:
        os.chmod(path, old)


@contextlib.contextmanager
def chown(path: Path, uid: int) -> Iterator[None]:
    old = os.lstat(path)
    os.lchown(path, uid, -1)
    try:
        yield
    finally:
        os.lchown(path, old.st_uid, old.st_gid)
        if not path.is_symlink():
            os.chmod(path, stat.S_IMODE(old.st_mode))  # chown may clear set-id bits


@contextlib.contextmanager
def replaced_by_symlink(path: Path) -> Iterator[Path]:
    """``path`` moved aside and replaced by a symlink to it: same content, via a link."""
    real = path.with_name(path.name + ".real")
    path.rename(real)
    path.symlink_to(real)
    try:
        yield real
    finally:
        path.unlink()
        real.rename(path)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home with device (swtpm if available), pin (SoftHSM) and biometric (soft FIDO2)."""
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("perm") / "home"
    with prepare(home) as tokens:
        cli_ok(home, "verifier", "init", "--name", "perms")
        for method in ("device", "pin", "biometric"):
            if method == "biometric" and "fido2" not in str(tokens.methods):
                continue
            offer = cli_ok(
                home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", method
            )
            pin = ["--pin-file", str(home / "offline.pin")] if method == "pin" else []
            response = cli_ok(
                home, "enroll", *code_file(home), "--method", method, *pin, stdin=offer
            )
            cli_ok(home, "verifier", "enroll", stdin=response)
        yield home


def session(home: Path) -> str:
    out = cli_ok(home, "--json", "verifier", "session", "--user", "alice", "--context", "perm")
    data: str = json.loads(out)["data"]
    return data


def otp(home: Path, method: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, "finish", "--method", method, *extra, session(home))


def test_the_home_as_made_by_the_library_is_accepted(home: Path) -> None:
    for method in ("device", "pin"):
        extra = ("--pin-file", str(home / "offline.pin")) if method == "pin" else ()
        result = otp(home, method, *extra)
        assert result.returncode == 0, result.stderr


# --- directories ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "args"),
    [
        ("verifier", ("verifier", "credentials")),
        ("authenticator", ("methods",)),
    ],
)
def test_a_state_directory_others_can_write_is_refused(
    home: Path, sub: str, args: tuple[str, ...]
) -> None:
    d = home / sub
    with chmod(d, 0o777):
        state_refused(
            home, args, f"{d} is writable by group or others (mode 0777)", f"chmod 700 {d}"
        )
    with chmod(d, 0o770):
        state_refused(home, args, "mode 0770", f"chmod 700 {d}")
    with chmod(d, 0o755):  # readable is not writable: the files that are secret are 0600
        assert run_cli(home, *args).returncode == 0


def test_a_home_others_can_write_is_refused(home: Path) -> None:
    with chmod(home, 0o777):
        state_refused(
            home,
            ("verifier", "credentials"),
            f"{home} is writable by group or others",
            f"chmod 700 {home}",
        )
        state_refused(home, ("methods",), f"chmod 700 {home}")


def test_a_home_given_as_a_symlink_is_refused(home: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(home)
    state_refused(link, ("methods",), f"{link} is a symbolic link")
    env = {**os.environ, "HSM_AUTH_HOME": str(link)}
    result = subprocess.run(
        [sys.executable, "-m", "hsm_auth", "methods"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    refused(result, 10, "symbolic link")


@pytest.mark.parametrize(
    ("sub", "method"),
    [("tpm2-objects", "device"), ("fido2-state", "biometric")],
)
def test_a_backend_state_directory_others_can_write_is_refused(
    home: Path, sub: str, method: str
) -> None:
    d = home / sub
    if not d.exists():
        pytest.skip(f"{sub}: that backend is not available here")
    data = session(home)
    with chmod(d, 0o777):
        line = refused(
            run_cli(home, "finish", "--method", method, data),
            10,
            f"{d} is writable by group or others",
            f"chmod 700 {d}",
        )
        assert "OTP" not in line
    with replaced_by_symlink(d):
        refused(run_cli(home, "finish", "--method", method, data), 10, f"{d} is a symbolic link")
    assert run_cli(home, "finish", "--method", method, data).returncode == 0


@as_root
@pytest.mark.parametrize(
    ("sub", "args"),
    [
        ("verifier", ("verifier", "credentials")),
        ("authenticator", ("methods",)),
    ],
)
def test_a_state_directory_owned_by_another_user_is_refused(
    home: Path, sub: str, args: tuple[str, ...]
) -> None:
    d = home / sub
    with chown(d, NOBODY):  # root could still use it: the owner decides, not the mode
        state_refused(home, args, f"{d} is owned by nobody, not by root", f"chown root {d}")


@as_root
def test_a_parent_owned_by_another_user_is_refused_before_anything_is_created(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chown(shared, NOBODY, -1)
    home = shared / "home"
    state_refused(home, ("verifier", "init"), f"{shared} (above", "owned by nobody")
    assert not home.exists()


def test_sticky_and_trusted_symlinked_parents_are_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may add entries, not replace ours
    real = sticky / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)  # a symlink above the home, owned by us
    home = tmp_path / "via" / "home"
    cli_ok(home, "verifier", "init")
    assert (real / "home" / "verifier" / "identity.json").exists()
    cli_ok(home, "verifier", "credentials")
    sticky.chmod(0o777)  # not sticky: anyone may rename "real"
    state_refused(home, ("verifier", "credentials"), f"{sticky} (above", f"chmod go-w {sticky}")


@as_root
def test_a_symlinked_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    cli_ok(real / "home", "verifier", "init")
    link = tmp_path / "via"
    link.symlink_to(real)
    os.lchown(link, NOBODY, -1)
    state_refused(
        link / "home",
        ("verifier", "credentials"),
        f"{link} (above",
        "symbolic link owned by nobody",
    )
    os.lchown(link, 0, -1)
    cli_ok(link / "home", "verifier", "credentials")
    os.chown(real, NOBODY, -1)  # where a trusted symlink leads is checked as well
    state_refused(link / "home", ("verifier", "credentials"), f"{real} (above", "owned by nobody")


# --- files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("config.toml", ("methods",)),  # it names the PKCS#11 module-path the CLI loads
        ("authenticator/credentials.json", ("methods",)),
        ("verifier/identity.json", ("verifier", "credentials")),
        ("verifier/verifier.db", ("verifier", "credentials")),
    ],
)
def test_a_state_file_others_can_write_is_refused(
    home: Path, name: str, args: tuple[str, ...]
) -> None:
    path = home / name
    with chmod(path, 0o666):
        state_refused(home, args, f"{path} is writable by group or others (mode 0666)")
    with chmod(path, 0o620):
        state_refused(home, args, "mode 0620")
    with replaced_by_symlink(path):
        state_refused(home, args, f"{path} is a symbolic link")
    assert run_cli(home, *args).returncode == 0


@as_root
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("config.toml", ("methods",)),
        ("authenticator/credentials.json", ("methods",)),
        ("verifier/identity.json", ("verifier", "credentials")),
        ("verifier/keys.pem", ("verifier", "credentials")),
    ],
)
def test_a_state_file_owned_by_another_user_is_refused(
    home: Path, name: str, args: tuple[str, ...]
) -> None:
    path = home / name
    with chown(path, NOBODY):
        state_refused(home, args, f"{path} is owned by nobody", f"chown root {path}")


def test_the_key_file_readable_by_others_is_refused(home: Path) -> None:
    path = home / "verifier" / "keys.pem"
    with chmod(path, 0o640):
        state_refused(
            home,
            ("verifier", "credentials"),
            f"{path} is accessible by group or others (mode 0640)",
            f"chmod 600 {path}",
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lockout_threshold", 1e9),
        ("lockout_threshold", 10**9),
        ("lockout_threshold", 0),
        ("lockout_threshold", True),
        ("window", 100_000),
        ("session_ttl", -5),
        ("offer_ttl", "600"),
    ],
)
def test_identity_values_only_an_edit_could_give_are_refused(
    home: Path, key: str, value: object
) -> None:
    path = home / "verifier" / "identity.json"
    saved = path.read_bytes()
    path.write_text(json.dumps({**json.loads(saved), key: value}))  # keeps mode 0600
    try:
        state_refused(home, ("verifier", "credentials"), "identity.json", key)
    finally:
        path.write_bytes(saved)
    assert run_cli(home, "verifier", "credentials").returncode == 0


@pytest.mark.parametrize(
    ("key", "value"),
    [("window", 10**9), ("window", 0), ("window", 1e3), ("synced_atc", -1), ("synced_atc", None)],
)
def test_credential_values_only_an_edit_could_give_are_refused(
    home: Path, key: str, value: object
) -> None:
    path = home / "authenticator" / "credentials.json"
    saved = path.read_bytes()
    data = json.loads(saved)
    data["methods"][0][key] = value
    path.write_text(json.dumps(data))
    try:
        state_refused(home, ("methods",), "credentials.json", key)
    finally:
        path.write_bytes(saved)
    assert run_cli(home, "methods").returncode == 0


def test_a_lock_file_symlink_is_not_followed(home: Path, tmp_path: Path) -> None:
    lock = home / "authenticator" / ".lock"
    target = tmp_path / "planted"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    try:
        refused(otp(home, "device"), 10, f"{lock} is a symbolic link")
        assert not target.exists()
    finally:
        lock.unlink()
    assert otp(home, "device").returncode == 0


# --- the PIN ------------------------------------------------------------------------------


def pin_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "pin"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_a_pin_file_others_can_read_or_write_is_refused(home: Path, tmp_path: Path) -> None:
    pin = (home / "offline.pin").read_bytes()
    for mode in (0o644, 0o640, 0o602):
        path = pin_file(tmp_path, pin, mode)
        line = refused(
            otp(home, "pin", "--pin-file", str(path)),
            10,
            f"the PIN file {path} is accessible by group or others",
            f"chmod 600 {path}",
        )
        assert pin.decode() not in line
    assert otp(home, "pin", "--pin-file", str(pin_file(tmp_path, pin))).returncode == 0


@as_root
def test_a_pin_file_owned_by_another_user_is_refused(home: Path, tmp_path: Path) -> None:
    path = pin_file(tmp_path, (home / "offline.pin").read_bytes())
    os.chown(path, NOBODY, -1)
    refused(otp(home, "pin", "--pin-file", str(path)), 10, "owned by nobody", f"chown root {path}")


BAD_PINS = {
    "binary": (b"\xff\xfe12\x80", "is not UTF-8 text"),
    "control": (b"12\x0034", "contains control characters"),
    "huge": (b"7" * 4097 + b"\n", "is longer than 4096 bytes"),
    "huge-no-newline": (b"7" * 100_000, "is longer than 4096 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_PINS))
def test_bad_pin_file_content_is_one_clear_error(home: Path, tmp_path: Path, case: str) -> None:
    content, words = BAD_PINS[case]
    result = otp(home, "pin", "--pin-file", str(pin_file(tmp_path, content)))
    line = refused(result, 2, "the PIN from the PIN file", words)
    assert content[:4].decode(errors="ignore") not in line.split(":")[-1]


@pytest.mark.parametrize("case", sorted(BAD_PINS))
def test_bad_pin_fd_content_is_one_clear_error(home: Path, case: str) -> None:
    content, words = BAD_PINS[case]
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):  # the reader stops after 4,099 bytes
            os.write(w, content)
        os.close(w)
        w = -1
        result = run_cli(
            home, "finish", "--method", "pin", "--pin-fd", str(r), session(home), pass_fds=(r,)
        )
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    refused(result, 2, f"the PIN from fd {r}", words)


def test_a_pin_of_exactly_4096_bytes_reaches_the_token(home: Path, tmp_path: Path) -> None:
    result = otp(home, "pin", "--pin-file", str(pin_file(tmp_path, b"7" * 4096 + b"\r\n")))
    refused(result, 32, "wrong PIN")  # read in full and tried: not refused as input


@pytest.mark.parametrize(
    ("fd", "words"),
    [
        ("-1", "--pin-fd -1 is not a file descriptor number"),
        (str(2**40), "is not a file descriptor number"),
        ("97", "cannot read the PIN from fd 97: Bad file descriptor"),
    ],
)
def test_a_bad_pin_fd_is_one_clear_error(home: Path, fd: str, words: str) -> None:
    refused(otp(home, "pin", "--pin-fd", fd), 2, words)


def test_a_pin_fd_gives_one_line(home: Path) -> None:
    pin = (home / "offline.pin").read_bytes()
    r, w = os.pipe()
    os.write(w, pin + b"\nmore lines that are not the PIN\n")
    os.close(w)
    try:
        result = run_cli(
            home, "finish", "--method", "pin", "--pin-fd", str(r), session(home), pass_fds=(r,)
        )
    finally:
        os.close(r)
    assert result.returncode == 0, result.stderr


def test_pam_refuses_an_oversized_or_malformed_secret_from_the_module() -> None:
    """The module's answers are hex of at most 256 bytes of UTF-8, else a protocol error."""
    from hsm_auth.pam import ProtocolError, _unhex_secret

    assert _unhex_secret("37" * 256) == "7" * 256
    for value in ("37" * 257, "3", "zz", "ff", "37 "):
        with pytest.raises(ProtocolError, match="malformed"):
            _unhex_secret(value)
