"""An attacker who can drive the verifier's HSM: run as its own process, logged in
to the token with python-pkcs11 (the user PIN), no hsm-auth code involved.

Input (JSON on stdin): the module path, the token label, the user PIN, the
public points the verifier's database shows (SEC1 hex) and every blob it holds
(sealed OTP keys, FIDO2 wrapped keys and their AES-KW parts, hex).

It enumerates every object and tries, with templates of its own choosing
(extractable, not sensitive, several key types): ECDH1_DERIVE from every
private key with every point; C_UnwrapKey of every blob with every secret key
(AES key wrap, with and without padding); C_Decrypt of every blob with every
secret key (ECB, CBC); C_WrapKey of every key with a wrapping key it made
itself; C_GetAttributeValue(CKA_VALUE) of every key, before and after trying to
make it extractable (C_SetAttributeValue); C_CopyObject of every key (then all of
that on the copy); C_DigestKey; and symmetric derives
(AES_ECB_ENCRYPT_DATA) from what it unwrapped; and offline, the AES key unwrap
of every blob with every 32-byte string it obtained. Every byte string any
attempt produced is printed (JSON on stdout) for the test to compare with the
OTP keys.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import keywrap
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute as A
from pkcs11 import KeyType as KT
from pkcs11 import Mechanism as M
from pkcs11 import ObjectClass as OC
from pkcs11._pkcs11 import (
    DecryptMixin,
    DeriveMixin,
    EncryptMixin,
    Object,
    PrivateKey,
    SecretKey,
    SignMixin,
    UnwrapMixin,
    WrapMixin,
)

LAX = [
    {A.SENSITIVE: False, A.EXTRACTABLE: True},
    {A.EXTRACTABLE: True},
    {A.SENSITIVE: True, A.EXTRACTABLE: True},
    {A.SENSITIVE: False, A.EXTRACTABLE: True, A.TOKEN: True},
]
#: The template the verifier's KEK forces on what it unwraps (the attacker may read
#: the verifier's source): an unwrap under it succeeds, into a key it cannot read.
FORCED = {A.TOKEN: False, A.SENSITIVE: True, A.EXTRACTABLE: False, A.MODIFIABLE: False,
          A.SIGN: True, A.VERIFY: False, A.ENCRYPT: False,
          A.DECRYPT: False, A.WRAP: False, A.UNWRAP: False, A.DERIVE: False}
#: The key types an unwrap or derive is asked to produce.
KINDS = [(KT.GENERIC_SECRET, 256), (KT.AES, 256)]


class Attacker:
    def __init__(self, session: Any) -> None:
        self.session = session
        self.outputs: list[str] = []  # hex of every byte string obtained
        self.attempts = 0
        self.refused = 0
        self.successes: dict[str, int] = {}
        # A wrapping key of our own, whose value we know: anything it wraps, we read.
        self.mine = session.generate_key(
            KT.AES, 256, store=False, capabilities=0,
            template={A.SENSITIVE: False, A.EXTRACTABLE: True, A.WRAP: True, A.UNWRAP: True,
                      A.ENCRYPT: True, A.DECRYPT: True},
        )
        self.mine_value = bytes(self.mine[A.VALUE])

    def attempt(self, what: str, action: Callable[[], Any]) -> Any:
        self.attempts += 1
        try:
            result = action()
        except (pkcs11.PKCS11Error, NotImplementedError, TypeError, ValueError,
                keywrap.InvalidUnwrap):
            self.refused += 1
            return None
        self.successes[what] = self.successes.get(what, 0) + 1
        if isinstance(result, (bytes, bytearray)):
            self.outputs.append(bytes(result).hex())
        return result

    def harvest(self, key: Any, origin: str) -> None:
        """Everything we can get out of ``key``: its value, a wrap under our key, a digest."""
        self.attempt(f"{origin}: read CKA_VALUE", lambda: bytes(key[A.VALUE]))
        for mechanism in (M.AES_KEY_WRAP, M.AES_KEY_WRAP_PAD):
            self.attempt(f"{origin}: wrap with own key, {mechanism.name}",
                         lambda m=mechanism: self._wrap_and_open(key, m))
        self.attempt(f"{origin}: C_DigestKey",
                     lambda: bytes(self.session.digest(key, mechanism=M.SHA256)))

    def _wrap_and_open(self, key: Any, mechanism: Any) -> bytes:
        wrapped = bytes(self.mine.wrap_key(key, mechanism=mechanism))
        if mechanism == M.AES_KEY_WRAP:
            return keywrap.aes_key_unwrap(self.mine_value, wrapped)
        return keywrap.aes_key_unwrap_with_padding(self.mine_value, wrapped)

    def loosen(self, key: Any, origin: str) -> None:
        """Try to make ``key`` readable after the fact, then harvest it again."""
        for attr, value in ((A.EXTRACTABLE, True), (A.SENSITIVE, False), (A.DERIVE, True),
                            (A.DECRYPT, True), (A.ENCRYPT, True), (A.WRAP, True)):
            self.attempt(f"{origin}: set {attr.name}={value}",
                         lambda a=attr, v=value: key.__setitem__(a, v))
        self.harvest(key, origin + " (after setting attributes)")


def _any_secret(key: Any) -> Any:
    """``key`` with every operation python-pkcs11 has, whatever its attributes say."""
    cls = type("AnySecret", (SecretKey, EncryptMixin, DecryptMixin, SignMixin, WrapMixin,
                             UnwrapMixin, DeriveMixin, Object), {})
    return cls(key.wrapper)


def _any_private(key: Any) -> Any:
    cls = type("AnyPrivate", (PrivateKey, DecryptMixin, SignMixin, UnwrapMixin, DeriveMixin,
                              Object), {})
    return cls(key.wrapper)


def main() -> int:
    spec = json.load(sys.stdin)
    lib = pkcs11.lib(spec["module"])
    token = lib.get_token(token_label=spec["token"])
    points = [
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(p))
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        for p in spec["points"]
    ]
    blobs = [bytes.fromhex(b) for b in spec["blobs"]]
    with token.open(rw=True, user_pin=spec["pin"]) as session:
        attacker = Attacker(session)
        found = list(session.get_objects({}))
        inventory = []
        privates, secrets = [], []
        for obj in found:
            if obj.handle == attacker.mine.handle:
                continue
            cls = obj[A.CLASS]
            label = obj[A.LABEL]
            inventory.append(f"{cls.name} {label}")
            if cls == OC.PRIVATE_KEY:
                privates.append((label, _any_private(obj)))
            elif cls == OC.SECRET_KEY:
                secrets.append((label, _any_secret(obj)))
        for label, key in privates + secrets:
            attacker.harvest(key, f"{label}")
            attacker.loosen(key, f"{label}")
            as_any = _any_private if (label, key) in privates else _any_secret
            for template in [{}, *LAX, {A.MODIFIABLE: True}, {A.TOKEN: False}]:
                copy = attacker.attempt(f"{label}: C_CopyObject",
                                        lambda k=key, t=template: k.copy(t))
                if copy is not None:
                    attacker.harvest(as_any(copy), f"{label}, copied")
                    attacker.loosen(as_any(copy), f"{label}, copied")
        derived = []
        for label, key in privates:
            for point in points:
                for kind, bits in KINDS:
                    for template in LAX:
                        result = attacker.attempt(
                            f"{label}: ECDH1_DERIVE {kind.name}",
                            lambda k=key, t=template, kd=kind, b=bits, p=point: k.derive_key(
                                kd, b, store=False, mechanism=M.ECDH1_DERIVE,
                                mechanism_param=(pkcs11.KDF.NULL, None, p), template=t),
                        )
                        if result is not None:
                            derived.append((f"derived from {label}", result))
        opened = []
        for label, key in secrets:
            for blob in blobs:
                for mechanism in (M.AES_KEY_WRAP, M.AES_KEY_WRAP_PAD):
                    for kind, _bits in KINDS:
                        for template in [*LAX, {}]:
                            result = attacker.attempt(
                                f"{label}: C_UnwrapKey {mechanism.name} {kind.name}",
                                lambda k=key, b=blob, m=mechanism, kd=kind, t=template:
                                k.unwrap_key(OC.SECRET_KEY, kd, b, mechanism=m, store=False,
                                             template=t),
                            )
                            if result is not None:
                                opened.append((f"unwrapped by {label}", result))
                    # the unwrap template the KEK forces: it works, and must yield nothing
                    result = attacker.attempt(
                        f"{label}: C_UnwrapKey {mechanism.name} under the forced template",
                        lambda k=key, b=blob, m=mechanism: k.unwrap_key(
                            OC.SECRET_KEY, KT.GENERIC_SECRET, b, mechanism=m, store=False,
                            capabilities=0, template=FORCED),
                    )
                    if result is not None:
                        opened.append((f"unwrapped (forced template) by {label}", result))
                for mechanism, param in ((M.AES_ECB, None), (M.AES_CBC, bytes(16))):
                    attacker.attempt(
                        f"{label}: C_Decrypt {mechanism.name}",
                        lambda k=key, b=blob, m=mechanism, pm=param: bytes(
                            k.decrypt(b[: len(b) // 16 * 16], mechanism=m, mechanism_param=pm)),
                    )
        for origin, key in derived + opened:
            anykey = _any_secret(key)
            attacker.harvest(anykey, origin)
            attacker.loosen(anykey, origin)
            for template in [{}, *LAX, {A.MODIFIABLE: True}]:
                copy = attacker.attempt(f"{origin}: C_CopyObject",
                                        lambda k=anykey, t=template: k.copy(t))
                if copy is not None:
                    attacker.harvest(_any_secret(copy), f"{origin}, copied")
                    attacker.loosen(_any_secret(copy), f"{origin}, copied")
            again = attacker.attempt(
                f"{origin}: AES_ECB_ENCRYPT_DATA derive",
                lambda k=anykey: k.derive_key(
                    KT.GENERIC_SECRET, 256, store=False, mechanism=M.AES_ECB_ENCRYPT_DATA,
                    mechanism_param=bytes(32),
                    template={A.SENSITIVE: False, A.EXTRACTABLE: True}),
            )
            if again is not None:
                attacker.harvest(again, origin + ", derived again")
        # Offline, with every 32-byte string obtained: the AES key wrap of every blob.
        candidates = {bytes.fromhex(o)[i : i + 32] for o in attacker.outputs
                      for i in range(len(bytes.fromhex(o)) - 31)}
        for candidate in candidates:
            for blob in blobs:
                for part in (blob, blob[33:]):
                    if len(part) % 8 == 0 and len(part) >= 24:
                        attacker.attempt("offline AES key unwrap with an obtained value",
                                         lambda c=candidate, b=part: keywrap.aes_key_unwrap(c, b))
    json.dump({
        "inventory": inventory,
        "attempts": attacker.attempts,
        "refused": attacker.refused,
        "successes": attacker.successes,
        "outputs": attacker.outputs,
    }, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
