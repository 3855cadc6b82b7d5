"""Tenants and several tokens per method through the provider API of a real
``hsm-auth serve`` (issue 14): offers name the tenant and the credential's label,
credential listings show them (per tenant), a session names its tenant in the
signed verification data, ``POST /v1/verify`` says which token answered, and a
token of alice without a tenant (or of the tenant's other token, revoked) never
answers the tenant's alice."""

from __future__ import annotations

import httpx
from _service import bearer, make_key, problem
from _verifier_device import PythonDevice

from hsm_auth import ocra
from hsm_auth.methods import Method
from hsm_auth.protocol import VerificationData
from hsm_auth.verifier import Verifier


class TenantDevice(PythonDevice):
    """The software device, answering with the tenant the verification data names
    bound in the question (docs/PROTOCOL.md §9/§17)."""

    def otp_of(self, text: str) -> str:
        data = VerificationData.from_text(text)[0]
        self.atc += 1
        q = self.scheme.question(
            verifier_id=self.verifier_id, user=self.user, method=self.method,
            credential_id=self.credential_id, challenge=data.challenge, context=data.context,
            tenant=data.tenant,
        )
        return ocra.generate(self.scheme.suite, self.otp_key, counter=self.atc, question=q)


def _enroll(service, key, **offer):
    r = httpx.post(service.url + "/v1/offers",
                   json={"user": "alice", "methods": ["device"], **offer}, headers=bearer(key))
    assert r.status_code == 201, r.text
    device = TenantDevice()
    response = device.enroll(r.json()["offer"], Method.DEVICE,
                             activation_code=r.json()["activation_code"])
    with Verifier.open(service.verifier_dir) as v:
        v.accept_enrollment(response)
    return device


def _session(service, key, **extra):
    r = httpx.post(service.url + "/v1/sessions",
                   json={"user": "alice", "context": "Pay the invoice", **extra},
                   headers=bearer(key))
    assert r.status_code == 201, r.text
    return r.json()


def _verify(service, key, session, otp):
    return httpx.post(service.url + "/v1/verify",
                      json={"session_id": session["session_id"], "otp": otp},
                      headers=bearer(key))


def test_tenants_and_labels_through_the_provider_api(service):
    key = make_key(service.verifier_dir)
    h = bearer(key)
    plain = _enroll(service, key)
    laptop = _enroll(service, key, tenant="acme", label="laptop")
    backup = _enroll(service, key, tenant="acme", label="yubikey-backup")
    problem(httpx.post(service.url + "/v1/offers", headers=h, json={
        "user": "alice", "tenant": "acme", "label": "laptop"}), 409, "already-enrolled")
    problem(httpx.post(service.url + "/v1/offers", headers=h, json={
        "user": "alice", "tenant": "a cme"}), 400, "invalid-input")

    def listed(query=""):
        r = httpx.get(service.url + "/v1/users/alice/credentials" + query, headers=h)
        assert r.status_code == 200, r.text
        return [(c["tenant"], c["label"], c["credential_id"]) for c in r.json()["credentials"]]

    assert listed() == [(None, "device", plain.credential_id.hex())]
    assert listed("?tenant=acme") == [
        ("acme", "laptop", laptop.credential_id.hex()),
        ("acme", "yubikey-backup", backup.credential_id.hex()),
    ]

    session = _session(service, key, tenant="acme")
    assert VerificationData.from_text(session["data"])[0].tenant == "acme"
    # alice without a tenant is another account: her token does not answer.
    assert _verify(service, key, session, plain.otp_of(session["data"])).status_code == 403
    session = _session(service, key, tenant="acme")
    r = _verify(service, key, session, backup.otp_of(session["data"]))
    assert r.status_code == 200, r.text
    assert (r.json()["label"], r.json()["credential_id"]) == (
        "yubikey-backup", backup.credential_id.hex())
    session = _session(service, key)
    assert VerificationData.from_text(session["data"])[0].tenant is None
    assert _verify(service, key, session, laptop.otp_of(session["data"])).status_code == 403
    session = _session(service, key)
    assert _verify(service, key, session, plain.otp_of(session["data"])).json()["label"] == (
        "device")

    # The laptop is lost: revoked alone, the backup goes on answering.
    r = httpx.delete(f"{service.url}/v1/credentials/{laptop.credential_id.hex()}", headers=h)
    assert r.status_code == 200, r.text
    assert [label for _, label, _ in listed("?tenant=acme")] == ["yubikey-backup"]
    session = _session(service, key, tenant="acme")
    assert _verify(service, key, session, laptop.otp_of(session["data"])).status_code == 403
    session = _session(service, key, tenant="acme")
    assert _verify(service, key, session, backup.otp_of(session["data"])).status_code == 200
