"""PII redaction: what is caught, what is left alone, and that it comes back intact."""

from __future__ import annotations

import pytest

from slm_agent.privacy.redactor import Redaction, Redactor, StreamRestorer


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("email", "john.doe+tag@example.co.uk"),
        ("phone", "+49 30 1234567"),
        ("phone", "+1 (415) 555-2671"),
        ("phone", "+447911123456"),
        ("phone", "(415) 555-2671"),
        ("phone", "415-555-2671"),
        ("phone", "020 7946 0958"),
        ("phone", "06 12 34 56 78"),
        ("card", "4111 1111 1111 1111"),
        ("card", "5500-0000-0000-0004"),
        ("card", "378282246310005"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("iban", "GB82WEST12345698765432"),
        ("iban", "FR14 2004 1010 0505 0001 3M02 606"),
        ("ip", "192.168.1.20"),
        ("ip", "2001:db8::8a2e:370:7334"),
        ("ip", "fe80::1"),
        ("secret", "sk-proj-abcdefghijklmnopqrstuvwx123"),
        ("secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
        ("secret", "AKIAIOSFODNN7EXAMPLE"),
        ("secret", "xoxb-123456789012-abcdefABCDEF"),
        ("secret", "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY"),
    ],
)
def test_detects_each_kind(redactor: Redactor, kind: str, value: str) -> None:
    text = f"Please use {value} for this."
    red = redactor.redact(text)
    assert red.counts == {kind: 1}, red.text
    placeholder = f"<{kind.upper()}_1>"
    assert red.text == f"Please use {placeholder} for this."
    assert red.mapping == {placeholder: value}
    assert redactor.restore(red.text, red.mapping) == text


def test_bearer_token_keeps_the_scheme(redactor: Redactor) -> None:
    red = redactor.redact("Authorization: Bearer abc.def-ghi_jkl123456789")
    assert red.text == "Authorization: Bearer <SECRET_1>"


@pytest.mark.parametrize(
    "text",
    [
        "In 2024 the price was $1,299.99 for 3 units, order 123456789012.",
        "Meeting on 2024-01-15 at 12:30:45, pi is 3.14159, version 1.2.3.",
        "Card-like but Luhn-invalid: 4111 1111 1111 1112 and 4111111111111112.",
        "Luhn-valid but no card issuer: 0000 0000 0000 0000.",
        "IBAN-like but mod-97 invalid: DE89 3704 0044 0532 0130 01 and GB82WEST12345698765433.",
        "Not IPs: 999.1.1.1, 1.2.3, MAC 00:1A:2B:3C:4D:5E, std::vector, a::b.",
        "Commit 3f786850e387550fdab836ed7e6dc881de23001b, uuid 123e4567-e89b-12d3-a456-426614174000.",
        "Path /usr/local/lib/python3.11/site-packages and internationalization_is_long_word.",
        "Population 8 000 000 000 people; ZIP 94103; room 1234; ISBN 978-3-16-148410-0.",
    ],
)
def test_no_false_positives_on_ordinary_text(redactor: Redactor, text: str) -> None:
    red = redactor.redact(text)
    assert red.counts == {}, red.text
    assert red.text == text


def test_placeholders_stable_across_messages_of_one_request(redactor: Redactor) -> None:
    mapping: dict[str, str] = {}
    first = redactor.redact("From ann@example.com to bob@example.com", mapping)
    second = redactor.redact("Reply to bob@example.com, cc carl@example.com", mapping)
    assert first.text == "From <EMAIL_1> to <EMAIL_2>"
    assert second.text == "Reply to <EMAIL_2>, cc <EMAIL_3>"
    assert second.counts == {"email": 2}
    assert mapping == {
        "<EMAIL_1>": "ann@example.com",
        "<EMAIL_2>": "bob@example.com",
        "<EMAIL_3>": "carl@example.com",
    }


def test_counts_per_kind(redactor: Redactor) -> None:
    red = redactor.redact(
        "a@x.io, b@x.io, a@x.io call +33 6 12 34 56 78, card 4242 4242 4242 4242, key sk-abcdefghijklmnop1234"
    )
    assert red.counts == {"email": 3, "phone": 1, "card": 1, "secret": 1}
    assert red.text.count("<EMAIL_1>") == 2


def test_extra_patterns_come_first() -> None:
    redactor = Redactor({"employee id": r"EMP-\d{6}"})
    red = redactor.redact("EMP-123456 wrote to hr@corp.example")
    assert red.text == "<EMPLOYEE_ID_1> wrote to <EMAIL_1>"
    assert red.counts == {"employee id": 1, "email": 1}


def test_redact_json_walks_values_not_keys(redactor: Redactor) -> None:
    value = {"email": "x@y.org", "items": [{"note": "call 415-555-2671"}, 3, None], "n": 2}
    out, mapping, counts = redactor.redact_json(value)
    assert out == {"email": "<EMAIL_1>", "items": [{"note": "call <PHONE_1>"}, 3, None], "n": 2}
    assert counts == {"email": 1, "phone": 1}
    assert mapping == {"<EMAIL_1>": "x@y.org", "<PHONE_1>": "415-555-2671"}
    assert value["email"] == "x@y.org"  # the input is not modified


def test_restore_leaves_unknown_placeholders(redactor: Redactor) -> None:
    assert redactor.restore("<EMAIL_1> and <EMAIL_9>", {"<EMAIL_1>": "a@b.cd"}) == "a@b.cd and <EMAIL_9>"


def test_stream_restorer_handles_a_placeholder_cut_in_two(redactor: Redactor) -> None:
    restorer = StreamRestorer(redactor, {"<EMAIL_1>": "a@b.cd", "<PHONE_12>": "+1 415 555 2671"})
    pieces = ["Write to <EM", "AIL_1> or call <", "PHONE_1", "2> now <", "b>"]
    out = "".join(restorer.feed(p) for p in pieces) + restorer.flush()
    assert out == "Write to a@b.cd or call +1 415 555 2671 now <b>"


def test_redaction_is_a_pydantic_model(redactor: Redactor) -> None:
    red = redactor.redact("x@y.org")
    assert isinstance(red, Redaction)
    assert Redaction.model_validate(red.model_dump()) == red
