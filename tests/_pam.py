"""Shared helpers of the PAM module tests (tests/test_pam_native.py, the spawned
helper; tests/test_pam_service.py, the resident login service): pam_wrapper +
pamtester drive service files shaped like ``sudo``, ``su`` and ``login`` that load
the module built by scripts/setup (build/pam/pam_hsm_auth.so), against SoftHSM
tokens and swtpm.

pam_matrix (pam_wrapper's password module) stands in for pam_unix: it asks
``Password:`` and sets PAM_AUTHTOK. A tiny test module (compiled here) puts
variables into the PAM environment with pam_putenv. Each PAM result is read
from pamtester's message, which is pam_strerror of the code the stack returned.
Import the fixtures into the test module (``from _pam import rig, ...``).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hsm_auth.config import Config, MethodConfig
from hsm_auth.login import AuthDir, enroll
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.testing.swtpm import swtpm_available

PIN = "246810"
# Real accounts (the policy resolves PAM_USER with getpwnam): one enrolled, one not.
ALICE, BOB = "games", "news"
UNIX_PASSWORD = "unix-password-7"
REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "build" / "pam" / "pam_hsm_auth.so"
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
PAM_WRAPPER = LIBDIR / "libpam_wrapper.so"
PAM_MATRIX = LIBDIR / "pam_wrapper" / "pam_matrix.so"
SECURITY = Path("/lib/x86_64-linux-gnu/security")
IGNORED = "NEXT-MODULE-DECIDES"  # pam_echo's text: the module returned PAM_IGNORE

# PAM return codes (security/_pam_types.h)
PAM_SUCCESS, PAM_SERVICE_ERR, PAM_SYSTEM_ERR, PAM_PERM_DENIED = 0, 3, 4, 6
PAM_AUTH_ERR, PAM_AUTHINFO_UNAVAIL, PAM_USER_UNKNOWN, PAM_MAXTRIES = 7, 9, 10, 11

_PUTENV_MODULE = r"""
#include <string.h>
#include <security/pam_modules.h>
/* Test module: "putenv=NAME=VALUE" -> pam_putenv; "authtok=X" -> PAM_AUTHTOK. */
int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)flags;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "putenv=", 7) == 0 && pam_putenv(pamh, argv[i] + 7) != PAM_SUCCESS)
            return PAM_SYSTEM_ERR;
        if (strncmp(argv[i], "authtok=", 8) == 0 &&
            pam_set_item(pamh, PAM_AUTHTOK, argv[i] + 8) != PAM_SUCCESS)
            return PAM_SYSTEM_ERR;
    }
    return PAM_SUCCESS;
}
int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
"""

# Marks any python process it is preloaded into (LD_PRELOAD, or as a PKCS#11 module).
_MARKER_LIBRARY = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    char exe[4096] = {0};
    const char *path = getenv("MARKER_PATH") ? getenv("MARKER_PATH") : MARKER;
    if (readlink("/proc/self/exe", exe, sizeof exe - 1) > 0 && strstr(exe, "python")) {
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) { write(fd, "preload\n", 8); close(fd); }
    }
}
"""


def strerror(code: int) -> str:
    libpam = ctypes.CDLL("libpam.so.0")
    libpam.pam_strerror.restype = ctypes.c_char_p
    libpam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return str(libpam.pam_strerror(None, code).decode())


def pam_available() -> str | None:
    if shutil.which("pamtester") is None:
        return "pamtester not found (apt install pamtester)"
    if not PAM_WRAPPER.exists() or not PAM_MATRIX.exists():
        return "pam_wrapper not found (apt install libpam-wrapper)"
    if not MODULE.exists():
        return f"{MODULE} not built (scripts/setup needs gcc and libpam0g-dev)"
    if shutil.which("gcc") is None:
        return "gcc not found"
    return None


@pytest.fixture(scope="module", autouse=True)
def pam_tools() -> None:
    reason = pam_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def native_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test PAM module (pam_putenv, authtok) and the marker library, compiled."""
    out = tmp_path_factory.mktemp("native")
    built = {}
    for name, source, extra in (
        ("pam_test_env", _PUTENV_MODULE, ["-lpam"]),
        ("marker", _MARKER_LIBRARY, [f'-DMARKER="{out / "marker.log"}"']),
    ):
        (out / f"{name}.c").write_text(source)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(out / f"{name}.so"),
                        str(out / f"{name}.c"), *extra], check=True, capture_output=True)
        built[name] = out / f"{name}.so"
    built["marker_log"] = out / "marker.log"
    return built


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        self.out = proc.stdout + proc.stderr

    @property
    def ok(self) -> bool:
        return self.proc.returncode == 0 and "successfully authenticated" in self.out

    def code(self, code: int) -> bool:
        """The stack failed with exactly ``code`` (pamtester prints pam_strerror)."""
        return self.proc.returncode != 0 and strerror(code) in self.out

    @property
    def ignored(self) -> bool:
        return IGNORED in self.out


class Rig:
    """A PAM service dir, root's config and an authfile directory under ``root``."""

    def __init__(self, root: Path, environment: dict[str, str]) -> None:
        self.root = root
        self.environment = environment
        #: The module's socket= option: "none" spawns the helper (test_pam_native),
        #: a path asks the login service there (test_pam_service), None: the default.
        self.socket: str | None = "none"
        self.module = MODULE
        self.services = root / "pam.d"
        self.services.mkdir(mode=0o755)
        self.authdir = root / "login"
        self.authdir.mkdir(mode=0o755)
        self.config = root / "config.toml"
        self.passdb = root / "passdb"
        self.passdb.write_text("".join(
            f"{user}:{UNIX_PASSWORD}:{service}\n"
            for user in (ALICE, BOB, "root") for service in ("su", "sudo", "login")
        ))
        self.write_config(environment)

    def write_config(self, environment: dict[str, str], login: str = "") -> None:
        env = "".join(f'{k} = "{v}"\n' for k, v in environment.items())
        self.config.write_text(
            f'[environment]\n{env}\n[login]\nauthdir = "{self.authdir}"\n'
            f'state_dir = "{self.root / "state"}"\n{login}'
        )
        self.config.chmod(0o644)

    def hsm(self, *options: str) -> str:
        socket = [] if self.socket is None else [f"socket={self.socket}"]
        return " ".join([str(self.module), f"config={self.config}", *socket, *options])

    def matrix(self) -> str:
        return f"{PAM_MATRIX} passdb={self.passdb}"

    def service(self, name: str, lines: list[str]) -> str:
        (self.services / name).write_text("\n".join(lines) + "\n")
        return name

    def sudo(self, *options: str, name: str = "sudo") -> str:
        """The token instead of the password; an unenrolled user falls through to it."""
        return self.service(name, [
            f"auth [success=done ignore=ignore default=die] {self.hsm('nouserok', *options)}",
            f"auth optional {SECURITY / 'pam_echo.so'} {IGNORED}",
            f"auth required {self.matrix()}",
        ])

    def su(self, *options: str, name: str = "su") -> str:
        """The Unix password first (sets PAM_AUTHTOK), then the token: both required."""
        return self.service(name, [
            f"auth required {self.matrix()}",
            f"auth required {self.hsm(*options)}",
        ])

    def login(self, *options: str, name: str = "login") -> str:
        """The token alone (a display manager's or console's only auth line)."""
        return self.service(name, [f"auth required {self.hsm(*options)}"])

    def pamtester(self, service: str, user: str, answers: list[str] | None, *items: str,
                  env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_PRELOAD": str(PAM_WRAPPER),
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(self.services),
            **(env or {}),
        }
        args = ["pamtester", "-v", *(a for i in items for a in ("-I", i)), service, user,
                "authenticate"]
        stdin = None if answers is None else "".join(a + "\n" for a in answers)
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True,
                              env=environment, timeout=timeout, check=False)
        return Result(proc)

    def counter(self, user: str = ALICE) -> int:
        data = json.loads((self.authdir / user).read_text())
        return int(data["credentials"][0]["counter"])


@pytest.fixture(params=["softhsm", pytest.param("swtpm", marks=pytest.mark.swtpm)])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    """``ALICE`` enrolled with the pin method on SoftHSM or on swtpm."""
    return make_rig(request, tmp_path, request.param)


@pytest.fixture
def hsm_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Rig:
    return make_rig(request, tmp_path, "softhsm")


def make_rig(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Rig:
    root = tmp_path / "rig"
    root.mkdir(mode=0o755)
    if kind == "softhsm":
        env = request.getfixturevalue("softhsm_env")
        token = init_token(unique_label("pamnative"), so_pin="12345678", user_pin=PIN)
        settings = {"uri": token.uri, "allow_unenforced_pin": True}
        config = Config({Method.PIN: MethodConfig("pkcs11", settings)})
        r = Rig(root, {"SOFTHSM2_CONF": str(env.conf)})
        r.token_label = token.label  # type: ignore[attr-defined]
    else:
        reason = swtpm_available()
        if reason:
            pytest.skip(reason)
        tpm = request.getfixturevalue("swtpm")
        settings = {"tcti": tpm.tcti, "state_dir": str(root / "tpm2-state")}
        config = Config({Method.PIN: MethodConfig("tpm2", settings)})
        r = Rig(root, {})
    with AuthDir(r.authdir) as authdir:
        enroll(authdir, ALICE, Method.PIN, config, pin=PIN)
    return r


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A directory with a sitecustomize and a fake ``hsm_auth`` package that each write
    to a marker file when imported, and a PYTHONSTARTUP file that does the same."""
    plant = tmp_path / "plant"
    (plant / "hsm_auth").mkdir(parents=True)
    marker = tmp_path / "planted.log"
    code = textwrap.dedent(f"""
        import os
        with open({str(marker)!r}, "a") as f:
            f.write(__name__ + "\\n")
    """)
    (plant / "sitecustomize.py").write_text(code)
    (plant / "usercustomize.py").write_text(code)
    (plant / "hsm_auth" / "__init__.py").write_text(code)
    (plant / "hsm_auth" / "pam.py").write_text(code)
    (plant / "startup.py").write_text(code)
    yield plant, marker


def hostile_environment(plant: Path, tmp_path: Path, libs: dict[str, Path]) -> dict[str, str]:
    """What a caller of ``su`` sets to take over the Python side or its tokens: the
    planted directory as Python's path, startup and user base, a bogus SoftHSM config
    and TCTI, and the marker library as PKCS#11 module."""
    bogus = tmp_path / "bogus-softhsm2.conf"
    bogus.write_text(f"directories.tokendir = {tmp_path}\n")
    return {
        "PYTHONPATH": str(plant),
        "PYTHONSTARTUP": str(plant / "startup.py"),
        "PYTHONUSERBASE": str(plant),
        "PYTHONINSPECT": "1",
        "PYTHONWARNINGS": "error",
        "SOFTHSM2_CONF": str(bogus),
        "TPM2TOOLS_TCTI": f"swtpm:path={tmp_path}/none.sock",
        "HSM_AUTH_TCTI": f"swtpm:path={tmp_path}/none.sock",
        "HSM_AUTH_PKCS11_MODULE": str(libs["marker"]),
        "HSM_AUTH_SOFTHSM_MODULE": str(libs["marker"]),
        "HSM_AUTH_PIN_BACKEND": "tpm2",
        "HSM_AUTH_CONFIG": str(bogus),
        "HSM_AUTH_SOFT_FIDO2": "1",
    }


def assert_login_ignores(rig: Rig, hostile: dict[str, str], libs: dict[str, Path],
                         marker: Path, log: Callable[[], str] = str) -> None:
    """``hostile`` in pamtester's environment (with the marker library preloaded) and put
    into the PAM environment by the stack: the login still works on root's config (the
    token's counter moves) and nothing planted ran."""
    service = rig.service("su-env", [
        *(f"auth required {libs['pam_test_env']} putenv={k}={v}" for k, v in hostile.items()),
        f"auth required {rig.hsm()}",
    ])
    env = hostile | {"LD_PRELOAD": f"{PAM_WRAPPER}:{libs['marker']}"}
    before = rig.counter()
    result = rig.pamtester(service, ALICE, [PIN], env=env)
    assert result.ok, result.out + log()
    assert rig.counter() > before
    assert not marker.exists(), marker.read_text()
    assert not libs["marker_log"].exists(), libs["marker_log"].read_text()
