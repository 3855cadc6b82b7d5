"""Bad input, each case a finding of issue 9: one ``hsm-auth: error:`` line, a
non-zero exit, no traceback, no hang, bounded memory; the library raises only
HsmAuthError subclasses."""

from __future__ import annotations

import datetime
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from _cli import code_file
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsm_auth import cbor, config, protocol, textcode
from hsm_auth.config import Config, MethodConfig, Paths
from hsm_auth.errors import (
    ConfigError,
    DecodeError,
    InvalidInput,
    StateError,
    UnsupportedVersion,
    UntrustedMessage,
)
from hsm_auth.login import LoginCredential
from hsm_auth.methods import Method
from hsm_auth.uri import Pkcs11Uri, parse_attr_uri
from hsm_auth.webauthn_proof import encode_enrollment_attestation, verify_enrollment_attestation

LONG = "A" * 300


def run(home: Path | None, *args: str, env: dict[str, str] | None = None, timeout: float = 30):
    base = {k: v for k, v in os.environ.items() if not k.startswith("HSM_AUTH_")}
    where = ["--home", str(home)] if home is not None else []
    return subprocess.run(
        [sys.executable, "-m", "hsm_auth", *where, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


def one_error(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsm-auth: error: "), err
    return lines[0]


# --- message arguments ---------------------------------------------------------


@pytest.fixture(scope="module")
def verifier_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    assert run(home, "verifier", "init").returncode == 0
    return home


@pytest.mark.parametrize(
    "command",
    [
        ["start"],
        ["finish", "--method", "device"],
        ["sync"],
        ["verifier", "enroll"],
        ["enroll", "--method", "device", "--offer"],
    ],
)
def test_a_long_message_argument_is_data_not_a_file_name(verifier_home, command):
    line = one_error(run(verifier_home, *command, LONG))
    assert "HA1:" in line  # decoded as (bad) data, not "File name too long"


def test_a_long_home_or_db_is_one_error(tmp_path):
    one_error(run(tmp_path, "--home", "H" * 5000, "methods"))
    one_error(run(tmp_path, "verifier", "credentials", "--db", "D" * 5000))
    (tmp_path / "file").touch()
    assert "File exists" in one_error(
        run(tmp_path, "verifier", "init", "--db", str(tmp_path / "file" / "v.db"))
    )
    line = one_error(run(None, "methods", env={"HSM_AUTH_HOME": "H" * 5000}))
    assert "File name too long" in line


def test_an_otp_from_dev_zero_or_a_home_that_is_not_utf8(verifier_home, tmp_path):
    with open("/dev/zero", "rb") as zero:
        result = subprocess.run(
            [sys.executable, "-m", "hsm_auth", "--home", str(verifier_home), "verifier", "verify",
             "--session", "00" * 16], stdin=zero, capture_output=True, timeout=30, check=False,
        )
    one_error(result)
    line = one_error(run(None, "--home", str(tmp_path) + os.fsdecode(b"/\xff"), "methods"))
    assert "UTF-8" in line


def test_demo_in_a_home_too_deep_for_the_swtpm_socket(tmp_path):
    from hsm_auth.testing.swtpm import swtpm_available

    if swtpm_available():
        pytest.skip(swtpm_available())
    home = tmp_path.joinpath(*["d" * 40] * 3)
    home.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    assert "socket is too long" in one_error(run(home, "demo", env=env, timeout=120))


def test_dev_zero_and_a_fifo_are_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in ("@/dev/zero", f"@{fifo}", f"@{tmp_path}"):
        line = one_error(run(tmp_path, "start", target, timeout=10))
        assert "not a regular file" in line


def test_a_huge_message_file_or_stdin_is_refused(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"HA1:" + b"A" * (2 << 20))
    assert "more than" in one_error(run(tmp_path, "start", f"@{big}"))
    with big.open("rb") as f:
        result = subprocess.run(
            [sys.executable, "-m", "hsm_auth", "--home", str(tmp_path), "start", "-"],
            stdin=f, capture_output=True, timeout=30, check=False,
        )
    assert "more than" in one_error(result)
    bad = tmp_path / "bad"
    bad.write_bytes(b"HA1:\xff\xfe")
    assert "UTF-8" in one_error(run(tmp_path, "start", f"@{bad}"))


def test_arguments_that_are_not_utf8_huge_counts_and_directories(tmp_path):
    surrogate = os.fsdecode(b"\xff")
    line = one_error(run(tmp_path, "verifier", "offer", *code_file(tmp_path), "--user", surrogate))
    assert "not valid UTF-8" in line
    line = one_error(run(tmp_path, "verifier", "audit", "--limit", "9" * 5000))
    assert "whole number" in line
    one_error(run(tmp_path, "verifier", "audit", "--limit", "99999999999999999999999"))
    one_error(run(tmp_path, "verifier", "show", "--user", "a", "--recent", "-1"))
    one_error(run(tmp_path, "verifier", "session", "--user", "a", "--context", "c",
                  "--qr", f"svg:{tmp_path}"))
    one_error(run(tmp_path, "no-such-command"))
    dsn = "postgresql://" + surrogate + "@localhost/x"
    assert "DSN" in one_error(run(tmp_path, "verifier", "audit", "--db", dsn))


# --- CBOR ----------------------------------------------------------------------


TAGS = [0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 261, 55799, 2**63]


@pytest.mark.parametrize("tag", TAGS)
def test_cbor_tags_are_refused_at_the_decoder(tag):
    value = [1] if tag in (4, 5, 29, 258) else (b"\x00" * 4 if tag in (260, 261) else 5)
    with pytest.raises(DecodeError):
        cbor.loads(cbor2.dumps(cbor2.CBORTag(tag, value)))
    with pytest.raises(DecodeError):
        cbor.loads(cbor2.dumps(cbor2.CBORTag(tag, value)), maps=True)


def test_cyclic_references_and_objects_tags_make_are_refused():
    with pytest.raises(DecodeError):
        cbor.loads(bytes.fromhex("d81c81d81d00"))  # shareable(28) [ sharedref(29) 0 ]
    # The type check refuses what a tag could make, whatever the decoder lets through.
    cyclic: list[object] = []
    cyclic.append(cyclic)
    for value in (datetime.datetime.now(), {1, 2}, 1.5, cbor2.undefined, 2**64, -(2**64) - 1,
                  cyclic, {"a": 1}):
        with pytest.raises(DecodeError):
            cbor._check(value, maps=False)
    assert cbor.loads(cbor2.dumps([2**64 - 1, -(2**64), b"", "", None, True])) is not None


def _body(*values: object) -> bytes:
    return cbor2.dumps([cbor2.dumps(list(values)), b""])


def test_a_bignum_version_is_refused_without_valueerror():
    bignum = 10**5000  # over the 4,300-digit int/str limit
    data = cbor2.dumps([cbor2.dumps([cbor2.CBORTag(2, bignum.to_bytes(2077, "big")), 3]), b""])
    with pytest.raises(DecodeError):
        protocol.VerificationData.decode(data)
    with pytest.raises(UnsupportedVersion):
        protocol.VerificationData.decode(_body(2**64 - 1, 3))
    with pytest.raises(DecodeError):
        protocol.message_kind(_body(1, 2.5))
    with pytest.raises(DecodeError):
        protocol.VerificationData.decode(_body(1, 3) + b"\x00")  # trailing bytes


# --- FIDO2 proofs --------------------------------------------------------------


def _cert_with_unknown_key_algorithm() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(Encoding.DER)
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
    assert der.count(ec_public_key) == 1
    return der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"))


def test_packed_attestation_with_an_unknown_certificate_key_is_untrusted():
    cert = _cert_with_unknown_key_algorithm()
    with pytest.raises(Exception) as raw:
        x509.load_der_x509_certificate(cert).public_key()
    assert raw.type.__name__ == "UnsupportedAlgorithm"  # what used to escape

    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    cose = {1: 2, 3: -7, -1: 1, -2: x, -3: y}
    cred_id = b"\x01" * 16
    auth_data = (
        b"\x11" * 32 + bytes([0x01 | 0x04 | 0x40 | 0x80]) + struct.pack(">I", 1)
        + b"\x22" * 16 + struct.pack(">H", len(cred_id)) + cred_id
        + cbor2.dumps(cose) + cbor2.dumps({"hmac-secret": True, "credProtect": 3})
    )
    attestation = encode_enrollment_attestation(
        "packed", auth_data, {"alg": -7, "sig": b"\x30\x00", "x5c": [cert]},
        b"\x11" * 32 + b"\x05" + struct.pack(">I", 2), b"\x30\x00",
    )
    point = b"\x04" + cose[-2] + cose[-3]
    # The proof of possession refuses it (its assertion is forged); the statement's
    # certificate is attestation_fido2's (tests/test_attestation_fido2.py swaps it in
    # a real enrollment).
    with pytest.raises(UntrustedMessage):
        verify_enrollment_attestation(attestation, point, b"binding")
    self_described = cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(attestation)))
    with pytest.raises(UntrustedMessage):
        verify_enrollment_attestation(self_described, point, b"binding")


# --- config --------------------------------------------------------------------


def _load(tmp_path: Path, data: bytes) -> Config:
    (tmp_path / "config.toml").write_bytes(data)
    return config.load(Paths(tmp_path))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[methods.device]\nbackend = \"\xff\"\n", "not UTF-8"),
        (b"a = " + b"[" * 100_000, "nested too deeply"),
        (b"[methods.device]\n" + b"x = " + b"[" * 20 + b"]" * 20 + b"\n", "too deeply"),
        (b'[environment]\n"A\\u0000B" = "x"\n', "not a variable name"),
        (b'[environment]\n"A=B" = "x"\n', "not a variable name"),
        (b'[environment]\n"" = "x"\n', "not a variable name"),
        (b'[environment]\nA = "x\\u0000"\n', "without NUL"),
        (b"[environment]\nA = 5\n", "must be a string"),
        (b"[login]\nauthdir = 5\n", "authdir must be a string"),
        (b"[login]\nauthfile = \"x\"\n", "unknown key 'authfile' in [login] (known: authdir,"),
        (b"[verifier]\ndb = \"x\"\n", "unknown key 'db' in [verifier] (known: database, hsm)"),
        (b"[method.device]\n", "unknown key 'method' in the config file (known: environment,"),
        (b"methods = 5\n", "[methods] must be a table"),
        (b"[methods.device]\nallow_unenforced_pin = \"yes\"\n", "true or false"),
        (b"[methods.devices]\n", "unknown key 'devices' in [methods] (known: biometric, device,"),
    ],
)
def test_bad_config_is_one_config_error(tmp_path, data, words):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, data)
    assert words in str(e.value)


def test_a_config_that_is_a_directory_or_a_fifo_is_refused(tmp_path, monkeypatch):
    (tmp_path / "config.toml").mkdir()
    with pytest.raises((ConfigError, StateError), match="not a regular file"):
        config.load(Paths(tmp_path))
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setenv("HSM_AUTH_CONFIG", str(tmp_path / "fifo"))
    with pytest.raises((ConfigError, StateError), match="not a regular file"):
        config.load(Paths(tmp_path))


def test_a_state_file_that_is_a_directory_is_one_state_error(tmp_path):
    from hsm_auth.files import read_json

    state = tmp_path / "credentials.json"
    state.mkdir(mode=0o700)
    with pytest.raises(StateError, match="not a regular file"):
        read_json(state)


def test_an_unknown_method_setting_names_the_known_ones(tmp_path):
    from hsm_auth import registry

    cfg = _load(tmp_path, b'[methods.device]\nbackend = "pkcs11"\nurl = "pkcs11:token=x"\n')
    with pytest.raises(ConfigError) as e:
        registry.choose_backend(cfg, Method.DEVICE)
    assert "'url'" in str(e.value) and "uri" in str(e.value)
    ok = Config(methods={Method.DEVICE: MethodConfig("pkcs11", {"uri": "pkcs11:token=x"})})
    assert registry.choose_backend(ok, Method.DEVICE)[0] == "pkcs11"


def test_hsm_auth_config_wins_over_the_home(tmp_path, monkeypatch):
    home, other = tmp_path / "home", tmp_path / "other.toml"
    home.mkdir()
    (home / "config.toml").write_text('[environment]\nWHICH = "home"\n')
    other.write_text('[environment]\nWHICH = "env"\n')
    assert config.load(Paths(home)).environment["WHICH"] == "home"
    monkeypatch.setenv("HSM_AUTH_CONFIG", str(other))
    assert Paths.from_env(home).config_file == other
    assert config.load(Paths.from_env(home)).environment["WHICH"] == "env"


# --- URIs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:slot-id=\u00b2",
        "pkcs11:slot-id=\u0661",
        "pkcs11:slot-id=" + "9" * 5000,
        "pkcs11:slot-id=18446744073709551616",
        "pkcs11:token=" + os.fsdecode(b"\xff"),
        "pkcs11:library-version=" + "1" * 5000,
        "pkcs11:" + "a=b;" * 5000,
    ],
)
def test_bad_uris_are_invalid_input(text):
    with pytest.raises(InvalidInput):
        Pkcs11Uri.parse(text)
    with pytest.raises(InvalidInput):
        parse_attr_uri(text.replace("pkcs11:", "tpm2:") + "\udcff", "tpm2")


def test_the_largest_slot_id_parses():
    assert Pkcs11Uri.parse("pkcs11:slot-id=18446744073709551615").slot_id == 2**64 - 1


# --- authfiles -----------------------------------------------------------------


def _cred(**changes: object) -> dict[str, object]:
    base = {
        "method": "device", "backend": "pkcs11", "settings": {}, "signing_key": "pkcs11:x",
        "counter_uri": None, "public_key": "04" + "00" * 64, "format": "raw", "counter": 1,
        "created": 0,
    }
    from hsm_auth.login import FORMATS

    base["format"] = sorted(FORMATS)[0]
    return {**base, **changes}


@pytest.mark.parametrize(
    "changes",
    [{"counter": float("inf")}, {"counter": 1.5}, {"counter": -1}, {"counter": 2**70},
     {"created": "x"}, {"method": 5}, {"settings": "abc"}, {"public_key": "zz"}],
)
def test_authfile_credentials_with_bad_numbers_are_state_errors(changes):
    with pytest.raises(StateError):
        LoginCredential.from_json(_cred(**changes))
    LoginCredential.from_json(_cred())


def test_login_check_on_an_authfile_with_counter_1e999(tmp_path):
    authdir = tmp_path / "authdir"
    authdir.mkdir(mode=0o755)
    text = json.dumps({"version": 1, "user": "alice", "credentials": [_cred()]})
    (authdir / "alice").write_text(text.replace('"counter": 1', '"counter": 1e999'))
    (authdir / "alice").chmod(0o644)
    line = one_error(run(tmp_path, "login", "check", "--user", "alice", "--authdir", str(authdir)))
    assert "malformed" in line
    (authdir / "alice").write_text("[" * 100_000)
    assert "malformed" in one_error(
        run(tmp_path, "login", "check", "--user", "alice", "--authdir", str(authdir))
    )


def test_a_pin_file_that_is_a_directory_is_a_state_error(tmp_path):
    from hsm_auth.files import read_secret_file

    with pytest.raises(StateError, match="is a directory"):
        read_secret_file(tmp_path)


def test_login_authdirs_too_long_or_with_a_nul(tmp_path):
    long = str(tmp_path / ("9" * 5000))
    for command in ("enroll", "check"):
        extra = ["--method", "device"] if command == "enroll" else []
        line = one_error(run(tmp_path, "login", command, "--user", "alice", *extra,
                             "--authdir", long))
        assert "File name too long" in line
    (tmp_path / "config.toml").write_text('[login]\nauthdir = "/tmp/a\\u0000b"\n')
    (tmp_path / "config.toml").chmod(0o600)
    assert "null" in one_error(run(tmp_path, "login", "check", "--user", "alice"))


def test_textcode_refuses_non_ascii_and_surrogates():
    for text in ("HA1:\udcff", "HA1:\u00b2\u00b2", "HA1:" + "A" * 9):
        with pytest.raises(DecodeError):
            textcode.decode(text)


def test_pam_helper_checks_the_config_schema_before_using_login_options(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[login]\nauthdir = 5\n")
    cfg.chmod(0o600)
    request = f"hsm-auth-pam 1\nuser alice\nservice login\noption config={cfg}\nend\n"
    result = subprocess.run([sys.executable, "-I", "-m", "hsm_auth.pam"], input=request,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout == "result SYSTEM_ERR [login] authdir must be a string\n"
