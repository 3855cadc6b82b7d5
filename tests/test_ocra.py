"""OCRA (RFC 6287) against every Appendix C vector, plus RFC 4226 truncation and suite parsing."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm_auth.errors import InvalidInput, InvalidToken
from hsm_auth.ocra import OTP_SUITE, OcraSuite, generate, truncate, verify

# --- RFC 6287 Appendix C -----------------------------------------------------

KEY20 = bytes.fromhex("3132333435363738393031323334353637383930")
KEY32 = bytes.fromhex("3132333435363738393031323334353637383930313233343536373839303132")
KEY64 = bytes.fromhex(
    "3132333435363738393031323334353637383930"
    "3132333435363738393031323334353637383930"
    "3132333435363738393031323334353637383930"
    "31323334"
)
PIN_SHA1 = bytes.fromhex("7110eda4d09e062aa5e4a390b0a572ac0d2c0220")  # SHA-1("1234")
T_RFC = 0x132D0B6  # "Mar 25 2008, 12:06:30 GMT" in minutes since the epoch


def _vectors() -> list[pytest.ParameterSet]:
    cases: list[tuple[str, str, bytes, dict[str, object], str]] = []

    # C.1 One-way challenge-response
    for i, r in enumerate(
        ["237653", "243178", "653583", "740991", "608993",
         "388898", "816933", "224598", "750600", "294470"]
    ):  # fmt: skip
        cases.append(("C.1", "OCRA-1:HOTP-SHA1-6:QN08", KEY20, {"question": str(i) * 8}, r))
    for c, r in enumerate(
        ["65347737", "86775851", "78192410", "71565254", "10104329",
         "65983500", "70069104", "91771096", "75011558", "08522129"]
    ):  # fmt: skip
        inputs = {"counter": c, "question": "12345678", "password": PIN_SHA1}
        cases.append(("C.1", "OCRA-1:HOTP-SHA256-8:C-QN08-PSHA1", KEY32, inputs, r))
    for i, r in enumerate(["83238735", "01501458", "17957585", "86776967", "86807031"]):
        inputs = {"question": str(i) * 8, "password": PIN_SHA1}
        cases.append(("C.1", "OCRA-1:HOTP-SHA256-8:QN08-PSHA1", KEY32, inputs, r))
    for c, r in enumerate(
        ["07016083", "63947962", "70123924", "25341727", "33203315",
         "34205738", "44343969", "51946085", "20403879", "31409299"]
    ):  # fmt: skip
        inputs = {"counter": c, "question": str(c) * 8}
        cases.append(("C.1", "OCRA-1:HOTP-SHA512-8:C-QN08", KEY64, inputs, r))
    for i, r in enumerate(["95209754", "55907591", "22048402", "24218844", "36209546"]):
        inputs = {"question": str(i) * 8, "timestamp": T_RFC}
        cases.append(("C.1", "OCRA-1:HOTP-SHA512-8:QN08-T1M", KEY64, inputs, r))

    # C.2 Mutual challenge-response: Q = client challenge || server challenge
    # for the server's response, server || client for the client's.
    def cli_srv(i: int) -> str:
        return f"CLI2222{i}SRV1111{i}"

    def srv_cli(i: int) -> str:
        return f"SRV1111{i}CLI2222{i}"

    for i, r in enumerate(["28247970", "01984843", "65387857", "03351211", "83412541"]):
        inputs = {"question": cli_srv(i), "mutual": True}
        cases.append(("C.2-server", "OCRA-1:HOTP-SHA256-8:QA08", KEY32, inputs, r))
    for i, r in enumerate(["15510767", "90175646", "33777207", "95285278", "28934924"]):
        inputs = {"question": srv_cli(i), "mutual": True}
        cases.append(("C.2-client", "OCRA-1:HOTP-SHA256-8:QA08", KEY32, inputs, r))
    for i, r in enumerate(["79496648", "76831980", "12250499", "90856481", "12761449"]):
        inputs = {"question": cli_srv(i), "mutual": True}
        cases.append(("C.2-server", "OCRA-1:HOTP-SHA512-8:QA08", KEY64, inputs, r))
    for i, r in enumerate(["18806276", "70020315", "01600026", "18951020", "32528969"]):
        inputs = {"question": srv_cli(i), "password": PIN_SHA1, "mutual": True}
        cases.append(("C.2-client", "OCRA-1:HOTP-SHA512-8:QA08-PSHA1", KEY64, inputs, r))

    # C.3 Plain signature
    for i, r in enumerate(["53095496", "04110475", "31331128", "76028668", "46554205"]):
        inputs = {"question": f"SIG1{i}000"}
        cases.append(("C.3", "OCRA-1:HOTP-SHA256-8:QA08", KEY32, inputs, r))
    for i, r in enumerate(["77537423", "31970405", "10235557", "95213541", "65360607"]):
        inputs = {"question": f"SIG1{i}00000", "timestamp": T_RFC}
        cases.append(("C.3", "OCRA-1:HOTP-SHA512-8:QA10-T1M", KEY64, inputs, r))

    return [
        pytest.param(suite, key, inputs, r, id=f"{sec}-{suite}-C{inputs.get('counter', '')}"
                     f"-Q{inputs['question']}")
        for sec, suite, key, inputs, r in cases
    ]  # fmt: skip


VECTORS = _vectors()


def test_vector_count() -> None:
    # 40 one-way, 20 mutual, 10 signature vectors in RFC 6287 Appendix C.
    assert len(VECTORS) == 70
    assert len({p.id for p in VECTORS}) == 70


@pytest.mark.parametrize(("suite_text", "key", "inputs", "expected"), VECTORS)
def test_rfc6287_appendix_c(
    suite_text: str, key: bytes, inputs: dict[str, object], expected: str
) -> None:
    suite = OcraSuite.parse(suite_text)
    assert generate(suite, key, **inputs) == expected  # type: ignore[arg-type]
    verify(suite, key, expected, **inputs)  # type: ignore[arg-type]
    wrong = f"{(int(expected) + 1) % 10 ** len(expected):0{len(expected)}d}"
    with pytest.raises(InvalidToken):
        verify(suite, key, wrong, **inputs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("suite_text", "key", "inputs", "expected"), VECTORS)
def test_rfc6287_appendix_c_with_a_mac_function(
    suite_text: str, key: bytes, inputs: dict[str, object], expected: str
) -> None:
    """The verifier hands ocra a MAC function (the key may live in an HSM): same vectors."""
    suite = OcraSuite.parse(suite_text)
    calls: list[bytes] = []

    def mac(data: bytes) -> bytes:
        calls.append(data)
        return hmac.new(key, data, suite.hash_name).digest()

    assert generate(suite, mac, **inputs) == expected  # type: ignore[arg-type]
    verify(suite, mac, expected, **inputs)  # type: ignore[arg-type]
    assert calls == [suite.data_input(**inputs)] * 2  # type: ignore[arg-type]
    wrong = f"{(int(expected) + 1) % 10 ** len(expected):0{len(expected)}d}"
    with pytest.raises(InvalidToken):
        verify(suite, mac, wrong, **inputs)  # type: ignore[arg-type]


def test_data_input_layout() -> None:
    # RFC 6287 §5.1, checked byte by byte on a suite that has every element.
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA256-8:C-QH10-PSHA1-S004-T30S")
    assert suite.timestep_seconds == 30
    assert suite.session_length == 4
    data = suite.data_input(
        counter=0x0102, question="ABCdef0", password=PIN_SHA1, session=b"sess", timestamp=7
    )
    head = suite.text.encode() + b"\x00"
    assert data[: len(head)] == head
    rest = data[len(head) :]
    assert rest[:8] == bytes.fromhex("0000000000000102")
    assert rest[8:136] == bytes.fromhex("abcdef00") + bytes(124)  # odd hex: zero nibble appended
    assert rest[136:156] == PIN_SHA1
    assert rest[156:160] == b"sess"
    assert rest[160:] == (7).to_bytes(8, "big")


def test_numeric_question_is_converted_to_hex() -> None:
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA1-6:QN08")
    data = suite.data_input(question="12345678")  # 12345678 = 0xBC614E
    q = data[len(suite.text) + 1 :]
    assert q == bytes.fromhex("bc614e") + bytes(125)


def test_alphanumeric_question_is_zero_padded() -> None:
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA1-6:QA08")
    assert suite.data_input(question="SIG10000").endswith(b"SIG10000" + bytes(120))


def test_otp_suite() -> None:
    suite = OcraSuite.parse(OTP_SUITE)
    assert (suite.hash_name, suite.digits, suite.counter) == ("sha256", 8, True)
    assert (suite.question_format, suite.question_length) == ("H", 64)
    assert (suite.password_hash, suite.session_length, suite.timestep_seconds) == (None,) * 3
    digest = hashlib.sha256(b"challenge || context").hexdigest()
    data = suite.data_input(counter=5, question=digest)
    assert data == OTP_SUITE.encode() + b"\x00" + (5).to_bytes(8, "big") + bytes.fromhex(
        digest
    ) + bytes(96)
    otp = generate(suite, KEY32, counter=5, question=digest)
    assert len(otp) == 8 and otp.isdigit()
    verify(suite, KEY32, otp, counter=5, question=digest)
    with pytest.raises(InvalidToken):
        verify(suite, KEY32, otp, counter=6, question=digest)
    with pytest.raises(InvalidInput):
        suite.data_input(counter=5, question=digest + "00")  # longer than QH64


def test_parse_fields() -> None:
    s = OcraSuite.parse("OCRA-1:HOTP-SHA512-0:QA10-PSHA256-S512-T48H")
    assert s == OcraSuite(
        "OCRA-1:HOTP-SHA512-0:QA10-PSHA256-S512-T48H", "sha512", 0, False, "A", 10,
        "sha256", 512, 48 * 3600,
    )  # fmt: skip
    assert s.timestamp_at(48 * 3600 * 10 + 5) == 10
    assert OcraSuite.parse("OCRA-1:HOTP-SHA1-10:QN64-T59M").timestep_seconds == 59 * 60


def test_fields_must_match_text() -> None:
    with pytest.raises(InvalidInput):
        OcraSuite("OCRA-1:HOTP-SHA1-6:QN08", "sha256", 6, False, "N", 8, None, None, None)


def test_no_truncation_gives_hex() -> None:
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA1-0:QN08")
    mac = hmac.new(KEY20, suite.data_input(question="1"), "sha1").digest()
    assert generate(suite, KEY20, question="1") == mac.hex()
    verify(suite, KEY20, mac.hex().upper(), question="1")


FULLWIDTH_237653 = "\uff12\uff13\uff17\uff16\uff15\uff13"


@pytest.mark.parametrize(
    "response", ["", "2376530", "23765", FULLWIDTH_237653, "237654", "237653 "]
)
def test_verify_rejects_other_responses(response: str) -> None:
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA1-6:QN08")
    verify(suite, KEY20, "237653", question="00000000")
    with pytest.raises(InvalidToken):
        verify(suite, KEY20, response, question="00000000")


# --- RFC 4226 Appendix D -----------------------------------------------------

HOTP_D = ["755224", "287082", "359152", "969429", "338314",
          "254676", "287922", "162583", "399871", "520489"]  # fmt: skip


@pytest.mark.parametrize(("count", "expected"), list(enumerate(HOTP_D)))
def test_rfc4226_appendix_d(count: int, expected: str) -> None:
    mac = hmac.new(b"12345678901234567890", count.to_bytes(8, "big"), "sha1").digest()
    assert truncate(mac, 6) == expected


def test_truncate_pads_and_checks() -> None:
    # offset 0, 31-bit value 5 -> zero-padded to the requested length
    mac = bytes([0, 0, 0, 5]) + bytes(16)
    assert truncate(mac, 8) == "00000005"
    assert truncate(bytes([0xFF, 0xFF, 0xFF, 0xFF]) + bytes(16), 10) == f"{0x7FFFFFFF:010d}"
    for digits in (-1, 1, 3, 11):
        with pytest.raises(InvalidInput):
            truncate(mac, digits)
    with pytest.raises(InvalidInput):
        truncate(bytes(19), 6)


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("OCRA-2:HOTP-SHA1-6:QN08", id="bad-prefix"),
        pytest.param("ocra-1:HOTP-SHA1-6:QN08", id="lower-case-prefix"),
        pytest.param("HOTP-SHA1-6:QN08", id="two-parts"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08:X", id="four-parts"),
        pytest.param("OCRA-1:HOTP-MD5-6:QN08", id="bad-hash"),
        pytest.param("OCRA-1:TOTP-SHA1-6:QN08", id="bad-function"),
        pytest.param("OCRA-1:HOTP-SHA1-3:QN08", id="digits-3"),
        pytest.param("OCRA-1:HOTP-SHA1-11:QN08", id="digits-11"),
        pytest.param("OCRA-1:HOTP-SHA1-06:QN08", id="digits-leading-zero"),
        pytest.param("OCRA-1:HOTP-SHA1-x:QN08", id="digits-not-number"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QX08", id="unknown-question-format"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN65", id="oversized-question"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN03", id="undersized-question"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN8", id="one-digit-question-length"),
        pytest.param("OCRA-1:HOTP-SHA1-6:C", id="no-question"),
        pytest.param("OCRA-1:HOTP-SHA1-6:", id="empty-data-input"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-C", id="counter-after-question"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-PMD5", id="bad-password-hash"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-S000", id="session-zero"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-S513", id="session-too-long"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-S64", id="session-two-digits"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T60S", id="timestep-60s"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T0H", id="timestep-0h"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T49H", id="timestep-49h"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T1D", id="timestep-unit"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T1M-PSHA1", id="wrong-order"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-PSHA1-PSHA1", id="repeated"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-", id="trailing-dash"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08\n", id="trailing-newline"),
        pytest.param("", id="empty"),
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        OcraSuite.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("suite_text", "inputs"),
    [
        pytest.param("OCRA-1:HOTP-SHA1-6:C-QN08", {"question": "1"}, id="missing-counter"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08", {"question": "1", "counter": 0}, id="extra-counter"
        ),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:C-QN08", {"question": "1", "counter": -1}, id="neg-counter"
        ),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:C-QN08", {"question": "1", "counter": 1 << 64}, id="huge-counter"
        ),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08", {"question": "123456789"}, id="question-too-long"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08", {"question": ""}, id="question-empty"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08", {"question": "12a"}, id="question-not-numeric"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08",
            {"question": "\u0661\u0662\u0663"},
            id="question-arabic-digits",
        ),
        pytest.param("OCRA-1:HOTP-SHA1-6:QH08", {"question": "12g"}, id="question-not-hex"),
        pytest.param("OCRA-1:HOTP-SHA1-6:QA08", {"question": "a b"}, id="question-not-alnum"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QA08",
            {"question": "CLI22220SRV11110"},
            id="mutual-question-without-mutual",
        ),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QA08",
            {"question": "CLI22220SRV111100", "mutual": True},
            id="mutual-question-too-long",
        ),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-PSHA1", {"question": "1"}, id="missing-password"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08-PSHA256",
            {"question": "1", "password": PIN_SHA1},
            id="password-wrong-size",
        ),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08", {"question": "1", "password": PIN_SHA1}, id="extra-password"
        ),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-S004", {"question": "1"}, id="missing-session"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08-S004",
            {"question": "1", "session": b"abc"},
            id="session-wrong-size",
        ),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08", {"question": "1", "session": b"abcd"}, id="extra-session"
        ),
        pytest.param("OCRA-1:HOTP-SHA1-6:QN08-T1M", {"question": "1"}, id="missing-timestamp"),
        pytest.param(
            "OCRA-1:HOTP-SHA1-6:QN08", {"question": "1", "timestamp": 1}, id="extra-timestamp"
        ),
    ],
)
def test_data_input_rejects(suite_text: str, inputs: dict[str, object]) -> None:
    suite = OcraSuite.parse(suite_text)
    with pytest.raises(InvalidInput):
        suite.data_input(**inputs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        generate(suite, KEY20, **inputs)  # type: ignore[arg-type]


def test_generate_rejects_empty_key() -> None:
    with pytest.raises(InvalidInput):
        generate(OcraSuite.parse("OCRA-1:HOTP-SHA1-6:QN08"), b"", question="1")


def test_timestamp_at() -> None:
    suite = OcraSuite.parse("OCRA-1:HOTP-SHA512-8:QN08-T1M")
    # 2008-03-25 12:06:30 UTC, the time of the RFC vectors
    assert suite.timestamp_at(1206446790) == T_RFC
    with pytest.raises(InvalidInput):
        OcraSuite.parse("OCRA-1:HOTP-SHA1-6:QN08").timestamp_at(0)


# --- property ------------------------------------------------------------------

_SUITE_LIKE = st.from_regex(
    r"OCRA-[0-9]:HOTP-SHA(1|256|512|5)-[0-9]{1,2}:(C-)?Q[ANHX][0-9]{1,2}"
    r"(-P(SHA1|SHA256|MD5))?(-S[0-9]{2,4})?(-T[0-9]{1,3}[SMHD])?",
    fullmatch=True,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), _SUITE_LIKE))
def test_parse_only_raises_invalid_input(text: str) -> None:
    try:
        suite = OcraSuite.parse(text)
    except InvalidInput as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert suite.text == text
        assert OcraSuite.parse(suite.text) == suite
