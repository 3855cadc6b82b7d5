"""The library never talks to the terminal: a token's "waiting for you" goes to the
caller's ``Authorization.interaction``, and the CLI's interaction prints it on stderr."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsm_auth.errors import Cancelled
from hsm_auth.keystore import Authorization, UserInteraction

ROOT = Path(__file__).resolve().parent.parent
#: Front ends, which own the terminal; and the test tools.
FRONT_ENDS = {"cli.py", "agent_cli.py", "demo.py", "pam.py", "login_service.py", "__main__.py"}


class Recorder(UserInteraction):
    def __init__(self, *, consent: bool = True) -> None:
        self.consent = consent
        self.prompts: list[str] = []
        self.uv_requests: list[str] = []

    def prompt_up(self, prompt: str) -> None:
        self.prompts.append(prompt)

    def request_uv(self, prompt: str) -> bool:
        self.uv_requests.append(prompt)
        return self.consent


def _library_files() -> list[Path]:
    files = [p for p in (ROOT / "hsm_auth").rglob("*.py") if "testing" not in p.parts]
    files += list((ROOT / "backends").glob("*.py"))
    return [p for p in files if p.name not in FRONT_ENDS or p.parent.name != "hsm_auth"]


def test_no_library_module_writes_to_the_terminal() -> None:
    """Static guard: no print(), sys.stdout/stderr, /dev/tty or getpass outside the front ends."""
    found = []
    files = _library_files()
    assert any(p.name == "fido2.py" and p.parent.name == "backends" for p in files)
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            bad = (
                (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                 and node.func.id in ("print", "input"))
                or (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"
                    and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__"))
                or (isinstance(node, ast.Constant) and node.value == "/dev/tty")
                or (isinstance(node, ast.Name | ast.alias)
                    and getattr(node, "id", getattr(node, "name", None)) == "getpass")
            )
            if bad:
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    assert found == []


# --- FIDO2: the only backend that waits for the user ------------------------------------

needs_fido2 = pytest.mark.skipif(
    importlib.util.find_spec("fido2") is None, reason="python-fido2 (the fido2 extra) is missing"
)


def _settings(device: Any, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "device": f"soft:{device.path}",
        "state_dir": str(tmp_path / "fido2-state"),
        "allow_software_authenticator": True,
        **extra,  # "prompts" left at its default (true)
    }


@pytest.mark.fido2
@needs_fido2
def test_fido2_prompt_goes_to_the_interaction_and_nothing_to_the_terminal(
    soft_fido2: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from hsm_auth_backends.fido2 import Fido2KeyStore

    user = Recorder()
    auth = Authorization(prompt="Touch the key", interaction=user)
    with Fido2KeyStore.open(_settings(soft_fido2, tmp_path)) as store:
        counter = store.create_counter("atc", auth)
        assert store.counter_increment(counter, auth) == 1
        assert store.counter_increment(counter, Authorization()) == 2  # no one to tell: silent
    assert user.prompts == ["Touch the key"] * 2  # once per operation that waited
    assert user.uv_requests and set(user.uv_requests) == {"Touch the key"}
    assert capfd.readouterr() == ("", "")


@pytest.mark.fido2
@needs_fido2
def test_prompts_false_keeps_prompt_up_quiet(soft_fido2: Any, tmp_path: Path) -> None:
    from hsm_auth_backends.fido2 import Fido2KeyStore

    user = Recorder()
    with Fido2KeyStore.open(_settings(soft_fido2, tmp_path, prompts=False)) as store:
        counter = store.create_counter("atc", Authorization(interaction=user))
        store.counter_increment(counter, Authorization(interaction=user))
    assert user.prompts == [] and user.uv_requests  # consent is still asked


@pytest.mark.fido2
@needs_fido2
def test_declined_user_verification_is_cancelled_before_the_token_is_asked(
    soft_fido2: Any, tmp_path: Path
) -> None:
    from hsm_auth_backends.fido2 import Fido2KeyStore

    with Fido2KeyStore.open(_settings(soft_fido2, tmp_path)) as store:
        counter = store.create_counter("atc", Authorization())
        state = store.state_file.read_bytes()
        before = soft_fido2.status()
        user = Recorder(consent=False)
        with pytest.raises(Cancelled, match="declined"):
            store.counter_increment(counter, Authorization(interaction=user))
        assert user.uv_requests and user.prompts == []
        assert store.state_file.read_bytes() == state
        after = soft_fido2.status()
        assert (after.sign_count, after.uv_retries) == (before.sign_count, before.uv_retries)
        assert store.counter_increment(counter, Authorization()) == 1


@pytest.mark.fido2
@needs_fido2
def test_whole_flow_in_process_writes_nothing(
    soft_fido2: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from hsm_auth.authenticator import PROMPTS, Authenticator
    from hsm_auth.config import Config, MethodConfig
    from hsm_auth.methods import Method
    from hsm_auth.verifier import Verifier

    config = Config(
        methods={Method.BIOMETRIC: MethodConfig("fido2", _settings(soft_fido2, tmp_path))}
    )
    user = Recorder()
    from hsm_auth.testing.fido2 import write_soft_policy

    write_soft_policy(tmp_path / "verifier", [soft_fido2])
    with Verifier.init(tmp_path / "verifier", "V") as verifier, Authenticator(
        tmp_path / "auth", config, interaction=user
    ) as auth:
        offer = verifier.create_offer("alice", methods=[Method.BIOMETRIC])
        response = auth.add_or_update(
            Method.BIOMETRIC, offer.text, activation_code=offer.activation_code
        )
        verifier.accept_enrollment(response)
        session = verifier.start_session("alice", "ctx")
        request = auth.start_offline_authentication(session.text)
        result = auth.finish_offline_authentication(request, Method.BIOMETRIC)
        assert verifier.verify(session.session_id, result.otp).atc == result.atc
    assert capfd.readouterr() == ("", "")
    assert user.prompts and set(user.prompts) == {PROMPTS[Method.BIOMETRIC]}


@pytest.mark.fido2
@needs_fido2
@pytest.mark.softhsm
def test_cli_prints_the_prompt_once_on_stderr(tmp_path: Path) -> None:
    from hsm_auth.demo import prepare
    from hsm_auth.testing.softhsm import softhsm_available

    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    with prepare(home, tpm=False):
        pass
    config = home / "config.toml"
    config.write_text(config.read_text().replace("prompts = false", "prompts = true"))
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "HSM_AUTH_HOME")}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "hsm_auth", "--home", str(home), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result

    cli("verifier", "init")
    code = ["--activation-code-file", str(tmp_path / "activation-code")]
    offer = cli("verifier", "offer", *code, "--user", "alice", "--methods", "biometric").stdout
    response = cli("enroll", *code, "--method", "biometric", stdin=offer).stdout
    cli("verifier", "enroll", stdin=response)
    data = cli("verifier", "session", "--user", "alice", "--context", "ctx").stdout.split()[-1]
    finished = cli("finish", "--method", "biometric", data)
    line = "Verify with your fingerprint on the authenticator: touch / verify on your authenticator"
    assert finished.stderr.count(line) == 1, finished.stderr
    assert finished.stdout.strip().isdigit()  # stdout holds the OTP and nothing else
