"""The login policy (hsm_auth.login_policy) through hsm_auth.login.authenticate, on real
SoftHSM tokens, swtpm and the software FIDO2 authenticator, with a scripted
conversation in place of the PAM module (the PAM-level tests are test_pam_native.py).

Accounts are real ones of this machine (``getpwnam`` canonicalises every name)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hsm_auth import login as L
from hsm_auth import login_policy as P
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import ConfigError
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label
from hsm_auth.uri import Pkcs11Uri

PIN = "482916"


def _accounts() -> list[str]:
    """Two accounts other than root that exist here (Debian has daemon and bin)."""
    names = [p.pw_name for p in pwd.getpwall() if p.pw_uid != 0 and L._USER.fullmatch(p.pw_name)]
    preferred = [n for n in ("daemon", "bin", "sys") if n in names]
    return (preferred + [n for n in names if n not in preferred])[:2]


ALICE, BOB = _accounts()


class Script:
    """A conversation that answers secrets from a list and records every message."""

    def __init__(self, *answers: str | None) -> None:
        self.answers = list(answers)
        self.log: list[tuple[str, str]] = []

    def secret(self, prompt: str) -> str | None:
        self.log.append(("secret", prompt))
        return self.answers.pop(0) if self.answers else None

    def info(self, text: str) -> None:
        self.log.append(("info", text))

    def error(self, text: str) -> None:
        self.log.append(("error", text))

    @property
    def prompts(self) -> list[str]:
        return [t for kind, t in self.log if kind == "secret"]


class Rig:
    def __init__(self, root: Path, config: Config) -> None:
        self.authdir = root / "login"
        self.state = root / "state"
        self.config = config
        with L.AuthDir(self.authdir, create=True):
            pass

    def enroll(self, user: str, method: Method, config: Config | None = None,
               pin: str | None = PIN) -> L.LoginCredential:
        with L.AuthDir(self.authdir) as d:
            return L.enroll(d, user, method, config or self.config, pin=pin,
                            replace_existing=True)

    def add(self, user: str, method: Method, config: Config, pin: str | None = PIN) -> None:
        """Enroll another token of the same method (login tries each)."""
        with L.AuthDir(self.authdir) as d:
            L.enroll(d, user, method, config, pin=pin, add=True)

    def creds(self, user: str) -> list[L.LoginCredential]:
        with L.AuthDir(self.authdir) as d:
            return d.read(user) or []

    def login(self, user: str, conv: Script, *args: str, config: Config | None = None,
              service: str = "su", rhost: str | None = None, tty: str | None = "/dev/pts/1",
              first_pass: str | None = None, prior_authtok: bool = False) -> L.LoginOutcome:
        table = (config or self.config).raw.get("login", {})
        request = L.LoginRequest(user, service, rhost, tty, L.LoginOptions.from_args(args, table),
                                 first_pass=first_pass, prior_authtok=prior_authtok)
        return L.authenticate(request, conv, config=config or self.config,
                              authdir=self.authdir, state_dir=self.state)


def _pkcs11(label: str) -> tuple[Config, str]:
    token = init_token(unique_label(label), so_pin="12345678", user_pin=PIN)
    settings = {"uri": token.uri, "allow_unenforced_pin": True}
    return Config({Method.PIN: MethodConfig("pkcs11", settings)}), token.label


def _with_login(config: Config, **table: object) -> Config:
    raw = dict(config.raw)
    raw["login"] = table
    return Config(config.methods, config.environment, raw)


@pytest.fixture
def rig(tmp_path, softhsm_env):
    config, _ = _pkcs11("policy")
    r = Rig(tmp_path, config)
    r.enroll(ALICE, Method.PIN)
    return r


# --- options --------------------------------------------------------------------------


def test_module_arguments_parse_and_unknown_ones_fail_closed():
    o = L.LoginOptions.from_args(["nouserok", "cue", "methods=pin,face", "timeout=12",
                                  "remote=allow", "debug", "try_first_pass"])
    assert o.nouserok and o.cue == L.DEFAULT_CUE and o.methods == (Method.PIN, Method.FACE)
    assert o.timeout == 12 and o.remote == "allow" and o.debug and o.first_pass == "try"
    assert L.LoginOptions().first_pass is None and not L.LoginOptions().nouserok
    assert L.LoginOptions.from_args(["cue_prompt=Tap it"]).cue == "Tap it"
    assert L.LoginOptions.from_args([], {"remote": "allow", "methods": "face"}).methods == (
        Method.FACE,)
    for bad in (["nouserok=1"], ["bogus"], ["remote=maybe"], ["timeout=0"], ["timeout=x"],
                ["methods="], ["methods=retina"], ["use_first_pass=yes"]):
        with pytest.raises((ConfigError, ValueError)):
            L.LoginOptions.from_args(bad)


# --- the PIN, the cue, the outcomes ------------------------------------------------------


@pytest.mark.softhsm
def test_pin_asked_with_its_own_prompt_naming_the_token_then_success(rig):
    before = rig.creds(ALICE)[0].counter
    conv = Script(PIN)
    out = rig.login(ALICE, conv, "cue_prompt=Checking your token")
    assert out.outcome is L.Outcome.SUCCESS and out.method is Method.PIN, out.message
    label = rig.creds(ALICE)[0].settings["uri"].split("token=")[1].split(";")[0].split("?")[0]
    assert conv.prompts == [f"PIN for token {label!r}: "]
    # the cue comes after the PIN and before the token is used: the log order shows it
    assert conv.log == [("secret", conv.prompts[0]), ("info", "Checking your token")]
    assert rig.creds(ALICE)[0].counter > before
    assert PIN not in out.message


@pytest.mark.softhsm
def test_wrong_pin_is_auth_err_and_changes_no_counter(rig):
    before = rig.creds(ALICE)
    out = rig.login(ALICE, Script("000000"))
    assert out.outcome is L.Outcome.AUTH_ERR, out.message
    assert rig.creds(ALICE) == before
    assert "000000" not in out.message


@pytest.mark.softhsm
def test_no_answer_or_empty_pin_fails_without_touching_the_token(rig):
    for answer in (None, ""):
        out = rig.login(ALICE, Script(answer))
        assert out.outcome is L.Outcome.AUTH_ERR
    assert P.FailureRecord(rig.state, ALICE, P.FailurePolicy()).count() == 0


@pytest.mark.softhsm
def test_earlier_password_is_never_the_pin_unless_first_pass_is_given(rig):
    unix_password = "hunter2-unix"
    conv = Script(PIN)
    out = rig.login(ALICE, conv, first_pass=unix_password)
    assert out.outcome is L.Outcome.SUCCESS and len(conv.prompts) == 1
    # with use_first_pass the earlier password is the PIN, and nothing is asked
    conv = Script(PIN)
    assert rig.login(ALICE, conv, "use_first_pass", first_pass=PIN).outcome is (
        L.Outcome.SUCCESS)
    assert conv.prompts == []
    out = rig.login(ALICE, Script(PIN), "use_first_pass", first_pass=unix_password)
    assert out.outcome is L.Outcome.AUTH_ERR
    out = rig.login(ALICE, Script(PIN), "use_first_pass")
    assert out.outcome is L.Outcome.AUTH_ERR


@pytest.mark.softhsm
def test_unenrolled_is_ignore_with_nouserok_else_user_unknown(rig):
    assert rig.login(BOB, Script(PIN), "nouserok").outcome is L.Outcome.IGNORE
    assert rig.login(BOB, Script(PIN)).outcome is L.Outcome.USER_UNKNOWN
    # root, not enrolled: IGNORE, so the next module (pam_unix) decides; never locked out
    assert rig.login("root", Script(), "nouserok").outcome is L.Outcome.IGNORE


@pytest.mark.softhsm
def test_names_are_canonicalised_never_passed(rig):
    # On this (case-sensitive) NSS these names are no account: unknown, even with nouserok
    for name in (ALICE.upper(), ALICE + ".", ALICE.capitalize(), " " + ALICE, ALICE + "\0"):
        out = rig.login(name, Script(PIN), "nouserok")
        assert out.outcome is L.Outcome.USER_UNKNOWN, (name, out)


@pytest.mark.softhsm
def test_a_case_insensitive_nss_resolves_to_the_real_account(rig):
    """SSSD/AD answer getpwnam("Alice") with alice's entry: the login is alice's, with
    alice's token. (A stand-in for that NSS: this machine's is case-sensitive.)"""
    real = pwd.getpwnam(ALICE)

    def insensitive(name: str):
        return pwd.getpwnam(name.lower().rstrip("."))

    request = L.LoginRequest(ALICE.capitalize() + ".", "su", None, None, L.LoginOptions())
    out = P.run(request, Script("000000"), config=rig.config, authdir=rig.authdir,
                state_dir=rig.state, getpwnam=insensitive)
    assert out.outcome is L.Outcome.AUTH_ERR  # alice's token was asked, and refused
    out = P.run(request, Script(PIN), config=rig.config, authdir=rig.authdir,
                state_dir=rig.state, getpwnam=insensitive)
    assert out.outcome is L.Outcome.SUCCESS and real.pw_name in out.message
    assert P.canonical_user("Nobody-Here") is None


# --- two tokens -------------------------------------------------------------------------


@pytest.mark.softhsm
def test_two_tokens_either_present_logs_in_and_none_is_authinfo_unavail(tmp_path, softhsm_env):
    config_a, label_a = _pkcs11("two-a")
    config_b, label_b = _pkcs11("two-b")
    r = Rig(tmp_path, config_a)
    r.enroll(ALICE, Method.PIN)
    r.add(ALICE, Method.PIN, config_b)
    assert len(r.creds(ALICE)) == 2
    tokens = softhsm_env.token_dir
    conv = Script(PIN)
    assert r.login(ALICE, conv).outcome is L.Outcome.SUCCESS
    assert conv.prompts == [f"PIN for token {label_a!r}: "]
    away = tmp_path / "away"
    away.mkdir()
    a_dir = _token_dir(tokens, label_a)
    shutil.move(a_dir, away / a_dir.name)  # token A unplugged
    conv = Script(PIN)
    out = r.login(ALICE, conv)
    assert out.outcome is L.Outcome.SUCCESS, out.message
    assert conv.prompts == [f"PIN for token {label_b!r}: "]  # nothing asked for the absent one
    b_dir = _token_dir(tokens, label_b)
    shutil.move(b_dir, away / b_dir.name)
    out = r.login(ALICE, Script(PIN))
    assert out.outcome is L.Outcome.AUTHINFO_UNAVAIL, out.message
    shutil.move(away / a_dir.name, a_dir)  # A back, B still away
    assert r.login(ALICE, Script(PIN)).outcome is L.Outcome.SUCCESS


def _token_dir(tokens: Path, label: str) -> Path:
    for d in tokens.iterdir():
        token_file = d / "token.object"
        if token_file.exists() and label.encode() in token_file.read_bytes():
            return d
    raise AssertionError(f"no token directory for {label}")


# --- secrets never in the authfile --------------------------------------------------------


def test_secret_settings_come_from_roots_config_not_the_authfile():
    assert "owner_auth" in L.SECRET_SETTINGS
    cred = L.LoginCredential(Method.PIN, "tpm2", {"tcti": "x"}, "k", None, b"\x04" * 65,
                             L.ECDSA_P256_SHA256, 0, 0)
    with_config = Config({Method.PIN: MethodConfig("tpm2", {"owner_auth": "from-root"})})
    assert L.with_secrets(cred, with_config)["owner_auth"] == "from-root"
    other = Config({Method.PIN: MethodConfig("pkcs11", {"owner_auth": "not-for-tpm2"})})
    assert "owner_auth" not in L.with_secrets(cred, other)


# --- the failure record ------------------------------------------------------------------


def _strict(config: Config, **table: object) -> Config:
    return _with_login(config, **table)


@pytest.mark.softhsm
def test_after_n_wrong_pins_tries_are_refused_without_reaching_the_token(rig):
    """Anyone who can run `su alice` gets `deny` guesses, then nothing for unlock_time."""
    config = _strict(rig.config, deny=3, unlock_time=2, fail_interval=60)
    before = rig.creds(ALICE)[0].counter
    for guess in ("000001", "000002", "000003"):
        assert rig.login(ALICE, Script(guess), config=config).outcome is L.Outcome.AUTH_ERR
    record = P.FailureRecord(rig.state, ALICE, P.FailurePolicy(3, 60, 2))
    assert record.count() == 3
    conv = Script(PIN)
    out = rig.login(ALICE, conv, config=config)  # even the right PIN
    assert out.outcome is L.Outcome.MAXTRIES and "without trying the token" in out.message
    assert conv.log == []  # no prompt, no cue: the token was not reached
    assert rig.creds(ALICE)[0].counter == before
    # the record is root's: 0600 in a 0700 directory, owned by this (root) process
    st = os.stat(record.path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(record.dir).st_mode) == 0o700
    # other users are not affected
    rig.enroll(BOB, Method.PIN)
    assert rig.login(BOB, Script(PIN), config=config).outcome is L.Outcome.SUCCESS
    time.sleep(2.1)  # unlock_time passed: the right PIN works and clears the record
    assert rig.login(ALICE, Script(PIN), config=config).outcome is L.Outcome.SUCCESS
    assert record.count() == 0


@pytest.mark.softhsm
def test_failures_older_than_fail_interval_are_forgotten(rig):
    config = _strict(rig.config, deny=2, unlock_time=600, fail_interval=1)
    assert rig.login(ALICE, Script("000001"), config=config).outcome is L.Outcome.AUTH_ERR
    time.sleep(1.1)
    assert rig.login(ALICE, Script("000002"), config=config).outcome is L.Outcome.AUTH_ERR
    assert rig.login(ALICE, Script(PIN), config=config).outcome is L.Outcome.SUCCESS


@pytest.mark.softhsm
def test_an_unsafe_or_malformed_failure_record_fails_closed(rig):
    assert rig.login(ALICE, Script("000001")).outcome is L.Outcome.AUTH_ERR
    record = P.FailureRecord(rig.state, ALICE, P.FailurePolicy())
    record.path.chmod(0o644)  # readable by others: not root's record any more
    out = rig.login(ALICE, Script(PIN))
    assert out.outcome is L.Outcome.SYSTEM_ERR, out.message
    record.path.chmod(0o600)
    record.path.write_text('{"version": 1, "failures": "none"}')
    assert rig.login(ALICE, Script(PIN)).outcome is L.Outcome.SYSTEM_ERR
    record.path.unlink()
    record.path.symlink_to(rig.state / "elsewhere")
    assert rig.login(ALICE, Script(PIN)).outcome is L.Outcome.SYSTEM_ERR


_KILLEE = r"""
import os, signal, sys
from pathlib import Path
from hsm_auth import login as L
from hsm_auth.config import Config, MethodConfig
from hsm_auth.methods import Method

class KillAtCue:
    def secret(self, prompt):
        return sys.argv[4]
    def info(self, text):  # the cue: shown once the try is recorded, before the token
        if sys.argv[6] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    def error(self, text):
        pass

config = Config({Method.PIN: MethodConfig("pkcs11", {"uri": sys.argv[3],
                                                   "allow_unenforced_pin": True})})
request = L.LoginRequest(sys.argv[5], "su", None, None, L.LoginOptions(cue="Working"))
out = L.authenticate(request, KillAtCue(), config=config, authdir=Path(sys.argv[1]),
                     state_dir=Path(sys.argv[2]))
print(out.outcome.name)
"""


@pytest.mark.softhsm
def test_kill_9_during_a_try_counts_as_a_failure_and_never_goes_back(rig, tmp_path):
    """The try is recorded before the token is used: killing the login (to hide a wrong
    guess) does not get an attacker more guesses."""
    script = tmp_path / "killee.py"
    script.write_text(_KILLEE)
    uri = rig.creds(ALICE)[0].settings["uri"]
    record = P.FailureRecord(rig.state, ALICE, P.FailurePolicy())
    for n in range(1, P.DENY + 1):
        r = subprocess.run([sys.executable, str(script), str(rig.authdir), str(rig.state), uri,
                            "000000", ALICE, "kill"], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert record.count() == n
    r = subprocess.run([sys.executable, str(script), str(rig.authdir), str(rig.state), uri,
                        PIN, ALICE, "-"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0 and r.stdout.strip() == "MAXTRIES", r.stderr
    assert not list(record.dir.glob(f".{ALICE}.*"))  # no temp file left by the kills


@pytest.mark.softhsm
def test_parallel_guesses_get_no_more_than_deny_tries(rig, tmp_path):
    """Eight `su alice` at once (processes, as PAM runs them): each try is recorded
    under the record's lock before the token is used, so only `deny` reach it."""
    script = tmp_path / "login.py"
    script.write_text(_KILLEE)
    uri = rig.creds(ALICE)[0].settings["uri"]
    procs = [subprocess.Popen([sys.executable, str(script), str(rig.authdir), str(rig.state),
                               uri, f"00000{i}", ALICE, "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert results.count("AUTH_ERR") == P.DENY, results
    assert results.count("MAXTRIES") == 8 - P.DENY, results


# --- remote sessions ---------------------------------------------------------------------


def _req(service: str = "su", rhost: str | None = None, tty: str | None = "/dev/pts/3",
         pid: int | None = None) -> L.LoginRequest:
    return L.LoginRequest(ALICE, service, rhost, tty, L.LoginOptions(), caller_pid=pid)


def test_pam_items_that_say_remote():
    assert P.pam_items_remote(_req(rhost="203.0.113.9"))
    assert P.pam_items_remote(_req(service="sshd", rhost=None, tty=None))
    assert P.pam_items_remote(_req(tty="ssh"))
    assert not P.pam_items_remote(_req())
    # sudo sets PAM_RHOST to the local host's name: that is not remote
    for local in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        assert not P.pam_items_remote(_req(service="sudo", rhost=local))


def test_without_logind_only_the_pam_items_count():
    """CI and containers have no logind: `su` typed in an SSH session looks local there
    (documented); sshd itself and a remote PAM_RHOST are still refused."""
    assert not P.logind_running() or pytest.skip("logind runs here")
    assert not P.is_remote(_req())
    assert P.is_remote(_req(service="sshd"))


def _fake_loginctl(tmp_path: Path, sessions: dict[str, str], exit_code: int = 0) -> Path:
    """A stand-in for /usr/bin/loginctl printing what loginctl prints for
    ``show-user UID --property=Sessions --value`` and ``show-session ID --property=Remote
    --value``; it logs its arguments and environment. (This tests our side of the
    interface; a real logind is not available on this machine.)"""
    log = tmp_path / "loginctl.log"
    cases = "".join(f'  "show-session {sid} --property=Remote --value") echo {remote};;\n'
                    for sid, remote in sessions.items())
    script = tmp_path / "loginctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$* PATH=$PATH XDG=$XDG_SESSION_ID" >> {log}\n'
        f"[ {exit_code} -eq 0 ] || exit {exit_code}\n"
        'case "$*" in\n'
        f'  "show-user {os.getuid()} --property=Sessions --value") echo '
        f'"{" ".join(sessions)}";;\n'
        f"{cases}"
        "  *) exit 1;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


def test_logind_session_remote_from_the_callers_cgroup_not_its_environment(tmp_path,
                                                                           monkeypatch):
    assert P.session_of("0::/user.slice/user-1000.slice/session-7.scope\n") == "7"
    assert P.session_of("9:name=systemd:/user.slice/user-0.slice/session-c2.scope\n"
                        "0::/\n") == "c2"
    assert P.session_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/"
                        "app-gnome-org.gnome.Terminal.slice/vte-spawn-1.scope\n") is None
    assert P.session_of("4:memory:/session-9.scope\n0::/\n") is None  # not systemd's
    # This process is in no session scope (no logind here): the calling user's sessions
    # decide, remote if any is remote. XDG_SESSION_ID and PATH are the user's: unused.
    monkeypatch.setenv("XDG_SESSION_ID", "1")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    local = _fake_loginctl(tmp_path, {"1": "no", "c4": "no"})
    assert not P.is_remote(_req(), loginctl=local, logind=True)
    log = (tmp_path / "loginctl.log").read_text()
    assert f"show-user {os.getuid()} --property=Sessions" in log
    assert "show-session c4 --property=Remote" in log
    assert all(line.endswith("PATH=/usr/bin:/bin XDG=") for line in log.splitlines())
    remote = _fake_loginctl(tmp_path, {"1": "no", "5": "yes"})
    assert P.is_remote(_req(), loginctl=remote, logind=True)


@pytest.mark.softhsm
def test_logind_that_cannot_answer_fails_closed(rig, tmp_path, monkeypatch):
    broken = _fake_loginctl(tmp_path, {}, exit_code=1)
    monkeypatch.setattr(P, "LOGINCTL", broken)
    monkeypatch.setattr(P, "logind_running", lambda: True)
    out = rig.login(ALICE, Script(PIN))
    assert out.outcome is L.Outcome.SYSTEM_ERR and "loginctl" in out.message
    assert rig.login(ALICE, Script(PIN), "remote=allow").outcome is L.Outcome.SUCCESS
    remote = _fake_loginctl(tmp_path, {"3": "yes"})
    monkeypatch.setattr(P, "LOGINCTL", remote)
    conv = Script(PIN)
    assert rig.login(ALICE, conv).outcome is L.Outcome.PERM_DENIED and conv.log == []


# --- FIDO2: the cue, user verification, device only as a second factor -------------------


def _fido2(device, tmp_path: Path, method: Method) -> Config:
    settings = {"device": f"soft:{device.path}", "state_dir": str(tmp_path / "f2"),
                "allow_software_authenticator": True}
    return Config({method: MethodConfig("fido2", settings)})


@pytest.mark.fido2
def test_fingerprint_login_shows_the_cue_before_the_authenticator_waits(tmp_path,
                                                                      soft_fido2_factory):
    device = soft_fido2_factory()
    config = _fido2(device, tmp_path, Method.BIOMETRIC)
    r = Rig(tmp_path, config)
    r.enroll(ALICE, Method.BIOMETRIC, pin=None)
    conv = Script()
    out = r.login(ALICE, conv, "cue_prompt=Touch the sensor")
    assert out.outcome is L.Outcome.SUCCESS and out.method is Method.BIOMETRIC, out.message
    assert conv.log == [("info", "Touch the sensor")]  # once, no PIN asked
    device.configure(uv_outcome="fail")
    assert r.login(ALICE, Script()).outcome is L.Outcome.AUTH_ERR
    os.rename(device.path, tmp_path / "unplugged")
    out = r.login(ALICE, Script())
    assert out.outcome is L.Outcome.AUTHINFO_UNAVAIL, out.message


@pytest.mark.softhsm
def test_device_alone_is_refused_and_allowed_only_as_a_configured_second_factor(
        tmp_path, softhsm_env):
    token = init_token(unique_label("device"), so_pin="12345678", user_pin=PIN)
    pin_file = tmp_path / "device.pin"
    pin_file.write_text(PIN)
    pin_file.chmod(0o600)
    uri = Pkcs11Uri(token=token.label, module_path=token.module_path,
                    pin_source=f"file:{pin_file}")
    config = Config({Method.DEVICE: MethodConfig("pkcs11", {"uri": str(uri)})})
    r = Rig(tmp_path, config)
    r.enroll(ALICE, Method.DEVICE, pin=None)
    # by default: as if not enrolled (possession proves no person)
    assert r.login(ALICE, Script()).outcome is L.Outcome.USER_UNKNOWN
    assert r.login(ALICE, Script(), "nouserok").outcome is L.Outcome.IGNORE
    assert r.login(ALICE, Script(), "methods=device", "second_factor",
                   prior_authtok=True).outcome is L.Outcome.USER_UNKNOWN  # not configured
    second = _with_login(config, device="second-factor")
    assert r.login(ALICE, Script(), config=second, prior_authtok=True).outcome is (
        L.Outcome.USER_UNKNOWN)  # no second_factor on the module line
    assert r.login(ALICE, Script(), "second_factor", config=second).outcome is (
        L.Outcome.USER_UNKNOWN)  # no module before it set PAM_AUTHTOK: it would be alone
    out = r.login(ALICE, Script(), "second_factor", config=second, prior_authtok=True)
    assert out.outcome is L.Outcome.SUCCESS and out.method is Method.DEVICE, out.message
    assert r.login(ALICE, Script(), "second_factor", "methods=pin", config=second,
                   prior_authtok=True).outcome is L.Outcome.USER_UNKNOWN
    with pytest.raises(ConfigError):
        P.allowed_methods(_req(), {"device": "yes"})


# --- swtpm: the TPM's owner_auth, a locked TPM ---------------------------------------------


@pytest.mark.swtpm
def test_tpm_owner_auth_stays_in_roots_config_and_a_locked_tpm_is_maxtries(tmp_path, swtpm):
    owner = "owner-" + os.urandom(6).hex()
    r = subprocess.run(["tpm2_changeauth", "-c", "owner", owner], capture_output=True,
                       text=True, env={**os.environ, "TPM2TOOLS_TCTI": swtpm.tcti}, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    settings = {"tcti": swtpm.tcti, "state_dir": str(tmp_path / "tpm2"), "owner_auth": owner}
    config = Config({Method.PIN: MethodConfig("tpm2", settings)})
    rig = Rig(tmp_path, config)
    rig.enroll(ALICE, Method.PIN)
    authfile = (rig.authdir / ALICE).read_text()
    assert owner not in authfile
    assert "owner_auth" not in rig.creds(ALICE)[0].settings
    assert stat.S_IMODE(os.stat(rig.authdir / ALICE).st_mode) == 0o644  # others may read it
    conv = Script(PIN)
    out = rig.login(ALICE, conv)
    assert out.outcome is L.Outcome.SUCCESS, out.message
    assert conv.prompts == ["PIN for the TPM: "]
    # the fixture's TPM locks after 3 wrong tries (dictionary-attack protection)
    lenient = _with_login(config, deny=10)
    outcomes = [rig.login(ALICE, Script("000000"), config=lenient).outcome for _ in range(4)]
    assert outcomes[0] is L.Outcome.AUTH_ERR and outcomes[-1] is L.Outcome.MAXTRIES, outcomes
    assert rig.login(ALICE, Script(PIN), config=lenient).outcome is L.Outcome.MAXTRIES
