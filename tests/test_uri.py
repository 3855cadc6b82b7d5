"""RFC 7512 PKCS#11 URIs and the generic ``scheme:attr=value`` helper."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsm_auth.errors import InvalidInput
from hsm_auth.uri import Pkcs11Uri, format_attr_uri, parse_attr_uri

# RFC 7512 section 3.3, every example.
RFC7512_EXAMPLES = [
    "pkcs11:",
    "pkcs11:object=my-pubkey;type=public",
    "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
    "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
    "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial="
    "?pin-source=file:/etc/token_pin",
    "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
    "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
    "pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc."
    "?pin-value=the-pin",
    "pkcs11:slot-description=Sun%20Metaslot",
    "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;"
    "library-version=1.23",
    "pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;"
    "id=%01%02%03%Ba%dd%Ca%fe%04%05%06",
    "pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=cert",
    "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;"
    "object=my-certificate;type=cert",
    "pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a"
    "?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
]


@pytest.mark.parametrize("text", RFC7512_EXAMPLES)
def test_rfc7512_examples_round_trip(text: str) -> None:
    uri = Pkcs11Uri.parse(text)
    assert Pkcs11Uri.parse(uri.format(include_pin_value=True)) == uri


def test_rfc7512_certificate_example_fields() -> None:
    uri = Pkcs11Uri.parse(RFC7512_EXAMPLES[3])
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.model == "1.0"
    assert uri.object == "my-certificate"
    assert uri.type == "cert"
    assert uri.id == bytes.fromhex("69953e5cf4bdec91")
    assert uri.serial == ""
    assert uri.pin_source == "file:/etc/token_pin"


def test_rfc7512_percent_and_utf8_examples() -> None:
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[9]).token == "My token% created by Joe"
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[9]).id == bytes.fromhex("010203baddcafe040506")
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[9]).library_version == "3"
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[10]).token == "A name with a substring %;"
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[11]).token == "Name with a small A with acute: \u00e1"
    lib = Pkcs11Uri.parse(RFC7512_EXAMPLES[8])
    assert (lib.library_manufacturer, lib.library_description, lib.library_version) == (
        "Snake Oil, Inc.",
        "Soft Token Library",
        "1.23",
    )
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[7]).slot_description == "Sun Metaslot"
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[4]).module_name == "mypkcs11"
    assert Pkcs11Uri.parse(RFC7512_EXAMPLES[5]).module_path == "/mnt/libmypkcs11.so.1"


def test_vendor_attributes_are_kept() -> None:
    uri = Pkcs11Uri.parse(RFC7512_EXAMPLES[12])
    assert uri.vendor_path == (("vendor-aaa", "value-a"),)
    assert uri.vendor_query == (("vendor-bbb", "value-b"),)
    assert uri.vendor("vendor-bbb") == "value-b"
    assert "vendor-aaa=value-a" in str(uri) and "vendor-bbb=value-b" in str(uri)


def test_empty_uri() -> None:
    assert Pkcs11Uri.parse("pkcs11:") == Pkcs11Uri()
    assert str(Pkcs11Uri()) == "pkcs11:"


def test_pin_value_never_printed() -> None:
    uri = Pkcs11Uri.parse(RFC7512_EXAMPLES[6])
    assert uri.pin_value == "the-pin"
    assert "the-pin" not in repr(uri)
    assert "the-pin" not in str(uri)
    assert "pin-value=the-pin" in uri.format(include_pin_value=True)


def test_format_exact() -> None:
    uri = Pkcs11Uri(
        token="hsm auth",
        object="a/b;c",
        id=b"\x00\xff",
        type="private",
        module_path="/usr/lib/softhsm/libsofthsm2.so",
    )
    assert str(uri) == (
        "pkcs11:token=hsm%20auth;object=a%2Fb%3Bc;id=%00%FF;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so"
    )
    assert Pkcs11Uri.parse(str(uri)) == uri
    assert dataclasses.replace(uri, slot_id=3).format().count("slot-id=3") == 1


@pytest.mark.parametrize(
    "text",
    [
        "pkcs12:token=a",
        "token=a",
        "pkcs11:token=a;token=b",
        "pkcs11:token",
        "pkcs11:type=secret",
        "pkcs11:slot-id=x1",
        "pkcs11:id=%zz",
        "pkcs11:token=%ff%fe",
        "pkcs11:pin-source=file:/x",
        "pkcs11:?token=a",
        "pkcs11:library-version=1.2.3",
        "pkcs11:token=a\nb",
        "pkcs11:=a",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Pkcs11Uri.parse(text)
    assert "\n" not in str(info.value)


def test_scheme_is_case_insensitive() -> None:
    assert Pkcs11Uri.parse("PKCS11:token=a").token == "a"


_text = st.text(st.characters(codec="utf-8"), max_size=20)


@given(
    token=st.none() | _text,
    obj=st.none() | _text,
    ident=st.none() | st.binary(max_size=20),
    slot=st.none() | st.integers(0, 2**32),
    path=st.none() | _text,
)
def test_round_trip_property(
    token: str | None, obj: str | None, ident: bytes | None, slot: int | None, path: str | None
) -> None:
    uri = Pkcs11Uri(token=token, object=obj, id=ident, slot_id=slot, module_path=path)
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_attr_uri_round_trip() -> None:
    text = format_attr_uri(
        "tpm2", {"handle": "0x81000001", "label": "a b;c"}, {"tcti": "swtpm:path=/t/x.sock"}
    )
    assert text == "tpm2:handle=0x81000001;label=a%20b%3Bc?tcti=swtpm:path=/t/x.sock"
    assert parse_attr_uri(text, "tpm2") == (
        {"handle": "0x81000001", "label": "a b;c"},
        {"tcti": "swtpm:path=/t/x.sock"},
    )
    assert parse_attr_uri("fido2:", "fido2") == ({}, {})


@given(
    path=st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), _text, max_size=4),
    query=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True), _text, max_size=4
    ),
)
def test_attr_uri_property(path: dict[str, str], query: dict[str, str]) -> None:
    assert parse_attr_uri(format_attr_uri("fido2", path, query), "fido2") == (path, query)


@pytest.mark.parametrize(
    "text", ["tpm2:handle=1", "fido2:a=1;a=2", "fido2:a", "fido2:a=%g0", "fido2:?b=1&b=2"]
)
def test_attr_uri_invalid(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_attr_uri(text, "fido2")
