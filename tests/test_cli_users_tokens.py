"""Several users and tokens through the real CLI (issue 14), on SoftHSM tokens made
by ``hsm-auth token init``: alice and bob on one workstation, alice's backup token
named on both sides (``verifier offer --label``, ``enroll --token``), ``verifier
credentials`` listing them, ``finish --token`` / ``--user``, and ``verifier revoke
--credential`` revoking one token alone."""

from __future__ import annotations

import json

import pytest
from _cli import cli_ok, code_file, error_line, run_cli

from hsm_auth.testing.softhsm import softhsm_available

pytestmark = pytest.mark.softhsm


@pytest.fixture
def home(tmp_path):
    reason = softhsm_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    cli_ok(home, "verifier", "init", "--name", "Workstation")
    return home


def _enroll(home, token, user, *offer_args, enroll_args=()):
    cli_ok(home, "token", "init", "--softhsm", token, "--method", "device", "--replace")
    offer = cli_ok(home, "verifier", "offer", *code_file(home), "--user", user,
                   "--methods", "device", *offer_args)
    response = cli_ok(home, "enroll", *code_file(home), "--method", "device", *enroll_args,
                      stdin=offer)
    cli_ok(home, "verifier", "enroll", stdin=response)


def _session(home, user):
    out = json.loads(cli_ok(home, "--json", "verifier", "session", "--user", user,
                            "--context", f"log in as {user}"))
    return out["session"], out["data"]


def _login(home, user, *finish_args):
    sid, data = _session(home, user)
    done = json.loads(cli_ok(home, "--json", "finish", "--method", "device", *finish_args, data))
    result = run_cli(home, "--json", "verifier", "verify", "--session", sid, "--otp", done["otp"])
    return done, result


def test_two_users_and_a_backup_token_through_the_cli(home):
    _enroll(home, "alice-main", "alice")
    _enroll(home, "bob-token", "bob")
    _enroll(home, "alice-spare", "alice", "--label", "yubikey-backup",
            enroll_args=("--token", "backup"))
    rows = json.loads(cli_ok(home, "--json", "verifier", "credentials", "alice"))["credentials"]
    assert [(r["user"], r["method"], r["label"], r["atc"], r["failures"], r["locked"])
            for r in rows] == [
        ("alice", "device", "device", 0, 0, False),
        ("alice", "device", "yubikey-backup", 0, 0, False),
    ]
    listed = cli_ok(home, "verifier", "credentials", "alice")
    assert "yubikey-backup" in listed and rows[1]["credential_id"][:16] in listed
    methods = json.loads(cli_ok(home, "--json", "methods"))["methods"]
    assert [(m["user"], m["token"]) for m in methods] == [
        ("alice", ""), ("bob", ""), ("alice", "backup")
    ]

    for user, args, label in (("alice", (), "device"), ("bob", (), "device"),
                              ("alice", ("--token", "backup"), "yubikey-backup")):
        done, result = _login(home, user, *args)
        assert result.returncode == 0, result.stderr
        accepted = json.loads(result.stdout)
        assert (accepted["user"], accepted["label"]) == (user, label)
    assert done["token"] == "backup"

    # A code for bob is not finished as alice's on the shared workstation.
    _, data = _session(home, "bob")
    refused = run_cli(home, "finish", "--method", "device", "--user", "alice", data)
    assert "is for 'bob', not 'alice'" in error_line(refused, 7)
    # alice has two device credentials: revoking "the device method" must name one.
    ambiguous = run_cli(home, "verifier", "revoke", "--user", "alice", "--method", "device")
    assert "2 such credentials (device, yubikey-backup): name one" in error_line(ambiguous, 2)
    out = json.loads(cli_ok(home, "--json", "verifier", "revoke", "--user", "alice",
                            "--credential", rows[0]["credential_id"][:12]))
    assert (out["revoked"], out["label"]) == (True, "device")
    assert [r["label"] for r in json.loads(
        cli_ok(home, "--json", "verifier", "credentials", "--user", "alice"))["credentials"]
    ] == ["yubikey-backup"]
    # The revoked token's OTP is refused; the backup alone works; bob is untouched.
    _, result = _login(home, "alice")
    assert error_line(result, 40).endswith("OTP refused")
    _, result = _login(home, "alice", "--token", "backup")
    assert json.loads(result.stdout)["label"] == "yubikey-backup"
    _, result = _login(home, "bob")
    assert json.loads(result.stdout)["user"] == "bob"
    unknown = run_cli(home, "finish", "--method", "device", "--token", "nope", _session(home,
                      "alice")[1])
    assert "no device token named 'nope'" in error_line(unknown, 7)
