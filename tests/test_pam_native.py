"""pam_hsm_auth.so through real libpam with the helper spawned for each login
(``socket=none``, and the default socket absent): pam_wrapper + pamtester drive
service files shaped like ``sudo``, ``su`` and ``login`` that load the module built
by scripts/setup (build/pam/pam_hsm_auth.so), against SoftHSM tokens and swtpm.
The shared rig is tests/_pam.py; the resident service is tests/test_pam_service.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _pam import (  # noqa: F401 - fixtures
    ALICE,
    BOB,
    IGNORED,
    MODULE,
    PAM_AUTH_ERR,
    PAM_AUTHINFO_UNAVAIL,
    PAM_MAXTRIES,
    PAM_PERM_DENIED,
    PAM_SERVICE_ERR,
    PAM_SYSTEM_ERR,
    PAM_USER_UNKNOWN,
    PAM_WRAPPER,
    PIN,
    REPO,
    SECURITY,
    UNIX_PASSWORD,
    Rig,
    assert_login_ignores,
    hostile_environment,
    hsm_rig,
    make_rig,
    native_libs,
    pam_tools,
    planted,
    rig,
    strerror,
)

from hsm_auth.config import Config, MethodConfig
from hsm_auth.login import AuthDir, enroll
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label

pytestmark = pytest.mark.pam


# --- the shapes: sudo, su, login --------------------------------------------------------


def test_sudo_shape_asks_the_pin_with_its_own_prompt_and_logs_in(rig: Rig) -> None:
    before = rig.counter()
    result = rig.pamtester(rig.sudo(), ALICE, [PIN])
    assert result.ok, result.out
    assert "PIN for " in result.out and "Password:" not in result.out
    assert rig.counter() > before


def test_su_shape_the_unix_password_never_reaches_the_token(rig: Rig) -> None:
    """Stacked after the Unix password module, the token's PIN is asked on its own: a
    Unix password equal to the PIN is not used, and with no second answer login fails."""
    rig.passdb.write_text(f"{ALICE}:{PIN}:su\n")
    before = rig.counter()
    only_password = rig.pamtester(rig.su(), ALICE, [PIN])
    assert only_password.code(PAM_AUTH_ERR), only_password.out
    assert "Password:" in only_password.out and "PIN for " in only_password.out
    assert rig.counter() == before
    both = rig.pamtester("su", ALICE, [PIN, PIN])
    assert both.ok, both.out
    assert rig.counter() > before


def test_login_shape_wrong_pin_is_auth_err_and_changes_nothing(rig: Rig) -> None:
    before = rig.counter()
    result = rig.pamtester(rig.login(), ALICE, ["999999"], "tty=tty1")
    assert result.code(PAM_AUTH_ERR), result.out
    assert rig.counter() == before
    assert rig.pamtester("login", ALICE, [PIN], "tty=tty1").ok


def test_no_answer_an_empty_or_an_oversized_pin_is_auth_err(hsm_rig: Rig) -> None:
    before = hsm_rig.counter()
    service = hsm_rig.login()
    for answers in ([], [""], ["7" * 300]):
        result = hsm_rig.pamtester(service, ALICE, answers)
        assert result.code(PAM_AUTH_ERR), (answers, result.out)
    assert hsm_rig.counter() == before


def test_unsafe_authfiles_fail_closed(hsm_rig: Rig) -> None:
    service = hsm_rig.login()
    good = hsm_rig.authdir / ALICE
    good.chmod(0o664)
    assert hsm_rig.pamtester(service, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    good.chmod(0o644)
    elsewhere = hsm_rig.root / "alice.json"
    good.rename(elsewhere)
    good.symlink_to(elsewhere)
    assert hsm_rig.pamtester(service, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    good.unlink()
    elsewhere.rename(good)
    hsm_rig.authdir.chmod(0o775)
    assert hsm_rig.pamtester(service, ALICE, [PIN]).code(PAM_SYSTEM_ERR)
    hsm_rig.authdir.chmod(0o755)
    assert hsm_rig.pamtester(service, ALICE, [PIN]).ok


def test_the_cue_is_shown_before_the_token_is_used(hsm_rig: Rig) -> None:
    result = hsm_rig.pamtester(hsm_rig.login("[cue_prompt=Insert your hsm-auth token]"),
                               ALICE, [PIN])
    assert result.ok, result.out
    assert result.out.index("Insert your hsm-auth token") < result.out.index("successfully")


# --- what each refusal returns -----------------------------------------------------------


def test_unenrolled_user_nouserok_is_ignore_and_without_it_user_unknown(hsm_rig: Rig) -> None:
    sudo = hsm_rig.pamtester(hsm_rig.sudo(), BOB, [UNIX_PASSWORD])
    assert sudo.ignored and sudo.ok, sudo.out  # the next module (the password) decided
    assert "PIN for" not in sudo.out
    wrong = hsm_rig.pamtester("sudo", BOB, ["nope"])
    assert wrong.ignored and not wrong.ok
    strict = hsm_rig.pamtester(hsm_rig.login(), BOB, [PIN])
    assert strict.code(PAM_USER_UNKNOWN), strict.out


def test_root_is_not_locked_out_by_the_sudo_stack(hsm_rig: Rig) -> None:
    assert hsm_rig.pamtester(hsm_rig.sudo(), "root", [UNIX_PASSWORD]).ok


def test_no_token_is_authinfo_unavail(hsm_rig: Rig) -> None:
    label = hsm_rig.token_label  # type: ignore[attr-defined]
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label], check=True,
                   capture_output=True)
    result = hsm_rig.pamtester(hsm_rig.login(), ALICE, [PIN])
    assert result.code(PAM_AUTHINFO_UNAVAIL), result.out


@pytest.mark.swtpm
def test_locked_tpm_is_maxtries(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rig = make_rig(request, tmp_path, "swtpm")
    rig.write_config(rig.environment, "deny = 100\n")  # the TPM locks, not the record
    service = rig.login()
    codes = [rig.pamtester(service, ALICE, ["999999"]) for _ in range(4)]
    assert codes[0].code(PAM_AUTH_ERR), codes[0].out
    assert codes[-1].code(PAM_MAXTRIES), codes[-1].out
    assert rig.pamtester(service, ALICE, [PIN]).code(PAM_MAXTRIES)


@pytest.mark.softhsm
def test_device_alone_is_refused_and_passes_only_as_a_configured_second_factor(
    tmp_path: Path, softhsm_env: Any
) -> None:
    """``device`` (possession) counts as not enrolled unless root's [login] makes it a
    second factor, the line says ``second_factor`` and a module before it set a password."""
    token = init_token(unique_label("pamdevice"), so_pin="12345678", user_pin=PIN)
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    uri = f"{token.uri};pin-source=file:{pin_file}" if "?" not in token.uri else (
        f"{token.uri}&pin-source=file:{pin_file}")
    root = tmp_path / "rig"
    root.mkdir(mode=0o755)
    rig = Rig(root, {"SOFTHSM2_CONF": str(softhsm_env.conf)})
    config = Config({Method.DEVICE: MethodConfig("pkcs11", {"uri": uri})})
    with AuthDir(rig.authdir) as authdir:
        enroll(authdir, ALICE, Method.DEVICE, config)
    alone = rig.pamtester(rig.login(), ALICE, [])
    assert alone.code(PAM_USER_UNKNOWN), alone.out
    assert rig.pamtester(rig.su("second_factor"), ALICE, [UNIX_PASSWORD]).code(
        PAM_USER_UNKNOWN)  # root's config does not allow it
    rig.write_config(rig.environment, 'device = "second-factor"\n')
    assert rig.pamtester(rig.login("second_factor", name="login2"), ALICE, []).code(
        PAM_USER_UNKNOWN)  # nothing before it: it would be alone
    second = rig.pamtester(rig.su("second_factor", name="su2"), ALICE, [UNIX_PASSWORD])
    assert second.ok, second.out
    assert "PIN for" not in second.out


def test_remote_session_refused_unless_allowed(hsm_rig: Rig) -> None:
    before = hsm_rig.counter()
    denied = hsm_rig.pamtester(hsm_rig.login(), ALICE, [PIN], "rhost=203.0.113.7")
    assert denied.code(PAM_PERM_DENIED), denied.out
    assert "PIN for" not in denied.out and hsm_rig.counter() == before
    allowed = hsm_rig.login("remote=allow", name="login-remote")
    assert hsm_rig.pamtester(allowed, ALICE, [PIN], "rhost=203.0.113.7").ok


def test_unknown_or_bad_options_fail_closed(hsm_rig: Rig) -> None:
    for options in (["unknown_flag"], ["timeout=0"], ["timeout=abc"], ["methods=nothing"],
                    ["remote=maybe"], ["config=relative.toml"], ["cue=x"]):
        result = hsm_rig.pamtester(hsm_rig.login(*options, name="bad"), ALICE, [PIN])
        assert not result.ok and result.code(PAM_SERVICE_ERR), (options, result.out)


# --- the caller has no say --------------------------------------------------------------


def test_caller_and_pam_environment_have_no_effect(
    hsm_rig: Rig, planted: tuple[Path, Path], native_libs: dict[str, Path], tmp_path: Path
) -> None:
    plant, marker = planted
    hostile = hostile_environment(plant, tmp_path, native_libs) | {"PYTHONHOME": str(plant)}
    assert_login_ignores(hsm_rig, hostile, native_libs, marker)


@pytest.mark.parametrize("socket", ["none", None])
def test_the_helper_runs_isolated(hsm_rig: Rig, tmp_path: Path, socket: str | None) -> None:
    """While it waits for the PIN: argv ``python -I -m hsm_auth.pam``, the environment
    PATH alone, 0 and 1 a socket, 2 /dev/null, no descriptor of the caller. The same
    without a socket= option when the default service socket is absent: the module
    spawns the helper."""
    if socket is None and os.path.lexists("/run/hsm-auth/login.sock"):
        pytest.skip("a login service socket exists here")
    hsm_rig.socket = socket
    r, w = os.pipe()
    os.set_inheritable(r, True)
    pipe = os.readlink(f"/proc/self/fd/{r}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LD_PRELOAD": str(PAM_WRAPPER),
        "PAM_WRAPPER": "1",
        "PAM_WRAPPER_SERVICE_DIR": str(hsm_rig.services),
        "SECRET_OF_THE_CALLER": "1",
    }
    proc = subprocess.Popen(["pamtester", hsm_rig.login(), ALICE, "authenticate"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, pass_fds=(r,))
    try:
        helper = _wait_for_child(proc.pid)
        info = _read_proc(helper)
        out = proc.communicate(f"{PIN}\n".encode(), timeout=60)[0].decode()
    finally:
        os.close(r)
        os.close(w)
        if proc.poll() is None:
            proc.kill()
    assert "successfully authenticated" in out, out
    assert info["cmdline"][1:] == ["-I", "-m", "hsm_auth.pam"]
    assert Path(info["cmdline"][0]).is_absolute()
    assert info["environ"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    fds = info["fds"]
    assert fds[0].startswith("socket:") and fds[1] == fds[0]
    assert fds[2] == "/dev/null"
    assert pipe not in fds.values()
    assert all(fd <= 2 or not target.startswith(("pipe:", "socket:", "/dev/pts", "/dev/tty"))
               for fd, target in fds.items()), fds


def _wait_for_child(parent: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) == parent and b"hsm_auth.pam" in cmdline:
                # wait until it asked for the PIN: it blocks reading its socket
                time.sleep(1.0)
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError("no helper process appeared")


def _read_proc(pid: int) -> dict[str, Any]:
    base = Path(f"/proc/{pid}")
    fds = {}
    for fd in (base / "fd").iterdir():
        try:
            fds[int(fd.name)] = os.readlink(fd)
        except OSError:
            continue
    return {
        "cmdline": [a.decode() for a in (base / "cmdline").read_bytes().split(b"\0")[:-1]],
        "environ": [a.decode() for a in (base / "environ").read_bytes().split(b"\0")[:-1]],
        "fds": fds,
    }


def test_a_hung_helper_is_killed_after_the_timeout(hsm_rig: Rig, tmp_path: Path) -> None:
    """root's config points SoftHSM at a FIFO: C_Initialize blocks for ever reading it.
    The module kills the helper after its timeout (+ grace) and fails."""
    fifo = tmp_path / "softhsm.fifo"
    os.mkfifo(fifo)
    hsm_rig.write_config({"SOFTHSM2_CONF": str(fifo)})
    start = time.monotonic()
    result = hsm_rig.pamtester(hsm_rig.login("timeout=1"), ALICE, [PIN], timeout=60)
    elapsed = time.monotonic() - start
    assert result.code(PAM_AUTH_ERR), result.out
    assert elapsed < 15, elapsed
    with pytest.raises(OSError):  # ENXIO: nobody holds the FIFO open for reading any more
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_the_python_side_refuses_to_run_without_isolation(hsm_rig: Rig) -> None:
    request = (
        f"hsm-auth-pam 1\nuser {ALICE}\nservice login\n"
        f"option config={hsm_rig.config}\nend\n"
    )
    result = subprocess.run([sys.executable, "-m", "hsm_auth.pam"], input=request,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.startswith("result SYSTEM_ERR "), result.stdout
    assert "python -I" in result.stdout


def test_the_floor_module_for_the_benchmark(hsm_rig: Rig, tmp_path: Path) -> None:
    """scripts/build-pam with another entry module: bench/login.py's floor logs in."""
    floor = tmp_path / "pam_floor.so"
    subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(floor), sys.executable,
                    "hsm_auth.testing.pam_floor"], check=True, capture_output=True)
    service = hsm_rig.service("floor", [f"auth required {floor} socket=none"])
    assert hsm_rig.pamtester(service, ALICE, []).ok
    bad = subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(floor),
                          sys.executable, "x;rm"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "not a module name" in bad.stderr
    relative = subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(floor),
                               "python3"], capture_output=True, text=True, check=False)
    assert relative.returncode == 2 and "absolute path" in relative.stderr


# --- installing the module (scripts/pam-install) ----------------------------------------


def _pam_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "pam-install"), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def test_pam_install_refuses_an_editable_checkout(tmp_path: Path) -> None:
    """This checkout's .venv has hsm-auth installed editable: root would import code
    from the checkout. Nothing is installed."""
    dest = tmp_path / "security"
    result = _pam_install("--python", sys.executable, "--dest", str(dest), "--unit-dir",
                          str(tmp_path / "units"))
    assert result.returncode != 0
    assert "editable install or a checkout" in result.stderr
    assert not dest.exists() and not (tmp_path / "units").exists()
    odd = _pam_install("--python", "/opt/my python/bin/python", "--check")
    assert odd.returncode == 2 and "may hold only" in odd.stderr


@pytest.mark.slow
def test_pam_install_builds_for_a_root_owned_install(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the install check wants root's files, run as root")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(REPO)],
                         capture_output=True, text=True, timeout=300, check=False)
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install the package here: {pip.stderr[-200:]}")
    dest, units = tmp_path / "security", tmp_path / "units"
    python = str(venv / "bin" / "python")
    ok = _pam_install("--python", python, "--dest", str(dest), "--unit-dir", str(units))
    assert ok.returncode == 0, ok.stderr
    module = dest / "pam_hsm_auth.so"
    assert module.stat().st_mode & 0o777 == 0o644
    assert python.encode() + b"\0" in module.read_bytes()
    unit = units / "hsm-auth-login.service"
    assert unit.stat().st_mode & 0o777 == 0o644
    text = unit.read_text()
    assert f"ExecStart={python} -I -m hsm_auth.login_service " in text
    assert "RuntimeDirectory=hsm-auth" in text and "@PYTHON@" not in text
    again = _pam_install("--python", python, "--dest", str(dest), "--unit-dir", str(units))
    assert again.returncode == 0, again.stderr  # idempotent
    installed = next((venv / "lib").glob("python3*/site-packages/hsm_auth/pam.py"))
    installed.chmod(0o646)
    bad = _pam_install("--python", python, "--dest", str(dest), "--check")
    assert bad.returncode != 0 and "writable by group or others" in bad.stderr


def test_names_that_are_not_the_account_never_pass(hsm_rig: Rig) -> None:
    """``GAMES`` / ``games.`` resolve to no account here (getpwnam is exact on files NSS):
    unknown even with nouserok, never a login and never a fall-through."""
    for name in (ALICE.upper(), ALICE + ".", ALICE.capitalize(), "no-such-account-x"):
        sudo = hsm_rig.pamtester(hsm_rig.sudo(), name, [PIN, UNIX_PASSWORD])
        assert not sudo.ok and not sudo.ignored, (name, sudo.out)
        assert sudo.code(PAM_USER_UNKNOWN), (name, sudo.out)


# --- a helper that breaks the protocol ---------------------------------------------------


@pytest.fixture(scope="module")
def hostile_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "pam_hostile.so"
    subprocess.run(["bash", str(REPO / "scripts" / "build-pam"), str(out), sys.executable,
                    "hsm_auth.testing.pam_hostile"], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("mode", ["longline", "control", "flood", "unknown", "ignore-crash",
                                  "silent-exit"])
def test_a_helper_that_breaks_the_protocol_is_a_system_error(
    hsm_rig: Rig, hostile_module: Path, mode: str
) -> None:
    service = hsm_rig.service(f"h-{mode}", [
        f"auth [success=done ignore=ignore default=die] {hostile_module} socket=none "
        f"hostile={mode}",
        f"auth optional {SECURITY / 'pam_echo.so'} {IGNORED}",
        "auth required " + str(SECURITY / "pam_permit.so"),
    ])
    result = hsm_rig.pamtester(service, ALICE, [])
    assert result.code(PAM_SYSTEM_ERR) and not result.ignored, result.out
    assert "x" * 100 not in result.out and "\x1b" not in result.out


def test_a_hanging_helper_is_killed_and_fails(hsm_rig: Rig, hostile_module: Path) -> None:
    service = hsm_rig.service("h-hang", [f"auth required {hostile_module} hostile=hang "
                                         "timeout=0.5 socket=none"])
    start = time.monotonic()
    result = hsm_rig.pamtester(service, ALICE, [])
    assert result.code(PAM_AUTH_ERR), result.out
    assert time.monotonic() - start < 15


def test_a_vanished_helper_raises_no_sigpipe_in_the_application(
    hsm_rig: Rig, hostile_module: Path
) -> None:
    """The helper asks a secret and exits; the answer is written to a closed socket.
    pamtester must get a PAM error, not die of SIGPIPE."""
    service = hsm_rig.service("h-vanish", [f"auth required {hostile_module} socket=none "
                                           "hostile=vanish"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_PRELOAD": str(PAM_WRAPPER),
           "PAM_WRAPPER": "1", "PAM_WRAPPER_SERVICE_DIR": str(hsm_rig.services)}
    proc = subprocess.Popen(["pamtester", service, ALICE, "authenticate"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, text=True)
    time.sleep(1.5)  # the helper is gone by now
    out = proc.communicate(PIN + "\n", timeout=60)[0]
    assert proc.returncode == 1, (proc.returncode, out)  # -13 would be SIGPIPE
    assert strerror(PAM_SYSTEM_ERR) in out, out
