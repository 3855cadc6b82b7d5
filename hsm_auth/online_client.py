"""The authenticator's client for the online service (``/v1/device/...``).

No bearer secret lives on the workstation: every request is signed in the token
by the enrolled method's key (:mod:`hsm_auth.request_signing`, docs/PROTOCOL.md
§13) over a fresh server nonce, and an answer carries an approval signed over the
challenge and its context. ``auth`` is the :class:`~hsm_auth.keystore.Authorization`
the token needs (the pin method's PIN, the user interaction for FIDO2), so that an
agent may pass one it holds in its cache (see :meth:`answer`).

Transport: :mod:`http.client`, one connection per call (calls may run in several
threads: the agent long-polls while the user answers), TLS with the system's
trust store by default (``ssl_context`` to pin another CA). Errors are the
library's: a refused signature is :class:`~hsm_auth.errors.InvalidToken`, a
gone challenge :class:`~hsm_auth.errors.ExpiredMessage`, an unreachable or
failing service :class:`ServiceError`.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import display
from .authenticator import Authenticator, EnrolledMethod
from .challenges import Challenge, Decision, parse_claim
from .errors import (
    ConfigError,
    DecodeError,
    ExpiredMessage,
    HsmAuthError,
    InvalidInput,
    InvalidToken,
    UnknownMethod,
    UntrustedMessage,
)
from .keystore import Authorization
from .methods import Method
from .request_signing import HEADER, format_header, request_message, unb64u

__all__ = ["OnlineClient", "OnlineSync", "ServiceError"]

_MAX_RESPONSE = 1 << 20
MAX_WAIT = 30


class ServiceError(HsmAuthError):
    """The service could not be reached, or answered with an error that is not the
    caller's (5xx, 409, 429); ``status`` is the HTTP status (``None``: no answer)."""

    exit_code = 50

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


_BY_STATUS: dict[int, type[HsmAuthError]] = {
    400: InvalidInput, 413: InvalidInput, 422: InvalidInput,
    401: InvalidToken, 403: InvalidToken, 404: UnknownMethod, 410: ExpiredMessage,
}


class OnlineClient:
    def __init__(
        self,
        authenticator: Authenticator,
        base_url: str,
        *,
        verifier_id: bytes | None = None,
        timeout: float = 35.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``base_url`` is the service's root (``https://host:port``, or a path prefix
        the service sees as is). ``verifier_id`` picks the verifier whose credentials
        sign; ``None``: the one verifier a method is enrolled with."""
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError("the service URL is http(s)://host[:port][/prefix]")
        self.authenticator = authenticator
        self.verifier_id = verifier_id
        self.timeout = timeout
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self._ssl = ssl_context

    # --- transport ---------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout,
                context=self._ssl or ssl.create_default_context(),
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _call(
        self, method: str, target: str, body: bytes = b"", *, signature: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        if signature is not None:
            headers[HEADER] = signature
        conn = self._connection(self.timeout if timeout is None else timeout)
        try:
            conn.request(method, target, body=body or None, headers=headers)
            response = conn.getresponse()
            raw = response.read(_MAX_RESPONSE + 1)
            status = response.status
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            raise ServiceError(
                f"the service at {self._host} did not answer ({e.__class__.__name__})"
            ) from None
        finally:
            conn.close()
        if len(raw) > _MAX_RESPONSE:
            raise ServiceError("the service's answer is too large", status=status)
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ServiceError("the service's answer is not JSON", status=status) from None
        if status >= 400:
            raise self._error(status, data)
        return data

    @staticmethod
    def _error(status: int, data: Any) -> HsmAuthError:
        detail = ""
        if isinstance(data, dict):
            detail = str(data.get("detail") or data.get("title") or "")[:200]
        text = display.escape(detail, keep="") or f"HTTP {status}"
        kind = _BY_STATUS.get(status)
        if kind is None:
            return ServiceError(f"the service refused: {text}", status=status)
        return kind(text)

    def _target(self, path: str, query: dict[str, str] | None = None) -> str:
        target = self._prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        return target

    def _verifier(self, method: Method) -> bytes:
        if self.verifier_id is not None:
            return self.verifier_id
        ids = {m.verifier_id for m in self.authenticator.enrolled if m.method is method}
        if not ids:
            raise UnknownMethod(f"the {method.value} method is not enrolled here")
        if len(ids) != 1:
            raise ConfigError(
                f"the {method.value} method is enrolled with {len(ids)} verifiers here: "
                "name the verifier (verifier_id)"
            )
        return ids.pop()

    def _signed(
        self, http_method: str, path: str, method: Method, *, body: Any = None,
        query: dict[str, str] | None = None, auth: Authorization | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request signed in the token over a fresh nonce."""
        verifier_id = self._verifier(method)
        enrolled = self.authenticator.online_method(verifier_id, method)
        credential_id = bytes.fromhex(enrolled.credential_id)
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        nonce_json = self._call("GET", self._target("/v1/device/nonce"))
        try:
            nonce = unb64u(str(nonce_json["nonce"]), "the nonce")
        except (KeyError, TypeError, DecodeError):
            raise ServiceError("the service gave no nonce") from None
        target = self._target(path, query)
        message = request_message(
            http_method, target, payload, nonce, verifier_id, credential_id
        )
        signed = self.authenticator.sign_online(verifier_id, method, message, auth=auth)
        header = format_header(signed.credential_id, nonce, signed.signature)
        return self._call(http_method, target, payload, signature=header, timeout=timeout)

    # --- the interface ---------------------------------------------------------

    def enroll(self, response_text: str) -> str:
        """Submit an enrollment response (self-authenticating: signed by the new key,
        MACed with the activation code); keep the verifier's result (the device
        certificate) and its approval policy with the method. Returns the result text."""
        data = self._call(
            "POST", self._target("/v1/device/enrollments"),
            json.dumps({"response": response_text}).encode(),
        )
        if not isinstance(data, dict) or not isinstance(data.get("result"), str):
            raise ServiceError("the service's enrollment answer has no result")
        result = str(data["result"])
        method = self.authenticator.store_result(result)
        approval = data.get("approval")
        if isinstance(approval, dict) and type(approval.get("timeout")) is int:
            self.authenticator.set_approval_policy(
                method.verifier_id, method.method, approval["timeout"]
            )
        return result

    def credentials(self, method: Method, *, auth: Authorization | None = None) -> list[dict]:  # type: ignore[type-arg]
        """The signer's user's credentials at the verifier (one dict each)."""
        data = self._signed("GET", "/v1/device/credentials", method, auth=auth)
        if not isinstance(data, dict) or not isinstance(data.get("credentials"), list):
            raise ServiceError("malformed credential list")
        return [c for c in data["credentials"] if isinstance(c, dict)]

    def remove(self, method: Method, *, auth: Authorization | None = None) -> None:
        """The verifier forgets the method's credential (a DELETE signed by it), then
        the token's keys are deleted (:meth:`Authenticator.remove`)."""
        verifier_id = self._verifier(method)
        enrolled = self.authenticator.online_method(verifier_id, method)
        self._signed(
            "DELETE", f"/v1/device/credentials/{enrolled.credential_id}", method, auth=auth
        )
        self.authenticator.remove(verifier_id, method, pin=None if auth is None else auth.pin)

    def pending(
        self, method: Method, *, wait: float = 0, auth: Authorization | None = None,
        known: Iterable[str] = (),
    ) -> list[Challenge]:
        """The user's pending push and in-app challenges. With ``wait`` (at most 30 s)
        the service holds the request until the set of pending challenges differs from
        ``known`` (challenge ids already seen)."""
        seconds = max(0, min(MAX_WAIT, int(wait)))
        query = {"wait": str(seconds)}
        seen = sorted(set(known))
        if seen:
            query["known"] = ",".join(seen)
        data = self._signed(
            "GET", "/v1/device/challenges", method, query=query, auth=auth,
            timeout=max(self.timeout, seconds + 5),
        )
        if not isinstance(data, dict) or not isinstance(data.get("challenges"), list):
            raise ServiceError("malformed challenge list")
        return [Challenge.from_json(c) for c in data["challenges"]]

    def claim(
        self, claim_text: str, method: Method, *, auth: Authorization | None = None
    ) -> Challenge:
        """Claim a QR challenge: returns it with the context of the request that
        started it (IP, user agent, location, custom data), to show before answering."""
        verifier_id, challenge_id = parse_claim(claim_text.strip())
        if self.verifier_id is not None and verifier_id != self.verifier_id:
            raise UntrustedMessage("the claim code is for another verifier")
        client = self if self.verifier_id is not None else _with_verifier(self, verifier_id)
        data = client._signed(
            "POST", "/v1/device/claims", method, body={"claim": claim_text.strip()}, auth=auth
        )
        challenge = Challenge.from_json(data)
        if challenge.challenge_id != challenge_id:
            raise UntrustedMessage("the service answered the claim with another challenge")
        return challenge

    def answer(
        self, challenge: Challenge, decision: Decision, method: Method, *,
        auth: Authorization | None = None, authorized_at: float | None = None,
    ) -> None:
        """Approve or reject ``challenge`` with an approval signed in the token over its
        id, its context hash and the decision. ``authorized_at``: when the PIN in
        ``auth`` was typed, if it comes from a cache (the method's approval timeout
        decides whether it may still be used)."""
        verifier_id = self._verifier(method)
        signed = self.authenticator.sign_approval(
            verifier_id, method, challenge, decision, auth=auth, authorized_at=authorized_at
        )
        self._call(
            "POST",
            self._target(f"/v1/device/challenges/{challenge.challenge_id}/answer"),
            json.dumps({
                "decision": decision.value,
                "credential": signed.credential_id.hex(),
                "approval": signed.signature.to_json(),
            }).encode(),
        )

    def submit_log(
        self, method: Method, *, auth: Authorization | None = None,
        signer: Method | None = None,
    ) -> dict[str, Any] | None:
        """Submit the method's offline log (docs/PROTOCOL.md §19) since the last
        submission, in signed requests of at most 100 entries (each signed in the token:
        for FIDO2 this signature is the one over the entries' head); returns the
        service's reconciliation (submitted, not submitted, alerts), None if nothing
        was new. ``signer``: another method of the same user signs the requests (``auth``
        is its authorization); only for a log whose entries are signed themselves
        (PKCS#11, TPM: the service refuses a FIDO2 log signed by another credential)."""
        from .offline_log import OfflineLog

        signer = signer or method
        verifier_id = self._verifier(method)
        enrolled = self.authenticator.online_method(verifier_id, method)
        credential_id = bytes.fromhex(enrolled.credential_id)
        if signer is not method and (
            self.authenticator.online_method(verifier_id, signer).user != enrolled.user
        ):
            raise UnknownMethod(f"the {signer.value} method is another user's here")
        log = OfflineLog(self.authenticator.directory)
        sent = log.sent(credential_id)
        pending = [
            e for e in log.raw_entries(credential_id)
            if not (isinstance(e, dict) and type(e.get("seq")) is int and e["seq"] <= sent)
        ]
        report: dict[str, Any] | None = None
        for start in range(0, len(pending), 100):
            batch = pending[start:start + 100]
            body: dict[str, Any] = {"entries": batch}
            if signer is not method:
                body["credential"] = enrolled.credential_id
            data = self._signed("POST", "/v1/device/offline-log", signer, body=body, auth=auth)
            if not isinstance(data, dict) or not isinstance(data.get("report"), dict):
                raise ServiceError("malformed offline log report")
            report = data["report"]
            seqs = [e["seq"] for e in batch if isinstance(e, dict) and type(e.get("seq")) is int]
            if seqs:
                log.mark_sent(credential_id, max(seqs))
        return report

    def submit_logs(
        self, signer: Method, *, auth: Authorization | None = None
    ) -> dict[str, dict[str, Any]]:
        """At an online contact (the agent's poll): submit every offline log of the
        signer's user here that has entries the service has not taken and that
        another credential may carry (ECDSA methods; the signer's own log always),
        signed by ``signer`` with ``auth``, so without a prompt for a ``device``
        signer. Returns the reports by method."""
        from .offline_log import OfflineLog
        from .request_signing import FIDO2_ASSERTION, signature_format

        verifier_id = self._verifier(signer)
        user = self.authenticator.online_method(verifier_id, signer).user
        log = OfflineLog(self.authenticator.directory)
        reports: dict[str, dict[str, Any]] = {}
        for m in self.authenticator.enrolled:
            if m.verifier_id != verifier_id or m.user != user or not m.credential_id or (
                m.method is not signer and signature_format(m.method) == FIDO2_ASSERTION
            ):
                continue
            cid = bytes.fromhex(m.credential_id)
            if log.last_seq(cid) <= log.sent(cid):
                continue  # nothing new: no request
            report = self.submit_log(m.method, auth=auth, signer=signer)
            if report is not None:
                reports[m.method.value] = report
        return reports

    def renew(self, method: Method, *, auth: Authorization | None = None) -> EnrolledMethod:
        """Renew the method's offline expiry (docs/PROTOCOL.md §20): a request signed by
        its credential (the pin method needs its PIN, FIDO2 a user verification); the
        verifier's new EnrollmentResult (new expiry, new certificate) is stored with
        the method (:meth:`Authenticator.store_result`). Returns the updated method."""
        data = self._signed("POST", "/v1/device/renewal", method, auth=auth)
        if not isinstance(data, dict) or not isinstance(data.get("result"), str):
            raise ServiceError("the service's renewal answer has no result")
        return self.authenticator.store_result(str(data["result"]))


    # --- the ATC resync at online login (docs/PROTOCOL.md §18) ------------------------

    def sync(self, method: Method, *, auth: Authorization | None = None) -> OnlineSync:
        """Bring the verifier and this authenticator back in step: a signed request
        opens a sync session for the method's credential, the token answers with its
        ATC report, the service applies it and acknowledges; the acknowledgement
        (signed by the verifier) resets the offline-use count. OTPs made offline and
        never submitted stop mattering. ``auth``: the pin method's PIN (the request's
        signature and the report each use it, as a login and an OTP would)."""
        message = self.sync_message(method, auth=auth)
        made = self.authenticator.sync(message, pin=None if auth is None else auth.pin)
        ack = self.submit_sync_report(made.report)
        updated = self.authenticator.apply_sync_ack(ack)
        return OnlineSync(updated.method, made.atc, made.unsubmitted, updated.synced_atc)

    def sync_message(self, method: Method, *, auth: Authorization | None = None) -> str:
        """Open a sync session for the method's credential (a signed request): the
        verifier's signed sync message (:meth:`Authenticator.sync` answers it)."""
        data = self._signed("POST", "/v1/device/sync", method, auth=auth)
        if not isinstance(data, dict) or not isinstance(data.get("sync"), str):
            raise ServiceError("the service's sync answer has no sync message")
        return str(data["sync"])

    def submit_sync_report(self, report: str) -> str:
        """Give the token's ATC report to the service; returns the verifier's signed
        acknowledgement (:meth:`Authenticator.apply_sync_ack` takes it). A refused
        report (bad MAC, old session, an ATC not ahead) is InvalidToken."""
        data = self._call(
            "POST", self._target("/v1/device/sync/report"),
            json.dumps({"report": report}).encode(),
        )
        if not isinstance(data, dict) or not isinstance(data.get("ack"), str):
            raise ServiceError("the service's answer to the sync report has no acknowledgement")
        return str(data["ack"])


@dataclass(frozen=True)
class OnlineSync:
    """What :meth:`OnlineClient.sync` did: the ATC the token reported, how many OTPs
    the verifier had never seen, and the ATC offline use counts from now."""

    method: Method
    atc: int
    unsubmitted: int
    synced_atc: int


def _with_verifier(client: OnlineClient, verifier_id: bytes) -> OnlineClient:
    other = object.__new__(OnlineClient)
    other.__dict__.update(client.__dict__)
    other.verifier_id = verifier_id
    return other
