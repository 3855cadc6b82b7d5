"""The agent's sources: the online verifier it polls, through
:class:`hsm_auth.online_client.OnlineClient`.

Where the service is: ``HSM_AUTH_ONLINE_URL``, else ``[online] url`` in the
authenticator's config file::

    [online]
    url = "https://auth.example.com"   # the service (hsm-auth serve) of the verifier
    verifier = "Example Bank"          # only when methods are enrolled with several
                                       # verifiers: its name or id (hex)

The enrollment records do not name a URL (an offer is the same offline and
online), so the config says it once; the verifier at that URL is the one whose
methods are enrolled here (or the one named). The agent reads the enrolled
methods when it starts: restart it after an enrollment.

One :class:`OnlineSource` per user enrolled with that verifier; each serves the
agent through one :class:`OnlineClient` over an :class:`Authenticator` whose
token operations are serialised (the agent signs a poll in one thread while the
user approves in another).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .agent import ChallengeView, CredentialPolicy
from .authenticator import Authenticator, OfflineOtp, OnlineSignature
from .challenges import Challenge, Decision, parse_claim
from .config import Config, Paths
from .errors import ConfigError, HsmAuthError, InvalidInput
from .keystore import Authorization
from .methods import Method
from .online_client import OnlineClient

URL_ENV = "HSM_AUTH_ONLINE_URL"
log = logging.getLogger("hsm_auth.agent")


class SerializedAuthenticator(Authenticator):
    """An :class:`Authenticator` whose signatures in the token run one at a time."""

    _token_lock = threading.Lock()

    def sign_online(
        self, verifier_id: bytes, method: Method, message: bytes, *,
        auth: Authorization | None = None,
    ) -> OnlineSignature:
        with self._token_lock:
            return super().sign_online(verifier_id, method, message, auth=auth)

    def finish_offline_authentication(self, *args: Any, **kwargs: Any) -> OfflineOtp:
        with self._token_lock:
            return super().finish_offline_authentication(*args, **kwargs)


def view_of(challenge: Challenge) -> ChallengeView:
    ctx = challenge.context
    return ChallengeView(
        challenge_id=challenge.challenge_id,
        kind=challenge.kind.value,
        state=challenge.state.value,
        expires=challenge.expires,
        user=challenge.user,
        message=challenge.message,
        ip=ctx.ip,
        user_agent=ctx.user_agent,
        location=ctx.location,
        custom=dict(ctx.custom),
        original=challenge,
    )


class OnlineSource:
    """One verifier and user, served through an :class:`OnlineClient`."""

    def __init__(
        self, client: OnlineClient, authenticator: Authenticator, verifier_id: bytes,
        name: str, user: str, url: str,
    ) -> None:
        self._client = client
        self._authenticator = authenticator
        self.verifier_id = verifier_id
        self.name = name
        self.user = user
        self.url = url

    def methods(self) -> Mapping[Method, CredentialPolicy]:
        return {
            m.method: CredentialPolicy(m.credential_id, float(m.approval_timeout))
            for m in self._authenticator.enrolled
            if m.verifier_id == self.verifier_id and m.user == self.user and m.credential_id
        }

    def pending(
        self, method: Method, wait: float, auth: Authorization, known: Sequence[str]
    ) -> list[ChallengeView]:
        self._submit_logs(method, auth)
        found = self._client.pending(method, wait=wait, auth=auth, known=known)
        return [view_of(c) for c in found if c.user in (None, self.user)]

    def _submit_logs(self, method: Method, auth: Authorization) -> None:
        """The offline logs at this online contact (docs/PROTOCOL.md §19.3): what the
        service has not taken yet, signed by the polling method (no prompt of its own);
        a failure is logged and never stops the poll."""
        try:
            self._client.submit_logs(method, auth=auth)
        except HsmAuthError as e:
            log.info("offline log not submitted to %s: %s", self.name, e.__class__.__name__)

    def owns_claim(self, claim: str) -> bool:
        try:
            verifier_id, _ = parse_claim(claim)
        except InvalidInput:
            return False
        return verifier_id == self.verifier_id

    def claim(self, claim: str, method: Method, auth: Authorization) -> ChallengeView:
        return view_of(self._client.claim(claim, method, auth=auth))

    def answer(
        self, challenge: ChallengeView, approve: bool, method: Method, auth: Authorization,
        authorized_at: float | None,
    ) -> None:
        original: Any = challenge.original
        assert isinstance(original, Challenge)
        decision = Decision.APPROVE if approve else Decision.REJECT
        self._client.answer(original, decision, method, auth=auth, authorized_at=authorized_at)


def service_url(config: Config) -> str | None:
    env = os.environ.get(URL_ENV)
    if env:
        return env
    url = config.raw.get("online", {}).get("url")
    return str(url) if url else None


def online_verifier(authenticator: Authenticator, config: Config) -> bytes | None:
    """The verifier at the [online] url: the one whose methods are enrolled here, or
    the one ``[online] verifier`` names (its name or id in hex); None if no method is
    enrolled. ConfigError when several are and none is named."""
    enrolled = [m for m in authenticator.enrolled if m.credential_id]
    wanted = config.raw.get("online", {}).get("verifier")
    ids = {m.verifier_id for m in enrolled}
    if wanted:
        ids = {
            vid for vid in ids
            if vid.hex() == str(wanted).lower() or authenticator.verifier_name(vid) == wanted
        }
        if not ids:
            raise ConfigError(f"[online] verifier {str(wanted)[:64]!r} is not enrolled here")
    if len(ids) > 1:
        raise ConfigError(
            "methods are enrolled with several verifiers: name the one at the [online] url "
            "with [online] verifier"
        )
    return ids.pop() if ids else None


def sources(
    paths: Paths, config: Config, *, report: Callable[[str], None]
) -> list[OnlineSource]:
    """The sources to poll (none, said through ``report``, without a URL or an
    enrollment)."""
    url = service_url(config)
    if url is None:
        report(f"no [online] url in the config (nor {URL_ENV}): nothing to poll")
        return []
    said: set[str] = set()

    def once(line: str) -> None:  # the same warning on every signature: say it once
        if line not in said:
            said.add(line)
            report(line)

    authenticator = SerializedAuthenticator(paths.authenticator_dir, config, warn=once)
    verifier_id = online_verifier(authenticator, config)
    if verifier_id is None:
        report("no method is enrolled here: nothing to poll")
        return []
    client = OnlineClient(authenticator, url, verifier_id=verifier_id)
    name = authenticator.verifier_name(verifier_id)
    enrolled = [m for m in authenticator.enrolled if m.credential_id]
    users = sorted({m.user for m in enrolled if m.verifier_id == verifier_id})
    return [OnlineSource(client, authenticator, verifier_id, name, user, url) for user in users]
