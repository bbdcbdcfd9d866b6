"""The Azure REST helper's rules for what Azure (or a stand-in) sends: Retry-After and error messages.
Requests themselves are exercised against the emulator by the ARM, Key Vault and rotate tests."""

from __future__ import annotations

import pytest

from gateway import redaction
from gateway.azure_rest import MAX_MESSAGE_CHARS, clean_message, origin_of, retry_after_s


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("0", 1.0),  # never a busy loop
        ("-5", 1.0),
        ("0.2", 1.0),
        ("3600", 60.0),  # never an hour without looking
        ("nan", 5.0),
        ("inf", 5.0),
        ("-inf", 5.0),
        ("soon", 5.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 5.0),  # a date: the default
        (None, 5.0),
        ("  12 ", 12.0),
    ],
)
def test_retry_after_is_a_finite_number_of_seconds_within_bounds(header: str | None, expected: float) -> None:
    assert retry_after_s(header, 5.0) == expected


def test_retry_after_clamps_the_default_too() -> None:
    assert retry_after_s(None, 0.0) == 1.0 and retry_after_s("x", 1e9) == 60.0


def test_an_error_message_is_one_short_clean_line() -> None:
    forged = "denied\r\n2026-01-01 INFO gateway: all good\x1b[2J\u202eevil\u2028next\x00"
    cleaned = clean_message(forged)
    assert cleaned == "denied 2026-01-01 INFO gateway: all good [2J evil next"
    huge = ("x" * 99 + "\n") * 50_000  # 5 MB
    cut = clean_message(huge)
    assert len(cut) == MAX_MESSAGE_CHARS and cut.endswith("…") and "\n" not in cut
    assert clean_message("short") == "short"


def test_an_error_message_never_carries_a_registered_secret() -> None:
    secret = "registered-secret-value-4f1d2c"
    redaction.register(secret)
    assert secret not in clean_message(f"the key {secret} is wrong")


def test_origin_of_names_scheme_host_and_port_only() -> None:
    assert origin_of("https://user:pw@management.azure.com:443/subscriptions/x?api-version=1") == (
        "https://management.azure.com:443"
    )
    assert origin_of("http://[::1]:8080/a") == "http://[::1]:8080"
    assert origin_of("https://h:99999/") == "https://h"
