"""The verifier's keys in a PKCS#11 HSM (SoftHSM in the tests): the
``pkcs11`` implementation of :class:`hsm_auth.verifier_keys.VerifierKeys`,
registered in the entry-point group ``hsm_auth.verifier_keys`` (the core
finds it by the ``type`` recorded in the verifier's identity file and never
imports this module or python-pkcs11 otherwise).

Both keys are generated in the token, sensitive and not extractable. For each
check the ECDH secret is derived *inside* the HSM as a session (non-token),
sensitive, non-extractable key, the OCRA data inputs are HMAC'd there, and the
session key is destroyed: the OTP key never exists on the host, and nothing
derived is cached between checks.

FIDO2 methods send their OTP key wrapped to the agreement key
(:mod:`hsm_auth.key_transport`). Here, for now, the ECDH step runs in the HSM
and the unwrap on the host, for the duration of one check.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_auth import ec as ecutil
from hsm_auth import key_transport
from hsm_auth.errors import HsmAuthError, StateError
from hsm_auth.keystore import NO_AUTH, KeyKind
from hsm_auth.store.base import CredentialRecord
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier_keys import MacFunction, VerifierKeys

from .pkcs11 import Pkcs11KeyStore, _text, convert_error


class Pkcs11VerifierKeys(VerifierKeys):
    """Both keys in a PKCS#11 token, used through the project's PKCS#11 backend
    (login from the URI's ``pin-source``, signing, key generation) plus one
    extra session of this process for the per-check session keys."""

    kind: ClassVar[str] = "pkcs11"
    LABEL_PREFIX: ClassVar[str] = "hsm-auth-verifier"

    def __init__(self, token_uri: str, store: Any, signing_uri: str, agreement_uri: str) -> None:
        self.token_uri = token_uri
        self.signing_uri = signing_uri
        self.agreement_uri = agreement_uri
        self._store = store
        self._lock = threading.RLock()
        self._auth = NO_AUTH
        self._signing_public = store.public_key(signing_uri, NO_AUTH)
        self._agreement_public = store.public_key(agreement_uri, NO_AUTH)
        self._p11: Any = None
        self._session: Any = None
        self._agreement_key: Any = None

    # --- lifecycle ---------------------------------------------------------

    @staticmethod
    def _open_store(token_uri: str) -> Any:
        return Pkcs11KeyStore.open({"uri": token_uri})

    @classmethod
    def create(cls, token_uri: str) -> Pkcs11VerifierKeys:
        """Generate the signing and agreement key pairs in the token named by ``token_uri``."""
        store = cls._open_store(token_uri)
        try:
            tag = os.urandom(4).hex()
            signing = store.generate_key(f"{cls.LABEL_PREFIX}/{tag}/sign", KeyKind.SIGNING, NO_AUTH)
            agreement = store.generate_key(
                f"{cls.LABEL_PREFIX}/{tag}/ecdh", KeyKind.AGREEMENT, NO_AUTH
            )
            return cls(token_uri, store, signing, agreement)
        except BaseException:
            store.close()
            raise

    @classmethod
    def open(cls, token_uri: str, signing_uri: str, agreement_uri: str) -> Pkcs11VerifierKeys:
        store = cls._open_store(token_uri)
        try:
            return cls(token_uri, store, signing_uri, agreement_uri)
        except BaseException:
            store.close()
            raise

    @classmethod
    def generate(cls, uri: str) -> Pkcs11VerifierKeys:
        return cls.create(uri)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], uri: str | None) -> Pkcs11VerifierKeys:
        try:
            token, signing, agreement = (
                str(spec["token"]), str(spec["signing"]), str(spec["agreement"])
            )
        except KeyError:
            raise StateError("the verifier identity names HSM keys incompletely") from None
        return cls.open(uri or token, signing, agreement)

    def to_json(self) -> dict[str, str]:
        return {
            "type": self.kind,
            "token": self.token_uri,
            "signing": self.signing_uri,
            "agreement": self.agreement_uri,
        }

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                with contextlib.suppress(Exception):  # a session that is gone is fine
                    self._session.close()
                self._session = None
                self._agreement_key = None
            self._store.close()

    # --- the extra session -----------------------------------------------------

    def _derive_session(self) -> tuple[Any, Any]:
        """(python-pkcs11 module, agreement private key object) in our own session.

        The backend store logged in; PKCS#11 login state belongs to the
        application and token, so this session is logged in too.
        """
        if self._session is not None:
            return self._p11, self._agreement_key
        import pkcs11

        uri = Pkcs11Uri.parse(self.agreement_uri)
        module = uri.module_path
        if module is None:
            raise StateError("the verifier's agreement key URI has no module-path")
        try:
            lib = pkcs11.lib(module)
            tokens = [
                t for t in lib.get_tokens(token_label=uri.token)
                if uri.serial is None or _text(t.serial) == uri.serial
            ]
            if len(tokens) != 1:
                raise StateError(f"{len(tokens)} tokens match the verifier's agreement key URI")
            session = tokens[0].open(rw=False)
            try:
                key = session.get_key(
                    object_class=pkcs11.ObjectClass.PRIVATE_KEY, id=uri.id, label=uri.object
                )
            except BaseException:
                session.close()
                raise
        except pkcs11.PKCS11Error as e:
            raise convert_error(e, "open the verifier's agreement key") from e
        self._p11, self._session, self._agreement_key = pkcs11, session, key
        return pkcs11, key

    def _derive(self, peer: ec.EllipticCurvePublicKey, *, extractable: bool) -> Any:
        p11, private = self._derive_session()
        attr = p11.Attribute
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return private.derive_key(
            p11.KeyType.GENERIC_SECRET,
            256,
            store=False,
            capabilities=p11.MechanismFlag.SIGN,
            mechanism=p11.Mechanism.ECDH1_DERIVE,
            mechanism_param=(p11.KDF.NULL, None, point),
            template={
                attr.TOKEN: False,
                attr.SENSITIVE: not extractable,
                attr.EXTRACTABLE: extractable,
                attr.SIGN: True,
                attr.VERIFY: False,
            },
        )

    # --- VerifierKeys ----------------------------------------------------------

    @property
    def signing_public(self) -> ec.EllipticCurvePublicKey:
        return self._signing_public  # type: ignore[no-any-return]

    @property
    def agreement_public(self) -> ec.EllipticCurvePublicKey:
        return self._agreement_public  # type: ignore[no-any-return]

    def sign_raw(self, data: bytes) -> bytes:
        with self._lock:
            return ecutil.der_to_raw(self._store.sign(self.signing_uri, data, self._auth))

    def _unwrap(self, wrapped: bytes) -> bytes:
        peer = key_transport.ephemeral_point(wrapped)
        with self._lock:
            try:
                secret = self._derive(peer, extractable=True)
                try:
                    shared = bytes(secret[self._p11.Attribute.VALUE])
                finally:
                    secret.destroy()
            except HsmAuthError:
                raise
            except Exception as e:
                raise convert_error(e, "derive the key-transport secret") from e
        return key_transport.open_with_shared(shared, wrapped)

    def check_wrapped(self, wrapped: bytes) -> None:
        self._unwrap(wrapped)

    @contextmanager
    def otp_macs(self, credential: CredentialRecord) -> Iterator[MacFunction]:
        if credential.agreement_key is None:
            if credential.wrapped_otp_key is None:
                raise StateError("the credential has neither an agreement key nor a wrapped key")
            key = self._unwrap(credential.wrapped_otp_key)

            def host_mac(data: bytes) -> bytes:
                return hmac.digest(key, data, hashlib.sha256)

            yield host_mac
            return
        peer = ecutil.decode_point(credential.agreement_key)
        with self._lock:
            try:
                secret = self._derive(peer, extractable=False)
            except HsmAuthError:
                raise
            except Exception as e:
                raise convert_error(e, "derive the OTP key in the HSM") from e
            mechanism = self._p11.Mechanism.SHA256_HMAC

            def hsm_mac(data: bytes) -> bytes:
                try:
                    return bytes(secret.sign(data, mechanism=mechanism))
                except Exception as e:
                    raise convert_error(e, "HMAC in the HSM") from e

            try:
                yield hsm_mac
            finally:
                try:
                    secret.destroy()
                except Exception as e:
                    raise convert_error(e, "destroy the per-check OTP key") from e


