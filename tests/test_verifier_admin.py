"""The verifier's admin CLI on both engines: 10 consecutive failures lock, the
right OTP is then refused with the same error as a wrong one, ``verifier
unlock`` lifts it; ``show``, ``credentials``, ``revoke`` and ``audit``.
The PostgreSQL DSN comes from ``[verifier] database`` in the config file."""

from __future__ import annotations

import io
import json

import pytest
from _cli import code_file
from _verifier_device import PythonDevice

from hsm_auth import cli
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData

ENGINES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=ENGINES)
def home(request, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    if request.param == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        (home / "config.toml").write_text(f'[verifier]\ndatabase = "{dsn}"\n')
    return home


def run(home, *argv, code=0):
    out, err = io.StringIO(), io.StringIO()
    got = cli.main(["--home", str(home), *argv], out=out, err=err)
    assert got == code, err.getvalue()
    return out.getvalue().strip(), err.getvalue().strip()


def test_lockout_unlock_show_revoke_audit(home):
    run(home, "verifier", "init", "--name", "Admin test")
    device = PythonDevice()
    offer, _ = run(
        home, "verifier", "offer", *code_file(home), "--user", "alice", "--methods", "device"
    )
    code = (home / "activation-code").read_text().strip()
    run(home, "verifier", "enroll", device.enroll(offer, Method.DEVICE, activation_code=code))
    out, _ = run(home, "verifier", "session", "--user", "alice", "--context", "ctx", "--json")
    session = json.loads(out)
    data, _ = VerificationData.from_text(session["data"])
    sid = session["session"]

    for _ in range(10):
        _, wrong = run(home, "verifier", "verify", "--session", sid, "--otp", "00000000", code=40)
    good = device.otp(data)
    _, refused = run(home, "verifier", "verify", "--session", sid, "--otp", good, code=40)
    assert refused == wrong == "hsm-auth: error: OTP refused"

    out, _ = run(home, "verifier", "show", "--user", "alice", "--json")
    shown = json.loads(out)
    assert shown["credentials"][0]["locked"] is True
    assert shown["credentials"][0]["failures_until_lockout"] == 0
    assert [e["event"] for e in shown["recent"]][-3:] == ["refuse", "lockout", "refuse"]
    assert "LOCKED" in run(home, "verifier", "credentials")[0]

    run(home, "verifier", "unlock", "--user", "alice", "--method", "device")
    assert "accepted" in run(home, "verifier", "verify", "--session", sid, "--otp", good)[0]
    out, _ = run(home, "verifier", "credentials", "--user", "alice", "--json")
    [row] = json.loads(out)["credentials"]
    assert (row["atc"], row["failures"], row["locked"]) == (1, 0, False)

    run(home, "verifier", "revoke", "--user", "alice", "--method", "device")
    assert run(home, "verifier", "credentials")[0] == "no credentials"
    run(home, "verifier", "revoke", "--user", "alice", "--method", "device", code=7)

    lines = run(home, "verifier", "audit", "--user", "alice")[0].splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events[:3] == ["offer", "enroll", "session"]
    assert events[-3:] == ["unlock", "accept", "revoke"]
    assert good not in "\n".join(lines)


@pytest.mark.postgres
def test_postgres_verifier_needs_its_dsn(tmp_path, postgres_dsn):
    home = tmp_path / "h"
    run(home, "verifier", "init", "--db", postgres_dsn)
    _, err = run(home, "verifier", "credentials", code=8)
    assert "postgresql" in err
    assert run(home, "verifier", "credentials", "--db", postgres_dsn)[0] == "no credentials"
