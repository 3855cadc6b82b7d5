"""The verifier's keys in a PKCS#11 HSM (SoftHSM in the tests): the ``pkcs11``
implementation of :class:`hsm_auth.verifier_keys.VerifierKeys`, registered in the
entry-point group ``hsm_auth.verifier_keys`` (the core finds it by the ``type``
recorded in the verifier's identity file and never imports this module or
python-pkcs11 otherwise).

One job per key (docs/PROTOCOL.md, "Verifier key custody"); every private and
secret key is sensitive, not extractable, not modifiable and not copyable
(CKA_COPYABLE false: no C_CopyObject outlives a destroyed key) unless said
otherwise below:

* **Signing key** (token, EC P-256, ``hsm-auth-verifier/<tag>/sign``): CKA_SIGN
  only, not modifiable (so CKA_DERIVE cannot be turned on later: the attack
  test found that it could, on a modifiable key). Signs offers, verification
  data and sync messages.
* **Device CA key** (token, EC P-256, ``hsm-auth-verifier/<tag>/ca``): made at
  ``verifier init --hsm`` with the same attributes as the signing key (CKA_SIGN
  only, not modifiable); signs the certificates of enrolled signing keys and the
  CA certificate (:mod:`hsm_auth.device_ca`), nothing else.
* **KEK** (token, AES-256, ``hsm-auth-verifier/<tag>/kek``): CKA_WRAP and
  CKA_UNWRAP only (no ENCRYPT, DECRYPT, DERIVE, SIGN). Its
  ``CKA_UNWRAP_TEMPLATE`` (:func:`unwrapped_template`) forces every key it
  unwraps to be a session generic secret, sensitive, not extractable, not
  modifiable, with CKA_SIGN only; SoftHSM refuses an unwrap whose template
  leaves out or differs in any of these attributes (measured). (It refuses
  CKA_COPYABLE in an unwrap template, CKR_ATTRIBUTE_READ_ONLY; a copy of an
  unwrapped key would have the same attributes.) Its ``CKA_WRAP_TEMPLATE``
  (:func:`wrappable_template`) lets it wrap only session generic secrets
  without any usage, i.e. the inert Z objects made at enrollment.
  ``CKA_WRAP_WITH_TRUSTED`` is not used: it needs the KEK marked
  ``CKA_TRUSTED``, which only the security officer may set (SoftHSM:
  CKR_ATTRIBUTE_READ_ONLY for the user), and the one extractable object it
  would guard lives only in this process's session.
* **Activation-code key** (token, generic secret of 256 bits,
  ``hsm-auth-verifier/<tag>/activation``): CKA_SIGN only (no VERIFY, ENCRYPT,
  DECRYPT, WRAP, UNWRAP, DERIVE). CKM_SHA256_HMAC of an offer id in the HSM gives
  that offer's activation code (:mod:`hsm_auth.activation`); nothing else is MACed
  with it, and the codes are never stored.
* **Per-offer agreement key** (token, EC P-256 private key with CKA_DERIVE
  only, CKA_ID = the offer id, label ``hsm-auth-verifier/<tag>/offer/<offer id
  hex>/<expires>``; its public half is destroyed once its point is read): made by
  :meth:`~Pkcs11VerifierKeys.offer_key` with the offer, destroyed when the
  enrollment is recorded, or by ``purge`` once the offer is used or expired.
  While it exists, whoever drives the HSM session can derive from it with any
  template (PKCS#11 lets the caller choose a derived key's attributes and
  SoftHSM has no CKA_DERIVE_TEMPLATE): it must not outlive its offer.

What exists when:

* at ``accept_enrollment`` (:meth:`~Pkcs11VerifierKeys.seal`), PKCS#11/TPM2
  credential: Z = ECDH(per-offer key, the authenticator's agreement point) is
  derived into a session generic secret with no usage, sensitive, extractable
  only so that the KEK can wrap it; the wrap (RFC 3394, 40 bytes) is the
  sealed OTP key, and Z is destroyed. FIDO2 credential: Z_e = ECDH(per-offer
  key, E) is derived into a session AES key with CKA_UNWRAP only, not
  extractable; it unwraps the response's AES-KW part into a session generic
  secret (no usage, extractable only for the KEK) that the KEK wraps; both are
  destroyed. The host never holds Z, Z_e or the OTP key.
* for each check (:meth:`~Pkcs11VerifierKeys.otp_macs`): the KEK unwraps the
  credential's sealed OTP key into a session object under :func:`unwrapped_template`,
  the OCRA data inputs are HMAC'd (CKM_SHA256_HMAC) in the HSM and the object
  is destroyed. Nothing derived or opened is cached between checks.
* afterwards: the signing key, the KEK, and the per-offer keys of pending
  offers. None of them can make an enrolled credential's OTP key appear in the
  clear: the KEK only unwraps into keys that are sensitive and not
  extractable, and the per-offer key that made the credential is gone.
  Whoever can drive the HSM session can still have it compute MACs under an
  enrolled credential's key (unwrap under the template, C_Sign), as the
  verifier does; they cannot take the key away. SoftHSM answers C_DigestKey
  even for sensitive keys (the SHA-256 of a key, not the key).

No code path here reads a secret key's CKA_VALUE.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm_auth import ec as ecutil
from hsm_auth import key_transport
from hsm_auth.errors import DecodeError, HsmAuthError, StateError
from hsm_auth.keystore import NO_AUTH
from hsm_auth.store.base import CredentialRecord
from hsm_auth.uri import Pkcs11Uri
from hsm_auth.verifier_keys import MacFunction, OfferKey, VerifierKeys, key_agreement

from .pkcs11 import (
    _P256_PARAMS,
    Pkcs11KeyStore,
    _config,
    _find_token,
    _load,
    _public_from_point,
    _text,
    convert_error,
)

#: What a token answers when an AES key wrap does not unwrap: the codes PKCS#11 names
#: for it, and CKR_GENERAL_ERROR, which SoftHSM returns for a failed integrity check (measured).
_BAD_WRAP = {"EncryptedDataInvalid", "EncryptedDataLenRange", "WrappedKeyInvalid",
             "WrappedKeyLenRange", "DataInvalid", "DataLenRange", "GeneralError"}
#: What follows the verifier's ``.../offer/`` label prefix: the offer id and its expiry.
_OFFER_LABEL = re.compile(r"([0-9a-f]{32})/([0-9]{1,20})")
#: What the KEK and the signing key must be, checked whenever the keys are opened.
_KEK_MUST = {"SENSITIVE": True, "EXTRACTABLE": False, "MODIFIABLE": False, "COPYABLE": False,
             "WRAP": True, "UNWRAP": True, "ENCRYPT": False, "DECRYPT": False, "DERIVE": False,
             "SIGN": False}
_SIGNING_MUST = {"SENSITIVE": True, "EXTRACTABLE": False, "MODIFIABLE": False,
                 "COPYABLE": False, "SIGN": True, "DECRYPT": False, "UNWRAP": False,
                 "DERIVE": False}
_ACTIVATION_MUST = {"SENSITIVE": True, "EXTRACTABLE": False, "MODIFIABLE": False,
                    "COPYABLE": False, "SIGN": True, "VERIFY": False, "ENCRYPT": False,
                    "DECRYPT": False, "WRAP": False, "UNWRAP": False, "DERIVE": False}
_ID_BYTES = 16


class _Attribute(ctypes.Structure):
    _fields_ = (("type", ctypes.c_ulong), ("value", ctypes.c_void_p), ("length", ctypes.c_ulong))


def _mapper(p11: Any) -> Any:
    """python-pkcs11's attribute mapper plus the array attributes (CKA_WRAP_TEMPLATE,
    CKA_UNWRAP_TEMPLATE), packed as a CK_ATTRIBUTE array whose values stay alive
    as long as the mapper (they are only written, when the KEK is made)."""
    from pkcs11.attributes import AttributeMapper

    mapper = AttributeMapper()
    alive: list[object] = []

    def pack(template: dict[Any, Any]) -> bytes:
        array = (_Attribute * len(template))()
        for i, (attr, value) in enumerate(template.items()):
            data = mapper.pack_attribute(attr, value)
            buffer = ctypes.create_string_buffer(data, len(data))
            alive.append(buffer)
            array[i] = _Attribute(int(attr), ctypes.cast(buffer, ctypes.c_void_p), len(data))
        alive.append(array)
        return ctypes.string_at(ctypes.addressof(array), ctypes.sizeof(array))

    for attr in (p11.Attribute.WRAP_TEMPLATE, p11.Attribute.UNWRAP_TEMPLATE):
        mapper.register_handler(attr, pack, bytes)
    return mapper


def _usages(p11: Any, **on: bool) -> dict[Any, bool]:
    """Every key usage attribute false, except those named in ``on``."""
    attr = p11.Attribute
    names = ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE")
    return {getattr(attr, n): on.get(n.lower(), False) for n in names}


def _kept(p11: Any) -> dict[Any, bool]:
    """What every key the verifier keeps in the token is: private, sensitive, and not
    extractable, modifiable or copyable (its usages are set beside this)."""
    attr = p11.Attribute
    return {
        attr.TOKEN: True,
        attr.PRIVATE: True,
        attr.SENSITIVE: True,
        attr.EXTRACTABLE: False,
        attr.MODIFIABLE: False,
        attr.COPYABLE: False,
    }


def unwrapped_template(p11: Any) -> dict[Any, Any]:
    """The KEK's CKA_UNWRAP_TEMPLATE: what every key it unwraps is."""
    attr = p11.Attribute
    return {
        attr.CLASS: p11.ObjectClass.SECRET_KEY,
        attr.KEY_TYPE: p11.KeyType.GENERIC_SECRET,
        attr.TOKEN: False,
        attr.SENSITIVE: True,
        attr.EXTRACTABLE: False,
        attr.MODIFIABLE: False,
        **_usages(p11, sign=True),
    }


def wrappable_template(p11: Any) -> dict[Any, Any]:
    """The KEK's CKA_WRAP_TEMPLATE: what it can wrap (session secrets without usage)."""
    attr = p11.Attribute
    return {
        attr.CLASS: p11.ObjectClass.SECRET_KEY,
        attr.KEY_TYPE: p11.KeyType.GENERIC_SECRET,
        attr.TOKEN: False,
        **_usages(p11),
    }


class Pkcs11VerifierKeys(VerifierKeys):
    """The signing key, the KEK, the activation-code key and the per-offer agreement
    keys in a PKCS#11 token,
    used through the project's PKCS#11 backend (login from the URI's ``pin-source``,
    token lookup, signing) plus one session of this process for the rest."""

    kind: ClassVar[str] = "pkcs11"
    LABEL_PREFIX: ClassVar[str] = "hsm-auth-verifier"

    def __init__(
        self,
        token_uri: str,
        store: Any,
        signing_uri: str,
        kek_uri: str,
        *,
        ca_uri: str,
        activation_uri: str,
    ) -> None:
        self.token_uri = token_uri
        self.signing_uri = signing_uri
        self.kek_uri = kek_uri
        self.ca_uri = ca_uri
        self.activation_uri = activation_uri
        self._store = store
        self._lock = threading.RLock()
        self._auth = NO_AUTH
        self._signing_public = store.public_key(signing_uri, NO_AUTH)
        self._ca_public = store.public_key(ca_uri, NO_AUTH)
        if ecutil.same_key(self._ca_public, self._signing_public):
            raise StateError("the verifier's identity names its signing key as its device CA "
                             "key; each key has one job: refusing to use them")
        kek = Pkcs11Uri.parse(kek_uri)
        label = kek.object or ""
        if not (label.startswith(f"{self.LABEL_PREFIX}/") and label.endswith("/kek")):
            raise StateError("the verifier's key-encryption key URI names no hsm-auth KEK")
        #: Label prefix of this verifier's per-offer keys.
        self._offer_prefix = label[: -len("kek")] + "offer/"
        self._p11: Any = None
        self._session: Any = None
        self._kek: Any = None
        self._activation: Any = None
        self._open_session()

    # --- lifecycle ---------------------------------------------------------

    @staticmethod
    def _open_store(token_uri: str) -> Any:
        return Pkcs11KeyStore.open({"uri": token_uri})

    @classmethod
    def create(cls, token_uri: str) -> Pkcs11VerifierKeys:
        """Generate the signing key pair, the KEK and the activation-code key in the
        token named by ``token_uri``."""
        import pkcs11 as p11

        store = cls._open_store(token_uri)  # logged in (pin-source): our session shares it
        try:
            prefix = f"{cls.LABEL_PREFIX}/{os.urandom(4).hex()}"
            session = cls._token_session(token_uri)
            try:
                signing = cls._generate_signing(session, token_uri, f"{prefix}/sign")
                kek = cls._generate_kek(session, token_uri, f"{prefix}/kek")
                ca = cls._generate_ca(session, token_uri, f"{prefix}/ca")
                act = cls._generate_activation(session, token_uri, f"{prefix}/activation")
            except p11.PKCS11Error as e:
                raise convert_error(e, "generate the verifier's keys") from e
            finally:
                with contextlib.suppress(p11.PKCS11Error):
                    session.close()
            return cls(token_uri, store, signing, kek, ca_uri=ca, activation_uri=act)
        except BaseException:
            store.close()
            raise

    @staticmethod
    def _key_uri(session: Any, token_uri: str, kind: str, label: str, ident: bytes) -> str:
        token = session.token
        return str(Pkcs11Uri(
            token=_text(token.label), serial=_text(token.serial), type=kind,
            module_path=_config({"uri": token_uri}).module, object=label, id=ident,
        ))

    @classmethod
    def _generate_signing(cls, session: Any, token_uri: str, label: str) -> str:
        """The signing key pair: CKA_SIGN only and not modifiable, so that nobody can
        turn CKA_DERIVE on later (the backend's signing keys are modifiable)."""
        import pkcs11 as p11

        attr = p11.Attribute
        ident = os.urandom(_ID_BYTES)
        params = session.create_domain_parameters(
            p11.KeyType.EC, {attr.EC_PARAMS: _P256_PARAMS}, local=True
        )
        params.generate_keypair(
            id=ident,
            label=label,
            store=True,
            capabilities=p11.MechanismFlag.SIGN | p11.MechanismFlag.VERIFY,
            public_template={attr.TOKEN: True, attr.PRIVATE: False, attr.DERIVE: False,
                             attr.MODIFIABLE: False},
            private_template={
                **_kept(p11),
                attr.SIGN: True,
                attr.DECRYPT: False,
                attr.UNWRAP: False,
                attr.DERIVE: False,
            },
        )
        return cls._key_uri(session, token_uri, "private", label, ident)

    @classmethod
    def _generate_ca(cls, session: Any, token_uri: str, label: str) -> str:
        """The device CA key pair: a signing key of its own, with the signing key's
        attributes (sign-only, sensitive, not extractable, modifiable or copyable)."""
        return cls._generate_signing(session, token_uri, label)

    @classmethod
    def _generate_secret(
        cls,
        session: Any,
        token_uri: str,
        label: str,
        key_type: Any,
        usages: dict[Any, Any],
        **generate: Any,
    ) -> str:
        """A 256-bit token secret key with only ``usages``: sensitive, not extractable,
        modifiable or copyable."""
        import pkcs11 as p11

        ident = os.urandom(_ID_BYTES)
        session.generate_key(
            key_type,
            256,
            id=ident,
            label=label,
            store=True,
            capabilities=0,
            template={
                **_kept(p11),
                **usages,
            },
            **generate,
        )
        return cls._key_uri(session, token_uri, "secret-key", label, ident)

    @classmethod
    def _generate_kek(cls, session: Any, token_uri: str, label: str) -> str:
        """The key-encryption key: AES-256 that only wraps and unwraps, under templates."""
        import pkcs11 as p11

        attr = p11.Attribute
        return cls._generate_secret(
            session,
            token_uri,
            label,
            p11.KeyType.AES,
            {
                **_usages(p11, wrap=True, unwrap=True),
                attr.UNWRAP_TEMPLATE: unwrapped_template(p11),
                attr.WRAP_TEMPLATE: wrappable_template(p11),
            },
        )

    @classmethod
    def _generate_activation(cls, session: Any, token_uri: str, label: str) -> str:
        """The activation-code key: a generic secret that can only HMAC (CKA_SIGN)."""
        import pkcs11 as p11

        return cls._generate_secret(
            session,
            token_uri,
            label,
            p11.KeyType.GENERIC_SECRET,
            _usages(p11, sign=True),
            mechanism=p11.Mechanism.GENERIC_SECRET_KEY_GEN,
        )

    @classmethod
    def open(
        cls, token_uri: str, signing_uri: str, kek_uri: str, *, ca_uri: str, activation_uri: str
    ) -> Pkcs11VerifierKeys:
        store = cls._open_store(token_uri)
        try:
            return cls(
                token_uri, store, signing_uri, kek_uri, ca_uri=ca_uri, activation_uri=activation_uri
            )
        except BaseException:
            store.close()
            raise

    @classmethod
    def generate(cls, uri: str) -> Pkcs11VerifierKeys:
        return cls.create(uri)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], uri: str | None) -> Pkcs11VerifierKeys:
        try:
            token, signing = str(spec["token"]), str(spec["signing"])
        except KeyError:
            raise StateError("the verifier identity names HSM keys incompletely") from None
        if "kek" not in spec:
            raise StateError(
                "this verifier's HSM keys predate per-offer agreement keys (identity.json "
                "names no key-encryption key): make a new verifier with 'hsm-auth verifier "
                "init --hsm', enroll its users again and delete the old hsm-auth-verifier keys"
            )
        if "ca" not in spec:
            raise StateError(
                "this verifier's HSM keys predate the device CA (identity.json names no CA "
                "key): make a new verifier with 'hsm-auth verifier init --hsm', enroll its "
                "users again and delete the old hsm-auth-verifier keys"
            )
        if "activation" not in spec:
            raise StateError(
                "this verifier's HSM keys predate activation codes (identity.json names no "
                "activation-code key): make a new verifier with 'hsm-auth verifier init "
                "--hsm', enroll its users again and delete the old hsm-auth-verifier keys"
            )
        return cls.open(uri or token, signing, str(spec["kek"]), ca_uri=str(spec["ca"]),
                        activation_uri=str(spec["activation"]))

    def to_json(self) -> dict[str, str]:
        return {
            "type": self.kind,
            "token": self.token_uri,
            "signing": self.signing_uri,
            "kek": self.kek_uri,
            "ca": self.ca_uri,
            "activation": self.activation_uri,
        }

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                with contextlib.suppress(Exception):  # a session that is gone is fine
                    self._session.close()
                self._session = None
                self._kek = None
                self._activation = None
            self._store.close()

    # --- our own session -------------------------------------------------------

    @staticmethod
    def _token_session(key_uri: str) -> Any:
        """A read-write session on the token ``key_uri`` names (found as the backend
        finds it), with the array attributes mapped. The backend store logged in;
        PKCS#11 login state belongs to the application and token, so this session
        is logged in too."""
        cfg = _config({"uri": key_uri})
        p11, lib = _load(cfg.module)
        token = _find_token(p11, lib, cfg)
        try:
            return token.open(rw=True, attribute_mapper=_mapper(p11))
        except p11.PKCS11Error as e:
            raise convert_error(e, "open a session for the verifier's keys") from e

    def _open_session(self) -> None:
        import pkcs11

        session = self._token_session(self.signing_uri)
        try:
            kek = self._checked(session, self.kek_uri, pkcs11.ObjectClass.SECRET_KEY,
                                _KEK_MUST, "key-encryption key", "wrap/unwrap-only")
            self._checked(session, self.signing_uri, pkcs11.ObjectClass.PRIVATE_KEY,
                          _SIGNING_MUST, "signing key", "sign-only")
            self._checked(session, self.ca_uri, pkcs11.ObjectClass.PRIVATE_KEY,
                          _SIGNING_MUST, "device CA key", "sign-only")
            act = self._checked(session, self.activation_uri, pkcs11.ObjectClass.SECRET_KEY,
                                _ACTIVATION_MUST, "activation-code key", "HMAC-only")
        except BaseException:
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()
            raise
        self._p11, self._session, self._kek, self._activation = pkcs11, session, kek, act

    @staticmethod
    def _checked(session: Any, uri_text: str, object_class: Any, must: dict[str, bool],
                 name: str, usage: str) -> Any:
        """The key ``uri_text`` names, refused unless its attributes are ``must``."""
        import pkcs11

        uri = Pkcs11Uri.parse(uri_text)
        try:
            key = session.get_key(object_class=object_class, id=uri.id, label=uri.object)
            got = key.get_attributes([pkcs11.Attribute[a] for a in must])
        except pkcs11.PKCS11Error as e:
            raise convert_error(e, f"open the verifier's {name}") from e
        if any(bool(got[pkcs11.Attribute[a]]) != value for a, value in must.items()):
            raise StateError(
                f"the verifier's {name} in the HSM is not a sensitive, unextractable, "
                f"unmodifiable {usage} key; refusing to use it"
            )
        return key

    def _ready(self) -> tuple[Any, Any, Any]:
        if self._session is None:
            raise StateError("these verifier keys are closed")
        return self._p11, self._session, self._kek

    def _offer_private(self, offer_id: bytes) -> Any:
        p11, session, _ = self._ready()
        found = [
            key for key in session.get_objects(
                {p11.Attribute.CLASS: p11.ObjectClass.PRIVATE_KEY, p11.Attribute.ID: offer_id}
            )
            if str(key[p11.Attribute.LABEL]).startswith(self._offer_prefix)
        ]
        if not found:
            raise StateError(
                "the offer's agreement key is not in the HSM (used, purged, or made by "
                "another verifier); make a new offer"
            )
        return found[0]

    def _derive(self, private: Any, peer: ec.EllipticCurvePublicKey, key_type: Any,
                **usage: bool) -> Any:
        """ECDH x-coordinate of ``private`` and ``peer`` as a session key of ``key_type``:
        sensitive; extractable only without any usage (for the KEK to wrap)."""
        p11 = self._p11
        attr = p11.Attribute
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return private.derive_key(
            key_type,
            256,
            store=False,
            capabilities=0,
            mechanism=p11.Mechanism.ECDH1_DERIVE,
            mechanism_param=(p11.KDF.NULL, None, point),
            template={
                attr.TOKEN: False,
                attr.SENSITIVE: True,
                attr.EXTRACTABLE: not usage,
                **_usages(p11, **usage),
            },
        )

    # --- VerifierKeys ----------------------------------------------------------

    @property
    def signing_public(self) -> ec.EllipticCurvePublicKey:
        return self._signing_public  # type: ignore[no-any-return]

    def sign_raw(self, data: bytes) -> bytes:
        with self._lock:
            return ecutil.der_to_raw(self._store.sign(self.signing_uri, data, self._auth))

    @property
    def ca_public(self) -> ec.EllipticCurvePublicKey:
        return self._ca_public  # type: ignore[no-any-return]

    def ca_sign(self, data: bytes) -> bytes:
        with self._lock:
            return bytes(self._store.sign(self.ca_uri, data, self._auth))

    def offer_key(self, offer_id: bytes, expires: int) -> ec.EllipticCurvePublicKey:
        if len(offer_id) != _ID_BYTES or not 0 <= expires < 10**20:
            raise StateError("an offer id is 16 bytes and its expiry a time")
        with self._lock:
            p11, session, _ = self._ready()
            attr = p11.Attribute
            try:
                params = session.create_domain_parameters(
                    p11.KeyType.EC, {attr.EC_PARAMS: _P256_PARAMS}, local=True
                )
                public, _private = params.generate_keypair(
                    id=offer_id,
                    label=f"{self._offer_prefix}{offer_id.hex()}/{expires}",
                    store=True,
                    capabilities=p11.MechanismFlag.DERIVE,
                    public_template={attr.TOKEN: False, attr.PRIVATE: False,
                                     attr.VERIFY: False, attr.DERIVE: False},
                    private_template={
                        **_kept(p11),
                        attr.SIGN: False,
                        attr.DECRYPT: False,
                        attr.UNWRAP: False,
                        attr.DERIVE: True,
                    },
                )
                try:
                    return _public_from_point(public[attr.EC_POINT])
                finally:
                    public.destroy()
            except p11.PKCS11Error as e:
                raise convert_error(e, "generate an offer's agreement key",
                                    mechanism="CKM_EC_KEY_PAIR_GEN") from e

    def activation_hmac(self, message: bytes) -> bytes:
        with self._lock:
            p11, _, _ = self._ready()
            try:
                return bytes(self._activation.sign(message, mechanism=p11.Mechanism.SHA256_HMAC))
            except p11.PKCS11Error as e:
                raise convert_error(e, "make an activation code in the HSM",
                                    mechanism="CKM_SHA256_HMAC") from e

    def seal(self, offer_id: bytes, credential: CredentialRecord) -> bytes:
        agreement = key_agreement(credential)
        with self._lock:
            p11, _, kek = self._ready()
            try:
                private = self._offer_private(offer_id)
                if credential.agreement_key is not None:
                    z = self._derive(private, ecutil.decode_point(agreement),
                                     p11.KeyType.GENERIC_SECRET)
                    try:
                        return bytes(kek.wrap_key(z, mechanism=p11.Mechanism.AES_KEY_WRAP))
                    finally:
                        z.destroy()
                peer = key_transport.ephemeral_point(agreement)
                z_e = self._derive(private, peer, p11.KeyType.AES, unwrap=True)
                try:
                    otp_key = self._unwrap_transport(z_e, key_transport.key_wrap_part(agreement))
                finally:
                    z_e.destroy()
                try:
                    return bytes(kek.wrap_key(otp_key, mechanism=p11.Mechanism.AES_KEY_WRAP))
                finally:
                    otp_key.destroy()
            except HsmAuthError:
                raise
            except p11.PKCS11Error as e:
                raise convert_error(e, "seal the OTP key in the HSM") from e

    def _unwrap_transport(self, z_e: Any, ciphertext: bytes) -> Any:
        p11 = self._p11
        attr = p11.Attribute
        try:
            return z_e.unwrap_key(
                p11.ObjectClass.SECRET_KEY,
                p11.KeyType.GENERIC_SECRET,
                ciphertext,
                mechanism=p11.Mechanism.AES_KEY_WRAP,
                store=False,
                capabilities=0,
                template={attr.TOKEN: False, attr.SENSITIVE: True, attr.EXTRACTABLE: True,
                          **_usages(p11)},
            )
        except p11.PKCS11Error as e:
            if type(e).__name__ in _BAD_WRAP:
                raise DecodeError("wrapped OTP key does not unwrap") from None
            raise

    @contextmanager
    def otp_macs(self, credential: CredentialRecord) -> Iterator[MacFunction]:
        sealed = credential.sealed_otp_key
        if sealed is None:
            raise StateError("the credential has no sealed OTP key; enroll it again")
        with self._lock:
            p11, _, kek = self._ready()
            template = {
                k: v for k, v in unwrapped_template(p11).items()
                if k not in (p11.Attribute.CLASS, p11.Attribute.KEY_TYPE)
            }
            try:
                secret = kek.unwrap_key(
                    p11.ObjectClass.SECRET_KEY,
                    p11.KeyType.GENERIC_SECRET,
                    sealed,
                    mechanism=p11.Mechanism.AES_KEY_WRAP,
                    store=False,
                    capabilities=0,
                    template=template,
                )
            except p11.PKCS11Error as e:
                raise convert_error(e, "open the sealed OTP key in the HSM") from e
            mechanism = p11.Mechanism.SHA256_HMAC

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

    def offer_keys(self) -> list[OfferKey]:
        with self._lock:
            p11, session, _ = self._ready()
            attr = p11.Attribute
            held: list[OfferKey] = []
            try:
                for key in session.get_objects({attr.CLASS: p11.ObjectClass.PRIVATE_KEY}):
                    label = str(key[attr.LABEL])
                    if not label.startswith(self._offer_prefix):
                        continue
                    found = _OFFER_LABEL.fullmatch(label[len(self._offer_prefix):])
                    if found is None:  # ours, but not as we write it: stale
                        held.append(OfferKey(bytes(key[attr.ID]), 0))
                    else:
                        held.append(OfferKey(bytes.fromhex(found[1]), int(found[2])))
            except p11.PKCS11Error as e:
                raise convert_error(e, "list the offers' agreement keys") from e
            return held

    def drop_offer_key(self, offer_id: bytes) -> None:
        with self._lock:
            p11, session, _ = self._ready()
            attr = p11.Attribute
            try:
                for key in list(session.get_objects(
                    {attr.CLASS: p11.ObjectClass.PRIVATE_KEY, attr.ID: offer_id}
                )):
                    if str(key[attr.LABEL]).startswith(self._offer_prefix):
                        # Gone meanwhile (another process purged it) is what we wanted.
                        with contextlib.suppress(p11.ObjectHandleInvalid):
                            key.destroy()
            except p11.PKCS11Error as e:
                raise convert_error(e, "destroy an offer's agreement key") from e
