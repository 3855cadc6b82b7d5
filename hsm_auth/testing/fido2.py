"""The software FIDO2 authenticator for tests: fixtures, a scripted user, a ready client.

Reusable by anyone who wants to run their own CI without FIDO2 hardware::

    from hsm_auth.testing.fido2 import make_client
    from hsm_auth.testing.soft_fido2 import SoftAuthenticator

    device = SoftAuthenticator.create(tmp / "fido2.json", pin="123456")
    client = make_client(device, pin="123456")   # a python-fido2 Fido2Client

or, with pytest, the fixtures ``soft_fido2`` (a fresh authenticator per test,
fingerprint UV, no PIN) and ``soft_fido2_factory`` (call it with the keyword
arguments of :meth:`SoftAuthenticator.create`); import them into a
``conftest.py``::

    from hsm_auth.testing.fido2 import soft_fido2, soft_fido2_factory  # noqa: F401

A verifier refuses the soft authenticator unless its policy names it:
:func:`write_soft_policy` writes a ``policy.toml`` that allows the given
authenticators' AAGUID and trusts their test roots.

Needs python-fido2 (the ``fido2`` extra). The authenticator keeps its keys in
a file: it is for tests only (see :mod:`hsm_auth.testing.soft_fido2`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapDevice
from fido2.ctap2.base import Ctap2
from fido2.ctap2.extensions import CredProtectExtension, Ctap2Extension, HmacSecretExtension
from fido2.ctap2.pin import ClientPin, PinProtocolV2

from hsm_auth.attestation import POLICY_FILE, VerifierPolicy
from hsm_auth.files import atomic_write, ensure_private_dir
from hsm_auth.methods import Method

from .soft_fido2 import SoftAuthenticator

DEFAULT_ORIGIN = "https://example.com"


class ScriptedUser(UserInteraction):
    """A user who touches, agrees to UV and types ``pin`` when asked; counts the prompts."""

    def __init__(self, pin: str | None = None, *, allow_uv: bool = True) -> None:
        self._pin = pin
        self._allow_uv = allow_uv
        self.up_prompts = 0
        self.pin_requests = 0
        self.uv_requests = 0

    def prompt_up(self) -> None:
        self.up_prompts += 1

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        self.pin_requests += 1
        return self._pin

    def request_uv(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> bool:
        self.uv_requests += 1
        return self._allow_uv


def make_client(
    device: CtapDevice,
    *,
    origin: str = DEFAULT_ORIGIN,
    pin: str | None = None,
    user: UserInteraction | None = None,
    extensions: Sequence[Ctap2Extension] | None = None,
) -> Fido2Client:
    """A python-fido2 client for ``origin`` with hmac-secret (and prf) and credProtect."""
    return Fido2Client(
        device,
        DefaultClientDataCollector(origin),
        user if user is not None else ScriptedUser(pin),
        extensions
        if extensions is not None
        else [
            HmacSecretExtension(allow_hmac_secret=True),  # type: ignore[no-untyped-call]
            CredProtectExtension(),
        ],
    )


def use_elsewhere(device: CtapDevice, assertions: int, rp_id: str = "example.com") -> None:
    """A website login on the same authenticator (plain ``Ctap2``, another RP): one
    makeCredential and ``assertions`` getAssertions. Authenticators with one signature
    counter for all credentials (YubiKeys, the software one) see it move by all of it."""
    ctap = Ctap2(device)
    cdh = os.urandom(32)
    token = ClientPin(ctap, PinProtocolV2()).get_uv_token(
        ClientPin.PERMISSION.MAKE_CREDENTIAL, rp_id
    )
    made = ctap.make_credential(
        cdh,
        {"id": rp_id, "name": rp_id},
        {"id": b"bob", "name": "bob", "displayName": "Bob"},
        [{"type": "public-key", "alg": -7}],
        pin_uv_param=PinProtocolV2().authenticate(token, cdh),  # type: ignore[no-untyped-call]
        pin_uv_protocol=2,
    )
    assert made.auth_data.credential_data is not None
    allow: list[Mapping[str, Any]] = [
        {"type": "public-key", "id": made.auth_data.credential_data.credential_id}
    ]
    for _ in range(assertions):
        ctap.get_assertion(rp_id, os.urandom(32), allow)


def authenticator_factory(directory: Path) -> Callable[..., SoftAuthenticator]:
    """A function making fresh soft authenticators in ``directory``; takes ``create``'s keywords."""
    numbers = itertools.count()

    def factory(**kwargs: Any) -> SoftAuthenticator:
        return SoftAuthenticator.create(directory / f"soft-fido2-{next(numbers)}.json", **kwargs)

    return factory


# --- the verifier's policy for soft authenticators ---------------------------------

#: The PEM file of the soft authenticators' roots that :func:`write_soft_policy` writes.
SOFT_ROOTS_FILE = "soft-fido2-roots.pem"
FIDO2_METHODS = (Method.BIOMETRIC, Method.FACE)


def soft_policy_toml(
    devices: Iterable[SoftAuthenticator],
    *,
    methods: Sequence[Method] = FIDO2_METHODS,
    attestation: str = "required",
    roots_file: str = SOFT_ROOTS_FILE,
) -> str:
    """``policy.toml`` text for ``methods``: ``attestation``, the roots in ``roots_file``
    and the devices' AAGUIDs allowed (the software authenticator's is refused unless
    a policy names it)."""
    aaguids = sorted({d.aaguid.hex() for d in devices})
    allow = ", ".join(f'"{a}"' for a in aaguids)
    lines = ["# the software FIDO2 test authenticator: tests and the demo only"]
    for method in methods:
        lines += [
            "", f"[methods.{method.value}]", f'attestation = "{attestation}"',
            f'roots = ["{roots_file}"]', f"aaguid_allow = [{allow}]",
        ]
    return "\n".join(lines) + "\n"


def write_soft_policy(
    verifier_dir: Path,
    devices: Iterable[SoftAuthenticator],
    *,
    methods: Sequence[Method] = FIDO2_METHODS,
    attestation: str = "required",
    extra: str = "",
) -> VerifierPolicy:
    """Write ``policy.toml`` (``extra`` first, then :func:`soft_policy_toml`) and the
    devices' roots into ``verifier_dir`` (made if missing); returns the policy, to
    give an open verifier (``verifier.policy = ...``)."""
    devices = list(devices)
    ensure_private_dir(verifier_dir)
    roots = dict.fromkeys(d.attestation_root.public_bytes(Encoding.PEM) for d in devices)
    atomic_write(verifier_dir / SOFT_ROOTS_FILE, b"".join(roots))
    text = extra + soft_policy_toml(devices, methods=methods, attestation=attestation)
    atomic_write(verifier_dir / POLICY_FILE, text.encode())
    return VerifierPolicy.load(verifier_dir)


# --- pytest fixtures ----------------------------------------------------------
# pytest is only a test dependency: import it lazily so this module imports without it.


def _fixtures() -> tuple[Any, Any]:
    import pytest

    @pytest.fixture
    def soft_fido2_factory(tmp_path: Path) -> Callable[..., SoftAuthenticator]:
        """Make fresh soft authenticators in ``tmp_path``; takes ``create``'s keywords."""
        return authenticator_factory(tmp_path)

    @pytest.fixture
    def soft_fido2(soft_fido2_factory: Callable[..., SoftAuthenticator]) -> SoftAuthenticator:
        """A fresh soft authenticator: fingerprint UV enrolled, no PIN, UP auto-approved."""
        return soft_fido2_factory()

    return soft_fido2_factory, soft_fido2


with contextlib.suppress(ImportError):  # without pytest the helpers still work
    soft_fido2_factory, soft_fido2 = _fixtures()
