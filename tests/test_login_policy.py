"""The login policy (hsm_auth.login_policy) through hsm_auth.login.authenticate, on real
SoftHSM tokens, swtpm and the software FIDO2 authenticator, with a scripted
conversation in place of the PAM module (the PAM-level tests are test_pam_native.py).

Accounts are real ones of this machine (``getpwnam`` canonicalises every name)."""

from __future__ import annotations

import pwd
import shutil
from pathlib import Path

import pytest

from hsm_auth import login as L
from hsm_auth import login_policy as P
from hsm_auth.config import Config, MethodConfig
from hsm_auth.errors import ConfigError
from hsm_auth.methods import Method
from hsm_auth.testing.softhsm import init_token, unique_label

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
